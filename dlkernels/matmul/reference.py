"""The torch reference for matmul/linear: what backend "torch" runs, and the kernel contract
(``mm``, ``bias_act_backward`` of op.py's docstring) written in PyTorch for testing kernels."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def matmul(a: Tensor, b: Tensor) -> Tensor:
    return torch.matmul(a, b)


def linear(input: Tensor, weight: Tensor, bias: Tensor | None, activation: str | None) -> Tensor:
    out = F.linear(input, weight, bias)
    return torch.relu(out) if activation == "relu" else out


def mm(a: Tensor, b: Tensor, bias: Tensor | None, bias_dim: int, activation: str) -> Tensor:
    out = torch.matmul(a, b)
    if bias is not None:
        out = out + (bias if bias_dim == 1 else bias[:, None])
    return (torch.relu(out) if activation == "relu" else out).contiguous()


def bias_act_backward(grad_out: Tensor, out: Tensor, activation: str, bias_dim: int, need_bias: bool):
    g = torch.where(out <= 0, 0, grad_out) if activation == "relu" else grad_out
    gb = None
    if need_bias:
        dims = [d for d in range(g.dim()) if d != g.dim() - 2 + bias_dim]
        gb = g.sum(dim=dims)
    return g, gb
