"""depthwise_conv2d: public function, torch.library ops, autograd and fake implementations.

Kernel contract: every backend module ``dlkernels/depthwise/<backend>_impl.py`` provides

    depthwise_fwd(x, weight, bias, stride, pad, dilation, out_hw) -> y
        x: (N, C, H, W), either NCHW-contiguous or channels_last-contiguous.
        weight: (C*m, 1, kH, kW) contiguous, channel multiplier m >= 1; bias: None or contiguous (C*m,).
        stride (sH, sW) >= 1; pad (pT, pL) >= 0: zero rows/cols before the first input row/col (the
        padding after the last is implied by out_hw, so asymmetric "same" padding needs nothing
        more); dilation (dH, dW) >= 1; out_hw (Ho, Wo) >= 1.
        y[n, o, i, j] = bias[o] + sum_{p<kH, q<kW} weight[o, 0, p, q] * x[n, o // m, i*sH - pT + p*dH, j*sW - pL + q*dW]
        (taps outside the input read zero). Returns a new (N, C*m, Ho, Wo) tensor in x's memory format.

    depthwise_bwd_input(grad_y, weight, in_hw, stride, pad, dilation) -> grad_x
        Called with a multiplier of 1 only: grad_y (N, C, Ho, Wo) NCHW- or channels_last-contiguous,
        weight (C, 1, kH, kW) (the op splits m > 1 into m such calls and sums them, since C is not
        known from grad_y and weight alone); returns (N, C, H, W), in grad_y's format.

    depthwise_bwd_weight(grad_y, x, kernel_hw, stride, pad, dilation, need_bias) -> (grad_weight, grad_bias)
        grad_y and x in the same memory format; grad_weight (C*m, 1, kH, kW) contiguous,
        grad_bias (C*m,) or None (unless need_bias).

Inputs arrive validated (_validation), in one dtype the backend computes in, on one device.
Reductions accumulate in at least float32 (float64 for float64 inputs).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _dispatch, _registration
from .._registration import channels_of_examples, examples_of_channels, per_channel_of_examples
from .. import _validation as V
from . import reference

FAMILY = "depthwise"
OP = "dlkernels.depthwise_conv2d"


def check_weights(op: str, x: Tensor, weight, bias, backend: str) -> None:
    """x is (N, C, H, W); weight is (C*m, 1, kH, kW); bias is None or (C*m,). Shared with separable."""
    V.tensor(x, "input", op, ndim=4)
    V.tensor(weight, "weight", op, ndim=4)
    V.optional_tensor(bias, "bias", op, ndim=1)
    V.same_device_dtype(op, "input", x, weight=weight, bias=bias)
    V.backend_dtype(op, backend, x)
    c, co = x.shape[1], weight.shape[0]
    if weight.shape[1] != 1 or co == 0 or co % max(c, 1) != 0 or c == 0:
        raise ValueError(f"{op}: weight must have shape (C*m, 1, kH, kW) with C = input.shape[-3] = {c} "
                         f"and a channel multiplier m >= 1, got {tuple(weight.shape)}")
    if weight.shape[2] < 1 or weight.shape[3] < 1:
        raise ValueError(f"{op}: kernel size must be >= 1, got {tuple(weight.shape[2:])}")
    if bias is not None:
        V.shape(op, "bias", bias, (co,), "weight.shape[0]")
    if x.shape[2] == 0 or x.shape[3] == 0:  # an empty batch is fine; torch rejects empty images too
        raise ValueError(f"{op}: input has an empty spatial dimension: {tuple(x.shape)}")


def no_input_output(x: Tensor, shape, bias: Optional[Tensor], fmt: torch.memory_format) -> Tensor:
    """A conv's output for an empty batch, as torch's: no kernel runs on empty arrays. Shared with
    separable."""
    out = empty_like_format(x, shape, fmt)
    return out.zero_() if bias is None else out.copy_(bias.view(1, -1, 1, 1).expand(shape))


def _out_shape(x: Tensor, weight: Tensor, out_hw) -> tuple[int, int, int, int]:
    return (x.shape[0], weight.shape[0], out_hw[0], out_hw[1])


def empty_like_format(x: Tensor, shape, fmt: torch.memory_format) -> Tensor:
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)


def _canonical_strides(shape, fmt: torch.memory_format) -> tuple[int, int, int, int]:
    """The strides torch gives a fresh (N, C, H, W) tensor of that format."""
    n, c, h, w = shape
    if fmt == torch.channels_last:
        return (h * w * c, 1, w * c, c)
    c, h, w = max(c, 1), max(h, 1), max(w, 1)  # size-0 dims stride as size-1 ones
    return (c * h * w, h * w, w, 1)


def in_format(t: Tensor, fmt: torch.memory_format) -> Tensor:
    """t with exactly the strides a fresh tensor of that format has (size-1 dims included), so the
    real and the fake implementations agree; copies only when t is laid out otherwise."""
    if t.stride() == _canonical_strides(t.shape, fmt):
        return t
    out = empty_like_format(t, t.shape, fmt)
    out.copy_(t)
    return out


# ---------------------------------------------------------------------------------------------
# dlkernels::depthwise_conv2d and its backward
# ---------------------------------------------------------------------------------------------
@_registration.custom_op("dlkernels::depthwise_conv2d", mutates_args=())
def depthwise_conv2d_op(input: Tensor, weight: Tensor, bias: Optional[Tensor], stride: list[int],
                        pad: list[int], dilation: list[int], out_hw: list[int], backend: str) -> Tensor:
    check_weights(OP, input, weight, bias, backend)
    fmt = V.memory_format(input)
    if input.numel() == 0:
        return no_input_output(input, _out_shape(input, weight, out_hw), bias, fmt)
    k = _dispatch.kernels(FAMILY, backend, input.device)
    y = k.depthwise_fwd(in_format(input, fmt), weight.contiguous(), None if bias is None else bias.contiguous(),
                        tuple(stride), tuple(pad), tuple(dilation), tuple(out_hw))
    return in_format(y, fmt)


@depthwise_conv2d_op.register_decomposition
def _(input, weight, bias, stride, pad, dilation, out_hw, backend):
    check_weights(OP, input, weight, bias, backend)
    return reference.depthwise_fwd(input, weight, bias, stride, pad, dilation, out_hw)


@depthwise_conv2d_op.register_fake
def _(input, weight, bias, stride, pad, dilation, out_hw, backend):
    check_weights(OP, input, weight, bias, backend)
    return empty_like_format(input, _out_shape(input, weight, out_hw), V.memory_format(input))


# Under torch.vmap the examples' channels become channels of one call (_registration.channels_of_examples):
# a depthwise conv's channels never mix, so one call computes every example, an ensemble's weights and
# per-example weight gradients included (instead of torch's fallback: one call an example).
@depthwise_conv2d_op.register_vmap
def _(info, in_dims, input, weight, bias, stride, pad, dilation, out_hw, backend):
    n = info.batch_size
    y = depthwise_conv2d_op.default(channels_of_examples(input, in_dims[0], n),
                                    per_channel_of_examples(weight, in_dims[1], n),
                                    per_channel_of_examples(bias, in_dims[2], n), stride, pad, dilation, out_hw,
                                    backend)
    return examples_of_channels(y, n), 1


@_registration.custom_op("dlkernels::depthwise_conv2d_backward", mutates_args=())
def depthwise_conv2d_backward_op(grad_out: Tensor, input: Tensor, weight: Tensor, stride: list[int],
                                 pad: list[int], dilation: list[int], output_mask: list[bool],
                                 backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_input, grad_weight, grad_bias); an output not asked for in output_mask is an empty tensor."""
    fmt = V.memory_format(input)
    if input.numel() == 0 or grad_out.numel() == 0:  # an empty batch: nothing for a kernel to read
        return (empty_like_format(input, input.shape, fmt).zero_() if output_mask[0] else input.new_empty(0),
                weight.new_zeros(weight.shape) if output_mask[1] else input.new_empty(0),
                grad_out.sum((0, 2, 3)) if output_mask[2] else input.new_empty(0))
    x = in_format(input, fmt)
    g = in_format(grad_out, fmt)
    k = _dispatch.kernels(FAMILY, backend, input.device)
    # an output not asked for is one shared empty tensor, allocated only then (each allocation from Python
    # costs microseconds on a cold cache)
    empty = None if (output_mask[0] and output_mask[1] and output_mask[2]) else input.new_empty(0)
    grad_x = grad_w = grad_b = empty
    if output_mask[0]:
        m = weight.shape[0] // x.shape[1]
        geo = ((x.shape[2], x.shape[3]), tuple(stride), tuple(pad), tuple(dilation))
        for j in range(m):  # output channel c*m + j reads input channel c
            gj = g if m == 1 else in_format(g[:, j::m], fmt)
            part = k.depthwise_bwd_input(gj, weight[j::m].contiguous(), *geo)
            grad_x = part if j == 0 else grad_x.add_(part)
        grad_x = in_format(grad_x, fmt)
    if output_mask[1] or output_mask[2]:
        gw, gb = k.depthwise_bwd_weight(g, x, (weight.shape[2], weight.shape[3]), tuple(stride), tuple(pad),
                                        tuple(dilation), bool(output_mask[2]))
        if output_mask[1]:
            grad_w = gw.contiguous()
        if output_mask[2]:
            grad_b = gb
    return grad_x, grad_w, grad_b


