"""Backend choice: keyword > use_backend > DLKERNELS_BACKEND > auto, and clear errors; the compiled
extension's facts; the Triton launchers' batch slicing; the CPU backends in forked workers; what
`import dlkernels` imports."""
import os
import subprocess
import sys

import pytest
import torch

import dlkernels
from helpers import DEVICE, KERNEL_BACKENDS
from dlkernels import _dispatch


def test_available_backends_lists_torch_and_cpu_kernels():
    have = dlkernels.available_backends("cpu")
    assert "torch" in have
    assert {"numba", "cpp"} <= set(have)  # the project installs both
    assert set(have) <= set(_dispatch.BACKENDS)


def test_precedence(monkeypatch):
    dev = torch.device("cpu")
    monkeypatch.setenv("DLKERNELS_BACKEND", "numba")
    assert _dispatch.resolve("matmul", None, dev) == "numba"
    with dlkernels.use_backend("torch"):
        assert _dispatch.resolve("matmul", None, dev) == "torch"
        assert _dispatch.resolve("matmul", "cpp", dev) == "cpp"
        with dlkernels.use_backend("auto"):
            assert _dispatch.resolve("matmul", None, dev) == "numba"  # auto in a block: env again
    monkeypatch.delenv("DLKERNELS_BACKEND")
    assert _dispatch.resolve("matmul", None, dev) == _dispatch.CPU_AUTO["matmul"]


