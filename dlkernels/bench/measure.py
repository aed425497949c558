"""Measuring one case: accuracy of every contender against a float64 reference, then interleaved
timing of the contenders that answered right.

Contenders: "torch" (PyTorch eager, the unfused function), "torch.compile" (the same function
compiled), and each dlkernels backend by name. A contender that cannot run here is "unavailable",
one with a wrong answer "FAILED" (never timed), one that raises anything else "error".
"""
from __future__ import annotations

import gc
import math
import statistics
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from . import machine
from .cases import Case, Problem, Unavailable, clone_args, format_of, to_float64

EAGER, COMPILED = "torch", "torch.compile"

# Max error allowed, relative to the reference's largest magnitude; a contender may also be as far
# off as 4x eager PyTorch's own error (long reductions in low precision).
# Norm-wise relative error allowed against float64. float32 gets 1e-3: a training pass through BN +
# ReLU in float32 is ~2e-4 off in every implementation (torch.compile's too: the ReLU masks of
# pre-activations within rounding of 0), while a wrong kernel is off by O(1).
BASE_TOL = {torch.float64: 1e-9, torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}
EAGER_FACTOR = 8  # ... or this many times PyTorch eager's own error on the case, if larger


@dataclass
class TimingConfig:
    rounds: int = 7             # interleaved rounds (each contender sampled once per round)
    min_rounds: int = 3
    budget_s: float = 2.5       # timed seconds per case after which rounds stop (min_rounds kept)
    min_sample_s: float = 5e-3  # a sample repeats a fast call until it lasts this long
    llc_bytes: int = 32 << 20


@dataclass
class Outcome:
    contender: str
    status: str                 # "ok", "FAILED", "unavailable", "error"
    reason: str = ""
    max_err: float | None = None
    tol: float | None = None
    samples: list = field(default_factory=list)   # seconds per call, one per round
    iters: int = 0              # calls per sample
    graph: bool | None = None   # CUDA: timed as graph replays (None: not on CUDA, or not timed)

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None


@dataclass
class CaseResult:
    case: Case
    dtype: torch.dtype
    device: torch.device
    bytes: int = 0
    flops: int = 0
    copies: int = 1             # input sets rotated so a memory-bound working set exceeds the LLC
    outcomes: dict = field(default_factory=dict)
    copy_bytes_per_s: float | None = None  # memory-bound CPU cases: the copy timed in their rounds


# ---------------------------------------------------------------------------------------------
# one call of a contender: forward, or forward + backward of every differentiated input
# ---------------------------------------------------------------------------------------------
def _grad_targets(problem: Problem, args: list) -> list[Tensor]:
    targets = [args[i] for i in problem.grad_args]
    for a in args:
        if isinstance(a, torch.nn.Module):
            targets += [p for p in a.parameters() if p.requires_grad]
    return targets


def _as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _step(fn: Callable, problem: Problem, args: list, grad_out: tuple | None) -> list[Tensor]:
    if grad_out is None:
        with torch.no_grad():
            outs = _as_tuple(fn(*args))
        return [*outs, *_state(problem, args)]
    outs = _as_tuple(fn(*args))
    grads = torch.autograd.grad(outs, _grad_targets(problem, args), grad_out)
    return [*outs, *_state(problem, args), *grads]


def call_once(problem: Problem, fn: Callable, fwd_bwd: bool) -> None:
    """fn on fresh copies of the problem's arguments, and for forward+backward its gradients of
    all-ones output gradients: one pass of every kernel the contender runs (precompile, probe)."""
    args = clone_args(problem.args, problem.state_args)
    outs = _as_tuple(fn(*args))
    if fwd_bwd:
        torch.autograd.grad(outs, _grad_targets(problem, args), tuple(torch.ones_like(o) for o in outs))


def _state(problem: Problem, args: list) -> list[Tensor]:
    """The mutated tensors (running statistics), compared like outputs; a mutated model's parameters
    come back as outputs of its training step instead."""
    return [args[i] for i in problem.state_args if isinstance(args[i], Tensor)]


def _max_error(got: list, ref: list) -> float:
    """The worst, over the outputs, gradients and running statistics, of the norm-wise relative error
    ||got - ref||_2 / ||ref||_2 against the float64 reference.

    Norm-wise, not element-wise: where a float32 pre-activation lies within rounding of 0 the ReLU
    mask flips against float64 and that one gradient element differs by O(|grad|), in every float32
    implementation (PyTorch's own and torch.compile's included); a max-norm error then measures
    which elements happened to flip, while a wrong kernel still gives an O(1) norm-wise error."""
    if len(got) != len(ref):
        return math.inf
    worst = 0.0
    for g, r in zip(got, ref):
        if not isinstance(g, Tensor) or g.shape != r.shape:
            return math.inf
        g = g.detach().double()
        if not torch.isfinite(g).all():
            return math.inf
        if r.numel():
            worst = max(worst, torch.linalg.vector_norm(g - r).item() / max(torch.linalg.vector_norm(r).item(), 1e-300))
    return worst


