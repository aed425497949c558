"""The C++ extension's portable build (CMake option DLKERNELS_PORTABLE=ON: baseline x86-64, the
scalar and SSE paths instead of -march=native) still compiles and computes: make test builds only the
native one, and an AVX-only construct once broke the portable build unnoticed. The check runs the
depthwise forward and batch norm's streamed evaluation (its plain-store fallback without AVX)."""
import subprocess
import sys
from pathlib import Path

import pybind11

ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh process, so that the portable module never meets the native dlkernels._C.
CHECK = """
import importlib.util, sys
import numpy as np, torch, torch.nn.functional as F
spec = importlib.util.spec_from_file_location("_C", sys.argv[1])
C = importlib.util.module_from_spec(spec)
spec.loader.exec_module(C)
assert C.simd() == "scalar", C.simd()
torch.manual_seed(0)
# (NCHW rows of 16 doubles or more take the fixed-tap 3x3 kernels, stride 1 and 2)
for (n, c, h, w_), s, cl in [((2, 37, 13, 11), 1, False), ((2, 37, 13, 11), 1, True), ((1, 3, 20, 40), 1, False),
                             ((1, 3, 21, 81), 2, False)]:
    x = torch.randn(n, c, h, w_, dtype=torch.float64)
    w, b = torch.randn(c, 1, 3, 3, dtype=torch.float64), torch.randn(c, dtype=torch.float64)
    fmt = torch.channels_last if cl else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    ref = F.conv2d(x, w, b, s, 1, 1, c)
    y = torch.empty(ref.shape, dtype=torch.float64).contiguous(memory_format=fmt)
    C.depthwise_fwd(x.numpy(), w.numpy(), b.numpy(), y.numpy(), s, s, 1, 1, 1, 1, cl)
    err = (y - ref).abs().max().item()
    assert err < 1e-12, (x.shape, s, cl, err)
# batch norm evaluation with streamed outputs (a 1-byte LLC): NCHW planes of 1517 that leave partial lines
# at their edges, channels-last rows of 70, planes of 7x7 (through the block buffer)
import os
os.environ["DLKERNELS_LLC_BYTES"] = "1"
for shape, cl in [((2, 3, 37, 41), False), ((2, 70, 5, 3), True), ((3, 5, 7, 7), False)]:
    c = shape[1]
    x, r = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    m, v = torch.randn(c, dtype=torch.float64), torch.rand(c, dtype=torch.float64) + 0.5
    w, b = torch.randn(c, dtype=torch.float64), torch.randn(c, dtype=torch.float64)
    ref = torch.relu(F.batch_norm(x, m, v, w, b, False, 0.1, 1e-5) + r)
    fmt = torch.channels_last if cl else torch.contiguous_format
    x, r = x.contiguous(memory_format=fmt), r.contiguous(memory_format=fmt)
    y = torch.empty_like(x)
    as3 = lambda t: t.view(shape[0], c, -1)  # the (N, C, S) view the op hands over, in either layout
    C.bn_apply(as3(x).numpy(), as3(r).numpy(), m.numpy(), v.numpy(), w.numpy(), b.numpy(), 1e-5, "relu",
               as3(y).numpy(), cl)
    err = (y - ref).abs().max().item()
    assert err < 1e-12, (shape, cl, err)
print("ok")
"""


def _cmake() -> str:
    local = Path(sys.executable).parent / "cmake"  # requirements.txt installs it into the venv
    return str(local) if local.exists() else "cmake"


def test_portable_build(tmp_path):
    build, out = tmp_path / "build", tmp_path / "out"
    build.mkdir()
    configure = [_cmake(), str(ROOT), f"-DPython_EXECUTABLE={sys.executable}",
                 f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", "-DCMAKE_BUILD_TYPE=Release",
                 "-DDLKERNELS_PORTABLE=ON", f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out}"]
    for cmd in (configure, [_cmake(), "--build", ".", "-j", "2"]):
        done = subprocess.run(cmd, cwd=build, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    (module,) = out.glob("_C*.so")
    done = subprocess.run([sys.executable, "-c", CHECK, str(module)], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr
