"""Numba (CPU) kernel for the fused separable conv; the contract is in dlkernels/separable/op.py.

Per tile of output pixels of one image, the depthwise result of all C*m channels goes into a small
buffer sized to stay in L1/L2, and a row-GEMM micro-kernel multiplies it by the pointwise weight
straight into the output: the intermediate never goes to memory in full.
"""
from __future__ import annotations

import numpy as np
import torch
from numba import prange

from .._numba_common import jit, sync_threads
from ..depthwise.numba_impl import (_dw_pixel_cl, _dw_row, geometry, bias_array, is_channels_last, nchw_view,
                                    nhwc_view, taps_by_channel)

# bytes of the depthwise tile (and of the pointwise weight slice in the channels-last kernel) that
# the GEMM streams once per output row: half of a 32 KiB L1D, leaving room for the output row
_TILE_BYTES = 16 * 1024


@jit
def _row_gemm(out, a, b):
    """out[l] += sum_k a[k] * b[k, l].

    Four k per pass over out: one load and one store of out per four FMAs keeps the loop off the
    store port, while the five pointers stay within LLVM's runtime alias-check budget, so it
    vectorizes along l.
    """
    K, L = b.shape
    k4 = K - K % 4
    for k in range(0, k4, 4):
        a0, a1, a2, a3 = a[k], a[k + 1], a[k + 2], a[k + 3]
        b0, b1, b2, b3 = b[k], b[k + 1], b[k + 2], b[k + 3]
        for t in range(L):
            out[t] += a0 * b0[t] + a1 * b1[t] + a2 * b2[t] + a3 * b3[t]
    for k in range(k4, K):
        ak = a[k]
        bk = b[k]
        for t in range(L):
            out[t] += ak * bk[t]


@jit(parallel=True)
def _sep_fwd_nchw(x, wdw, pw, bias, y, m, tile, sH, sW, pT, pL, dH, dW):
    N, O, Ho, Wo = y.shape
    Cm = wdw.shape[0]
    P = Ho * Wo
    n_tiles = -(-P // tile)
    zero = y.dtype.type(0)
    for r in prange(N * n_tiles):
        n = r // n_tiles
        p0 = (r % n_tiles) * tile
        p1 = min(P, p0 + tile)
        buf = np.empty((Cm, p1 - p0), y.dtype)
        for c in range(Cm):
            xc = x[n, c // m]
            bc = buf[c]
            # a tile of flattened pixels may span several output rows
            pp = p0
            while pp < p1:
                i = pp // Wo
                j0 = pp - i * Wo
                j1 = min(Wo, j0 + p1 - pp)
                _dw_row(xc, wdw[c], zero, i, j0, j1, bc[pp - p0:], sH, sW, pT, pL, dH, dW)
                pp += j1 - j0
        # NCHW keeps one output channel's tile contiguous: each GEMM row is a stretch of y
        yn = y[n].reshape(O, P)
        for o in range(O):
            out = yn[o][p0:p1]
            out[:] = bias[o] if bias.shape[0] != 0 else zero
            _row_gemm(out, pw[o], buf)


@jit(parallel=True)
def _sep_fwd_cl(x, wt, pwt, bias, y, m, tile, o_block, sH, sW, pT, pL, dH, dW, kW):
    N, Ho, Wo, O = y.shape
    Cm = pwt.shape[0]
    P = Ho * Wo
    n_tiles = -(-P // tile)
    no_bias = bias[:0]
    for r in prange(N * n_tiles):
        n = r // n_tiles
        p0 = (r % n_tiles) * tile
        p1 = min(P, p0 + tile)
        buf = np.empty((p1 - p0, Cm), y.dtype)
        for t in range(p1 - p0):
            i = (p0 + t) // Wo
            _dw_pixel_cl(x[n], wt, no_bias, i, p0 + t - i * Wo, buf[t], m, sH, sW, pT, pL, dH, dW, kW)
        yn = y[n].reshape(P, O)
        # output channels in blocks so the (Cm, o_block) slice of the weight stays in L1 for the tile
        for o0 in range(0, O, o_block):
            o1 = min(O, o0 + o_block)
            wblk = pwt[:, o0:o1]
            for t in range(p1 - p0):
                out = yn[p0 + t][o0:o1]
                if bias.shape[0] != 0:
                    out[:] = bias[o0:o1]
                else:
                    out[:] = 0
                _row_gemm(out, buf[t], wblk)


def _tile(n_values: int, itemsize: int, lo: int, hi: int) -> int:
    """How many rows of n_values fit _TILE_BYTES, a multiple of 8 within [lo, hi]."""
    return max(lo, min(hi, _TILE_BYTES // max(1, n_values * itemsize) // 8 * 8))


def separable_fwd(x, dw_weight, pw_weight, bias, stride, pad, dilation, out_hw):
    sync_threads()
    N, C = x.shape[0], x.shape[1]
    Cm, _, kH, kW = dw_weight.shape
    O = pw_weight.shape[0]
    m = Cm // C
    Ho, Wo = int(out_hw[0]), int(out_hw[1])
    geo = geometry(stride, pad, dilation)
    b = bias_array(bias, x)
    isz = x.element_size()
    if is_channels_last(x):
        y = torch.empty((N, Ho, Wo, O), dtype=x.dtype)
        pwt = np.ascontiguousarray(pw_weight.detach().numpy().T)  # (Cm, O): rows along output channels
        tile = min(Ho * Wo, _tile(Cm, isz, 16, 256))
        o_block = min(O, _tile(Cm, isz, 16, 512))
        _sep_fwd_cl(nhwc_view(x), taps_by_channel(dw_weight), pwt, b, y.numpy(), m, tile, o_block, *geo, kW)
        return y.permute(0, 3, 1, 2)
    y = torch.empty((N, O, Ho, Wo), dtype=x.dtype)
    tile = min(Ho * Wo, _tile(Cm, isz, 32, 1024))
    _sep_fwd_nchw(nchw_view(x), nchw_view(dw_weight).reshape(Cm, kH, kW), nchw_view(pw_weight), b, y.numpy(),
                  m, tile, *geo)
    return y