def _prepare_grads(problem: Problem, fwd_bwd: bool) -> None:
    if fwd_bwd:
        for i in problem.grad_args:
            problem.args[i].requires_grad_(True)


def contender_fn(problem: Problem, name: str) -> Callable:
    if name == EAGER:
        return problem.eager
    if name == COMPILED:
        return torch.compile(problem.eager, dynamic=False)
    return lambda *args: problem.dl(name, *args)


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------
class _Clock:
    """Seconds per sample of ``iters`` calls: CUDA events on GPU, perf_counter on CPU.

    On a GPU the ``iters`` calls are captured once into a CUDA graph and each sample replays it:
    the events then time the kernels, not the Python that launches them (tens of microseconds a
    call, as long as a layer's kernels at small batches), for every contender alike. A call that
    cannot be captured (it synchronises, say) is timed as launched, and ``uncaptured`` names it.
    """

    def __init__(self, device: torch.device, flush: Callable | None, graphs: bool = True):
        self.cuda = device.type == "cuda"
        self.flush = flush
        self.graphs = graphs and self.cuda
        self._graphs: dict = {}
        self.uncaptured: set = set()

    def _graph(self, call: Callable, iters: int):
        key = (id(call), iters)
        if key not in self._graphs:
            graph = None
            if call not in self.uncaptured:
                try:
                    side = torch.cuda.Stream()
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):  # capture needs its ops warmed up off the default stream
                        call()
                    torch.cuda.current_stream().wait_stream(side)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        for _ in range(iters):
                            call()
                except Exception:  # noqa: BLE001 - timed without a graph instead
                    graph = None
                    self.uncaptured.add(call)
                    torch.cuda.synchronize()
            self._graphs[key] = graph
        return self._graphs[key]

    def __call__(self, call: Callable, iters: int) -> float:
        if self.cuda:
            graph = self._graph(call, iters) if self.graphs else None
            if self.flush:
                self.flush()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            if graph is not None:
                graph.replay()
            else:
                for _ in range(iters):
                    call()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / iters
        t0 = time.perf_counter()
        for _ in range(iters):
            call()
        return (time.perf_counter() - t0) / iters


def interleave(calls: dict[str, Callable], clock: _Clock, cfg: TimingConfig, single_iter: bool,
               paired: Callable | None = None):
    """Samples per contender, taken in rounds; each round visits every contender, starting one
    further along each time, so drifts of a shared machine fall on all of them alike. ``paired``
    (a reference such as a large copy) is timed once a round too, under the key None, outside the
    time budget."""
    for call in calls.values():  # warm-up: caches, allocator, lazy initialisation
        call()
        call()
    iters = {}
    for name, call in calls.items():
        once = clock(call, 1)
        iters[name] = 1 if single_iter else max(1, min(10_000, math.ceil(cfg.min_sample_s / max(once, 1e-9))))
    names = list(calls)
    samples: dict = {n: [] for n in names}
    if paired is not None:
        paired()
        samples[None] = []
    spent = 0.0
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for r in range(cfg.rounds):
            if paired is not None:
                samples[None].append(clock(paired, 1))
            for j in range(len(names)):
                name = names[(r + j) % len(names)]
                t = clock(calls[name], iters[name])
                samples[name].append(t)
                spent += t * iters[name]
            if r + 1 >= cfg.min_rounds and spent > cfg.budget_s:
                break
    finally:
        if gc_was:
            gc.enable()
    return samples, iters


def _clone_set(args: list) -> list:
    return [a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, Tensor) else a for a in args]


def _flusher(device: torch.device, llc: int) -> Callable | None:
    if device.type != "cuda":
        return None
    buf = torch.empty(max(2 * llc, 64 << 20), dtype=torch.uint8, device=device)
    return buf.zero_


# ---------------------------------------------------------------------------------------------
# one case
# ---------------------------------------------------------------------------------------------
def case_seed(case: Case, dtype: torch.dtype) -> int:
    return zlib.crc32(f"{case.id}/{dtype}".encode())