@depthwise_conv2d_backward_op.register_decomposition
def _(grad_out, input, weight, stride, pad, dilation, output_mask, backend):
    gx, gw = reference.depthwise_bwd(grad_out, input, weight, stride, pad, dilation, output_mask[:2])
    return (gx if output_mask[0] else input.new_empty(0), gw if output_mask[1] else input.new_empty(0),
            grad_out.sum((0, 2, 3)) if output_mask[2] else input.new_empty(0))


@depthwise_conv2d_backward_op.register_fake
def _(grad_out, input, weight, stride, pad, dilation, output_mask, backend):
    gx = empty_like_format(input, input.shape, V.memory_format(input)) if output_mask[0] else input.new_empty(0)
    gw = weight.new_empty(weight.shape) if output_mask[1] else input.new_empty(0)
    gb = weight.new_empty(weight.shape[0]) if output_mask[2] else input.new_empty(0)
    return gx, gw, gb


@depthwise_conv2d_backward_op.register_vmap
def _(info, in_dims, grad_out, input, weight, stride, pad, dilation, output_mask, backend):
    n = info.batch_size
    gx, gw, gb = depthwise_conv2d_backward_op.default(
        channels_of_examples(grad_out, in_dims[0], n), channels_of_examples(input, in_dims[1], n),
        per_channel_of_examples(weight, in_dims[2], n), stride, pad, dilation, output_mask, backend)
    return ((examples_of_channels(gx, n) if output_mask[0] else gx,
             gw.reshape(n, -1, *gw.shape[1:]) if output_mask[1] else gw,
             gb.reshape(n, -1) if output_mask[2] else gb),
            (1 if output_mask[0] else None, 0 if output_mask[1] else None, 0 if output_mask[2] else None))


