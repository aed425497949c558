"""pytest plugin behind benchmarks/: parametrizes the suite from the case table, measures each case
once (every contender interleaved), and hands each contender's samples to pytest-benchmark.

pytest-benchmark times one test at a time; contenders of a case must be timed in interleaved rounds
instead (a shared machine drifts). So each case is measured once, by dlkernels.bench.measure, when
its first contender's test runs; every contender's test then passes its samples to pytest-benchmark
through ``replay_clock`` (its timer for these tests), so ``--benchmark-json``, ``--benchmark-compare``
and the usual tables hold the interleaved medians. Accuracy failures fail the test; unavailable
backends skip it. Every outcome, timed or not, goes into the JSON under "dlkernels".

Options (``pytest benchmarks/ --benchmark-only --bench-preset quick ...``):
  --bench-preset tiny|quick|default|full   --bench-ops matmul,batchnorm,...
  --bench-backends numba,cpp,...           --bench-dtypes float32,...
  --bench-device cpu|cuda                  --bench-compile auto|all|none|OPS
"""
from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from . import cases as C
from . import machine
from .measure import COMPILED, EAGER, CaseResult, TimingConfig, measure_case

TIMING = {  # per preset: interleaved rounds and the timed seconds per case after which rounds stop
    "tiny": TimingConfig(rounds=3, min_rounds=2, budget_s=0.2),
    "quick": TimingConfig(rounds=5, min_rounds=3, budget_s=1.0),
    "default": TimingConfig(rounds=9, min_rounds=5, budget_s=2.5),
    "full": TimingConfig(rounds=15, min_rounds=7, budget_s=6.0),
}

# ---------------------------------------------------------------------------------------------
# the timer pytest-benchmark reads: it replays the interleaved samples of the test being recorded
# ---------------------------------------------------------------------------------------------
_pending: deque = deque()
_now = [0.0, False]  # clock value, and whether the next read ends a sample


def replay_clock() -> float:
    """Interleaved samples measured by dlkernels.bench.measure, read back one per start/end pair."""
    if _now[1]:
        _now[0] += _pending.popleft()
    _now[1] = not _now[1]
    return _now[0]


def _record(benchmark, samples: list[float]) -> None:
    _pending.clear()
    _pending.extend(samples)
    _now[1] = False
    benchmark.pedantic(lambda: None, rounds=len(samples), iterations=1, warmup_rounds=0)


# ---------------------------------------------------------------------------------------------
# options and session state
# ---------------------------------------------------------------------------------------------
def pytest_addoption(parser):
    g = parser.getgroup("dlkernels bench")
    g.addoption("--bench-preset", default="default", choices=list(C.PRESETS), help="case tier (default: default)")
    g.addoption("--bench-ops", default="", help="comma-separated ops or groups (default: all)")
    g.addoption("--bench-backends", default="", help="comma-separated backends (default: all available)")
    g.addoption("--bench-dtypes", default="", help="comma-separated dtypes (default: float32)")
    g.addoption("--bench-device", default="", help="cpu or cuda (default: cuda when present)")
    g.addoption("--bench-partial", default="", help="rewrite this JSON file (the report's input) after every case, "
                                                  "so a run cut short still leaves what it measured")
    g.addoption("--bench-compile", default="auto",
                help="torch.compile contender: auto (ops where fusion is the point, and the models), all, none, "
                     "or comma-separated ops or groups")
    g.addoption("--bench-progress", action="store_true", help="a progress bar (the CLI sets it)")


@dataclass
class State:
    preset: str
    device: torch.device
    dtypes: list
    kernel_backends: list
    compile: str
    timing: TimingConfig
    allocator: str
    info: machine.MachineInfo | None = None
    limits: machine.Limits | None = None
    copy_at: float = 0.0                           # time.monotonic() of the last copy measurement
    wanted: dict = field(default_factory=dict)     # (case id, dtype) -> contenders selected
    current: tuple | None = None                   # ((case id, dtype), CaseResult)
    records: list = field(default_factory=list)
    progress: object = None

    def contenders(self, case: C.Case) -> list[str]:
        names = [EAGER]
        use_compile = (self.compile == "all" or (self.compile == "auto" and case.compile)
                       or bool({case.op, case.group} & set(C.csv(self.compile))))
        if use_compile and case.bound != "overhead":
            names.append(COMPILED)
        return names + self.kernel_backends


