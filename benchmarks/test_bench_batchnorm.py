"""Fused batch norm + residual + activation (issue 5): every case of dlkernels/bench/cases.py for these ops, each contender checked against
float64 and timed interleaved with PyTorch (see dlkernels/bench/plugin.py)."""
BENCH_OPS = ("batch_norm_residual",)


def test_batchnorm(bench_item):
    bench_item()
