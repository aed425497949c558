"""Settings and small helpers shared by every Numba kernel module."""
from __future__ import annotations

import functools

import numba
import numpy as np
import torch

from . import _dispatch

# Not fastmath=True: its no-NaN/no-Inf flags let LLVM fold isnan() to False and break NaN
# propagation. These four still let reductions reassociate and vectorize.
FASTMATH = {"contract", "reassoc", "arcp", "nsz"}

jit = functools.partial(numba.njit, fastmath=FASTMATH, cache=True)
pjit = functools.partial(numba.njit, fastmath=FASTMATH, cache=True, parallel=True)


if _dispatch.forked:  # the first numba kernel of a forked child: its threading layer (see there)
    _dispatch.numba_after_fork()


def sync_threads() -> None:
    """Give Numba's own thread pool torch's thread count (torch.set_num_threads is honoured). Called
    before every kernel, so that a forked child that cannot run them says so (_dispatch.numba_fork_error)."""
    if _dispatch.numba_fork_error is not None:
        raise RuntimeError(_dispatch.numba_fork_error)
    n = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)


def flat_view(t: torch.Tensor) -> np.ndarray:
    """A zero-copy 1-D numpy view of the storage span a (non-empty) strided tensor covers, starting
    at its first element: index it as ``sum(i_d * t.stride(d))``. One array type per dtype, whatever
    the strides (transposed, stride-0 broadcast), so the kernels compile once per dtype, not once per
    layout, and take the strides as plain integers."""
    span = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return torch.as_strided(t.detach(), (span,), (1,), t.storage_offset()).numpy()


def dummy(dtype: torch.dtype) -> np.ndarray:
    """Stands in for an absent optional array, so an optional input does not add a signature."""
    return np.zeros(1, dtype=torch.empty(0, dtype=dtype).numpy().dtype)
