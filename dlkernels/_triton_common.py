"""Settings and small helpers shared by every Triton kernel module: how a kernel is launched and
how it is tuned.

Launching. Kernels are launched directly (``kernel[grid](...)``), not through
torch.library.wrap_triton: the ops are opaque custom ops to torch.compile (it sees their fake
implementations, never these launches), and in eager mode wrap_triton runs its tracing machinery on
every call. Measured on an H200 (2026-11-26): a tiny depthwise conv took 680 us a call through it
(eager conv: 15 us), and an autotuned kernel with a config-pruning hook was re-created, hence
re-tuned, on every call (1 s per 8x8x8 matmul).

Tuning. On a GPU each kernel is autotuned over its config list, timed with short do_bench runs (5 ms
warm-up, 25 ms of repeats, not the default 25/100 ms: a lent GPU's minutes go to timing the cases,
and the bench tunes ~20 configs per depthwise case). ``DLKERNELS_TRITON_AUTOTUNE=0`` runs each
kernel's default config instead, untimed: the GPU tests set it, because tuning every test shape
would compile and time every config of every kernel. Under TRITON_INTERPRET=1 (CPU) no kernel is
tuned either; each runs its interpreter config, small enough that edge masks are exercised by small
test shapes.
"""
from __future__ import annotations

import functools
import math
import os

import torch
import triton

from ._dispatch import triton_interpreting

INTERPRET = triton_interpreting()

# grid axes 1 and 2 are limited to 65535 programs on CUDA
MAX_GRID_YZ = 65535


def batch_slices(n: int) -> list[slice]:
    """A batch of n in the slices that a launch with the batch on grid axis 1 or 2 can take
    (MAX_GRID_YZ each): a launch of 65536 images and more failed on CUDA (invalid argument)."""
    return [slice(b0, min(n, b0 + MAX_GRID_YZ)) for b0 in range(0, n, MAX_GRID_YZ)]


def autotuning() -> bool:
    return not INTERPRET and os.environ.get("DLKERNELS_TRITON_AUTOTUNE", "1") not in ("", "0")


def launch(kernel, grid):
    """``kernel[grid]``: one place to change how every kernel is launched. The grid is checked against
    CUDA's limit on axes 1 and 2 (MAX_GRID_YZ), here rather than by the driver's "invalid argument",
    and under the interpreter too, where no limit holds: a launcher that takes the batch on those axes
    must slice it (batch_slices)."""
    def checked(meta):
        g = grid(meta) if callable(grid) else grid
        if any(v > MAX_GRID_YZ for v in g[1:]):
            raise RuntimeError(f"dlkernels: the Triton grid {tuple(g)} of {kernel} has more than "
                               f"{MAX_GRID_YZ} programs on axis 1 or 2")
        return g
    return kernel[checked]


def quick_bench(kernel_call, quantiles=None):
    """Milliseconds per call, timed briefly (the autotuners' timer)."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


def graph_bench(fn, reps: int = 20) -> float:
    """Milliseconds of GPU work per call of fn, its host cost excluded: fn captured once in a CUDA
    graph, then replayed. For choosing between kernel sequences that launch different numbers of
    kernels, where do_bench's eager calls time the host instead: Xception's exit separable conv
    (channels-last) timed 0.20 ms in two passes whose kernels take 69 us, against 0.33 ms fused,
    and another timing of the same shape chose the fused kernel, 316 us in the bench (H100,
    2026-11-26). fn must have run already (its kernels tuned: tuning cannot be captured)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # a warm call on a side stream before capture, as torch.cuda.graph asks
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def autotune(fn, configs, key, default=None, **autotune_kw):
    """``fn`` autotuned over ``configs`` (or, with tuning off, run with ``default``, else the first
    config, as the only one)."""
    if not autotuning():
        configs = [default or configs[0]]
    return triton.autotune(configs=configs, key=key, do_bench=quick_bench, **autotune_kw)(fn)


def cfg(num_warps: int = 4, num_stages: int = 2, **meta) -> triton.Config:
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


class TunedKernel:
    """A @triton.jit kernel: autotuned over ``configs`` on a GPU (untuned: ``default``, else the
    first config), run with the fixed ``interpret_meta`` under the interpreter (tuning there only
    multiplies the already slow run time)."""

    def __init__(self, fn, configs, key, interpret_meta, default=None, **autotune_kw):
        if INTERPRET:
            self.fn, self.meta = fn, dict(interpret_meta)
        else:
            self.fn, self.meta = autotune(fn, configs, key, default, **autotune_kw), {}

    def __call__(self, grid, *args, **kwargs):
        return launch(self.fn, grid)(*args, **kwargs, **self.meta)


# Program-count target for tensors that are not on a GPU: under the interpreter every program is a
# Python-level loop, so a handful. precompile.py, compiling on CPU tensors for a GPU it stands in
# for, sets the GPU's count here so that the launchers size their grids as they will there.
HOST_PROGRAMS = 4


@functools.cache
def _gpu_programs(device_index: int) -> int:
    return 4 * torch.cuda.get_device_properties(device_index).multi_processor_count


def target_programs(device: torch.device) -> int:
    """Enough programs for a few waves over the GPU's SMs."""
    if INTERPRET or device.type != "cuda":
        return HOST_PROGRAMS
    return _gpu_programs(device.index)


def cdiv(a: int, b: int) -> int:
    """Ceiling division of host integers (grids, splits). triton.cdiv is a constexpr_function (in
    triton 3.6 as in 3.9), whose call wrapper took about 2.6 us a call with triton 3.9 on the
    development CPU: the split-K choice alone, ten of them, cost 31 us of every matmul call (4.7 us
    with this)."""
    return -(-a // b)


def next_pow2(v: int) -> int:
    """The smallest power of two >= v (v >= 1), for host-side block sizes: triton.next_power_of_2 is
    a constexpr_function too (about 1.4 us a call with triton 3.9 on the development CPU)."""
    return 1 << (v - 1).bit_length()


def align_of(*values: int) -> int:
    """The largest power of two up to 16 dividing every value (strides, channel counts): the
    kernels' ALIGN_*/COUNT_* hints (tl.multiple_of, mask bounds written as (C // A) * A). Triton
    itself only marks an integer argument divisible by 16, so at 728 channels (8 * 91) a
    channels-last pixel's 8-element alignment was unknown to the compiler and every load was split
    into scalar ones (0.56x eager on an H200, 2026-11-26)."""
    g = 0
    for v in values:
        g = math.gcd(g, int(v))
    a = 1
    while a < 16 and g % (2 * a) == 0:
        a *= 2
    return a
