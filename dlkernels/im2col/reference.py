"""The torch im2col of a channels_last input and its adjoint (contract: dlkernels/im2col/op.py).

Forward: one copy of a strided view of the (padded) NHWC tensor, where F.unfold's (N, C*kH*kW, L)
needs another copy to become row-major. Adjoint: one strided add per kernel tap, each over runs of C
contiguous values, clipped to the input (no padded buffer); autograd through the view would run
``unfold_backward`` twice, a zero-filled scatter 7-10x slower (ResNet-18 8x64x16x16 3x3: 1.73 -> 0.17
ms, 2 cores, Zen5). Any device and dtype; each backend's kernels replace both where they run (op.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def im2col(x: Tensor, kernel_size, stride, padding, dilation, taps_first: bool) -> Tensor:
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    n = x.shape[0]
    xh = x.permute(0, 2, 3, 1)
    if ph or pw:
        xh = F.pad(xh, (0, 0, pw, pw, ph, ph))
    win = xh.unfold(1, dh * (kh - 1) + 1, sh).unfold(2, dw * (kw - 1) + 1, sw)  # (N, Ho, Wo, C, span, span)
    if dh > 1 or dw > 1:
        win = win[..., ::dh, ::dw]
    if taps_first:
        win = win.permute(0, 1, 2, 4, 5, 3)
    return win.reshape(n * win.shape[1] * win.shape[2], x.shape[1] * kh * kw)  # sizes given: N may be 0


def _tap_span(size: int, out: int, stride: int, pad: int, offset: int) -> tuple[int, int, int]:
    """For one kernel tap at ``offset`` (= tap index * dilation) along a dimension: (first output
    position, first input position, count) of the outputs whose input position ``o * stride + offset -
    pad`` lies inside [0, size)."""
    first = max(0, -((offset - pad) // stride))                     # ceil((pad - offset) / stride)
    last = min(out - 1, (size - 1 + pad - offset) // stride)
    return first, first * stride + offset - pad, max(0, last - first + 1)


def col2im(rows: Tensor, x_shape, out_hw, kernel_size, stride, padding, dilation, taps_first: bool) -> Tensor:
    """The adjoint of im2col: (N, C, H, W) channels_last."""
    n, c, h, w = x_shape
    ho, wo = out_hw
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    g = rows.reshape(n, ho, wo, kh, kw, c) if taps_first else rows.reshape(n, ho, wo, c, kh, kw)
    gx = rows.new_zeros(n, h, w, c)
    for i in range(kh):
        oh, ih, cnt_h = _tap_span(h, ho, sh, ph, i * dh)
        if not cnt_h:
            continue
        for j in range(kw):
            ow, iw, cnt_w = _tap_span(w, wo, sw, pw, j * dw)
            if not cnt_w:
                continue
            tap = g[:, oh:oh + cnt_h, ow:ow + cnt_w]
            tap = tap[:, :, :, i, j, :] if taps_first else tap[:, :, :, :, i, j]
            gx[:, ih:ih + (cnt_h - 1) * sh + 1:sh, iw:iw + (cnt_w - 1) * sw + 1:sw] += tap
    return gx.permute(0, 3, 1, 2)


def col2im_batchable(rows: Tensor, x_shape, out_hw, kernel_size, stride, padding, dilation, taps_first: bool) -> Tensor:
    """col2im as one F.fold: the same sums (bitwise, float16 to float64), in ops that torch's older vmap
    batches, which cannot write the strided adds' slices in place ("Batching rule not implemented for
    aten::alias"): the adjoint of a backward whose gradients come batched (autograd.grad with
    is_grads_batched, jacobian(vectorize=True)). Not the default: 5-10x slower than the strided adds at
    32-64 channels on a 2-core CPU (8x64x16x16 3x3: 2.38 against 0.25 ms; 32x32x28x28: 12.6 against 2.5)."""
    n, c, h, w = x_shape
    ho, wo = out_hw
    kh, kw = kernel_size
    if taps_first:
        cols = rows.reshape(n, ho * wo, kh, kw, c).permute(0, 4, 2, 3, 1)
    else:
        cols = rows.reshape(n, ho * wo, c, kh, kw).permute(0, 2, 3, 4, 1)
    gx = F.fold(cols.reshape(n, c * kh * kw, ho * wo), (h, w), kernel_size, dilation, padding, stride)
    return gx.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # channels_last, as col2im's