def test_auto_on_cpu_is_a_cpu_kernel_backend(monkeypatch):
    monkeypatch.delenv("DLKERNELS_BACKEND", raising=False)
    for family in ("matmul", "depthwise", "separable", "batchnorm"):
        assert _dispatch.resolve(family, None, torch.device("cpu")) in ("numba", "cpp")


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        dlkernels.matmul(torch.randn(2, 2), torch.randn(2, 2), backend="cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        with dlkernels.use_backend("mkl"):
            pass


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1.*Available for cpu tensors"):
        dlkernels.matmul(torch.randn(2, 2), torch.randn(2, 2), backend="triton")


def test_cpu_backend_on_other_device_is_a_clear_error():
    with pytest.raises(RuntimeError, match="runs on CPU tensors only"):
        _dispatch.resolve("matmul", "numba", torch.device("cuda"))


def test_ops_refuse_torch_backend_name():
    with pytest.raises(ValueError, match="backend 'torch' is PyTorch's own ops"):
        torch.ops.dlkernels.matmul(torch.randn(2, 2), torch.randn(2, 2), "torch")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_every_op_family_has_kernels_for_every_backend(backend):
    for family in ("matmul", "depthwise", "separable", "batchnorm"):
        mod = _dispatch.kernels(family, backend, DEVICE)
        assert mod.__name__ == f"dlkernels.{family}.{backend}_impl"


def test_torch_backend_is_pytorch():
    a, b = torch.randn(3, 4), torch.randn(4, 5)
    assert torch.equal(dlkernels.matmul(a, b, backend="torch"), torch.matmul(a, b))


def test_compiled_c_extension_reports_isa():
    from dlkernels import _C
    assert _C.simd() in ("avx512", "avx2-fma", "scalar")


def test_compiled_c_extension_measures_the_arithmetic_peak():
    """The bench's compute limit (dlkernels/bench/machine.py): FLOP/s of register-only multiply-add chains,
    float64 at most about float32's rate (half of it in vector builds), bad arguments refused."""
    from dlkernels import _C
    f32, f64 = _C.fma_peak(False, 0.01, 2), _C.fma_peak(True, 0.01, 2)
    assert 1e8 < f32 < 1e14 and 1e8 < f64 < 1.5 * f32
    with pytest.raises(ValueError, match="fma_peak"):
        _C.fma_peak(False, 0.0, 1)


def test_compiled_c_extension_reads_dlpack_capsules():
    """The kernel modules hand tensors over as DLPack capsules (dlkernels/_cpp_common.py): the C++ reads
    their shape, strides and dtype (checked as numpy arrays' are: the test below runs on both), reads a
    capsule without consuming it, refuses one already consumed, and takes nothing else (no list as an
    output)."""
    from torch.utils.dlpack import to_dlpack as c

    from dlkernels import _C
    x, w, b = torch.randn(2, 3, 5, 5), torch.randn(3, 1, 3, 3), torch.randn(3)
    y = torch.empty(2, 3, 5, 5)
    _C.depthwise_fwd(c(x), c(w), c(b), c(y), 1, 1, 1, 1, 1, 1, False)
    torch.testing.assert_close(y, torch.nn.functional.conv2d(x, w, b, 1, 1, 1, 3))
    a, bb = torch.randn(4, 6), torch.randn(6, 2)
    with pytest.raises(ValueError, match="dlkernels._C: .*out must be a DLPack capsule or a numpy array"):
        _C.mm(c(a), c(bb), None, 1, False, [[0.0, 0.0]] * 4)
    taken = c(y)
    torch.from_dlpack(taken)  # consumes it
    with pytest.raises(TypeError, match="incompatible function arguments"):
        _C.depthwise_fwd(c(x), c(w), c(b), taken, 1, 1, 1, 1, 1, 1, False)


@pytest.mark.parametrize("handed_as", ["numpy", "dlpack"])
def test_compiled_c_extension_refuses_buffers_that_do_not_match(handed_as):
    """The C++ entry points check every array they are handed, numpy array or DLPack capsule, against the
    geometry (a second fence behind the Python validation; see also the im2col test in test_nn.py), with
    the sizes in the message."""
    from torch.utils.dlpack import to_dlpack

    from dlkernels import _C
    v = (lambda t: t.numpy()) if handed_as == "numpy" else to_dlpack
    x, w, b = torch.randn(2, 3, 5, 5), torch.randn(3, 1, 3, 3), torch.randn(3)
    y = torch.empty(2, 3, 5, 5)
    _C.depthwise_fwd(v(x), v(w), v(b), v(y), 1, 1, 1, 1, 1, 1, False)  # the right buffers pass
    x3, m, var = torch.randn(4, 3, 5), torch.randn(3), torch.rand(3) + 0.5
    y3 = torch.empty(4, 3, 5)
    a, bb, out = torch.randn(4, 6), torch.randn(6, 2), torch.empty(4, 2)
    bad = [
        (lambda: _C.depthwise_fwd(v(x), v(w), v(b), v(torch.empty(3, 3, 5, 5)), 1, 1, 1, 1, 1, 1, False),
         "y: size of dimension 0 is 3, expected 2"),
        (lambda: _C.depthwise_fwd(v(x), v(w), v(torch.randn(4)), v(y), 1, 1, 1, 1, 1, 1, False),
         "bias: size of dimension 0 is 4, expected 3"),
        (lambda: _C.depthwise_fwd(v(x), v(w), v(b), v(y), 1, 1, 1, 1, 1, 1, True), "x: not laid out"),
        (lambda: _C.depthwise_fwd(v(x), v(w.double()), v(b), v(y), 1, 1, 1, 1, 1, 1, False), "weight: dtype"),
        (lambda: _C.bn_apply(v(x3), None, v(m), v(var), None, None, 1e-5, "", v(torch.empty(4, 3)), False),
         "y3: expected 3 dimensions, got 2"),
        (lambda: _C.bn_forward_train(v(x3), None, None, None, 1e-5, "relu", v(m), v(var), v(y3),
                                     v(torch.empty(3, dtype=torch.uint8)), False),
         "relu_gate: 3 bytes, expected 16"),
        (lambda: _C.mm(v(a), v(bb), None, 1, False, v(torch.empty(4, 3))), r"out must have shape \(\.\., M, N\)"),
        (lambda: _C.mm(v(a), v(bb), None, 1, False, v(torch.empty(2, 4).t())), "out must be C-contiguous"),
    ]
    for call, msg in bad:
        with pytest.raises(ValueError, match="dlkernels._C: .*" + msg):
            call()


@pytest.mark.parametrize("backend", [b for b in KERNEL_BACKENDS if b == "triton"])
@pytest.mark.parametrize("op", ["depthwise", "separable", "matmul"])
def test_triton_splits_a_batch_beyond_the_grid_limit(backend, op, monkeypatch):
    """Launches with the batch on grid axis 1 or 2 go in slices of MAX_GRID_YZ images (65535 on CUDA,
    2 here, so that 5 images take three launches): forward and gradients equal torch's."""
    from dlkernels import _triton_common

    monkeypatch.setattr(_triton_common, "MAX_GRID_YZ", 2)
    torch.manual_seed(0)
    cl = torch.channels_last
    if op == "matmul":
        inputs = [torch.randn(5, 3, 4, device=DEVICE), torch.randn(5, 4, 6, device=DEVICE)]
        ours, ref = (lambda a, b: dlkernels.matmul(a, b, backend=backend)), torch.matmul
    elif op == "depthwise":
        inputs = [torch.randn(5, 3, 6, 7, device=DEVICE).contiguous(memory_format=cl),
                  torch.randn(6, 1, 3, 3, device=DEVICE)]
        ours = lambda x, w: dlkernels.depthwise_conv2d(x, w, None, 2, 1, backend=backend)  # noqa: E731
        ref = lambda x, w: torch.nn.functional.conv2d(x, w, None, 2, 1, groups=3)  # noqa: E731
    else:
        inputs = [torch.randn(5, 3, 6, 7, device=DEVICE), torch.randn(3, 1, 3, 3, device=DEVICE),
                  torch.randn(4, 3, 1, 1, device=DEVICE)]
        ours = lambda x, dw, pw: dlkernels.separable_conv2d(x, dw, pw, None, 1, 1, backend=backend)  # noqa: E731
        ref = lambda x, dw, pw: torch.nn.functional.conv2d(  # noqa: E731
            torch.nn.functional.conv2d(x, dw, None, 1, 1, groups=3), pw)
    got = [t.clone().requires_grad_() for t in inputs]
    want = [t.clone().requires_grad_() for t in inputs]
    out, expected = ours(*got), ref(*want)
    torch.testing.assert_close(out, expected, rtol=2e-5, atol=2e-5)
    grad = torch.randn_like(expected)
    for a, b in zip(torch.autograd.grad(out, got, grad), torch.autograd.grad(expected, want, grad)):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


def test_a_dtype_the_backend_lacks_names_those_that_take_it():
    x, w = torch.ones(2, 3, dtype=torch.bfloat16), torch.ones(4, 3, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=r"backend 'cpp' computes in float32, float64; got torch.bfloat16 "
                                        r"\(backend .*'torch' takes it\)"):
        dlkernels.linear(x, w, backend="cpp")
    assert torch.equal(dlkernels.linear(x, w, backend="torch"), torch.nn.functional.linear(x, w))


_FORKED_WORKERS = """
import sys, torch
import dlkernels
from torch.utils.data import DataLoader, Dataset
backend, parent = sys.argv[1], sys.argv[2]
w = torch.randn(8, 1, 3, 3, generator=torch.Generator().manual_seed(0))
def item(i):
    x = torch.randn(4, 8, 32, 32, generator=torch.Generator().manual_seed(i))
    return dlkernels.depthwise_conv2d(x, w, padding=1, backend=backend).sum()
class Items(Dataset):
    def __len__(self): return 4
    def __getitem__(self, i): return item(i)
big, wb = torch.randn(8, 64, 56, 56), torch.randn(64, 1, 3, 3)  # the parent's OpenMP threads start
torch.nn.functional.conv2d(big, wb, groups=64)
dlkernels.depthwise_conv2d(big, wb, backend="cpp")
if parent == "imported":  # Numba imported, its threads not started
    import dlkernels.depthwise.numba_impl
if parent == "ran":
    dlkernels.depthwise_conv2d(big, wb, backend="numba")
try:
    got = list(DataLoader(Items(), batch_size=None, num_workers=2, timeout=60, multiprocessing_context="fork"))
except RuntimeError as e:
    print("ERROR", e)
else:
    print("OK" if all(torch.equal(a, item(i)) for i, a in enumerate(got)) else "MISMATCH")
"""


@pytest.mark.parametrize("backend,parent", [("cpp", "ran"), ("numba", "untouched"), ("numba", "imported"),
                                            ("numba", "ran")])
def test_cpu_backends_in_forked_dataloader_workers(backend, parent):
    """A DataLoader's forked workers, after the parent's OpenMP threads ran: the cpp kernels run there as
    torch's ops do (on the one thread DataLoader sets); the numba backend's first kernel hung there (GNU
    OpenMP after fork) and now runs on Numba's workqueue layer, or, where the parent had started Numba's
    OpenMP threads (which Numba terminates a child for), raises an error that says what to do."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    run = subprocess.run([sys.executable, "-c", _FORKED_WORKERS, backend, parent],
                         capture_output=True, text=True, timeout=300, env=env)
    out = run.stdout.strip() or run.stderr[-2000:]
    if backend == "numba" and parent == "ran":
        assert out.startswith("ERROR") and "multiprocessing_context='spawn'" in out, out
    else:
        assert out == "OK", out


def test_resolve_is_marked_constant_as_torch_compiler_marks_a_function():
    """_dispatch marks resolve itself where torch._dynamo is not imported yet (importing it is 40 % of
    `import dlkernels`): the mark must be what torch.compiler.assume_constant_result sets."""
    def f():
        return 0

    torch.compiler.assume_constant_result(f)
    assert vars(f) == {"_dynamo_marked_constant": True}
    assert _dispatch.resolve._dynamo_marked_constant is True


def test_import_leaves_torch_dynamo_unimported():
    code = "import sys, dlkernels; print('torch._dynamo' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120).stdout.strip() == "False"
