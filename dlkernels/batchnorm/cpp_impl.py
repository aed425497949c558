"""C++ kernels for batch_norm_residual (csrc/batchnorm.cpp): zero-copy numpy views of the (N, C, S)
views in, outputs allocated here in x3's layout and filled in place. Contract: dlkernels/batchnorm/op.py."""
from __future__ import annotations

import torch

from .. import _C
from .._cpp_common import np_view as _np
from .op import reads_channels_last as _channels_last


def bn_stats(x3):
    c = x3.shape[1]
    mean = torch.empty(c, dtype=x3.dtype)
    var = torch.empty(c, dtype=x3.dtype)
    _C.bn_stats(_np(x3), _np(mean), _np(var), _channels_last(x3))
    return mean, var


def bn_apply(x3, residual3, mean, var, weight, bias, eps, activation):
    y3 = torch.empty_like(x3)
    _C.bn_apply(_np(x3), _np(residual3), _np(mean), _np(var), _np(weight), _np(bias), eps, activation or "", _np(y3),
                _channels_last(x3))
    return y3


def bn_backward_reduce(grad_y3, y3, x3, residual3, mean, invstd, scale, shift, activation, write_dz):
    c = x3.shape[1]
    sum_dz = torch.empty(c, dtype=mean.dtype)
    sum_dz_xhat = torch.empty(c, dtype=mean.dtype)
    dz3 = torch.empty_like(x3) if write_dz else None
    _C.bn_backward_reduce(_np(grad_y3), _np(y3), _np(x3), _np(residual3), _np(mean), _np(invstd), _np(scale),
                          _np(shift), activation or "", _np(sum_dz), _np(sum_dz_xhat), _np(dz3), _channels_last(x3))
    return sum_dz, sum_dz_xhat, dz3


def bn_backward_apply(grad_y3, y3, x3, residual3, mean, invstd, scale, shift, c_dz, c_xhat, activation,
                      need_grad_residual):
    grad_x3 = torch.empty_like(x3)
    grad_r3 = torch.empty_like(x3) if need_grad_residual else None
    _C.bn_backward_apply(_np(grad_y3), _np(y3), _np(x3), _np(residual3), _np(mean), _np(invstd), _np(scale),
                         _np(shift), _np(c_dz), _np(c_xhat), activation or "", _np(grad_x3), _np(grad_r3),
                         _channels_last(x3))
    return grad_x3, grad_r3
