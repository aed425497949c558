"""matmul/linear kernels of the C++ backend (csrc/matmul.cpp, a BLIS-style packed GEMM).

Tensors go to C++ as zero-copy DLPack capsules with their strides (transposed and stride-0 batch
operands included); outputs are allocated here with torch.empty and filled in place.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _C
from .._cpp_common import c_arg as _c


def mm(a: Tensor, b: Tensor, bias: Optional[Tensor], bias_dim: int, activation: str) -> Tensor:
    sa, n = a.shape, b.shape[-1]
    out = torch.empty(sa[0], sa[1], n, dtype=a.dtype) if len(sa) == 3 else torch.empty(sa[0], n, dtype=a.dtype)
    _C.mm(_c(a), _c(b), _c(bias), bias_dim, activation == "relu", _c(out))
    return out


def bias_act_backward(grad_out: Tensor, out: Tensor, activation: str, bias_dim: int, need_bias: bool):
    relu = activation == "relu"
    grad_bias = grad_out.new_empty(grad_out.shape[-2 + bias_dim]) if need_bias else None
    if not relu and not need_bias:
        return grad_out, None
    # without relu grad_pre is grad_out itself: only the bias sums are computed
    grad_pre = torch.empty_like(grad_out, memory_format=torch.contiguous_format) if relu else grad_out
    _C.bias_act_backward(_c(grad_out), _c(out), relu, bias_dim, _c(grad_pre) if relu else None,
                         _c(grad_bias))
    return grad_pre, grad_bias
