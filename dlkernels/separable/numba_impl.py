"""Numba (CPU) kernel for the fused separable conv; the contract is in dlkernels/separable/op.py.

Per tile of output pixels of one image, the depthwise result of all C*m channels goes into a small
buffer sized to stay in L2, and a 4-row GEMM micro-kernel multiplies it by the pointwise weight
straight into the output: the intermediate never goes to memory in full.
"""
from __future__ import annotations

import numpy as np
import torch
from numba import prange

from .._numba_common import jit, sync_threads
from ..depthwise.numba_impl import (_dw_row_cl, _dw_row, geometry, bias_array, is_channels_last, nchw_view,
                                    nhwc_view, taps_by_channel)

# bytes of the depthwise tile: big enough for long vector loops in the GEMM, small enough to stay
# in a 512 KiB L2 while each group of output rows streams it
_TILE_BYTES = 96 * 1024


@jit
def _row_gemm(out, a, b):
    """out[l] += sum_k a[k] * b[k, l] (a row left over from _gemm_4rows)."""
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


@jit
def _gemm_4rows(o0, o1, o2, o3, a0, a1, a2, a3, b):
    """o_r[l] += sum_k a_r[k] * b[k, l] for four rows r.

    The micro-kernel: LLVM vectorizes the loop along l; four rows times four k give 16 FMAs per
    four vector loads of b and four loads/stores of out, so it runs near the FMA peak (measured
    within ~10% of numpy's BLAS matmul for K=128) while the 16 broadcast weights stay in registers.
    Explicit rows rather than a 2-D block keep the pointers few enough for LLVM's alias checks.
    """
    K, L = b.shape
    k4 = K - K % 4
    for k in range(0, k4, 4):
        w00, w01, w02, w03 = a0[k], a0[k + 1], a0[k + 2], a0[k + 3]
        w10, w11, w12, w13 = a1[k], a1[k + 1], a1[k + 2], a1[k + 3]
        w20, w21, w22, w23 = a2[k], a2[k + 1], a2[k + 2], a2[k + 3]
        w30, w31, w32, w33 = a3[k], a3[k + 1], a3[k + 2], a3[k + 3]
        b0, b1, b2, b3 = b[k], b[k + 1], b[k + 2], b[k + 3]
        for t in range(L):
            v0, v1, v2, v3 = b0[t], b1[t], b2[t], b3[t]
            o0[t] += w00 * v0 + w01 * v1 + w02 * v2 + w03 * v3
            o1[t] += w10 * v0 + w11 * v1 + w12 * v2 + w13 * v3
            o2[t] += w20 * v0 + w21 * v1 + w22 * v2 + w23 * v3
            o3[t] += w30 * v0 + w31 * v1 + w32 * v2 + w33 * v3
    for k in range(k4, K):
        w0, w1, w2, w3 = a0[k], a1[k], a2[k], a3[k]
        bk = b[k]
        for t in range(L):
            v = bk[t]
            o0[t] += w0 * v
            o1[t] += w1 * v
            o2[t] += w2 * v
            o3[t] += w3 * v


@jit
def _gemm_into(y2, row0, col0, a, b, bias, bias_by_row):
    """y2[row0 + r, col0 + l] = bias + sum_k a[r, k] * b[k, l] for r < len(a), l < b.shape[1]; bias is
    bias[row0 + r] (bias_by_row) or bias[l], none if bias is empty."""
    R = a.shape[0]
    L = b.shape[1]
    for r in range(R):
        out = y2[row0 + r][col0:col0 + L]
        if bias.shape[0] == 0:
            out[:] = 0
        elif bias_by_row:
            out[:] = bias[row0 + r]
        else:
            out[:] = bias[:L]
    r4 = R - R % 4
    for r in range(0, r4, 4):
        _gemm_4rows(y2[row0 + r][col0:col0 + L], y2[row0 + r + 1][col0:col0 + L],
                    y2[row0 + r + 2][col0:col0 + L], y2[row0 + r + 3][col0:col0 + L],
                    a[r], a[r + 1], a[r + 2], a[r + 3], b)
    for r in range(r4, R):
        _row_gemm(y2[row0 + r][col0:col0 + L], a[r], b)


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
        # in NCHW each output channel's part of the tile is a contiguous stretch of y
        _gemm_into(y[n].reshape(O, P), 0, p0, pw, buf, bias, True)


@jit(parallel=True)
def _sep_fwd_cl(x, wt, pwt, bias, y, m, tile, sH, sW, pT, pL, dH, dW, kW):
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
        pp = p0
        while pp < p1:
            i = pp // Wo
            j0 = pp - i * Wo
            j1 = min(Wo, j0 + p1 - pp)
            _dw_row_cl(x[n], wt, no_bias, i, j0, j1, buf[pp - p0:], m, sH, sW, pT, pL, dH, dW, kW)
            pp += j1 - j0
        # in channels-last each pixel's O outputs are contiguous: rows are pixels, (Cm, O) weight
        _gemm_into(y[n].reshape(P, O), p0, 0, buf, pwt, bias, False)


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
        tile = min(Ho * Wo, _tile(Cm, isz, 16, 128))
        _sep_fwd_cl(nhwc_view(x), taps_by_channel(dw_weight), pwt, b, y.numpy(), m, tile, *geo, kW)
        return y.permute(0, 3, 1, 2)
    y = torch.empty((N, O, Ho, Wo), dtype=x.dtype)
    tile = min(Ho * Wo, _tile(Cm, isz, 64, 512))
    _sep_fwd_nchw(nchw_view(x), nchw_view(dw_weight).reshape(Cm, kH, kW), nchw_view(pw_weight), b, y.numpy(),
                  m, tile, *geo)
    return y
