"""The torch reference for depthwise conv: what backend "torch" runs, and the kernel contract of
op.py written with F.conv2d, for testing kernels."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def depthwise_conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1) -> Tensor:
    return F.conv2d(input, weight, bias, stride, padding, dilation, groups=input.shape[-3])


def _pad_full(x: Tensor, pad, in_hw, kernel_hw, stride, dilation, out_hw) -> Tensor:
    """x zero-padded so that a padding-0 conv gives out_hw (pad before given, after implied)."""
    after = [max(0, (out_hw[i] - 1) * stride[i] + dilation[i] * (kernel_hw[i] - 1) + 1 - pad[i] - in_hw[i])
             for i in range(2)]
    return F.pad(x, (pad[1], after[1], pad[0], after[0]))


def depthwise_fwd(x, weight, bias, stride, pad, dilation, out_hw) -> Tensor:
    xp = _pad_full(x, pad, x.shape[2:], weight.shape[2:], stride, dilation, out_hw)
    y = F.conv2d(xp, weight, bias, stride, 0, dilation, groups=x.shape[1])
    return y[:, :, : out_hw[0], : out_hw[1]]


def depthwise_bwd(grad_y, x, weight, stride, pad, dilation, mask):
    """(grad_x, grad_weight) by aten's convolution_backward on the padded frame (each None unless asked
    for in mask): torch ops, which forward-mode AD differentiates to any order."""
    xp = _pad_full(x, pad, x.shape[2:], weight.shape[2:], stride, dilation, grad_y.shape[2:])
    xp = xp[:, :, : (grad_y.shape[2] - 1) * stride[0] + dilation[0] * (weight.shape[2] - 1) + 1,
            : (grad_y.shape[3] - 1) * stride[1] + dilation[1] * (weight.shape[3] - 1) + 1]
    gxp, gw, _ = torch.ops.aten.convolution_backward(grad_y, xp, weight, None, list(stride), [0, 0], list(dilation),
                                                     False, [0, 0], x.shape[1], [mask[0], mask[1], False])
    gx = None
    if mask[0]:
        gx = x.new_zeros(x.shape)
        h = min(x.shape[2], gxp.shape[2] - pad[0])
        w = min(x.shape[3], gxp.shape[3] - pad[1])
        gx[:, :, :h, :w] = gxp[:, :, pad[0]: pad[0] + h, pad[1]: pad[1] + w]
    return gx, gw


def depthwise_bwd_input(grad_y, weight, in_hw, stride, pad, dilation) -> Tensor:
    """Called with a multiplier of 1: grad_y (N, C, Ho, Wo), weight (C, 1, kH, kW)."""
    x = grad_y.new_zeros((grad_y.shape[0], grad_y.shape[1], *in_hw))
    return depthwise_bwd(grad_y, x, weight, stride, pad, dilation, (True, False))[0]


def depthwise_bwd_weight(grad_y, x, kernel_hw, stride, pad, dilation, need_bias):
    weight = x.new_zeros((grad_y.shape[1], 1, *kernel_hw))
    gw = depthwise_bwd(grad_y, x, weight, stride, pad, dilation, (False, True))[1]
    return gw, (grad_y.sum(dim=(0, 2, 3)) if need_bias else None)