_STATE = pytest.StashKey[State]()


def state_of(config) -> State:
    return config.stash[_STATE]


def pytest_configure(config):
    # the one process-wide setting a CPU timing needs before anything allocates big buffers
    allocator = machine.configure_malloc()
    dev = config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(dev)
    dtypes = C.dtypes_of(config.getoption("--bench-dtypes"))
    import dlkernels  # after the allocator setting
    usable = [b for b in dlkernels.available_backends(device) if b != "torch"]
    if device.type == "cpu":  # Triton on the CPU is its interpreter: not worth timing
        usable = [b for b in usable if b != "triton"]
    asked = C.csv(config.getoption("--bench-backends"))
    backends = [b for b in usable if not asked or b in asked]
    preset = config.getoption("--bench-preset")
    timing = TimingConfig(**vars(TIMING[preset]))
    config.stash[_STATE] = State(preset, device, dtypes, backends, config.getoption("--bench-compile"),
                                 timing, allocator)


def pytest_generate_tests(metafunc):
    if "bench_item" not in metafunc.fixturenames:
        return
    st = state_of(metafunc.config)
    module_ops = getattr(metafunc.module, "BENCH_OPS", C.OPS)
    asked = set(C.csv(metafunc.config.getoption("--bench-ops")))
    cases = [c for c in C.select(st.preset, list(module_ops), st.device.type)
             if not asked or c.op in asked or c.group in asked]
    params = []
    for case in cases:
        for dt in st.dtypes:
            dname = str(dt).removeprefix("torch.")
            for who in st.contenders(case):
                params.append(pytest.param(
                    (case, dt, who), id=f"{case.id}-{dname}-{who}",
                    marks=pytest.mark.benchmark(group=f"{case.id} {dname}", timer=replay_clock)))
    metafunc.parametrize("bench_item", params, indirect=True)


def pytest_collection_finish(session):
    st = state_of(session.config)
    for item in session.items:
        cs = getattr(item, "callspec", None)
        if cs is None or not isinstance(cs.params.get("bench_item"), tuple):
            continue  # not a bench test, or a module whose ops have no case in this preset
        case, dt, who = cs.params["bench_item"]
        st.wanted.setdefault((case.id, dt), [EAGER])
        if who not in st.wanted[(case.id, dt)]:
            st.wanted[(case.id, dt)].append(who)
    if session.config.getoption("--bench-progress") and st.wanted:
        from .progress import Progress
        st.progress = Progress(len(st.wanted))


def pytest_sessionfinish(session):
    st = session.config.stash.get(_STATE, None)
    if st is not None and st.progress is not None:
        st.progress.close()


# ---------------------------------------------------------------------------------------------
# running an item
# ---------------------------------------------------------------------------------------------
def _ensure_limits(st: State, timed: bool) -> None:
    if st.info is None:
        st.info = machine.describe(st.device, st.allocator)
        st.timing.llc_bytes = st.info.llc_bytes
    if timed and st.limits is None:
        if st.progress:
            st.progress.stage("measuring machine limits (copy bandwidth, torch.matmul FLOP/s)")
        st.limits = machine.measure_limits(st.device, st.dtypes, st.info.llc_bytes, quick=st.preset == "tiny")
        st.copy_at = time.monotonic()


# Seconds between copy measurements: before a memory-bound case, the copy is timed again when this
# long has passed, and the report's limit is the best of the run's measurements (Limits.add_copy).
COPY_EVERY_S = 30.0


def _recheck_copy(st: State, case: C.Case) -> None:
    if st.limits is None or case.bound != "memory" or time.monotonic() - st.copy_at < COPY_EVERY_S:
        return
    if st.progress:
        st.progress.stage("measuring copy bandwidth again")
    st.limits.add_copy(machine.copy_rate(st.device, st.info.llc_bytes, quick=st.preset == "tiny")[0])
    st.copy_at = time.monotonic()


