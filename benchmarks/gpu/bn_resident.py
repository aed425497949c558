"""Batch norm training on a GPU: the resident kernels (one a direction, a program per channel block)
against the passes they replace, in one process, beside eager; and the variants that test their plan.

    python benchmarks/gpu/bn_resident.py OUT_FILE [-k EXPR]

For each selected training case of the bench (bf16, the GPU batch), timed as the bench times (CUDA
graph replays, L2 flushed before each sample, contenders interleaved in rounds):
- eager, ours as planned (triton_impl._resident_plan), ours with the passes forced;
- where the plan declines, ours forced resident at the smallest block it would consider (does the
  L2 budget decline the right cases?); where it accepts, tiles of 2048 and 8192 elements.
Each variant's outputs and gradients against the passes' (relative L2 difference), and the chosen
block, grid and tile, go beside the times.
"""
from __future__ import annotations

import argparse
import contextlib

import torch

from dlkernels.batchnorm import triton_impl as T
from dlkernels.batchnorm.op import as_ncs, channels_last
from dlkernels.bench import cases as C
from dlkernels.bench.measure import (EAGER, TimingConfig, _Clock, _flusher, _prepare_grads, _step, contender_fn,
                                     interleave)


@contextlib.contextmanager
def _patched(**values):
    old = {k: getattr(T, k) for k in values}
    for k, v in values.items():
        setattr(T, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(T, k, v)


def _variants(x3):
    """name -> module patches, for this case."""
    out = {"ours": {}, "passes": dict(RESIDENT_L2_SHARE=0.0)}
    n, c, s = x3.shape
    cl = s == 1 or not x3.is_contiguous()
    plan = T._resident_plan(n, c, s, cl, x3.element_size(), max(1, T.target_programs(x3.device) // 4),
                            T.l2_bytes(x3.device))
    if plan is None:
        pow2 = c & -c
        bc = min(8, pow2) if cl else 1
        if cl or bc * s <= T._RESIDENT_MAX_RUN:
            out[f"forced-bc{bc}"] = dict(_resident_plan=lambda *a, bc=bc: bc)
    else:
        out["tile2048"] = dict(_RESIDENT_TILE=2048)
        out["tile8192"] = dict(_RESIDENT_TILE=8192)
    return out, plan


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("-k", default="train")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run under TRITON_INTERPRET=1")
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    dtype = torch.bfloat16
    flush = _flusher(dev, T.l2_bytes(dev))
    clock = _Clock(dev, flush)
    cfg = TimingConfig(rounds=7, min_rounds=3, budget_s=1.0)
    open(a.out, "w").close()

    def say(msg):  # line by line: a run cut by its time limit keeps what it measured
        print(msg, flush=True)
        with open(a.out, "a") as f:
            f.write(msg + "\n")

    say(f"{torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'} torch {torch.__version__} triton {__import__('triton').__version__}")
    for case in C.select("default", ["batchnorm"], "cuda"):
        if case.passes != "fwd+bwd" or not all(w in case.id for w in a.k.split(",")):
            continue
        gen = torch.Generator().manual_seed(0)
        problem = case.build(case, dtype, dev, gen)
        _prepare_grads(problem, True)
        x = problem.args[0]
        x3 = as_ncs(x.detach(), channels_last(x))
        variants, plan = _variants(x3)
        calls, results = {"eager": None}, {}
        ref_fn = contender_fn(problem, EAGER)
        y = ref_fn(*problem.args)
        grad_out = (torch.randn_like(y),)
        calls["eager"] = lambda: _step(ref_fn, problem, problem.args, grad_out)
        dl = contender_fn(problem, "triton")
        for name, patch in variants.items():
            def call(patch=patch):
                with _patched(**patch):
                    return _step(dl, problem, problem.args, grad_out)
            calls[name] = call
            # outputs and gradients; not the running statistics (each call moves them)
            got = call()
            n_state = len(problem.state_args)
            results[name] = [t.detach().float().clone() for t in got[:1] + got[1 + n_state:]]
            with _patched(**patch):
                launch = T._resident_launch(x3)
            results[name + "/launch"] = launch and (launch[0], launch[1][2], {k: launch[2][k] for k in ("RUN", "BLOCK_M", "BLOCK_R", "num_warps")})
        samples, iters = interleave(calls, clock, cfg, single_iter=False)
        med = {k: sorted(v)[len(v) // 2] * 1e6 for k, v in samples.items() if k is not None}
        say(f"{case.id}  plan bc={plan}")
        for name in calls:
            diff = ""
            if name in results:
                ref = results["passes"]
                worst = max(((g - r).norm() / r.norm().clamp_min(1e-30)).item() for g, r in zip(results[name], ref)
                            if g.shape == r.shape and g.numel())
                diff = f" vs passes {worst:.1e} launch {results[name + '/launch']}"
            say(f"   {name:10s} {med[name]:9.1f} us  x eager {med['eager'] / med[name]:.2f}{diff}")
        if dev.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