def _backward_setup(ctx, inputs, output):
    grad_out, input, weight, stride, pad, dilation, output_mask, backend = inputs
    ctx.save_for_backward(grad_out, input, weight)
    ctx.geometry, ctx.output_mask, ctx.backend = (stride, pad, dilation), output_mask, backend


def _double_backward(ctx, v_x, v_w, v_b):
    """The backward is bilinear: grad_input = convT(grad_out, weight), grad_weight = corr(grad_out, input),
    grad_bias = sum(grad_out). So its own gradients are the same three kernels again: grad_out's is the
    forward conv of v_x by the weight plus that of the input by v_w plus v_b; the input's, the input
    gradient of grad_out through v_w; the weight's, the weight gradient of grad_out against v_x."""
    g, x, w = ctx.saved_tensors
    stride, pad, dilation = ctx.geometry
    # the cotangents of the outputs the backward computed (the others are empty placeholders)
    v_x, v_w, v_b = (v if (m and v is not None and v.numel()) else None
                     for v, m in zip((v_x, v_w, v_b), ctx.output_mask))
    need_g, need_x, need_w = ctx.needs_input_grad[:3]
    backend, out_hw = ctx.backend, list(g.shape[-2:])
    gg = gx = gw = None
    if need_g:
        if v_x is not None:
            gg = depthwise_conv2d_op(v_x, w, v_b, stride, pad, dilation, out_hw, backend)
        if v_w is not None:
            part = depthwise_conv2d_op(x, v_w, v_b if gg is None else None, stride, pad, dilation, out_hw, backend)
            gg = part if gg is None else gg + part
        if gg is None and v_b is not None:
            gg = v_b[:, None, None].expand(g.shape)
    if need_x and v_w is not None:
        gx = depthwise_conv2d_backward_op(g, x, v_w, stride, pad, dilation, [True, False, False], backend)[0]
    if need_w and v_x is not None:
        gw = depthwise_conv2d_backward_op(g, v_x, w, stride, pad, dilation, [False, True, False], backend)[1]
    return gg, gx, gw, None, None, None, None, None


