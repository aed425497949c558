"""DistributedDataParallel (gloo, 2 processes on this CPU) over a reference model on dlkernels ops:
the all-reduced gradients equal the single-process gradients of the same global batch."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import dlkernels
from dlkernels import models
from helpers import KERNEL_BACKENDS

WORLD = 2
BACKEND = next((b for b in KERNEL_BACKENDS if b in ("cpp", "numba")), "torch")


def _model():
    torch.manual_seed(0)
    return models.mini_xception(4, 1, widths=(4, 8), dropout=0.0).double()  # no RNG: ranks compare exactly


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 1, 12, 12, generator=g, dtype=torch.float64), torch.randint(0, 4, (8,), generator=g)


def _loss_grads(model, x, y):
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _worker(rank, init_file, out_dir):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = _model()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        x, y = _batch()
        shard = slice(rank * len(y) // WORLD, (rank + 1) * len(y) // WORLD)
        result = {}
        with dlkernels.use_backend(BACKEND):
            for mode in ("eval", "train"):
                ddp.train(mode == "train")
                ddp.zero_grad()
                F.cross_entropy(ddp(x[shard]), y[shard]).backward()  # DDP averages over the ranks
                result[mode] = {n: p.grad.clone() for n, p in model.named_parameters()}
            torch.optim.SGD(model.parameters(), lr=0.1).step()
            result["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        # Gloo's worker threads free each finished collective's work, whose saved thread-local state
        # can hold a Python object (a GIL acquire); destroy_process_group joins those threads while
        # holding the GIL, and hung about one run in fifteen under load (torch 2.13) when a DDP
        # all-reduce's work was still being freed. A barrier issued here, outside the autograd
        # engine's hooks, is the last work either rank queues, so destruction meets idle threads.
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_gradients_equal_single_process(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.fail("torch.distributed with gloo is required")
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    x, y = _batch()
    model = _model()
    with dlkernels.use_backend(BACKEND):
        model.eval()  # BN on running statistics: the global batch's gradient, exactly
        full = _loss_grads(model, x, y)
        model.train()  # BN on each rank's own batch statistics: DDP averages the shards' gradients
        half = len(y) // WORLD
        shards = [_loss_grads(model, x[i * half:(i + 1) * half], y[i * half:(i + 1) * half]) for i in range(WORLD)]
    for r in ranks:
        for n, g in full.items():
            torch.testing.assert_close(r["eval"][n], g, rtol=1e-10, atol=1e-12, msg=f"eval {n}")
            torch.testing.assert_close(r["train"][n], sum(s[n] for s in shards) / WORLD, rtol=1e-10, atol=1e-12,
                                       msg=f"train {n}")
        for n, p in ranks[0]["params"].items():  # the replicas stay identical after a step
            torch.testing.assert_close(r["params"][n], p, rtol=0, atol=0)
