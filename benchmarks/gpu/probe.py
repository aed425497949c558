"""Diagnostics for a lent GPU, beside the benchmark: where the time of a case goes.

    python benchmarks/gpu/probe.py OUT_DIR [-k EXPR]

For each selected bench case (bf16, the GPU batch) it writes to OUT_DIR/probe.txt:
- the CUDA kernels of one triton call and of one eager call (torch.profiler, per-kernel device
  time), so a slow case shows which of its kernels is slow and how many small ones it launches;
- the autotuner's choice for every Triton kernel the call ran, and the separable path chosen.
Then the per-call host cost of a tiny call of each op (what a loop without CUDA graphs pays),
with a cProfile of the depthwise call's Python path.

Run it after the bench: the bench's precompile has filled Triton's disk cache, so the autotuning
here only times.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time

import torch
import torch.nn.functional as F

import dlkernels
from dlkernels.bench import cases as C
from dlkernels.bench import precompile
from dlkernels.bench.measure import _prepare_grads, call_once

DEFAULT_K = ("(xception and entry and 128 and depthwise) or (mobilenetv2 and 144 and k5 and depthwise and channels_last)"
             " or (resnet50 and (stage1 or stage4) and batch_norm)"
             " or (separable and fwd- and (middle or (144 and k5)))")


def _tuned_kernels():
    """(name, TunedKernel/autotuner) of every module-level tuned Triton kernel."""
    from dlkernels import _triton_common
    import importlib
    out = []
    for mod_name in ("depthwise", "separable", "batchnorm", "matmul"):
        mod = importlib.import_module(f"dlkernels.{mod_name}.triton_impl")
        for name, obj in vars(mod).items():
            fn = getattr(obj, "fn", obj) if isinstance(obj, _triton_common.TunedKernel) else obj
            if hasattr(fn, "cache") and hasattr(fn, "configs"):
                out.append((f"{mod_name}.{name}", fn))
    return out


def profile_case(case, out, dtype=torch.bfloat16):
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    problem = case.build(case, dtype, dev, gen)
    fwd_bwd = case.passes == "fwd+bwd"
    _prepare_grads(problem, fwd_bwd)
    print(f"\n### {case.id}", file=out, flush=True)
    for name in ("triton", "eager"):
        fn = problem.eager if name == "eager" else (lambda *a: problem.dl(name, *a))
        for _ in range(2):  # tune, then warm
            call_once(problem, fn, fwd_bwd)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                call_once(problem, fn, fwd_bwd)
            torch.cuda.synchronize()
        rows = [e for e in prof.key_averages() if e.device_time_total > 0]
        rows.sort(key=lambda e: -e.device_time_total)
        total = sum(e.device_time_total for e in rows) / 3
        print(f"{name}: {total:.1f} us of kernels per call, {sum(e.count for e in rows) / 3:.0f} kernels",
              file=out)
        for e in rows[:12]:
            print(f"   {e.device_time_total / 3:9.1f} us  x{e.count // 3:<3d} {e.key[:110]}", file=out)
    out.flush()


def report_tuning(out):
    print("\n### autotuner choices", file=out)
    for name, tuner in _tuned_kernels():
        for key, config in tuner.cache.items():
            print(f"{name} {key} -> {config}", file=out)
    from dlkernels.separable import triton_impl as sep
    for key, path in sep._chosen.items():
        print(f"separable path {key} -> {path} (ms: {sep._timings.get(key)})", file=out)
    out.flush()


def host_cost(out, calls=300):
    dev = torch.device("cuda")
    x = torch.randn(2, 8, 8, 8, device=dev, dtype=torch.bfloat16)
    xc = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(8, 1, 3, 3, device=dev, dtype=torch.bfloat16)
    pw = torch.randn(8, 8, 1, 1, device=dev, dtype=torch.bfloat16)
    rm, rv = torch.zeros(8, device=dev), torch.ones(8, device=dev)
    g, b = torch.ones(8, device=dev), torch.zeros(8, device=dev)
    a = torch.randn(16, 16, device=dev, dtype=torch.bfloat16)
    runs = {
        "depthwise triton": lambda: dlkernels.depthwise_conv2d(xc, w, None, 1, 1, backend="triton"),
        "depthwise eager": lambda: F.conv2d(xc, w, None, 1, 1, groups=8),
        "separable triton": lambda: dlkernels.separable_conv2d(xc, w, pw, None, 1, 1, backend="triton"),
        "bn eval triton": lambda: dlkernels.batch_norm_residual(x, x, rm, rv, g, b, False, activation="relu",
                                                               backend="triton"),
        "bn eval eager": lambda: F.relu(F.batch_norm(x, rm, rv, g, b, False) + x),
        "matmul triton": lambda: dlkernels.matmul(a, a, backend="triton"),
        "matmul eager": lambda: a @ a,
    }
    print("\n### host cost per call (tiny tensors, no CUDA graph)", file=out)
    for name, fn in runs.items():
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        print(f"{name:20s} {(time.perf_counter() - t0) / calls * 1e6:8.1f} us", file=out)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        runs["depthwise triton"]()
    prof.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
    print(s.getvalue(), file=out)
    out.flush()


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("-k", default=DEFAULT_K)
    args = ap.parse_args(argv)
    selected = [C.for_device(c, "cuda") for c in C.select("default", None, "cuda")]
    selected = [c for c in selected if c.op != "model"
                and precompile._matches(args.k, f"{c.id}-bfloat16-triton")]
    with open(f"{args.out_dir}/probe.txt", "w") as out:
        print(torch.cuda.get_device_name(), torch.__version__, file=out)
        host_cost(out)
        for case in selected:
            t0 = time.perf_counter()
            try:
                profile_case(case, out)
            except Exception as e:  # noqa: BLE001 - a probe reports and goes on
                print(f"FAILED {case.id}: {e!r}", file=out)
            print(f"{case.id}: {time.perf_counter() - t0:.1f} s", flush=True)
        report_tuning(out)


if __name__ == "__main__":
    sys.exit(main())
