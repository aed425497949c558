"""pointwise_conv2d: the 1x1 convolution, run on the matmul kernels (dlkernels/matmul/*_impl.py).

No layout copies: a channels_last input (N, H, W, C in memory) is one (N*H*W, C) @ (C, O) GEMM whose
(N*H*W, O) result is the channels_last output; an NCHW input is a batched (O, C) @ (C, H*W) GEMM with
the weight broadcast over the batch (stride 0), whose result is the NCHW output. The bias rides in the
GEMM epilogue (per column for channels_last, per row for NCHW).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _dispatch, _registration
from .. import _validation as V
from ..depthwise.op import empty_like_format
from ..matmul.op import bias_act_backward_op, matmul_op
from . import reference

FAMILY = "matmul"  # the kernels it runs on, and the auto choice it follows
OP = "dlkernels.pointwise_conv2d"


def check(op: str, x, weight, bias, backend: str, in_channels: int | None = None) -> None:
    V.tensor(x, "input", op, ndim=4)
    V.tensor(weight, "weight", op, ndim=4)
    V.optional_tensor(bias, "bias", op, ndim=1)
    V.same_device_dtype(op, "input", x, weight=weight, bias=bias)
    V.backend_dtype(op, backend, x)
    c = x.shape[1] if in_channels is None else in_channels
    if weight.shape[0] < 1 or weight.shape[1] != c or weight.shape[2:] != (1, 1):
        raise ValueError(f"{op}: weight must have shape (O, {c}, 1, 1) with O >= 1 for {c} input channels, "
                         f"got {tuple(weight.shape)}")
    if bias is not None:
        V.shape(op, "bias", bias, (weight.shape[0],), "weight.shape[0]")


def forward(k, x: Tensor, w2: Tensor, bias: Tensor | None) -> Tensor:
    """The 1x1 conv of x (N, C, H, W) with w2 (O, C) on kernel module k, in x's memory format."""
    n, c, h, w = x.shape
    o = w2.shape[0]
    bias = None if bias is None else bias.contiguous()
    if V.memory_format(x) == torch.channels_last:
        y = k.mm(x.permute(0, 2, 3, 1).reshape(-1, c), w2.t(), bias, 1, "")
        return y.view(n, h, w, o).permute(0, 3, 1, 2)
    x = x.contiguous()
    y = k.mm(w2.expand(n, o, c), x.view(n, c, h * w), bias, 0, "")
    return y.view(n, o, h, w)


def backward(grad: Tensor, x: Tensor, w2: Tensor, mask, backend: str):
    """(grad_x, grad_w2 (O, C), grad_bias) of forward, on dlkernels ops (so it traces and composes)."""
    n, c, h, w = x.shape
    o = w2.shape[0]
    mm = matmul_op
    gx = gw = gb = None
    if V.memory_format(x) == torch.channels_last:
        g2 = grad.permute(0, 2, 3, 1).reshape(-1, o)  # a view when grad is channels_last
        x2 = x.permute(0, 2, 3, 1).reshape(-1, c)
        if mask[0]:
            gx = mm(g2, w2, backend).view(n, h, w, c).permute(0, 3, 1, 2)
        if mask[1]:
            gw = mm(g2.t(), x2, backend)
        bias_dim = 1
    else:
        g2 = grad.reshape(n, o, h * w)
        x3 = x.reshape(n, c, h * w)
        if mask[0]:
            gx = mm(w2.t().expand(n, c, o), g2, backend).view(n, c, h, w)
        if mask[1]:
            if h * w * (o + c) < o * c:
                # Few pixels an image (Xception's exit flow: 100 against 1536 x 1024): one GEMM over
                # all N*H*W pixels, its operands copied pixel-major, moves less than N (O, C) partial
                # products written and summed, each from a K of only H*W. C++, Zen5, two threads:
                # 8x1024x10x10 -> 1536 fwd+bwd 25.9 -> 23.6 ms (eager 19.0); 19x19 and 56x56 keep
                # the batched form (23.4 / 3.47 ms either way).
                gw = mm(g2.transpose(0, 1).reshape(o, -1), x3.transpose(0, 1).reshape(c, -1).t(), backend)
            else:
                gw = mm(g2, x3.mT, backend).sum(0)
        bias_dim = 0
    if mask[2]:
        _, gb = bias_act_backward_op(g2, g2, "", bias_dim, True, backend)
    return gx, gw, gb


