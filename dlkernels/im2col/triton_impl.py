"""Triton kernels of the channels_last im2col and its adjoint (contract: dlkernels/im2col/op.py).

Pure data movement, any float dtype. im2col: a (rows x columns) tile of the output per program,
each element one masked load of x (0 in the padding), so the stores run along a row's contiguous
columns. The adjoint gathers as the C++ kernel does: a (pixels x channels) tile of grad_x per
program, summing, over the kH*kW taps (unrolled), the row elements that read each pixel, masked where
the tap reads no pixel; one store, no atomics. Addresses in int64: the rows of a large batch pass
2^31 elements.

Under TRITON_INTERPRET=1 (CPU) no autotuning happens: each kernel runs one fixed small config.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton_common import TunedKernel, cdiv, cfg
from ..depthwise.triton_impl import acc_dtype


@triton.jit
def _im2col_kernel(x_ptr, rows_ptr, R, K, C, H, W, Ho, Wo, KW, sH, sW, pH, pW, dH, dW,
                   TAPS_FIRST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    n = r // (Ho * Wo)
    i = (r // Wo) % Ho
    j = r % Wo
    if TAPS_FIRST:  # (kH, kW, C)
        tap = k // C
        c = k % C
    else:  # (C, kH, kW)
        c = k // (K // C)
        tap = k % (K // C)
    h = i[:, None] * sH - pH + (tap // KW)[None, :] * dH
    w = j[:, None] * sW - pW + (tap % KW)[None, :] * dW
    live = (r[:, None] < R) & (k[None, :] < K)
    inside = live & (h >= 0) & (h < H) & (w >= 0) & (w < W)
    v = tl.load(x_ptr + ((n[:, None] * H + h) * W + w) * C + c[None, :], mask=inside, other=0.0)
    tl.store(rows_ptr + r[:, None] * K + k[None, :], v, mask=live)


@triton.jit
def _col2im_kernel(rows_ptr, gx_ptr, P, K, C, H, W, Ho, Wo, sH, sW, pH, pW, dH, dW,
                   KH: tl.constexpr, KW: tl.constexpr, TAPS_FIRST: tl.constexpr, ACC: tl.constexpr,
                   BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    p = (tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    n = p // (H * W)
    h = (p // W) % H
    w = p % W
    live_c = c < C
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=ACC)
    for kh in tl.static_range(KH):
        ti = h + pH - kh * dH  # the output row i = ti / sH that reads row h through tap kh, if whole
        ok_h = (p < P) & (ti >= 0) & (ti % sH == 0) & (ti // sH < Ho)
        for kw in tl.static_range(KW):
            tj = w + pW - kw * dW
            ok = ok_h & (tj >= 0) & (tj % sW == 0) & (tj // sW < Wo)
            row = (n * Ho + ti // sH) * Wo + tj // sW
            if TAPS_FIRST:
                col = (kh * KW + kw) * C + c
            else:
                col = c * (KH * KW) + kh * KW + kw
            v = tl.load(rows_ptr + row[:, None] * K + col[None, :], mask=ok[:, None] & live_c[None, :], other=0.0)
            acc += v.to(ACC)
    tl.store(gx_ptr + p[:, None] * C + c[None, :], acc.to(gx_ptr.dtype.element_ty),
             mask=(p[:, None] < P) & live_c[None, :])


_IM2COL_CONFIGS = [cfg(BLOCK_R=32, BLOCK_K=128), cfg(BLOCK_R=64, BLOCK_K=64), cfg(BLOCK_R=16, BLOCK_K=256)]
_COL2IM_CONFIGS = [cfg(BLOCK_P=32, BLOCK_C=64), cfg(BLOCK_P=64, BLOCK_C=32), cfg(BLOCK_P=16, BLOCK_C=128)]
_im2col = TunedKernel(_im2col_kernel, _IM2COL_CONFIGS, ["K", "C", "TAPS_FIRST"], dict(BLOCK_R=32, BLOCK_K=16))
_col2im = TunedKernel(_col2im_kernel, _COL2IM_CONFIGS, ["C", "KH", "KW", "TAPS_FIRST"], dict(BLOCK_P=32, BLOCK_C=4))


def im2col(x, kernel_size, stride, padding, dilation, taps_first, out_hw):
    n, c, h, w = x.shape
    ho, wo = out_hw
    k = kernel_size[0] * kernel_size[1] * c
    rows = x.new_empty(n * ho * wo, k)
    grid = lambda meta: (cdiv(rows.shape[0], meta["BLOCK_R"]), cdiv(k, meta["BLOCK_K"]))  # noqa: E731
    _im2col(grid, x, rows, rows.shape[0], k, c, h, w, ho, wo, kernel_size[1], *stride, *padding, *dilation,
            TAPS_FIRST=bool(taps_first))
    return rows


def col2im(rows, x_shape, out_hw, kernel_size, stride, padding, dilation, taps_first):
    n, c, h, w = x_shape
    gx = torch.empty(x_shape, dtype=rows.dtype, device=rows.device, memory_format=torch.channels_last)
    grid = lambda meta: (cdiv(n * h * w, meta["BLOCK_P"]), cdiv(c, meta["BLOCK_C"]))  # noqa: E731
    _col2im(grid, rows, gx, n * h * w, rows.shape[1], c, h, w, *out_hw, *stride, *padding, *dilation,
            KH=kernel_size[0], KW=kernel_size[1], TAPS_FIRST=bool(taps_first), ACC=acc_dtype(rows.dtype))
    return gx
