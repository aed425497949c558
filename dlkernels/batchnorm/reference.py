"""The torch reference for batch_norm_residual: what backend "torch" runs (PyTorch's unfused
sequence), and the kernel contract of op.py written in PyTorch, for testing kernels."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def activate(z: Tensor, activation: str | None) -> Tensor:
    if activation == "relu":
        return torch.relu(z)
    if activation == "silu":
        return F.silu(z)
    return z


def batch_norm_residual(input, residual, running_mean, running_var, weight=None, bias=None, training=False,
                        momentum=0.1, eps=1e-5, activation=None) -> Tensor:
    z = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if residual is not None:
        z = z + residual
    return activate(z, activation)


def bn_stats(x3: Tensor):
    var, mean = torch.var_mean(x3.double(), dim=(0, 2), correction=0)
    dt = torch.float64 if x3.dtype == torch.float64 else torch.float32
    return mean.to(dt), var.to(dt)


def bn_apply(x3, residual3, mean, var, weight, bias, eps, activation):
    invstd = torch.rsqrt(var + eps)
    scale = invstd if weight is None else weight * invstd
    shift = -mean * scale if bias is None else bias - mean * scale
    z = x3 * scale[:, None] + shift[:, None]
    if residual3 is not None:
        z = z + residual3
    return activate(z, activation).to(x3.dtype)


def _dz(grad_y3, y3, x3, residual3, scale, shift, activation):
    if activation == "relu":
        return torch.where(y3 <= 0, 0, grad_y3)
    if activation == "silu":
        z = x3 * scale[:, None] + shift[:, None]
        if residual3 is not None:
            z = z + residual3
        s = torch.sigmoid(z)
        return grad_y3 * s * (1 + z * (1 - s))
    return grad_y3


def bn_backward_reduce(grad_y3, y3, x3, residual3, mean, invstd, scale, shift, activation, write_dz):
    dz = _dz(grad_y3.double(), None if y3 is None else y3.double(), x3.double(),
             None if residual3 is None else residual3.double(), scale.double(), shift.double(), activation)
    xhat = (x3.double() - mean.double()[:, None]) * invstd.double()[:, None]
    return (dz.sum(dim=(0, 2)).to(mean.dtype), (dz * xhat).sum(dim=(0, 2)).to(mean.dtype),
            dz.to(x3.dtype) if write_dz else None)


def bn_backward_apply(grad_y3, y3, x3, residual3, mean, invstd, scale, shift, c_dz, c_xhat, activation,
                      need_grad_residual):
    dz = _dz(grad_y3, y3, x3, residual3, scale, shift, activation)
    if c_dz is None:  # evaluation: grad_x does not read x
        gx = scale[:, None] * dz
    else:
        xhat = (x3 - mean[:, None]) * invstd[:, None]
        gx = scale[:, None] * (dz - c_dz[:, None] - xhat * c_xhat[:, None])
    return gx.to(x3.dtype), (dz.to(x3.dtype, copy=True) if need_grad_residual else None)


def grads_differentiable(grad_out, passes, input, residual, weight, bias, mean, var, eps, training, activation):
    """(grad_input, grad_residual, grad_weight, grad_bias) of batch_norm_residual in torch ops, for a
    backward that must itself be differentiated (create_graph=True: double backward, gradient
    penalties). In training the statistics are recomputed from ``input`` so that their dependence on it
    is differentiated too (the forward's are constants to autograd). ``passes``: relu's gate, True where
    the output passed its gradient (``not out <= 0``); silu recomputes its pre-activation instead, from
    ``residual`` and ``bias``."""
    dims = [0] + list(range(2, input.dim()))
    per_channel = [1, -1] + [1] * (input.dim() - 2)
    if training:
        var, mean = torch.var_mean(input, dims, correction=0)
    invstd = torch.rsqrt(var + eps)
    xhat = (input - mean.view(per_channel)) * invstd.view(per_channel)
    if activation == "relu":
        dz = torch.where(passes, grad_out, 0)
    elif activation == "silu":
        z = xhat if weight is None else xhat * weight.view(per_channel)
        z = z if bias is None else z + bias.view(per_channel)
        z = z if residual is None else z + residual
        s = torch.sigmoid(z)
        dz = grad_out * s * (1 + z * (1 - s))
    else:
        dz = grad_out
    sum_dz, sum_dz_xhat = dz.sum(dims), (dz * xhat).sum(dims)
    scale = invstd if weight is None else weight * invstd
    centred = dz
    if training:
        count = input.numel() // input.shape[1]
        centred = dz - (sum_dz / count).view(per_channel) - xhat * (sum_dz_xhat / count).view(per_channel)
    grad_input = (centred * scale.view(per_channel)).to(input.dtype)
    return (grad_input, dz.to(input.dtype), None if weight is None else sum_dz_xhat.to(weight.dtype),
            None if bias is None else sum_dz.to(bias.dtype))