@_registration.custom_op("dlkernels::pointwise_conv2d", mutates_args=())
def pointwise_conv2d_op(input: Tensor, weight: Tensor, bias: Optional[Tensor], backend: str) -> Tensor:
    check(OP, input, weight, bias, backend)
    k = _dispatch.kernels(FAMILY, backend, input.device)
    return forward(k, input, weight.reshape(weight.shape[0], -1), bias)


@pointwise_conv2d_op.register_decomposition
def _(input, weight, bias, backend):
    check(OP, input, weight, bias, backend)
    return reference.pointwise_conv2d(input, weight, bias)


@pointwise_conv2d_op.register_fake
def _(input, weight, bias, backend):
    check(OP, input, weight, bias, backend)
    n, _, h, w = input.shape
    return empty_like_format(input, (n, weight.shape[0], h, w), V.memory_format(input))


def examples_pointwise(x: Tensor, weight: Tensor, bias: Optional[Tensor], bias_batched: bool, backend: str) -> Tensor:
    """Each example's 1x1 conv with its own weights (an ensemble under torch.vmap) as one batched GEMM:
    x (B, N, C, H, W), weight (B, O, C, 1, 1), bias None, (B, O) (bias_batched) or (O,) -> (B, N, O, H, W)."""
    n, b, c, h, w = x.shape
    o = weight.shape[1]
    y = matmul_op.default(weight.reshape(n, 1, o, c), x.reshape(n, b, c, h * w), backend)  # (B, N, O, H*W)
    if bias is not None:
        y = y + (bias[:, None, :, None] if bias_batched else bias[:, None])
    return y.reshape(n, b, o, h, w)


@pointwise_conv2d_op.register_vmap
def _(info, in_dims, input, weight, bias, backend):
    """Under torch.vmap the examples' images as one batch (per-example gradients: the backward runs on
    matmul's batched rules); an ensemble's weights as one batched GEMM (examples_pointwise)."""
    n = info.batch_size
    if in_dims[1] is None and in_dims[2] is None:
        return _registration.examples_as_batch(lambda x: pointwise_conv2d_op.default(x, weight, bias, backend),
                                               input, in_dims[0], n)
    x = _registration.examples_first(input, in_dims[0], n)
    check(OP, x[0], _registration.one_example(weight, in_dims[1]), _registration.one_example(bias, in_dims[2]),
          backend)
    w = _registration.examples_first(weight, in_dims[1], n)
    b = _registration.batched_first(bias, in_dims[2])
    return examples_pointwise(x, w, b, in_dims[2] is not None, backend), 0


def _setup(ctx, inputs, output):
    input, weight, bias, backend = inputs
    ctx.save_for_backward(input, weight)
    ctx.has_bias, ctx.backend = bias is not None, backend


def _backward(ctx, grad):
    input, weight = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
    gx, gw, gb = backward(grad, input, weight.reshape(weight.shape[0], -1), mask, ctx.backend)
    return gx, (gw.view(weight.shape) if gw is not None else None), gb, None


pointwise_conv2d_op.register_autograd(_backward, setup_context=_setup)


@pointwise_conv2d_op.register_jvp
def _(inputs, output, tangents):
    """Linear in the input and in the weight, as depthwise's."""
    input, weight, bias, backend = inputs
    t_in, t_w, t_b = tangents[:3]
    terms = _registration.product_rule(lambda x, w: pointwise_conv2d_op(x, w, None, backend), input, weight, t_in,
                                       t_w)
    if t_b is not None:
        terms.append(t_b.view(1, -1, 1, 1))
    return _registration.tangent_sum(terms, output)
pointwise_conv2d_op.register_autocast(_registration.lower_precision)


def pointwise_conv2d(input: Tensor, weight: Tensor, bias: Tensor | None = None, *,
                     backend: str | None = None) -> Tensor:
    """``F.conv2d(input, weight, bias)`` for a 1x1 weight ``(O, C, 1, 1)``; input ``(N, C, H, W)`` or
    ``(C, H, W)``, NCHW or channels_last (kept)."""
    V.tensor(input, "input", OP, ndim=(3, 4))
    if input.dim() == 3:
        return pointwise_conv2d(input.unsqueeze(0), weight, bias, backend=backend).squeeze(0)
    name = _dispatch.resolve(FAMILY, backend, input.device)
    if name == "torch":  # the custom op checks its arguments itself
        check(OP, input, weight, bias, name)
        return reference.pointwise_conv2d(input, weight, bias)
    return pointwise_conv2d_op(input, weight, bias, name)
