"""``python -m dlkernels bench``: every op on every available backend, checked against a float64
PyTorch reference and timed side by side with PyTorch, reported in the terminal and as files.

It runs the pytest-benchmark suite in benchmarks/ (the cases: dlkernels/bench/cases.py) and writes,
under benchmarks/results/<machine>/ (or --out): benchmark.json (pytest-benchmark's raw JSON, with
every outcome under "dlkernels"), report.md, speedup.png and limits.png. Exit status 1 when any
backend gives a wrong answer or raises.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import cases

REPO = Path(__file__).resolve().parents[2]
SUITE = REPO / "benchmarks"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dlkernels bench", description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", dest="preset", action="store_const", const="quick",
                   help="a minute or two: one real shape per op, plus the tiny cases")
    g.add_argument("--full", dest="preset", action="store_const", const="full", help="every case")
    g.add_argument("--preset", choices=list(cases.PRESETS), help="tiny, quick, default (the default) or full")
    p.add_argument("--ops", default="", help=f"comma-separated ops or groups, of {', '.join(cases.OPS)} "
                                             "(or matmul, depthwise, pointwise, separable, batchnorm, models)")
    p.add_argument("--backends", default="", help="comma-separated dlkernels backends (default: all available)")
    p.add_argument("--dtypes", default="", help="comma-separated dtypes (default: float32)")
    p.add_argument("--device", default="", help="cpu or cuda (default: cuda when present, else cpu)")
    p.add_argument("--compile", default="auto",
                   help="torch.compile contender: auto (separable, batch norm and the models), all, none, or "
                        "comma-separated ops or groups (on a GPU each case compiles afresh: seconds each)")
    p.add_argument("--no-precompile", action="store_true",
                   help="on CUDA, skip compiling the Triton kernels in parallel before the run (see precompile.py)")
    p.add_argument("--out", type=Path, help="output folder (default: benchmarks/results/<machine>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("pytest_args", nargs="*", help="passed to pytest after --, e.g. -- -k depthwise")
    return p


def _keyword(pytest_args: list[str]) -> str:
    """The -k expression among the pytest arguments, if any."""
    for i, a in enumerate(pytest_args):
        if a == "-k" and i + 1 < len(pytest_args):
            return pytest_args[i + 1]
        if a.startswith("-k") and len(a) > 2:
            return a[2:]
    return ""


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    preset = args.preset or "default"
    if not SUITE.is_dir():
        print(f"dlkernels bench: the suite {SUITE} is missing (run from a source checkout)", file=sys.stderr)
        return 2
    import pytest
    import torch

    from . import machine, report
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = args.out or SUITE / "results" / machine.describe(device, "").slug()
    out.mkdir(parents=True, exist_ok=True)
    raw = out / "benchmark.json"
    if raw.exists():
        raw.unlink()
    wanted_backends = cases.csv(args.backends)
    if device.type == "cuda" and not args.no_precompile and (not wanted_backends or "triton" in wanted_backends):
        from . import precompile
        precompile.run(cases.select(preset, cases.csv(args.ops), "cuda"), cases.dtypes_of(args.dtypes), device,
                       keyword=_keyword(args.pytest_args))
    pytest_argv = [str(SUITE), "--benchmark-only", f"--benchmark-json={raw}", "--benchmark-quiet",
                   "-p", "no:cacheprovider", "-p", "no:xdist", "-qq", "-s", "-o", "addopts=", f"--rootdir={REPO}",
                   f"--bench-preset={preset}", f"--bench-device={device.type}", f"--bench-compile={args.compile}",
                   f"--bench-ops={args.ops}", f"--bench-partial={out / 'partial.json'}",
                   f"--bench-backends={args.backends}", f"--bench-dtypes={args.dtypes}",
                   *([] if args.no_progress else ["--bench-progress"]), *args.pytest_args]
    # pytest-benchmark turns itself off inside an xdist worker (PYTEST_XDIST_WORKER), as when this
    # runs from the test suite under -n: the nested session is not distributed, so hide it
    worker = os.environ.pop("PYTEST_XDIST_WORKER", None)
    try:
        rc = pytest.main(pytest_argv)
    finally:
        if worker is not None:
            os.environ["PYTEST_XDIST_WORKER"] = worker
    if not raw.exists():
        print(f"dlkernels bench: pytest exited {rc} without results", file=sys.stderr)
        return int(rc) or 1
    meta = json.loads(raw.read_text())["dlkernels"]
    (out / "partial.json").unlink(missing_ok=True)
    report.print_table(meta)
    path = report.write(meta, out)
    print(f"\nreport: {path}\nraw pytest-benchmark JSON: {raw}")
    bad = report.failures(meta)
    if bad:
        print(f"\nFAILED: {len(bad)} contender(s) gave a wrong answer or raised:", file=sys.stderr)
        for r in bad:
            print(f"  {r['contender']} on {r['case']} {r['dtype']}: {r['status']}: {r['reason']}", file=sys.stderr)
        return 1
    return 0 if rc in (0, pytest.ExitCode.NO_TESTS_COLLECTED) else int(rc)
