"""C++ kernels for batch_norm_residual (csrc/batchnorm.cpp): zero-copy DLPack capsules of the (N, C, S)
views in, outputs allocated here in x3's layout and filled in place. Contract: dlkernels/batchnorm/op.py.
Training runs whole (bn_forward_train, bn_backward): one C++ call each, the per-channel folds inside."""
from __future__ import annotations

import torch

from .. import _C
from .._cpp_common import c_arg as _c
from .op import reads_channels_last as _channels_last
from .op import relu_gate_bytes


def bn_apply(x3, residual3, mean, var, weight, bias, eps, activation):
    y3 = torch.empty_like(x3)
    _C.bn_apply(_c(x3), _c(residual3), _c(mean), _c(var), _c(weight), _c(bias), eps, activation or "", _c(y3),
                _channels_last(x3))
    return y3


# bn_forward_train writes relu's gate bits, which bn_backward then reads instead of y, and updates the
# running statistics when handed them (op.py's contract)
RELU_GATE = True
UPDATES_RUNNING = True


def bn_forward_train(x3, residual3, weight, bias, eps, activation, running=None):
    c = x3.shape[1]
    mean = torch.empty(c, dtype=x3.dtype)
    var = torch.empty(c, dtype=x3.dtype)
    y3 = torch.empty_like(x3)
    gate = torch.empty(relu_gate_bytes(x3.numel()), dtype=torch.uint8) if activation == "relu" else None
    run_mean, run_var, momentum = (None, None, 0.0) if running is None else running
    _C.bn_forward_train(_c(x3), _c(residual3), _c(weight), _c(bias), eps, activation or "", _c(mean), _c(var),
                        _c(y3), _c(gate), _channels_last(x3), _c(run_mean), _c(run_var), momentum)
    return y3, mean, var, gate


def bn_backward(grad_y3, y3, relu_gate, x3, residual3, mean, var, weight, bias, eps, training, activation, need_x,
                need_r, need_sums):
    c = x3.shape[1]
    sum_dz = torch.empty(c, dtype=mean.dtype) if need_sums else None
    sum_dz_xhat = torch.empty(c, dtype=mean.dtype) if need_sums else None
    grad_x3 = torch.empty_like(x3) if need_x else None
    grad_r3 = torch.empty_like(x3) if need_r else None
    _C.bn_backward(_c(grad_y3), _c(y3), _c(relu_gate), _c(x3), _c(residual3), _c(mean), _c(var), _c(weight),
                   _c(bias), eps, bool(training), activation or "", _c(sum_dz), _c(sum_dz_xhat), _c(grad_x3),
                   _c(grad_r3), _channels_last(x3))
    return grad_x3, grad_r3, sum_dz, sum_dz_xhat
