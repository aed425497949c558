"""separable_conv2d: depthwise k x k then pointwise 1 x 1 (Keras SeparableConv2D), fused.

Kernel contract: every backend module ``dlkernels/separable/<backend>_impl.py`` provides

    separable_fwd(x, dw_weight, pw_weight, bias, stride, pad, dilation, out_hw) -> y
        x, dw_weight, stride, pad, dilation, out_hw: as depthwise_fwd (dlkernels/depthwise/op.py).
        pw_weight: (O, C*m) contiguous (the (O, C*m, 1, 1) conv weight, reshaped); bias: None or (O,).
        y[n, o] = bias[o] + sum_c pw_weight[o, c] * depthwise(x)[n, c], a new (N, O, Ho, Wo) tensor
        in x's memory format. ONE fused kernel: the depthwise intermediate is never written to
        memory in full (Triton: a tile of it lives in registers and feeds tl.dot; CPU: a block of it
        stays in cache and feeds the GEMM: a few output rows of an image for all channels, or in C++
        NCHW, and channels_last planes of 12x12 outputs or fewer, a block of whole images, a quarter
        of the LLC, through the depthwise kernels and then the GEMM).

Its backward recomputes the depthwise output and runs on the depthwise and matmul kernels of the
same backend.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from .. import _dispatch, _registration
from .._registration import channels_of_examples, examples_of_channels, per_channel_of_examples
from .. import _validation as V
from ..depthwise.op import (check_weights, depthwise_conv2d_backward_op, depthwise_conv2d_op, empty_like_format,
                           in_format, no_input_output)
from ..pointwise import op as pointwise
from . import reference

FAMILY = "separable"
OP = "dlkernels.separable_conv2d"


def _check(x, dw_weight, pw_weight, bias, backend: str) -> None:
    check_weights(OP, x, dw_weight, None, backend)
    V.tensor(pw_weight, "pointwise_weight", OP, ndim=4)
    V.same_device_dtype(OP, "input", x, pointwise_weight=pw_weight)
    pointwise.check(OP, x, pw_weight, bias, backend, in_channels=dw_weight.shape[0])


@_registration.custom_op("dlkernels::separable_conv2d", mutates_args=())
def separable_conv2d_op(input: Tensor, depthwise_weight: Tensor, pointwise_weight: Tensor, bias: Optional[Tensor],
                        stride: list[int], pad: list[int], dilation: list[int], out_hw: list[int],
                        backend: str) -> Tensor:
    _check(input, depthwise_weight, pointwise_weight, bias, backend)
    fmt = V.memory_format(input)
    if input.numel() == 0:
        shape = (input.shape[0], pointwise_weight.shape[0], out_hw[0], out_hw[1])
        return no_input_output(input, shape, bias, fmt)
    k = _dispatch.kernels(FAMILY, backend, input.device)
    y = k.separable_fwd(in_format(input, fmt), depthwise_weight.contiguous(),
                        pointwise_weight.reshape(pointwise_weight.shape[0], -1).contiguous(),
                        None if bias is None else bias.contiguous(),
                        tuple(stride), tuple(pad), tuple(dilation), tuple(out_hw))
    return in_format(y, fmt)


@separable_conv2d_op.register_decomposition
def _(input, depthwise_weight, pointwise_weight, bias, stride, pad, dilation, out_hw, backend):
    _check(input, depthwise_weight, pointwise_weight, bias, backend)
    return reference.separable_fwd(input, depthwise_weight, pointwise_weight.reshape(pointwise_weight.shape[0], -1),
                                   bias, stride, pad, dilation, out_hw)


@separable_conv2d_op.register_fake
def _(input, depthwise_weight, pointwise_weight, bias, stride, pad, dilation, out_hw, backend):
    _check(input, depthwise_weight, pointwise_weight, bias, backend)
    shape = (input.shape[0], pointwise_weight.shape[0], out_hw[0], out_hw[1])
    return empty_like_format(input, shape, V.memory_format(input))


@separable_conv2d_op.register_vmap
def _(info, in_dims, input, depthwise_weight, pointwise_weight, bias, stride, pad, dilation, out_hw, backend):
    """Under torch.vmap the examples' images as one batch (per-example gradients: the backward runs on the
    depthwise and matmul rules); an ensemble's weights as two calls, not fused: the depthwise conv over the
    examples' channels, then the pointwise one as a batched GEMM (pointwise.examples_pointwise)."""
    n = info.batch_size
    if all(d is None for d in in_dims[1:4]):
        return _registration.examples_as_batch(
            lambda x: separable_conv2d_op.default(x, depthwise_weight, pointwise_weight, bias, stride, pad, dilation,
                                                  out_hw, backend), input, in_dims[0], n)
    _check(*(_registration.one_example(t, d) for t, d in zip((input, depthwise_weight, pointwise_weight, bias),
                                                              in_dims[:4])), backend)
    mid = depthwise_conv2d_op.default(channels_of_examples(input, in_dims[0], n),
                                      per_channel_of_examples(depthwise_weight, in_dims[1], n), None, stride, pad,
                                      dilation, out_hw, backend)
    pw = _registration.examples_first(pointwise_weight, in_dims[2], n)
    b = _registration.batched_first(bias, in_dims[3])
    return pointwise.examples_pointwise(examples_of_channels(mid, n).movedim(1, 0), pw, b, in_dims[3] is not None,
                                        backend), 0


