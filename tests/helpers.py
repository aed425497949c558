"""What the tests share: the device and backends under test, and comparison helpers.

(Imported as ``helpers``, not from conftest: a nested pytest run, as the bench test does, or a
spawned DDP worker can leave another directory's conftest under that module name.)"""
from __future__ import annotations

import contextlib
import os
import warnings

import torch

import dlkernels

DEVICE = torch.device("cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
                      else "cpu")
# Every non-reference backend that can run on DEVICE here.
KERNEL_BACKENDS = [b for b in dlkernels.available_backends(DEVICE) if b != "torch"]
# The backends that run layer-sized tests in seconds: Triton's CPU interpreter would take minutes.
LARGE_BACKENDS = [b for b in KERNEL_BACKENDS if b != "triton" or DEVICE.type == "cuda"]

# Tolerance relative to the largest reference magnitude. float32: accumulation order differs from
# the float64 reference by ~sqrt(K) ulps for K-term sums (K up to a few hundred here), so 2e-5
# relative to the tensor's scale; float16/bfloat16 (Triton only): their own epsilons.
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, what: str = "",
                 factor: float = 1.0) -> None:
    """actual (computed in dtype) against expected (computed in float64 from the same inputs)."""
    dtype = dtype or actual.dtype
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    assert torch.equal(nan_a, nan_e), f"{what}: NaN positions differ"
    a, e = a.masked_fill(nan_a, 0), e.masked_fill(nan_e, 0)
    scale = max(e.abs().max().item() if e.numel() else 0.0, 1e-30)
    err = (a - e).abs().max().item() if e.numel() else 0.0
    tol = TOL[dtype] * factor * max(scale, 1.0 if dtype != torch.float64 else scale)
    assert err <= tol, f"{what}: max abs error {err:.3e} > {tol:.3e} (reference scale {scale:.3e}, {dtype})"


def assert_close_non_finite(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """actual against torch's own expected, which holds infinities or NaNs (the case must reach it):
    the same non-finite values at the same places, the finite ones to 1e-4 of their scale."""
    assert not expected.isfinite().all(), what
    scale = expected[expected.isfinite()].abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * scale, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def grads(out: torch.Tensor, inputs, grad_out: torch.Tensor):
    """Gradients of out w.r.t. the inputs that require grad (None for the others)."""
    req = [t for t in inputs if t is not None and t.requires_grad]
    got = iter(torch.autograd.grad(out, req, grad_out, allow_unused=True))
    return [next(got) if (t is not None and t.requires_grad) else None for t in inputs]


def leaf(t: torch.Tensor, requires_grad: bool = True) -> torch.Tensor:
    return t.detach().requires_grad_(requires_grad)


def as64(t):
    """A float64 leaf copy of t (same strides) for the reference computation."""
    return None if t is None else leaf(t.detach().double(), t.requires_grad)


DTYPES_CPU = [torch.float32, torch.float64]


def dtypes_for(backend: str):
    return DTYPES_CPU + ([torch.float16, torch.bfloat16] if backend == "triton" else [])


@contextlib.contextmanager
def no_vmap_fallback():
    """torch.vmap inside: torch's per-example fallback (an op without a vmap rule; it warns "There is a
    performance drop") is an error, so a test checks that the op's own rule ran."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*performance drop.*")
        yield
