"""Numba kernels for matmul/linear (the contract is in op.py's docstring).

GEMM, BLIS-style: for each K block of KC, A is packed into MR-row panels and B into NR-column
panels, both stored k-contiguous and zero-padded to whole panels and to a multiple of KPAD in k.
The register-blocked micro-kernel then computes an MR x NR tile as MR*NR dot products over k held
in scalar accumulators: LLVM's loop vectorizer turns each into an 8-lane (float32) FMA chain, so a
k step is MR + NR vector loads for MR*NR vector FMAs and stays FMA-bound. (The textbook
outer-product form, a tile of accumulators updated by broadcast A times a B vector, does not
vectorize through Numba: the tile stays in memory and LLVM emits scalar code, ~4 GFLOP/s.)
Work is split over (batch, MC-row block, NC-column block) tasks with prange; a task keeps its A
block (MC x KC) in L2 and one B panel (NR x KC) in L1 while it sweeps the A panels.
"""
from __future__ import annotations

import numpy as np
import torch
from numba import prange

from .._numba_common import dummy, flat_view, jit, pjit, sync_threads

MR, NR = 4, 2  # micro-tile; 4x2 and 2x4 measured best (8 accumulators + 6 loads fit 16 ymm registers)
KC_BYTES = 2048  # one k-row of a panel block: KC = 512 float32 / 256 float64 (A panel 8 KiB, B panel 4 KiB)
MC, NC = 128, 256  # rows / columns of C per parallel task (multiples of MR / NR)
KPAD = 16  # k of a packed block is padded to this so the vectorized loop needs no scalar remainder
PACK_GROUP = 8  # panels packed per task: their rows/columns share the cache lines the source is read by


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@pjit
def _pack(src, s_batch, s_row, s_k, rows, k0, kc, dst):
    """dst[b, q, r, p] = src[b, q*R + r, k0 + p] (zero outside rows x kc), R = dst.shape[2].

    A is packed with (s_row, s_k) = (stride_m, stride_k), B with (stride_n, stride_k): both become
    panels of R rows that are contiguous in k."""
    nb, npanel, width, kcp = dst.shape
    ngroup = (npanel + PACK_GROUP - 1) // PACK_GROUP
    for t in prange(nb * ngroup):
        b = t // ngroup
        q0 = (t % ngroup) * PACK_GROUP
        q1 = min(q0 + PACK_GROUP, npanel)
        base = b * s_batch + k0 * s_k
        # k outermost: a row-major source is then read along whole cache lines of the group's
        # columns, a column-major one along its rows; either way every line is used while hot.
        for p in range(kcp):
            for q in range(q0, q1):
                for r in range(width):
                    row = q * width + r
                    if row < rows and p < kc:
                        dst[b, q, r, p] = src[base + row * s_row + p * s_k]
                    else:
                        dst[b, q, r, p] = 0


@jit(inline="always")
def _micro_tile(ap, ba, ip, bp, bb, jp, kcp, zero):
    """The MR x NR dot products of A panel ip and B panel jp over the packed k block."""
    c00 = c01 = c10 = c11 = c20 = c21 = c30 = c31 = zero
    for p in range(kcp):
        a0 = ap[ba, ip, 0, p]
        a1 = ap[ba, ip, 1, p]
        a2 = ap[ba, ip, 2, p]
        a3 = ap[ba, ip, 3, p]
        b0 = bp[bb, jp, 0, p]
        b1 = bp[bb, jp, 1, p]
        c00 += a0 * b0
        c01 += a0 * b1
        c10 += a1 * b0
        c11 += a1 * b1
        c20 += a2 * b0
        c21 += a2 * b1
        c30 += a3 * b0
        c31 += a3 * b1
    return c00, c01, c10, c11, c20, c21, c30, c31


