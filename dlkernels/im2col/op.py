"""nhwc_windows: the im2col rows of a channels_last input, for dlkernels.nn.Conv2d's GEMM.

Kernel contract: each backend's ``dlkernels/im2col/<backend>_impl.py`` provides

    im2col(x, kernel_size, stride, padding, dilation, taps_first, out_hw) -> rows
        x (N, C, H, W) channels_last-contiguous, float32 or float64; rows (N*Ho*Wo, kH*kW*C), row
        (n, i, j) the window of output pixel (i, j) of image n in (kH, kW, C) order when taps_first
        (a channels_last weight's order), else (C, kH, kW) (an NCHW weight's, F.unfold's); taps in the
        zero padding are 0.
    col2im(rows, x_shape, out_hw, kernel_size, stride, padding, dilation, taps_first) -> grad_x
        the adjoint: grad_x (N, C, H, W) channels_last, each pixel the sum of its values in the rows
        whose window reads it.

(C++ and Numba: float32 and float64 on CPU; Triton: any float dtype.) The torch version
(reference.py) runs everywhere else (other dtypes, the "torch" backend) and for double backward. An
eager-mode helper, not a registered op: compiled graphs of Conv2d take F.unfold (see there).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _dispatch, _registration
from .. import _validation as V
from . import reference

FAMILY = "im2col"


def _kernels(backend: str, x: Tensor):
    """The backend's kernel module, or the torch reference where it has none for x or x is empty.
    ``backend`` comes resolved for x's device (dlkernels._dispatch.resolve)."""
    if x.numel() == 0:  # an empty batch (or rows of padding only): nothing for a kernel to read
        return reference
    if backend in _dispatch.CPU_BACKENDS:
        has = x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
    else:
        has = backend == "triton" and x.dtype.is_floating_point
    return _dispatch.kernels(FAMILY, backend, x.device) if has else reference


def _windows(k, x, kernel_size, stride, padding, dilation, taps_first, out_hw):
    if k is reference:
        return reference.im2col(x, kernel_size, stride, padding, dilation, taps_first)
    return k.im2col(x, kernel_size, stride, padding, dilation, taps_first, out_hw)


class _NHWCWindows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kernel_size, stride, padding, dilation, taps_first, out_hw, backend):
        k = _kernels(backend, x)
        ctx.geometry = (tuple(x.shape), out_hw, kernel_size, stride, padding, dilation, taps_first, k)
        return _windows(k, x, kernel_size, stride, padding, dilation, taps_first, out_hw)

    @staticmethod
    def backward(ctx, grad_rows):
        x_shape, out_hw, kernel_size, stride, padding, dilation, taps_first, k = ctx.geometry
        geometry = (x_shape, out_hw, kernel_size, stride, padding, dilation, taps_first)
        if not _registration.kernel_readable(grad_rows):  # batched gradients (torch's older vmap)
            gx = reference.col2im_batchable(grad_rows, *geometry)
        elif k is not reference and not torch.is_grad_enabled():
            gx = k.col2im(grad_rows.contiguous(), *geometry)
        else:  # double backward differentiates the torch version
            gx = reference.col2im(grad_rows, *geometry)
        return gx, None, None, None, None, None, None, None


def nhwc_windows(x: Tensor, kernel_size, stride, padding, dilation, taps_first: bool, backend: str) -> Tensor:
    """The (N*Ho*Wo, kH*kW*C) im2col rows of channels_last x (N, C, H, W), in (kH, kW, C) order when
    ``taps_first`` else (C, kH, kW), for a conv of ``kernel_size``, ``stride``, ``padding`` (zeros, each
    side) and ``dilation`` (pairs); differentiable. ``backend``: the conv's resolved backend name."""
    _, _, _, out_hw = V.conv2d_geometry("dlkernels.nn.Conv2d", x, kernel_size, stride, padding, dilation)
    if not _registration.records_autograd(x):
        return _windows(_kernels(backend, x), x, tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation),
                        taps_first, out_hw)
    return _NHWCWindows.apply(x, tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation), taps_first,
                              out_hw, backend)
