"""The benchmark suite: `pytest benchmarks/ --benchmark-only` (options: --bench-preset, --bench-ops,
--bench-backends, --bench-dtypes, --bench-device, --bench-compile; see dlkernels/bench/plugin.py).
`python -m dlkernels bench` runs this suite and writes the report. The cases live in
dlkernels/bench/cases.py, shared by both."""
pytest_plugins = ["dlkernels.bench.plugin"]
