"""C++ kernels for depthwise conv (csrc/depthwise.cpp): zero-copy DLPack capsules in, outputs allocated
here in the input's memory format and filled in place. Contract: dlkernels/depthwise/op.py."""
from __future__ import annotations

import torch

from .. import _C
from .. import _validation as V
from .._cpp_common import c_arg as _c


def is_channels_last(t: torch.Tensor) -> bool:
    return V.memory_format(t) == torch.channels_last


def new_output(ref: torch.Tensor, shape, channels_last: bool) -> torch.Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=ref.dtype, device=ref.device, memory_format=fmt)


def depthwise_fwd(x, weight, bias, stride, pad, dilation, out_hw):
    cl = is_channels_last(x)
    y = new_output(x, (x.shape[0], weight.shape[0], *out_hw), cl)
    _C.depthwise_fwd(_c(x), _c(weight), _c(bias), _c(y),
                     *stride, *pad, *dilation, cl)
    return y


def depthwise_bwd_input(grad_y, weight, in_hw, stride, pad, dilation, *, in_channels=None):
    """``in_channels`` (C): grad_y and weight only carry C*m, so without it the multiplier is taken
    as 1 (the contract's signature does not pass C; see the family's op.py)."""
    c = grad_y.shape[1] if in_channels is None else int(in_channels)
    cl = is_channels_last(grad_y)
    gx = new_output(grad_y, (grad_y.shape[0], c, *in_hw), cl)
    _C.depthwise_bwd_input(_c(grad_y), _c(weight), _c(gx), *stride, *pad, *dilation, cl)
    return gx


def depthwise_bwd_weight(grad_y, x, kernel_hw, stride, pad, dilation, need_bias):
    cl = is_channels_last(x)
    gw = torch.empty((grad_y.shape[1], 1, *kernel_hw), dtype=x.dtype)
    gb = torch.empty((grad_y.shape[1],), dtype=x.dtype) if need_bias else None
    _C.depthwise_bwd_weight(_c(grad_y), _c(x), _c(gw), _c(gb), *stride, *pad, *dilation, cl)
    return gw, gb
