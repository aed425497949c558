"""The bench command itself: a tiny run writes the JSON, markdown and PNG files with the expected
cases, and a backend that answers wrong makes the run fail loudly (shown FAILED, not timed).

The kernels are stood in for by the torch reference (right answers) or by garbage (wrong ones),
so these tests check the bench, not the kernels, and take seconds."""
import json
import os
import types

import pytest
import torch

import dlkernels
from dlkernels import _dispatch
from dlkernels.bench import cases, main
from dlkernels.matmul import reference as mm_ref

MATMUL_TINY = [c.id for c in cases.select("tiny", ["matmul"])]


def _patch_kernels(monkeypatch, behaviour: dict):
    """matmul kernels per backend: "right" (the torch reference), "wrong" (garbage), "missing"."""
    real = _dispatch.kernels

    def kernels(family, backend, device):
        how = behaviour.get(backend) if family == "matmul" else None
        if how is None:
            return real(family, backend, device)
        if how == "missing":
            raise ModuleNotFoundError(f"No module named 'dlkernels.matmul.{backend}_impl'")
        if how == "right":
            return mm_ref
        return types.SimpleNamespace(
            mm=lambda a, b, bias, bias_dim, act: torch.full_like(mm_ref.mm(a, b, bias, bias_dim, act), 7.0),
            bias_act_backward=mm_ref.bias_act_backward)
    monkeypatch.setattr(_dispatch, "kernels", kernels)


def _run(tmp_path, backends: str):
    rc = main(["--preset", "tiny", "--ops", "matmul", "--compile", "none", "--backends", backends,
               "--out", str(tmp_path), "--no-progress"])
    return rc, json.loads((tmp_path / "benchmark.json").read_text())["dlkernels"]


@pytest.fixture(autouse=True)
def _cpu_backends():
    if not {"numba", "cpp"} <= set(dlkernels.available_backends("cpu")):
        pytest.skip("the bench's CPU contenders need numba and the C++ extension installed")


def test_case_table_covers_every_op_and_preset():
    ids = [c.id for c in cases.CASES]
    assert len(ids) == len(set(ids))
    for preset, tier in cases.PRESETS.items():
        chosen = cases.select(preset)
        assert all(c.tier <= tier for c in chosen)
        ops = {c.op for c in chosen}
        assert {"matmul", "linear", "depthwise_conv2d", "pointwise_conv2d", "separable_conv2d",
                "batch_norm_residual"} <= ops, preset
    for op in ("matmul", "linear", "depthwise_conv2d", "pointwise_conv2d", "separable_conv2d",
               "batch_norm_residual"):
        assert any(c.op == op and c.bound == "overhead" and c.tier == 0 for c in cases.CASES), op
    # the layer shapes of the op issues are in the default preset, both passes and memory formats
    default = {c.id for c in cases.select("default")}
    assert "depthwise_conv2d-xception-middle-8x728x19x19k3s1-fwd+bwd-channels_last" in default
    assert "batch_norm_residual-resnet50-stage1-32x256x56x56+resrelu-fwd+bwd-nchw-train" in default
    assert "matmul-square-1024^3-fwd" in default


