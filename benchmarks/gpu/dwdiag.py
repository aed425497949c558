"""What bounds the Triton depthwise forward (channels_last, bf16) at one layer shape: every tuner
config's time, or one config alone, run a few times for a profiler (ncu) to read.

    python benchmarks/gpu/dwdiag.py timings CASE        # each config's do_bench time, sorted
    python benchmarks/gpu/dwdiag.py one CASE INDEX      # config INDEX of the forward list, alone
    ncu --clock-control none -k regex:_dw_fwd --launch-skip 2 --launch-count 1 \\
        python benchmarks/gpu/dwdiag.py one CASE INDEX

CASE: one of CASES (the bench's stride-1 layer shapes, batch 64). The copy floor of each case is
printed beside the times: input read once, output written once, at the card's copy bandwidth.
"""
import sys

import torch

from dlkernels._triton_common import TunedKernel, graph_bench
from dlkernels.bench import machine
from dlkernels.depthwise import triton_impl as dw

CASES = {"mnv2": (64, 144, 56, 56, 3), "middle": (64, 728, 19, 19, 3), "entry": (64, 128, 75, 75, 3),
         "exit": (64, 1024, 10, 10, 3), "mnv2k5": (64, 144, 56, 56, 5)}


def operands(case):
    n, c, h, w, k = CASES[case]
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, c, h, w, device="cuda", generator=g).to(torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c, 1, k, k, device="cuda", generator=g).to(torch.bfloat16)
    return x, weight, (h - k + 1 + 2 * (k // 2), w - k + 1 + 2 * (k // 2)), k // 2


def forward(x, weight, out_hw, pad):
    return dw.depthwise_fwd(x, weight, None, (1, 1), (pad, pad), (1, 1), out_hw)


def copy_floor_us(x):
    """Input read once and output written once at the bench's copy rate (read + write)."""
    rate, _ = machine.copy_rate(x.device, torch.cuda.get_device_properties(x.device).L2_cache_size, quick=True)
    return 2 * x.numel() * x.element_size() / rate * 1e6


def timings(case):
    x, weight, out_hw, pad = operands(case)
    forward(x, weight, out_hw, pad)
    tuner = dw._dw_fwd_cl.fn
    print(f"{case}: floor {copy_floor_us(x):.1f} us; chosen {tuner.best_config}")
    ref = torch.nn.functional.conv2d(x.double(), weight.double(), padding=pad, groups=x.shape[1])
    print(f"  max abs err {(forward(x, weight, out_hw, pad).double() - ref).abs().max().item():.3g}")
    index = {str(c): i for i, c in enumerate(dw._FWD_CONFIGS_CL)}
    for config, t in sorted(tuner.configs_timings.items(), key=lambda kv: kv[1]):
        print(f"  [{index.get(str(config), '?'):>2}] {(t[0] if isinstance(t, (list, tuple)) else t) * 1e3:7.1f} us  {config}")
    print(f"  chosen, graph-timed: {graph_bench(lambda: forward(x, weight, out_hw, pad)) * 1e3:.1f} us")


def one(case, i):
    config = dw._FWD_CONFIGS_CL[i]
    dw._dw_fwd_cl = TunedKernel(dw._dw_fwd_kernel, [config], dw._FWD_KEY, {})
    x, weight, out_hw, pad = operands(case)
    for _ in range(4):
        forward(x, weight, out_hw, pad)
    torch.cuda.synchronize()
    print(f"{case} [{i}] {config}: {graph_bench(lambda: forward(x, weight, out_hw, pad)) * 1e3:.1f} us")


if __name__ == "__main__":
    what, case = sys.argv[1], sys.argv[2]
    timings(case) if what == "timings" else one(case, int(sys.argv[3]))
