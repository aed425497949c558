"""Depthwise convolution (issue 4): every case of dlkernels/bench/cases.py for these ops, each contender checked against
float64 and timed interleaved with PyTorch (see dlkernels/bench/plugin.py)."""
BENCH_OPS = ("depthwise_conv2d",)


def test_depthwise(bench_item):
    bench_item()