def _result(st: State, case: C.Case, dt, timed: bool) -> CaseResult:
    key = (case.id, dt)
    if st.current is None or st.current[0] != key:
        st.current = None  # free the previous case's tensors first
        if st.progress:
            st.progress.start_case(f"{case.id} {str(dt).removeprefix('torch.')}")
        if timed:
            _recheck_copy(st, case)
        t0 = time.perf_counter()
        res = measure_case(case, dt, st.device, st.wanted.get(key, [EAGER]),
                           st.timing if timed else None, on_stage=st.progress.stage if st.progress else lambda s: None)
        res.wall_s = time.perf_counter() - t0
        st.current = (key, res)
    return st.current[1]


@pytest.fixture
def bench_item(request, benchmark):
    """Callable that checks and records one contender of one case (the test's parameter)."""
    case, dt, who = request.param
    st = state_of(request.config)

    def run():
        timed = not benchmark.disabled
        _ensure_limits(st, timed)
        res = _result(st, case, dt, timed)
        out = res.outcomes[who]
        rec = {"case": case.id, "op": case.op, "group": case.group, "layer": case.layer, "shape": case.shape,
               "passes": case.passes, "layout": case.layout, "mode": case.mode, "bound": case.bound,
               "tier": case.tier, "dtype": str(dt).removeprefix("torch."), "device": st.device.type,
               "contender": who, "status": out.status, "reason": out.reason, "max_err": out.max_err,
               "tol": out.tol, "bytes": res.bytes, "flops": res.flops, "copies": res.copies,
               "copy_bytes_per_s": res.copy_bytes_per_s,
               "iters": out.iters, "cuda_graph": out.graph, "samples": list(out.samples)}
        st.records.append(rec)
        partial = request.config.getoption("--bench-partial")
        if partial:
            Path(partial).write_text(json.dumps(_meta(st), default=str))
        benchmark.extra_info.update({k: v for k, v in rec.items() if k != "samples"})
        if out.status == "unavailable":
            benchmark.skipped = True
            pytest.skip(f"{who} unavailable on {case.id}: {out.reason}")
        if out.status == "FAILED":
            pytest.fail(f"WRONG ANSWER: {who} on {case.id} {rec['dtype']}: {out.reason}", pytrace=False)
        if out.status == "error":
            pytest.fail(f"{who} raised on {case.id} {rec['dtype']}: {out.reason}", pytrace=False)
        if timed:
            _record(benchmark, out.samples)
        else:
            benchmark.skipped = True  # accuracy only (--benchmark-disable)
    return run


# ---------------------------------------------------------------------------------------------
# what goes into pytest-benchmark's JSON
# ---------------------------------------------------------------------------------------------
def _meta(st: State) -> dict:
    return {
        "machine": st.info.to_dict() if st.info else None,
        "limits": st.limits.to_dict() if st.limits else None,
        "preset": st.preset,
        "timing": {**vars(st.timing),
                   "method": "CUDA events around CUDA-graph replays of the calls (launch overhead excluded, "
                   "except in the overhead cases; a record's cuda_graph says which), L2 flushed before each "
                   "memory-bound sample"
                   if st.device.type == "cuda" else "time.perf_counter, inputs rotated past the LLC for "
                   "memory-bound cases", "interleaved": True},
        "tolerance": {"base": {str(k).removeprefix("torch."): v for k, v in _tols().items()},
                      "rule": "||x - ref||_2 / ||ref||_2 against float64 (worst over outputs, gradients, running stats), allowed max(base, 8 x eager's, the case's own floor: 1e-2 for a model's float32 training step, where one max-pool or ReLU near-tie flips)"},
        "records": st.records,
    }


def _tols():
    from .measure import BASE_TOL
    return BASE_TOL


def pytest_benchmark_update_machine_info(config, machine_info):
    st = config.stash.get(_STATE, None)
    if st is not None and st.info is not None:
        machine_info["dlkernels"] = st.info.to_dict()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    st = config.stash.get(_STATE, None)
    if st is not None:
        output_json["dlkernels"] = _meta(st)