depthwise_conv2d_backward_op.register_autograd(_double_backward, setup_context=_backward_setup)


@depthwise_conv2d_backward_op.register_jvp
def _(inputs, output, tangents):
    """Bilinear again (see _double_backward): grad_input's tangent is the input gradient of grad_out's
    tangent through the weight plus that of grad_out through the weight's tangent; grad_weight's, the
    weight gradient of grad_out's tangent against the input plus that of grad_out against the input's
    tangent; grad_bias's, grad_out's tangent summed. Forward over reverse (torch.func.hessian) needs it."""
    g, x, w, stride, pad, dilation, output_mask, backend = inputs
    t_g, t_x, t_w = tangents[:3]

    def grad(i):  # output i of the backward, alone, as a function of what it is bilinear in
        mask = [j == i for j in range(3)]
        return lambda g_, a, b: depthwise_conv2d_backward_op(g_, a, b, stride, pad, dilation, mask, backend)[i]

    gx, gw, gb = grad(0), grad(1), grad(2)
    terms = (_registration.product_rule(lambda g_, w_: gx(g_, x, w_), g, w, t_g, t_w),
             _registration.product_rule(lambda g_, x_: gw(g_, x_, w), g, x, t_g, t_x),
             [] if t_g is None else [gb(t_g, x, w)])
    return tuple(_registration.tangent_sum(t, out) if wanted else torch.zeros_like(out)
                 for t, out, wanted in zip(terms, output, output_mask))


def _setup(ctx, inputs, output):
    input, weight, bias, stride, pad, dilation, out_hw, backend = inputs
    ctx.save_for_backward(input, weight)
    ctx.geometry = (stride, pad, dilation)
    ctx.has_bias, ctx.backend = bias is not None, backend


def _backward(ctx, grad):
    input, weight = ctx.saved_tensors
    stride, pad, dilation = ctx.geometry
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
    gx, gw, gb = depthwise_conv2d_backward_op(grad, input, weight, stride, pad, dilation, mask, ctx.backend)
    return (gx if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None,
            None, None, None, None, None)


depthwise_conv2d_op.register_autograd(_backward, setup_context=_setup)


@depthwise_conv2d_op.register_jvp
def _(inputs, output, tangents):
    """The conv is linear in the input and in the weight: the conv of the input's tangent, plus the conv
    with the weight's tangent, plus the bias's tangent."""
    input, weight, bias, stride, pad, dilation, out_hw, backend = inputs
    t_in, t_w, t_b = tangents[:3]
    terms = _registration.product_rule(
        lambda x, w: depthwise_conv2d_op(x, w, None, stride, pad, dilation, out_hw, backend), input, weight, t_in, t_w)
    if t_b is not None:
        terms.append(t_b.view(1, -1, 1, 1))
    return _registration.tangent_sum(terms, output)
depthwise_conv2d_op.register_autocast(_registration.lower_precision)


# ---------------------------------------------------------------------------------------------
# public function
# ---------------------------------------------------------------------------------------------
def depthwise_conv2d(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0, dilation=1,
                     *, backend: str | None = None) -> Tensor:
    """``F.conv2d(input, weight, bias, stride, padding, dilation, groups=C)`` with ``C = input.shape[-3]`` and
    weight ``(C*m, 1, kH, kW)``. Input ``(N, C, H, W)`` or unbatched ``(C, H, W)``, NCHW or channels_last
    (the output keeps the input's memory format); padding an int, a pair, "same" or "valid"."""
    V.tensor(input, "input", OP, ndim=(3, 4))
    if input.dim() == 3:
        return depthwise_conv2d(input.unsqueeze(0), weight, bias, stride, padding, dilation,
                                backend=backend).squeeze(0)
    name = _dispatch.resolve(FAMILY, backend, input.device)
    if name == "torch":
        check_weights(OP, input, weight, bias, name)
    else:  # the op checks the rest itself: the kernel size is all the geometry needs first
        V.tensor(weight, "weight", OP, ndim=4)
    geo = V.conv2d_geometry(OP, input, weight.shape[2:], stride, padding, dilation)
    if name == "torch":
        return reference.depthwise_conv2d(input, weight, bias, stride, padding, dilation)
    stride, pad, dilation, out_hw = geo
    return depthwise_conv2d_op(input, weight, bias, list(stride), list(pad), list(dilation), list(out_hw), name)