def measure_case(case: Case, dtype: torch.dtype, device: torch.device, contenders: list[str],
                 cfg: TimingConfig | None, on_stage: Callable[[str], None] = lambda s: None) -> CaseResult:
    """Check every contender against float64, then (cfg not None) time those that passed.

    ``contenders`` must start with "torch" (eager): its error sets the tolerance floor and its
    time the ratio every other contender is reported against.
    """
    res = CaseResult(case, dtype, device)
    gen = torch.Generator().manual_seed(case_seed(case, dtype))
    fwd_bwd = case.passes == "fwd+bwd"
    if COMPILED in contenders:
        torch._dynamo.reset()  # each case compiles afresh: no recompile limit reached across cases
    try:
        problem = case.build(case, dtype, device, gen)
    except Unavailable as e:
        res.outcomes = {c: Outcome(c, "unavailable", str(e)) for c in contenders}
        return res
    res.bytes, res.flops = problem.bytes, problem.flops
    _prepare_grads(problem, fwd_bwd)

    # the reference: the eager function in float64 on the same values
    on_stage("float64 reference")
    ref_problem = Problem(to_float64(problem.args), problem.eager, problem.dl, 0, 0,
                          problem.grad_args, problem.state_args)
    _prepare_grads(ref_problem, fwd_bwd)
    grad_out = grad_out64 = None
    if fwd_bwd:
        with torch.no_grad():
            outs = _as_tuple(problem.eager(*clone_args(problem.args, problem.state_args)))
        grad_out = tuple(torch.randn(o.shape, generator=gen, dtype=torch.float64)
                         .to(device=device, dtype=o.dtype).contiguous(memory_format=format_of(o)) for o in outs)
        grad_out64 = tuple(g.double() for g in grad_out)
    ref = [t.detach() for t in _step(problem.eager, ref_problem, clone_args(ref_problem.args, problem.state_args),
                                     grad_out64)]
    del ref_problem

    fns: dict[str, Callable] = {}
    eager_err = 0.0
    for name in contenders:
        on_stage(f"checking {name}")
        try:
            fn = contender_fn(problem, name)
            got = _step(fn, problem, clone_args(problem.args, problem.state_args), grad_out)
        except (ImportError, Unavailable) as e:  # ModuleNotFoundError included: kernel not written yet
            res.outcomes[name] = Outcome(name, "unavailable", f"{type(e).__name__}: {e}")
            continue
        except Exception as e:  # noqa: BLE001 - reported per contender; the run goes on
            status = "unavailable" if name == COMPILED else "error"
            res.outcomes[name] = Outcome(name, status, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
            continue
        err = _max_error(got, ref)
        del got
        if name == EAGER:
            eager_err = err if math.isfinite(err) else 0.0
        tol = max(BASE_TOL.get(dtype, 1e-3), EAGER_FACTOR * eager_err, problem.tol)
        ok = err <= tol
        res.outcomes[name] = Outcome(name, "ok" if ok else "FAILED",
                                     "" if ok else f"relative error {err:.3g} > tolerance {tol:.3g}", err, tol)
        if ok:
            fns[name] = fn
    del ref
    if cfg is None or not fns:
        return res

    # timing: memory-bound CPU cases rotate input sets so that the working set exceeds the LLC
    on_stage("timing " + ", ".join(fns))
    copies = 1
    if device.type == "cpu" and case.bound == "memory" and problem.bytes:
        copies = max(1, min(8, math.ceil(2 * cfg.llc_bytes / problem.bytes)))
    sets = [problem.args] + [_clone_set(problem.args) for _ in range(copies - 1)]
    res.copies = copies
    calls = {}
    for name, fn in fns.items():
        ring = deque(sets)

        def call(fn=fn, ring=ring):
            ring.rotate(1)
            _step(fn, problem, ring[0], grad_out)
        calls[name] = call
    flush = _flusher(device, cfg.llc_bytes) if case.bound == "memory" else None
    # the per-call overhead cases time the launch itself: no graph there
    clock = _Clock(device, flush, graphs=case.bound != "overhead")
    # A memory-bound CPU case's floor and limit take the copy bandwidth timed in its own rounds: this
    # host's moves between ~42 and ~78 GB/s within minutes, and against the run's best a case timed
    # in a slow moment read up to 2.6x its floor, one timed fast after a slow measurement 0.59x.
    paired = nbytes = None
    if device.type == "cpu" and case.bound == "memory" and problem.bytes:
        paired, nbytes = machine.copy_call(device, cfg.llc_bytes)
    samples, iters = interleave(calls, clock, cfg, single_iter=flush is not None, paired=paired)
    if paired is not None:
        res.copy_bytes_per_s = 2 * nbytes / statistics.median(samples[None])
    for name in fns:
        res.outcomes[name].samples = samples[name]
        res.outcomes[name].iters = iters[name]
        if clock.graphs:
            res.outcomes[name].graph = calls[name] not in clock.uncaptured
    return res

