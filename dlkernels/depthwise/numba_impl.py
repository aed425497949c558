"""Numba (CPU) kernels for depthwise_conv2d; the contract is in dlkernels/depthwise/op.py.

Direct convolution, no im2col: the op is memory-bound, so each kernel reads its inputs once and
writes its output once.

NCHW kernels work on one image row at a time with the inner loop along W. For every tap the range
of output columns whose input column lies inside the image is computed once (``_tap_range``), so
the hot loop has no bounds checks: the border is just the part of the row outside that range.
Channels-last kernels work on one row of pixels at a time with the inner loop along the contiguous
C; per-pixel tap ranges (integer divisions) are computed only on the border.

Helpers taking a slice and looping from 0 (rather than indexing with a possibly negative offset)
let LLVM prove the index non-negative, drop Numba's wraparound select and vectorize.
"""
from __future__ import annotations

import numba
import numpy as np
import torch
from numba import prange

from .. import _validation as V
from .._numba_common import jit, sync_threads


# ---------------------------------------------------------------------------------------------
# shared helpers (also used by dlkernels/separable/numba_impl.py)
# ---------------------------------------------------------------------------------------------
@jit
def _tap_range(offset, step, n_in, lo, hi):
    """The sub-range [a, b) of [lo, hi) of indices t with 0 <= t*step + offset < n_in (b may be < a)."""
    a = max(lo, -(offset // step))
    b = min(hi, (n_in - 1 - offset) // step + 1)
    return a, b


@jit
def _axpy_strided(alpha, x, step, out, n):
    """out[t] += alpha * x[t*step] for t < n."""
    if step == 1:
        for t in range(n):
            out[t] += alpha * x[t]
    else:
        for t in range(n):
            out[t] += alpha * x[t * step]


@jit
def _dw_row(xc, wk, b, i, j0, j1, out, sH, sW, pT, pL, dH, dW):
    """out[j - j0] = b + sum_{p,q} wk[p, q] * xc[i*sH - pT + p*dH, j*sW - pL + q*dW] for j in [j0, j1),
    taps outside the (H, W) plane xc reading zero."""
    H, W = xc.shape
    kH, kW = wk.shape
    for t in range(j1 - j0):
        out[t] = b
    ih0 = i * sH - pT
    p_lo, p_hi = _tap_range(ih0, dH, H, 0, kH)
    for p in range(p_lo, p_hi):
        xrow = xc[ih0 + p * dH]
        for q in range(kW):
            off = q * dW - pL
            a, e = _tap_range(off, sW, W, j0, j1)
            if e > a:
                _axpy_strided(wk[p, q], xrow[a * sW + off:], sW, out[a - j0:], e - a)


@jit
def _interior(step, pad, dil, k, n_in, lo, hi):
    """The sub-range of output indices in [lo, hi) whose k taps all lie inside [0, n_in)."""
    a = _tap_range(-pad, step, n_in, lo, hi)[0]
    e = _tap_range((k - 1) * dil - pad, step, n_in, lo, hi)[1]
    return a, max(a, e)


@jit
def _acc_bcast(acc, a, xv, C, m):
    """acc[o] += a[o] * xv[o // m] for o < C*m: output channel o reads input channel o // m
    (m == 1: one contiguous loop the compiler vectorizes)."""
    if m == 1:
        for o in range(C):
            acc[o] += a[o] * xv[o]
    else:
        for c in range(C):
            xc = xv[c]
            for k in range(c * m, c * m + m):
                acc[k] += a[k] * xc


@jit
def _dw_row_cl(xn, wt, bias, i, j0, j1, out, m, sH, sW, pT, pL, dH, dW, kW):
    """out[j - j0, o] = bias[o] (0 if bias is empty) + sum_{p,q} wt[p*kW + q, o] * xn[ih, iw, o // m] for
    the output pixels (i, j), j in [j0, j1), of the (H, W, C) image xn; wt is the weight as (kH*kW, C*m).

    The tap range of a pixel costs integer divisions, so it is computed only on the border: interior
    pixels take all kW column taps.
    """
    H, W, C = xn.shape
    Cm = out.shape[1]
    kH = wt.shape[0] // kW
    ih0 = i * sH - pT
    p_lo, p_hi = _tap_range(ih0, dH, H, 0, kH)
    ja, je = _interior(sW, pL, dW, kW, W, j0, j1)
    for j in range(j0, j1):
        acc = out[j - j0]
        if bias.shape[0] != 0:
            acc[:] = bias
        else:
            acc[:] = 0
        iw0 = j * sW - pL
        if ja <= j < je:
            q_lo, q_hi = 0, kW
        else:
            q_lo, q_hi = _tap_range(iw0, dW, W, 0, kW)
        for p in range(p_lo, p_hi):
            xr = xn[ih0 + p * dH]
            wr = wt[p * kW:]
            q = q_lo
            if m == 1:
                # three taps per pass over acc: one load and store of it per three FMAs, not per one
                while q + 3 <= q_hi:
                    x0, x1, x2 = xr[iw0 + q * dW], xr[iw0 + (q + 1) * dW], xr[iw0 + (q + 2) * dW]
                    w0, w1, w2 = wr[q], wr[q + 1], wr[q + 2]
                    for o in range(Cm):
                        acc[o] += w0[o] * x0[o] + w1[o] * x1[o] + w2[o] * x2[o]
                    q += 3
            for q in range(q, q_hi):
                _acc_bcast(acc, wr[q], xr[iw0 + q * dW], C, m)


# ---------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------
@jit(parallel=True)
def _fwd_nchw(x, w, bias, y, m, sH, sW, pT, pL, dH, dW):
    N, Cm, Ho, Wo = y.shape
    zero = y.dtype.type(0)
    # one output row per iteration: enough work items even for N = C = 1
    for r in prange(N * Cm * Ho):
        i = r % Ho
        o = (r // Ho) % Cm
        n = r // (Ho * Cm)
        b = bias[o] if bias.shape[0] != 0 else zero
        _dw_row(x[n, o // m], w[o], b, i, 0, Wo, y[n, o, i], sH, sW, pT, pL, dH, dW)


@jit(parallel=True)
def _fwd_cl(x, wt, bias, y, m, sH, sW, pT, pL, dH, dW, kW):
    N, Ho, Wo, Cm = y.shape
    for r in prange(N * Ho):
        i = r % Ho
        n = r // Ho
        _dw_row_cl(x[n], wt, bias, i, 0, Wo, y[n, i], m, sH, sW, pT, pL, dH, dW, kW)


# ---------------------------------------------------------------------------------------------
# backward, input: a gather per input row / pixel, so parallel iterations never write the same place
# ---------------------------------------------------------------------------------------------
@jit(parallel=True)
def _bwd_input_nchw(gy, w, gx, m, sH, sW, pT, pL, dH, dW):
    N, C, H, W = gx.shape
    Ho, Wo = gy.shape[2], gy.shape[3]
    kH, kW = w.shape[1], w.shape[2]
    for r in prange(N * C * H):
        h = r % H
        c = (r // H) % C
        n = r // (H * C)
        gxrow = gx[n, c, h]
        gxrow[:] = 0
        for p in range(kH):
            ti = h + pT - p * dH
            if ti < 0 or ti % sH != 0 or ti // sH >= Ho:
                continue
            i = ti // sH
            for o in range(c * m, c * m + m):
                gyrow = gy[n, o, i]
                for q in range(kW):
                    off = q * dW - pL
                    a, e = _tap_range(off, sW, W, 0, Wo)
                    if e <= a:
                        continue
                    # transpose of _dw_row's gather: scatter gy's row back along the same columns
                    wv = w[o, p, q]
                    gxs = gxrow[a * sW + off:]
                    gys = gyrow[a:]
                    if sW == 1:
                        for t in range(e - a):
                            gxs[t] += wv * gys[t]
                    else:
                        for t in range(e - a):
                            gxs[t * sW] += wv * gys[t]


@jit
def _source_index(t, step, n_out):
    """The output index u with u*step == t, or -1 when there is none in [0, n_out)."""
    if t < 0 or t % step != 0 or t // step >= n_out:
        return -1
    return t // step


@jit(parallel=True)
def _bwd_input_cl(gy, wt, gx, m, sH, sW, pT, pL, dH, dW, kW):
    N, H, W, C = gx.shape
    Ho, Wo = gy.shape[1], gy.shape[2]
    kH = wt.shape[0] // kW
    # which output column each (input column, tap) reads, once per call: keeps the integer
    # divisions out of the per-pixel loop
    src_j = np.empty((W, kW), np.int64)
    for iw in range(W):
        for q in range(kW):
            src_j[iw, q] = _source_index(iw + pL - q * dW, sW, Wo)
    for r in prange(N * H):
        h = r % H
        n = r // H
        src_i = np.empty(kH, np.int64)
        for p in range(kH):
            src_i[p] = _source_index(h + pT - p * dH, sH, Ho)
        for iw in range(W):
            acc = gx[n, h, iw]
            acc[:] = 0
            for p in range(kH):
                i = src_i[p]
                if i < 0:
                    continue
                for q in range(kW):
                    j = src_j[iw, q]
                    if j < 0:
                        continue
                    gv = gy[n, i, j]
                    wv = wt[p * kW + q]
                    if m == 1:
                        for c in range(C):
                            acc[c] += wv[c] * gv[c]
                    else:
                        for c in range(C):
                            s = acc[c]
                            for k in range(c * m, c * m + m):
                                s += wv[k] * gv[k]
                            acc[c] = s


# ---------------------------------------------------------------------------------------------
# backward, weight and bias: each iteration owns a float64 row of partial sums, reduced at the end
# ---------------------------------------------------------------------------------------------
@jit
def _dot_strided(a, b, step, n):
    """sum_t a[t] * b[t*step] for t < n, accumulated in a's dtype (one image row: short enough)."""
    s = a.dtype.type(0)
    if step == 1:
        for t in range(n):
            s += a[t] * b[t]
    else:
        for t in range(n):
            s += a[t] * b[t * step]
    return s


@jit(parallel=True)
def _bwd_weight_nchw(gy, x, partial, m, n_blocks, sH, sW, pT, pL, dH, dW, kH, kW):
    """partial[(n*Cm + o)*n_blocks + blk, p*kW + q] (and [..., kH*kW] for the bias) over one block of rows."""
    N, Cm, Ho, Wo = gy.shape
    H, W = x.shape[2], x.shape[3]
    rows = -(-Ho // n_blocks)
    K = kH * kW
    for r in prange(N * Cm * n_blocks):
        blk = r % n_blocks
        o = (r // n_blocks) % Cm
        n = r // (n_blocks * Cm)
        acc = partial[r]
        acc[:] = 0
        xc = x[n, o // m]
        for i in range(blk * rows, min(Ho, blk * rows + rows)):
            gyrow = gy[n, o, i]
            s = gyrow.dtype.type(0)
            for j in range(Wo):
                s += gyrow[j]
            acc[K] += s
            ih0 = i * sH - pT
            p_lo, p_hi = _tap_range(ih0, dH, H, 0, kH)
            for p in range(p_lo, p_hi):
                xrow = xc[ih0 + p * dH]
                for q in range(kW):
                    off = q * dW - pL
                    a, e = _tap_range(off, sW, W, 0, Wo)
                    if e > a:
                        acc[p * kW + q] += _dot_strided(gyrow[a:], xrow[a * sW + off:], sW, e - a)


@jit(parallel=True)
def _bwd_weight_cl(gy, x, partial, m, sH, sW, pT, pL, dH, dW, kW):
    """partial[chunk, p*kW + q, o] (and [chunk, kH*kW, o] for the bias) over one chunk of image rows."""
    n_chunks, K1, Cm = partial.shape
    N, Ho, Wo = gy.shape[0], gy.shape[1], gy.shape[2]
    H, W, C = x.shape[1], x.shape[2], x.shape[3]
    kH = (K1 - 1) // kW
    rows = N * Ho
    ja, je = _interior(sW, pL, dW, kW, W, 0, Wo)
    for t in prange(n_chunks):
        acc = partial[t]
        acc[:] = 0
        # one image row summed in the input dtype (vectorizes), rows summed in float64
        row_acc = np.empty((K1, Cm), gy.dtype)
        for r in range(t * rows // n_chunks, (t + 1) * rows // n_chunks):
            i = r % Ho
            n = r // Ho
            row_acc[:] = 0
            ih0 = i * sH - pT
            p_lo, p_hi = _tap_range(ih0, dH, H, 0, kH)
            for j in range(Wo):
                gv = gy[n, i, j]
                bacc = row_acc[K1 - 1]
                for o in range(Cm):
                    bacc[o] += gv[o]
                iw0 = j * sW - pL
                # tap ranges (integer divisions) only for border pixels
                if ja <= j < je:
                    q_lo, q_hi = 0, kW
                else:
                    q_lo, q_hi = _tap_range(iw0, dW, W, 0, kW)
                for p in range(p_lo, p_hi):
                    for q in range(q_lo, q_hi):
                        _acc_bcast(row_acc[p * kW + q], gv, x[n, ih0 + p * dH, iw0 + q * dW], C, m)
            for a in range(K1):
                for o in range(Cm):
                    acc[a, o] += row_acc[a, o]


# ---------------------------------------------------------------------------------------------
# Python side: numpy views, output allocation, layout choice
# ---------------------------------------------------------------------------------------------
def is_channels_last(t: torch.Tensor) -> bool:
    return V.memory_format(t) == torch.channels_last


def nchw_view(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


def nhwc_view(t: torch.Tensor) -> np.ndarray:
    """The (N, H, W, C) numpy view of a channels_last tensor (a copy only if it is not one)."""
    return t.detach().permute(0, 2, 3, 1).contiguous().numpy()


def taps_by_channel(weight: torch.Tensor) -> np.ndarray:
    """The (C*m, 1, kH, kW) weight as a (kH*kW, C*m) array: channels-last kernels read it along C."""
    return np.ascontiguousarray(weight.detach().reshape(weight.shape[0], -1).numpy().T)


def bias_array(bias: torch.Tensor | None, like: torch.Tensor) -> np.ndarray:
    """bias as a numpy array; an empty one for None, so the kernel has one signature either way."""
    if bias is None:
        return np.empty(0, dtype=torch.empty(0, dtype=like.dtype).numpy().dtype)
    return bias.detach().contiguous().numpy()


def geometry(stride, pad, dilation):
    return (int(stride[0]), int(stride[1]), int(pad[0]), int(pad[1]), int(dilation[0]), int(dilation[1]))


def depthwise_fwd(x, weight, bias, stride, pad, dilation, out_hw):
    sync_threads()
    N, C = x.shape[0], x.shape[1]
    Cm, _, kH, kW = weight.shape
    m = Cm // C
    Ho, Wo = int(out_hw[0]), int(out_hw[1])
    geo = geometry(stride, pad, dilation)
    b = bias_array(bias, x)
    if is_channels_last(x):
        y = torch.empty((N, Ho, Wo, Cm), dtype=x.dtype)
        _fwd_cl(nhwc_view(x), taps_by_channel(weight), b, y.numpy(), m, *geo, kW)
        return y.permute(0, 3, 1, 2)
    y = torch.empty((N, Cm, Ho, Wo), dtype=x.dtype)
    _fwd_nchw(nchw_view(x), nchw_view(weight).reshape(Cm, kH, kW), b, y.numpy(), m, *geo)
    return y


def depthwise_bwd_input(grad_y, weight, in_hw, stride, pad, dilation, *, in_channels=None):
    """The op calls this with a multiplier of 1; ``in_channels`` (C) lets a caller that knows C pass
    all C*m channels at once (grad_y and weight alone do not tell C)."""
    sync_threads()
    N, Cm = grad_y.shape[0], grad_y.shape[1]
    _, _, kH, kW = weight.shape
    H, W = int(in_hw[0]), int(in_hw[1])
    C = Cm if in_channels is None else int(in_channels)
    m = Cm // C
    geo = geometry(stride, pad, dilation)
    if is_channels_last(grad_y):
        gx = torch.empty((N, H, W, C), dtype=grad_y.dtype)
        _bwd_input_cl(nhwc_view(grad_y), taps_by_channel(weight), gx.numpy(), m, *geo, kW)
        return gx.permute(0, 3, 1, 2)
    gx = torch.empty((N, C, H, W), dtype=grad_y.dtype)
    _bwd_input_nchw(nchw_view(grad_y), nchw_view(weight).reshape(Cm, kH, kW), gx.numpy(), m, *geo)
    return gx


def depthwise_bwd_weight(grad_y, x, kernel_hw, stride, pad, dilation, need_bias):
    sync_threads()
    N, Cm, Ho, Wo = grad_y.shape
    C = x.shape[1]
    m = Cm // C
    kH, kW = int(kernel_hw[0]), int(kernel_hw[1])
    K = kH * kW
    geo = geometry(stride, pad, dilation)
    threads = numba.get_num_threads()
    if is_channels_last(grad_y):
        n_chunks = max(1, min(N * Ho, threads))
        partial = np.empty((n_chunks, K + 1, Cm), dtype=np.float64)
        _bwd_weight_cl(nhwc_view(grad_y), nhwc_view(x), partial, m, *geo, kW)
        sums = partial.sum(axis=0).T  # (Cm, K + 1)
    else:
        # split rows only when there are too few (n, o) planes to keep every thread busy
        n_blocks = max(1, min(Ho, -(-4 * threads // max(1, N * Cm))))
        partial = np.empty((N * Cm * n_blocks, K + 1), dtype=np.float64)
        _bwd_weight_nchw(nchw_view(grad_y), nchw_view(x), partial, m, n_blocks, *geo, kH, kW)
        sums = partial.reshape(N, Cm, n_blocks, K + 1).sum(axis=(0, 2))
    sums = torch.from_numpy(np.ascontiguousarray(sums)).to(grad_y.dtype)
    grad_weight = sums[:, :K].reshape(Cm, 1, kH, kW).contiguous()
    # a copy, never a view of sums: with one channel the weight grad above is a view of it too
    grad_bias = sums[:, K].clone() if need_bias else None
    return grad_weight, grad_bias
