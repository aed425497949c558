"""One training step of the reference models (dlkernels.models): every case of dlkernels/bench/cases.py for these ops, each contender checked against
float64 and timed interleaved with PyTorch (see dlkernels/bench/plugin.py)."""
BENCH_OPS = ("model",)


def test_models(bench_item):
    bench_item()
