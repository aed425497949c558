"""Pointwise (1x1) convolution (issue 4): every case of dlkernels/bench/cases.py for these ops, each contender checked against
float64 and timed interleaved with PyTorch (see dlkernels/bench/plugin.py)."""
BENCH_OPS = ("pointwise_conv2d",)


def test_pointwise(bench_item):
    bench_item()
