"""matmul and linear (issue 3): every case of dlkernels/bench/cases.py for these ops, each contender checked against
float64 and timed interleaved with PyTorch (see dlkernels/bench/plugin.py)."""
BENCH_OPS = ("matmul", "linear")


def test_matmul(bench_item):
    bench_item()
