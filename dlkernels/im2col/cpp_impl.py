"""C++ kernels of the channels_last im2col (csrc/im2col.cpp): outputs allocated here, filled in
place. Contract: dlkernels/im2col/op.py."""
from __future__ import annotations

import torch

from .. import _C
from .._cpp_common import c_arg as _c


def im2col(x, kernel_size, stride, padding, dilation, taps_first, out_hw):
    rows = x.new_empty(x.shape[0] * out_hw[0] * out_hw[1], kernel_size[0] * kernel_size[1] * x.shape[1])
    _C.im2col(_c(x), _c(rows), *kernel_size, *stride, *padding, *dilation, taps_first)
    return rows


def col2im(rows, x_shape, out_hw, kernel_size, stride, padding, dilation, taps_first):
    gx = torch.empty(x_shape, dtype=rows.dtype, memory_format=torch.channels_last)
    _C.col2im(_c(rows), _c(gx), *kernel_size, *stride, *padding, *dilation, taps_first)
    return gx
