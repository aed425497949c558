"""Compile every Triton kernel a GPU benchmark run will launch, in parallel, before the run.

Autotuning compiles each config of each kernel for each new specialisation one after another,
inside the timing process: for the depthwise family alone that is ~20 configs per case, 1-3 s of
CPU each. Here a pool of processes does that work up front. Each worker builds a case's problem
on the CPU and runs the triton contender's forward (and backward) with Triton's launches turned
into warm-ups (compile, never launch) for the GPU's target, every autotune config of every
kernel compiled. The binaries land in Triton's on-disk cache, where the timing process finds
them; what it then tunes is only timing.

A worker sees the GPU's SM count (the launchers size their grids from it, and a grid argument of 1
would specialise a kernel differently; _triton_common.HOST_PROGRAMS), but no GPU: it must be
spawned, not forked, from a process that has initialised CUDA.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import time
import traceback

import torch

from . import cases as C


def _fake_gpu(arch: int, programs: int) -> None:
    """Make this process's Triton compile for CUDA ``arch`` without a GPU, launching nothing."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    class CompileOnlyDriver:
        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

    driver.set_active(CompileOnlyDriver())
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        return run(self, *args, grid=grid, warmup=True, **kwargs)

    def every_config(self, *args, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        for config in self.prune_configs(kwargs):
            self.fn.run(*args, **kwargs, **config.all_kwargs())
        self.nargs = None

    JITFunction.run = compile_only
    Autotuner.run = every_config

    from .. import _dispatch, _triton_common
    from ..separable import triton_impl as separable
    _dispatch._runs_on = lambda name, device_type: True  # triton on CPU tensors, not interpreted
    _triton_common.HOST_PROGRAMS = programs  # grids sized for the GPU
    # the separable forward's path choice runs both paths (compiling both) and then times them,
    # which needs the GPU: every path times alike here
    separable._time_path = lambda run: 0.0


def _compile_case(task) -> tuple[str, float, str]:
    from .measure import _prepare_grads, call_once, case_seed
    case, dtype = task
    t0 = time.perf_counter()
    try:
        gen = torch.Generator().manual_seed(case_seed(case, dtype))
        problem = case.build(case, dtype, torch.device("cpu"), gen)
        fwd_bwd = case.passes == "fwd+bwd"
        _prepare_grads(problem, fwd_bwd)
        call_once(problem, lambda *a: problem.dl("triton", *a), fwd_bwd)
        err = ""
    except Exception:  # noqa: BLE001 - reported; the timing run shows the same failure in context
        err = traceback.format_exc(limit=-4)
    return f"{case.id} {str(dtype).removeprefix('torch.')}", time.perf_counter() - t0, err


def _matches(keyword: str, test_id: str) -> bool:
    """Whether pytest's -k expression selects the test named test_id (case-insensitive substrings)."""
    if not keyword:
        return True
    from _pytest.mark.expression import Expression
    name = test_id.lower()
    return Expression.compile(keyword).evaluate(lambda sub, **_: sub.lower() in name)


def run(selected: list[C.Case], dtypes: list[torch.dtype], device: torch.device, workers: int = 0,
        keyword: str = "") -> int:
    """Compile the triton contender's kernels of every (case, dtype) that the -k expression
    ``keyword`` selects, if any; the number that failed."""
    major, minor = torch.cuda.get_device_capability(device)
    programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    tasks = [(case, dt) for case in selected for dt in dtypes if case.op != "model"
             and _matches(keyword, f"{case.id}-{str(dt).removeprefix('torch.')}-triton")]
    if not tasks:
        return 0
    # the slowest (most kernels) first, so the pool does not end waiting on one of them
    tasks.sort(key=lambda t: (t[0].passes != "fwd+bwd", t[0].op != "separable_conv2d"))
    workers = workers or max(1, min(len(tasks), (os.cpu_count() or 2) - 1))
    t0 = time.perf_counter()
    failed = 0
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=_fake_gpu, initargs=(major * 10 + minor, programs)) as pool:
        for name, secs, err in pool.imap_unordered(_compile_case, tasks):
            if err:
                failed += 1
                print(f"precompile: {name}: FAILED\n{err}", flush=True)
    print(f"precompile: {len(tasks)} cases x triton compiled for sm_{major}{minor} by {workers} processes "
          f"in {time.perf_counter() - t0:.0f} s ({failed} failed)", flush=True)
    return failed
