"""The torch reference for separable conv: what backend "torch" runs (the two-conv sequence), and
the kernel contract of op.py for testing kernels."""
from __future__ import annotations

import torch.nn.functional as F

from ..depthwise.reference import depthwise_fwd


def separable_conv2d(input, depthwise_weight, pointwise_weight, bias=None, stride=1, padding=0, dilation=1):
    mid = F.conv2d(input, depthwise_weight, None, stride, padding, dilation, groups=input.shape[-3])
    return F.conv2d(mid, pointwise_weight, bias)


def separable_fwd(x, dw_weight, pw_weight, bias, stride, pad, dilation, out_hw):
    mid = depthwise_fwd(x, dw_weight, None, stride, pad, dilation, out_hw)
    return F.conv2d(mid, pw_weight[:, :, None, None], bias)