@jit(inline="always")
def _store(c, b, m, n, v, rows, cols, accumulate, last, bias, bias_dim, has_bias, relu, zero):
    """Write one result of a tile (the fused epilogue: bias and relu once, after the last K block)."""
    if m < rows and n < cols:
        if accumulate:
            v += c[b, m, n]
        if last:
            if has_bias:
                v += bias[n] if bias_dim == 1 else bias[m]
            if relu and v < zero:  # not "v > 0": relu(nan) is nan
                v = zero
        c[b, m, n] = v


@pjit
def _gemm_block(ap, bp, c, accumulate, last, bias, bias_dim, has_bias, relu):
    """c[b] (+)= A-block @ B-block for the packed K block, epilogue fused when ``last``."""
    nb, rows, cols = c.shape
    kcp = ap.shape[3]
    zero = np.zeros(1, c.dtype)[0]
    n_ic = (rows + MC - 1) // MC
    n_jc = (cols + NC - 1) // NC
    a_batched = ap.shape[0] > 1  # a stride-0 batch is packed once
    b_batched = bp.shape[0] > 1
    for t in prange(nb * n_ic * n_jc):
        b = t // (n_ic * n_jc)
        ic = (t // n_jc) % n_ic
        jc = t % n_jc
        ba = b if a_batched else 0
        bb = b if b_batched else 0
        ip0 = ic * (MC // MR)
        ip1 = min(ip0 + MC // MR, ap.shape[1])
        jp0 = jc * (NC // NR)
        jp1 = min(jp0 + NC // NR, bp.shape[1])
        for jp in range(jp0, jp1):
            n = jp * NR
            for ip in range(ip0, ip1):
                m = ip * MR
                c00, c01, c10, c11, c20, c21, c30, c31 = _micro_tile(ap, ba, ip, bp, bb, jp, kcp, zero)
                _store(c, b, m, n, c00, rows, cols, accumulate, last, bias, bias_dim, has_bias, relu, zero)
                _store(c, b, m, n + 1, c01, rows, cols, accumulate, last, bias, bias_dim, has_bias, relu, zero)
                _store(c, b, m + 1, n, c10, rows, cols, accumulate, last, bias, bias_dim, has_bias, relu, zero)
                _store(c, b, m + 1, n + 1, c11, rows, cols, accumulate, last, bias, bias_dim, has_bias, relu, zero)
                _store(c, b, m + 2, n, c20, rows, cols, accumulate, last, bias, bias_dim, has_bias, relu, zero)
                _store(c, b, m + 2, n + 1, c21, rows, cols, accumulate, last, bias, bias_dim, has_bias, relu, zero)
                _store(c, b, m + 3, n, c30, rows, cols, accumulate, last, bias, bias_dim, has_bias, relu, zero)
                _store(c, b, m + 3, n + 1, c31, rows, cols, accumulate, last, bias, bias_dim, has_bias, relu, zero)


def mm(a, b, bias, bias_dim, activation):
    sync_threads()
    batched = a.dim() == 3
    a3 = a if batched else a.unsqueeze(0)
    b3 = b if batched else b.unsqueeze(0)
    nb, m, k = a3.shape
    n = b3.shape[2]
    out = torch.empty((nb, m, n), dtype=a.dtype)
    if out.numel() > 0:
        o = out.numpy()
        bias_np = dummy(a.dtype) if bias is None else bias.detach().numpy()
        relu = activation == "relu"
        # A batch that is stride 0 (or of size 1) is one matrix: pack it once for every batch.
        nba = 1 if (nb == 1 or a3.stride(0) == 0) else nb
        nbb = 1 if (nb == 1 or b3.stride(0) == 0) else nb
        a_np = flat_view(a3) if a3.numel() else dummy(a.dtype)
        b_np = flat_view(b3) if b3.numel() else dummy(a.dtype)
        kc_max = KC_BYTES // a.element_size()
        n_kb = max(1, _cdiv(k, kc_max))  # K = 0 still runs one (empty) block for the epilogue
        kc_full = min(k, kc_max)
        kcp_full = _cdiv(kc_full, KPAD) * KPAD
        ap_buf = np.empty((nba, _cdiv(m, MR), MR, kcp_full), dtype=o.dtype)
        bp_buf = np.empty((nbb, _cdiv(n, NR), NR, kcp_full), dtype=o.dtype)
        for kb in range(n_kb):
            k0 = kb * kc_max
            kc = min(kc_max, k - k0)
            kcp = _cdiv(kc, KPAD) * KPAD
            ap = ap_buf[..., :kcp] if kcp == kcp_full else np.empty((*ap_buf.shape[:3], kcp), o.dtype)
            bp = bp_buf[..., :kcp] if kcp == kcp_full else np.empty((*bp_buf.shape[:3], kcp), o.dtype)
            _pack(a_np, a3.stride(0), a3.stride(1), a3.stride(2), m, k0, kc, ap)
            _pack(b_np, b3.stride(0), b3.stride(2), b3.stride(1), n, k0, kc, bp)
            _gemm_block(ap, bp, o, kb > 0, kb == n_kb - 1, bias_np, bias_dim, bias is not None, relu)
    return out if batched else out[0]


@pjit
def _bias_act_backward_cols(g, o, relu, need_bias, gp, gb):
    """Per-column bias gradient (bias_dim=1): g, o, gp viewed (rows, N); gb (N,) float64 sums."""
    rows, cols = g.shape
    nchunk = min(rows, 64)
    part = np.zeros((nchunk, cols), dtype=np.float64)
    for ch in prange(nchunk):
        for r in range(ch * rows // nchunk, (ch + 1) * rows // nchunk):
            for j in range(cols):
                v = g[r, j]
                if relu:
                    # as torch's threshold_backward: out <= 0 -> 0 (a NaN output passes its gradient)
                    v = 0.0 if o[r, j] <= 0 else v
                    gp[r, j] = v
                if need_bias:
                    part[ch, j] += v
    if need_bias:
        for j in prange(cols):
            s = 0.0
            for ch in range(nchunk):
                s += part[ch, j]
            gb[j] = s


@pjit
def _bias_act_backward_rows(g, o, relu, need_bias, gp, gb):
    """Per-row bias gradient (bias_dim=0): g, o, gp viewed (B, M, N); gb (M,) float64 sums."""
    nb, rows, cols = g.shape
    for i in prange(rows):
        s = 0.0
        for b in range(nb):
            for j in range(cols):
                v = g[b, i, j]
                if relu:
                    v = 0.0 if o[b, i, j] <= 0 else v
                    gp[b, i, j] = v
                s += v
        if need_bias:
            gb[i] = s


def bias_act_backward(grad_out, out, activation, bias_dim, need_bias):
    sync_threads()
    relu = activation == "relu"
    grad_pre = torch.empty_like(grad_out) if relu else grad_out
    grad_bias = None
    if need_bias:
        grad_bias = torch.empty(grad_out.shape[-2 + bias_dim], dtype=grad_out.dtype)
    if grad_out.numel() == 0:
        if grad_bias is not None:
            grad_bias.zero_()
        return grad_pre, grad_bias
    if not relu and not need_bias:
        return grad_pre, grad_bias
    cols = grad_out.shape[-1]
    g = grad_out.detach()
    gb64 = np.zeros(grad_bias.shape[0] if need_bias else 1, dtype=np.float64)
    if bias_dim == 1 or not need_bias:
        _bias_act_backward_cols(g.reshape(-1, cols).numpy(), out.detach().reshape(-1, cols).numpy(), relu,
                                need_bias, grad_pre.reshape(-1, cols).numpy(), gb64)
    else:
        g3 = g.reshape(-1, *g.shape[-2:])
        _bias_act_backward_rows(g3.numpy(), out.detach().reshape(g3.shape).numpy(), relu, need_bias,
                                grad_pre.reshape(g3.shape).numpy(), gb64)
    if need_bias:
        grad_bias.copy_(torch.from_numpy(gb64))
    return grad_pre, grad_bias