def _setup(ctx, inputs, output):
    input, dw, pw, bias, stride, pad, dilation, out_hw, backend = inputs
    ctx.save_for_backward(input, dw, pw)
    ctx.geometry = (stride, pad, dilation, out_hw)
    ctx.has_bias, ctx.backend = bias is not None, backend


def _backward(ctx, grad):
    # The depthwise output was never stored: recompute it, then back through the pointwise GEMM and
    # the depthwise conv, all on the same backend's kernels.
    input, dw, pw, = ctx.saved_tensors
    stride, pad, dilation, out_hw = ctx.geometry
    needs = ctx.needs_input_grad
    mid = depthwise_conv2d_op(input, dw, None, stride, pad, dilation, out_hw, ctx.backend)
    need_mid_grad = needs[0] or needs[1]
    g_mid, g_pw, g_bias = pointwise.backward(grad, mid, pw.reshape(pw.shape[0], -1),
                                             [need_mid_grad, needs[2], ctx.has_bias and needs[3]], ctx.backend)
    g_in = g_dw = None
    if need_mid_grad:
        g_in, g_dw, _ = depthwise_conv2d_backward_op(
            g_mid, input, dw, stride, pad, dilation, [needs[0], needs[1], False], ctx.backend)
    return (g_in if needs[0] else None, g_dw if needs[1] else None,
            g_pw.view(pw.shape) if g_pw is not None else None, g_bias,
            None, None, None, None, None)


separable_conv2d_op.register_autograd(_backward, setup_context=_setup)


@separable_conv2d_op.register_jvp
def _(inputs, output, tangents):
    """Linear in each of input, depthwise weight and pointwise weight: one term each, the last the 1x1
    conv of the depthwise output by the pointwise weight's tangent, plus the bias's tangent."""
    input, dw, pw, bias, stride, pad, dilation, out_hw, backend = inputs
    t_in, t_dw, t_pw, t_b = tangents[:4]
    terms = _registration.product_rule(
        lambda x, d: separable_conv2d_op(x, d, pw, None, stride, pad, dilation, out_hw, backend), input, dw, t_in, t_dw)
    if t_pw is not None:
        mid = depthwise_conv2d_op(input, dw, None, stride, pad, dilation, out_hw, backend)
        terms.append(pointwise.pointwise_conv2d_op(mid, t_pw, None, backend))
    if t_b is not None:
        terms.append(t_b.view(1, -1, 1, 1))
    return _registration.tangent_sum(terms, output)
separable_conv2d_op.register_autocast(_registration.lower_precision)


def separable_conv2d(input: Tensor, depthwise_weight: Tensor, pointwise_weight: Tensor, bias: Tensor | None = None,
                     stride=1, padding=0, dilation=1, *, backend: str | None = None) -> Tensor:
    """``F.conv2d(F.conv2d(input, depthwise_weight, None, stride, padding, dilation, groups=C),
    pointwise_weight, bias)`` (Keras SeparableConv2D) in one fused kernel: depthwise weight
    ``(C*m, 1, kH, kW)``, pointwise weight ``(O, C*m, 1, 1)``, bias ``(O,)``."""
    V.tensor(input, "input", OP, ndim=(3, 4))
    if input.dim() == 3:
        return separable_conv2d(input.unsqueeze(0), depthwise_weight, pointwise_weight, bias, stride, padding,
                                dilation, backend=backend).squeeze(0)
    name = _dispatch.resolve(FAMILY, backend, input.device)
    if name == "torch":
        _check(input, depthwise_weight, pointwise_weight, bias, name)
    else:  # the op checks the rest itself: the kernel size is all the geometry needs first
        V.tensor(depthwise_weight, "depthwise_weight", OP, ndim=4)
    geo = V.conv2d_geometry(OP, input, depthwise_weight.shape[2:], stride, padding, dilation)
    if name == "torch":
        return reference.separable_conv2d(input, depthwise_weight, pointwise_weight, bias, stride, padding, dilation)
    stride, pad, dilation, out_hw = geo
    return separable_conv2d_op(input, depthwise_weight, pointwise_weight, bias, list(stride), list(pad), list(dilation),
                               list(out_hw), name)
