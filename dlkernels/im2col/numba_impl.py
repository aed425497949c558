"""Numba kernels of the channels_last im2col (the same loops as csrc/im2col.cpp). Contract:
dlkernels/im2col/op.py."""
from __future__ import annotations

import torch
from numba import prange

from .._numba_common import pjit, sync_threads


@pjit
def _im2col(x, rows, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo, taps_first):
    """x (N, H, W, C) contiguous; rows (N*Ho*Wo, kH*kW*C), each written whole (0 in the padding)."""
    n_img, h_in, w_in, c_in = x.shape
    taps = kh * kw
    for r in prange(n_img * ho * wo):
        n = r // (ho * wo)
        i = (r // wo) % ho
        j = r % wo
        for a in range(kh):
            h = i * sh - ph + a * dh
            for b in range(kw):
                w = j * sw - pw + b * dw
                inside = 0 <= h < h_in and 0 <= w < w_in
                tap = a * kw + b
                for c in range(c_in):
                    v = x[n, h, w, c] if inside else 0.0
                    if taps_first:
                        rows[r, tap * c_in + c] = v
                    else:
                        rows[r, c * taps + tap] = v


@pjit
def _col2im(rows, gx, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo, taps_first):
    """gx (N, H, W, C) contiguous: each pixel the sum of its values in the rows whose window reads it."""
    n_img, h_in, w_in, c_in = gx.shape
    taps = kh * kw
    for nh in prange(n_img * h_in):
        n = nh // h_in
        h = nh % h_in
        for w in range(w_in):
            for c in range(c_in):
                gx[n, h, w, c] = 0.0
            for a in range(kh):
                ti = h + ph - a * dh
                if ti < 0 or ti % sh != 0 or ti // sh >= ho:
                    continue
                i = ti // sh
                for b in range(kw):
                    tj = w + pw - b * dw
                    if tj < 0 or tj % sw != 0 or tj // sw >= wo:
                        continue
                    r = (n * ho + i) * wo + tj // sw
                    tap = a * kw + b
                    if taps_first:
                        for c in range(c_in):
                            gx[n, h, w, c] += rows[r, tap * c_in + c]
                    else:
                        for c in range(c_in):
                            gx[n, h, w, c] += rows[r, c * taps + tap]


def im2col(x, kernel_size, stride, padding, dilation, taps_first, out_hw):
    sync_threads()
    rows = x.new_empty(x.shape[0] * out_hw[0] * out_hw[1], kernel_size[0] * kernel_size[1] * x.shape[1])
    _im2col(x.detach().permute(0, 2, 3, 1).numpy(), rows.numpy(), *kernel_size, *stride, *padding, *dilation,
            *out_hw, taps_first)
    return rows


def col2im(rows, x_shape, out_hw, kernel_size, stride, padding, dilation, taps_first):
    sync_threads()
    gx = torch.empty(x_shape, dtype=rows.dtype, memory_format=torch.channels_last)
    _col2im(rows.detach().numpy(), gx.permute(0, 2, 3, 1).numpy(), *kernel_size, *stride, *padding, *dilation,
            *out_hw, taps_first)
    return gx