def test_tiny_run_writes_report_with_expected_cases(tmp_path, monkeypatch):
    _patch_kernels(monkeypatch, {"numba": "right", "cpp": "right"})
    rc, meta = _run(tmp_path, "numba,cpp")
    assert rc == 0
    recs = {(r["case"], r["contender"]): r for r in meta["records"]}
    assert set(recs) == {(c, who) for c in MATMUL_TINY for who in ("torch", "numba", "cpp")}
    for r in recs.values():
        assert r["status"] == "ok", r
        assert r["max_err"] < 1e-5 and len(r["samples"]) >= 2 and all(s > 0 for s in r["samples"])
    assert meta["limits"]["copy_bytes_per_s"] > 0 and meta["limits"]["matmul_flops"]["float32"] > 0
    assert meta["limits"]["peak_flops"]["float32"] > 0
    assert meta["machine"]["versions"]["torch"] == torch.__version__
    # pytest-benchmark's own entries hold the interleaved samples
    raw = json.loads((tmp_path / "benchmark.json").read_text())
    assert len(raw["benchmarks"]) == len(recs)
    md = (tmp_path / "report.md").read_text()
    for cid in MATMUL_TINY:
        assert cid in md
    assert "copy bandwidth" in md and "arithmetic peak" in md and "torch 2" in md and "## Not timed" not in md
    for png in ("speedup.png", "limits.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_wrong_answer_fails_loudly_and_is_not_timed(tmp_path, monkeypatch, capsys):
    _patch_kernels(monkeypatch, {"numba": "right", "cpp": "wrong"})
    rc, meta = _run(tmp_path, "numba,cpp")
    assert rc == 1
    for r in meta["records"]:
        if r["contender"] == "cpp":
            assert r["status"] == "FAILED" and r["samples"] == [] and "tolerance" in r["reason"]
        else:
            assert r["status"] == "ok" and r["samples"]
    assert "FAILED" in capsys.readouterr().err
    md = (tmp_path / "report.md").read_text()
    assert "**FAILED** cpp on" in md


def test_missing_kernel_module_is_unavailable_and_run_goes_on(tmp_path, monkeypatch):
    _patch_kernels(monkeypatch, {"numba": "missing", "cpp": "right"})
    rc, meta = _run(tmp_path, "numba,cpp")
    assert rc == 0
    status = {(r["case"], r["contender"]): r["status"] for r in meta["records"]}
    assert all(s == "unavailable" for (c, who), s in status.items() if who == "numba")
    assert all(s == "ok" for (c, who), s in status.items() if who != "numba")
    assert "n/a" in (tmp_path / "report.md").read_text()


PRECOMPILE_SCRIPT = """
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
os.environ["DLKERNELS_TRITON_AUTOTUNE"] = "0"  # one config per kernel: seconds, not minutes
import torch
from dlkernels.bench import cases, precompile
precompile._fake_gpu(90, 528)
os.environ["DLKERNELS_TRITON_AUTOTUNE"] = "1"  # tuned calls: the separable path choice runs
failed = 0
for case in cases.select("tiny", ["separable"]):
    name, _, err = precompile._compile_case((case, torch.float16))
    print(name, "FAILED" if err else "ok", err, flush=True)
    failed += bool(err)
sys.exit(failed)
"""


def test_precompile_compiles_without_gpu(tmp_path):
    # The GPU bench compiles every Triton kernel for the GPU's target in CPU-only workers first
    # (bench/precompile.py). Tuned, the separable forward times its two paths, which such a worker
    # cannot: its stand-in timer must let both compile (a CUDA-graph timer failed every case).
    import subprocess
    import sys
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", PRECOMPILE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count(" ok") == len(cases.select("tiny", ["separable"])) > 0


def test_compute_bound_cases_are_held_to_the_arithmetic_peak():
    """A compute-bound case's limit is the measured arithmetic peak of its dtype; reports written before
    it was measured (and GPU runs) fall back to the large torch.matmul's FLOP/s."""
    from dlkernels.bench import report
    rec = {"bound": "compute", "flops": 4e9, "dtype": "float32", "samples": [0.02, 0.02, 0.02], "status": "ok"}
    lim = {"copy_bytes_per_s": 40e9, "matmul_flops": {"float32": 250e9}, "peak_flops": {"float32": 400e9}}
    assert report.fraction(rec, lim) == pytest.approx(0.5)
    del lim["peak_flops"]
    assert report.fraction(rec, lim) == pytest.approx(0.8)


def test_copy_limit_is_the_best_of_the_runs_measurements(monkeypatch):
    """A shared host's bandwidth moves within minutes: the copy is timed again before a memory-bound
    case once plugin.COPY_EVERY_S has passed (not before other cases, nor sooner), and the limit is
    the best measurement, so that no pass reads as over 100 % of it because the first was slow."""
    from dlkernels.bench import machine, plugin
    lim = machine.Limits(copy_bytes_per_s=40e9, copy_size_bytes=1 << 28, matmul_flops={}, matmul_size=8,
                         copy_samples=[40e9])
    lim.add_copy(75e9)
    lim.add_copy(50e9)
    assert lim.copy_bytes_per_s == 75e9 and lim.copy_samples == [40e9, 75e9, 50e9]
    calls = []
    monkeypatch.setattr(machine, "copy_rate", lambda *a, **k: (calls.append(a) or 90e9, 1 << 28))
    st = types.SimpleNamespace(limits=lim, copy_at=0.0, progress=None, device=torch.device("cpu"),
                               info=types.SimpleNamespace(llc_bytes=1 << 25), preset="default")
    memory = next(c for c in cases.CASES if c.bound == "memory")
    other = next(c for c in cases.CASES if c.bound != "memory")
    plugin._recheck_copy(st, other)
    assert not calls
    plugin._recheck_copy(st, memory)
    assert len(calls) == 1 and lim.copy_bytes_per_s == 90e9 and lim.copy_samples[-1] == 90e9
    plugin._recheck_copy(st, memory)  # within COPY_EVERY_S of the last
    assert len(calls) == 1
