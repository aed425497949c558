"""Settings shared by every Numba kernel module."""
from __future__ import annotations

import functools

import numba
import torch

# Not fastmath=True: its no-NaN/no-Inf flags let LLVM fold isnan() to False and break NaN
# propagation. These four still let reductions reassociate and vectorize.
FASTMATH = {"contract", "reassoc", "arcp", "nsz"}

jit = functools.partial(numba.njit, fastmath=FASTMATH, cache=True)


def sync_threads() -> None:
    """Give Numba's own thread pool torch's thread count (torch.set_num_threads is honoured)."""
    n = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)
