"""Numba kernels for batch_norm_residual (the contract is in op.py's docstring).

Each kernel has two loop orders, so memory is always read sequentially: NCS walks (n, c) rows of S
contiguous values (the per-channel values are loop constants); channels-last walks (n, s) rows of C
contiguous values (the per-channel vectors are read alongside, vectorized over c).

Both reductions (the statistics and the backward sums) are one kernel per layout: per-task partial
sums in float64 of a = x - center[c] (or dz) and of a * (x - center[c]), merged per channel
afterwards. For the statistics the center is a value of the channel itself (its first element), so
the shifted sums do not cancel even for a mean of 1e4 with a tiny variance; for the backward the
center is the mean, which gives sum(dz * xhat) / invstd directly.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from numba import prange

from .._numba_common import dummy, jit, pjit, sync_threads
from .op import fold_scale_shift
from .op import reads_channels_last as _is_cl

_ACT = {"": 0, "relu": 1, "silu": 2}
SPLIT = 16384  # values per task along a long NCS row (so few, huge channels still use every thread)
CL_CHUNK_VALUES = 65536  # values per channels-last reduction task: partial vectors stay few and small


@jit(inline="always")
def _pre(x, r, has_r, scale, shift):
    z = x * scale + shift
    return z + r if has_r else z


@jit(inline="always")
def _act(z, act, zero):
    if act == 1:
        return zero if z < zero else z  # not "z > 0": relu(nan) is nan
    if act == 2:
        return z / (1 + math.exp(-z))
    return z


@jit(inline="always")
def _dz(g, y, x, r, has_r, scale, shift, act, zero):
    """grad_y * act'(z): relu from the output's mask (as torch's threshold_backward: y <= 0 gives 0,
    a NaN output passes its gradient), silu from the recomputed pre-activation."""
    if act == 1:
        return zero if y <= zero else g
    if act == 2:
        z = _pre(x, r, has_r, scale, shift)
        s = 1 / (1 + math.exp(-z))
        return g * s * (1 + z * (1 - s))
    return g


# -------------------------------------------------------------------------------------------------
# reductions: parts[..., 0] = sum of a, parts[..., 1] = sum of a * (x - center), a = x - center or dz
# -------------------------------------------------------------------------------------------------
@pjit
def _reduce_ncs(x, r, has_r, g, y, center, scale, shift, backward, act, write_dz, dzo, nsplit, parts):
    """x, r, g, y, dzo: (N, C, S); parts: (N, C, nsplit, 2) float64. dzo receives dz when write_dz."""
    nn, cc, ss = x.shape
    zero = np.zeros(1, x.dtype)[0]
    for t in prange(nn * cc * nsplit):
        n = t // (cc * nsplit)
        c = (t // nsplit) % cc
        sp = t % nsplit
        s0 = sp * ss // nsplit
        s1 = (sp + 1) * ss // nsplit
        k = center[c]
        sa = 0.0
        sb = 0.0
        if backward:
            sc = scale[c]
            sh = shift[c]
            for s in range(s0, s1):
                d = _dz(g[n, c, s], y[n, c, s], x[n, c, s], r[n, c, s], has_r, sc, sh, act, zero)
                if write_dz:
                    dzo[n, c, s] = d
                sa += d
                sb += d * (x[n, c, s] - k)
        else:
            for s in range(s0, s1):
                d = x[n, c, s] - k
                sa += d
                sb += d * d
        parts[n, c, sp, 0] = sa
        parts[n, c, sp, 1] = sb


@pjit
def _reduce_cl(x, r, has_r, g, y, center, scale, shift, backward, act, write_dz, dzo, parts):
    """x, r, g, y, dzo: (N, S, C) contiguous; parts: (nchunk, C, 2) float64, one task per chunk of rows.
    dzo receives dz when write_dz."""
    nn, ss, cc = x.shape
    rows = nn * ss
    nchunk = parts.shape[0]
    zero = np.zeros(1, x.dtype)[0]
    for t in prange(nchunk):
        sa = np.zeros(cc)
        sb = np.zeros(cc)
        for row in range(t * rows // nchunk, (t + 1) * rows // nchunk):
            n = row // ss
            s = row % ss
            if backward:
                for c in range(cc):
                    d = _dz(g[n, s, c], y[n, s, c], x[n, s, c], r[n, s, c], has_r, scale[c], shift[c], act, zero)
                    if write_dz:
                        dzo[n, s, c] = d
                    sa[c] += d
                    sb[c] += d * (x[n, s, c] - center[c])
            else:
                for c in range(cc):
                    d = x[n, s, c] - center[c]
                    sa[c] += d
                    sb[c] += d * d
        for c in range(cc):
            parts[t, c, 0] = sa[c]
            parts[t, c, 1] = sb[c]


# -------------------------------------------------------------------------------------------------
# elementwise passes
# -------------------------------------------------------------------------------------------------
@pjit
def _apply_ncs(x, r, has_r, scale, shift, act, nsplit, out):
    nn, cc, ss = x.shape
    zero = np.zeros(1, x.dtype)[0]
    for t in prange(nn * cc * nsplit):
        n = t // (cc * nsplit)
        c = (t // nsplit) % cc
        sp = t % nsplit
        sc = scale[c]
        sh = shift[c]
        for s in range(sp * ss // nsplit, (sp + 1) * ss // nsplit):
            out[n, c, s] = _act(_pre(x[n, c, s], r[n, c, s], has_r, sc, sh), act, zero)


@pjit
def _apply_cl(x, r, has_r, scale, shift, act, out):
    nn, ss, cc = x.shape
    zero = np.zeros(1, x.dtype)[0]
    for row in prange(nn * ss):
        n = row // ss
        s = row % ss
        for c in range(cc):
            out[n, s, c] = _act(_pre(x[n, s, c], r[n, s, c], has_r, scale[c], shift[c]), act, zero)


@jit(inline="always")
def _grad_x(d, x, mean, invstd, scale, c_dz, c_xhat, centre):
    if centre:
        return scale * (d - c_dz - (x - mean) * invstd * c_xhat)
    return scale * d  # evaluation: x not read (an infinite x would make it inf * 0)


@pjit
def _backward_apply_ncs(g, y, x, r, has_r, mean, invstd, scale, shift, c_dz, c_xhat, centre, act, need_r,
                        nsplit, gx, gr):
    nn, cc, ss = x.shape
    zero = np.zeros(1, x.dtype)[0]
    for t in prange(nn * cc * nsplit):
        n = t // (cc * nsplit)
        c = (t // nsplit) % cc
        sp = t % nsplit
        mu, inv, sc, sh, cd, cx = mean[c], invstd[c], scale[c], shift[c], c_dz[c], c_xhat[c]
        for s in range(sp * ss // nsplit, (sp + 1) * ss // nsplit):
            d = _dz(g[n, c, s], y[n, c, s], x[n, c, s], r[n, c, s], has_r, sc, sh, act, zero)
            gx[n, c, s] = _grad_x(d, x[n, c, s], mu, inv, sc, cd, cx, centre)
            if need_r:
                gr[n, c, s] = d


@pjit
def _backward_apply_cl(g, y, x, r, has_r, mean, invstd, scale, shift, c_dz, c_xhat, centre, act, need_r, gx,
                       gr):
    nn, ss, cc = x.shape
    zero = np.zeros(1, x.dtype)[0]
    for row in prange(nn * ss):
        n = row // ss
        s = row % ss
        for c in range(cc):
            d = _dz(g[n, s, c], y[n, s, c], x[n, s, c], r[n, s, c], has_r, scale[c], shift[c], act, zero)
            gx[n, s, c] = _grad_x(d, x[n, s, c], mean[c], invstd[c], scale[c], c_dz[c], c_xhat[c], centre)
            if need_r:
                gr[n, s, c] = d


# -------------------------------------------------------------------------------------------------
# the contract
# -------------------------------------------------------------------------------------------------
def _arr(t, cl: bool) -> np.ndarray:
    """The C-contiguous numpy view the kernels index: (N, C, S), or (N, S, C) when channels-last."""
    t = t.detach()
    return (t.transpose(1, 2).contiguous() if cl else t.contiguous()).numpy()


def _new(x3, cl: bool):
    """(tensor in x3's layout, its kernel view)."""
    n, c, s = x3.shape
    if cl:
        t = torch.empty((n, s, c), dtype=x3.dtype)
        return t.transpose(1, 2), t.numpy()
    t = torch.empty((n, c, s), dtype=x3.dtype)
    return t, t.numpy()


def _nsplit(s: int) -> int:
    return max(1, -(-s // SPLIT))


def _vec(t) -> np.ndarray:
    return t.detach().contiguous().numpy()


def _reduce(g3, y3, x3, residual3, center, scale, shift, backward, activation, dz_out=None):
    """Per-channel float64 (sum of a, sum of a * (x - center)) over N and S; dz into the kernel view
    dz_out unless None."""
    sync_threads()
    cl = _is_cl(x3)
    x = _arr(x3, cl)
    r = x if residual3 is None else _arr(residual3, cl)
    g = x if g3 is None else _arr(g3, cl)
    y = x if y3 is None else _arr(y3, cl)
    n, c, s = x3.shape
    args = (x, r, residual3 is not None, g, y, center, scale, shift, backward, _ACT[activation],
            dz_out is not None, x if dz_out is None else dz_out)  # x: a placeholder never written
    if cl:
        nchunk = max(1, min(n * s, (n * s * c) // CL_CHUNK_VALUES, 256))
        parts = np.empty((nchunk, c, 2))
        _reduce_cl(*args, parts)
        return parts.sum(axis=0)
    nsplit = _nsplit(s)
    parts = np.empty((n, c, nsplit, 2))
    _reduce_ncs(*args, nsplit, parts)
    return parts.sum(axis=(0, 2))


def bn_stats(x3):
    sdtype = torch.float64 if x3.dtype == torch.float64 else torch.float32
    n, c, s = x3.shape
    count = n * s
    # shift each channel by one of its own values: the shifted sums then carry no large mean
    center = x3[0, :, 0].detach().to(torch.float64).contiguous().numpy()
    unused = dummy(x3.dtype)
    sums = _reduce(None, None, x3, None, center, unused, unused, False, "")
    with np.errstate(invalid="ignore"):  # an infinite input's NaN statistics are torch's too, silently
        d_mean = sums[:, 0] / count
        mean = center + d_mean
        var = np.maximum(sums[:, 1] / count - d_mean * d_mean, 0.0)  # np.maximum keeps nan
    return torch.from_numpy(mean).to(sdtype), torch.from_numpy(var).to(sdtype)


def bn_apply(x3, residual3, mean, var, weight, bias, eps, activation):
    scale, shift = fold_scale_shift(mean, var, weight, bias, eps)
    sync_threads()
    cl = _is_cl(x3)
    x = _arr(x3, cl)
    r = x if residual3 is None else _arr(residual3, cl)
    out, o = _new(x3, cl)
    args = (x, r, residual3 is not None, _vec(scale), _vec(shift), _ACT[activation])
    if cl:
        _apply_cl(*args, o)
    else:
        _apply_ncs(*args, _nsplit(x3.shape[2]), o)
    return out


def bn_backward_reduce(grad_y3, y3, x3, residual3, mean, invstd, scale, shift, activation, write_dz):
    dz3, dzo = _new(x3, _is_cl(x3)) if write_dz else (None, None)
    sums = _reduce(grad_y3, y3 if activation == "relu" else None, x3, residual3,
                   _vec(mean).astype(np.float64), _vec(scale), _vec(shift), True, activation, dzo)
    sum_dz = torch.from_numpy(sums[:, 0]).to(mean.dtype)
    sum_dz_xhat = (torch.from_numpy(sums[:, 1]) * invstd.detach().to(torch.float64)).to(mean.dtype)
    return sum_dz, sum_dz_xhat, dz3


def bn_backward_apply(grad_y3, y3, x3, residual3, mean, invstd, scale, shift, c_dz, c_xhat, activation,
                      need_grad_residual):
    sync_threads()
    cl = _is_cl(x3)
    x = _arr(x3, cl)
    r = x if residual3 is None else _arr(residual3, cl)
    g = _arr(grad_y3, cl)
    y = _arr(y3, cl) if activation == "relu" else x
    grad_x, gx = _new(x3, cl)
    grad_r, gr = _new(x3, cl) if need_grad_residual else (None, gx)
    centre = c_dz is not None  # None in evaluation (see the contract); the arrays are then unread
    args = (g, y, x, r, residual3 is not None, _vec(mean), _vec(invstd), _vec(scale), _vec(shift),
            _vec(c_dz if centre else mean), _vec(c_xhat if centre else mean), centre, _ACT[activation],
            bool(need_grad_residual))
    if cl:
        _backward_apply_cl(*args, gx, gr)
    else:
        _backward_apply_ncs(*args, _nsplit(x3.shape[2]), gx, gr)
    return grad_x, grad_r
