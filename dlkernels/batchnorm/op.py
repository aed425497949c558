"""batch_norm_residual: act(batch_norm(x) + residual), training and evaluation, fused.

Kernel contract: every backend module ``dlkernels/batchnorm/<backend>_impl.py`` provides the
kernels below. Tensors "x3" are 3-D strided views (N, C, S) of the input (S = H*W, L or 1) in one
of two layouts: NCS-contiguous (strides (C*S, S, 1)) or channels-last (strides (S*C, 1, C), i.e.
contiguous (N, S, C)). residual3, grad_y3 and y3 always share x3's layout. Per-channel vectors
(mean, invstd, scale, ...) are contiguous (C,) in the statistics dtype: float32 for
float16/bfloat16/float32 inputs, float64 for float64. activation is "", "relu" or "silu".

    bn_stats(x3) -> (mean, var)
        per-channel mean and biased variance over N and S, in one read of x, accurate for large
        means and large N*S (Welford / shifted sums merged in a two-level reduction).

    bn_apply(x3, residual3, mean, var, weight, bias, eps, activation) -> y3
        y = act(x * scale[c] + shift[c] + residual) with scale, shift = fold_scale_shift(mean, var,
        weight, bias, eps) (residual3, weight and bias may be None; weight and bias in the statistics
        dtype too); a new tensor in x3's layout. Training (batch statistics) and evaluation (running
        ones) both run it; the fold is the kernel's, so a call costs no extra tensor ops.

    bn_backward_reduce(grad_y3, y3, x3, residual3, mean, invstd, scale, shift, activation, write_dz)
            -> (sum_dz, sum_dz_xhat, dz3)
        dz = grad_y * act'(z) with z = x*scale[c] + shift[c] + residual (relu: 0 where y <= 0,
        read from the output; silu: recomputed z; none: grad_y). xhat = (x - mean[c]) * invstd[c].
        Per-channel sums over N and S, in the statistics dtype. dz3: when write_dz, dz itself, a new
        tensor in x3's layout and dtype (else None). The op asks for it when grad_residual (= dz) is
        wanted with an activation: the apply pass then reads dz and x (bn_backward_apply with
        activation "") instead of grad_y, y (or residual) and x, one tensor fewer to stream.

    bn_backward_apply(grad_y3, y3, x3, residual3, mean, invstd, scale, shift, c_dz, c_xhat,
                      activation, need_grad_residual) -> (grad_x3, grad_residual3)
        grad_x = scale[c] * (dz - c_dz[c] - xhat * c_xhat[c]) (scale = weight * invstd; training
        passes c_dz = sum_dz / count, c_xhat = sum_dz_xhat / count), in evaluation (c_dz and c_xhat
        None) scale[c] * dz: x is not read there, so an infinite or NaN input does not make its own
        gradient NaN (inf * 0) where torch's is finite; grad_residual = dz (None unless
        need_grad_residual); new tensors in x3's layout.

A backend may instead provide the training forward and the backward whole, with the semantics of
``compose_forward_train`` and ``compose_backward`` below (which build them from the kernels above):
one call each instead of two passes plus per-channel torch ops between them, which on a CPU cost more
than a small layer's passes (the C++ backend does this):

    bn_forward_train(x3, residual3, weight, bias, eps, activation) -> (y3, mean, var, relu_gate)
    bn_backward(grad_y3, y3, relu_gate, x3, residual3, mean, var, weight, bias, eps, training, activation,
                need_x, need_residual, need_sums) -> (grad_x3, grad_residual3, sum_dz, sum_dz_xhat)

Where the module sets ``UPDATES_RUNNING = True``, bn_forward_train also takes ``running=(running_mean,
running_var, momentum)`` (vectors contiguous in the statistics dtype) and updates them in place as
update_running_stats_op does, to the bit: the eager training path (_TrainingEager) passes it, saving that op's
torch calls (the functional op itself mutates nothing).

relu_gate: None, or where the module sets ``RELU_GATE = True`` and the activation is relu, a uint8
tensor of relu_gate_bytes(x3.numel()) whose bit i (byte i // 8, bit i % 8) is ``not y <= 0`` for the
element at flat offset i of x3's layout: the mask relu's gradient needs, in 1/32 of y's bytes. The op
saves it instead of y, and bn_backward then reads it instead of y3 (which is None).

The op itself updates running_mean/running_var (a small per-channel step, once per call).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import _dispatch, _registration
from .._registration import channels_of_examples, examples_of_channels, per_channel_of_examples
from .. import _validation as V
from . import reference

FAMILY = "batchnorm"
OP = "dlkernels.batch_norm_residual"


def relu_gate_bytes(elements: int) -> int:
    """Bytes of a relu gate (see the contract): a bit per element and 8 bytes of padding past the last,
    which the C++ reader's 8-byte loads may touch (csrc/batchnorm.cpp's gate_bytes, checked there)."""
    return (elements + 7) // 8 + 8


def relu_gate_passes(gate: Tensor, input: Tensor) -> Tensor:
    """A relu gate (see the contract) as a bool tensor of input's shape, True where relu passed its
    gradient: the bits are in the order of the kernels' view of input (as_ncs)."""
    n = input.numel()
    shifts = torch.arange(8, device=gate.device, dtype=torch.uint8)
    flat = (gate[:(n + 7) // 8, None] >> shifts).bitwise_and_(1).view(-1)[:n].bool()
    if channels_last(input):
        return flat.view(input.shape[0], -1, input.shape[1]).transpose(1, 2).reshape(input.shape)
    return flat.view(input.shape)


def writes_relu_gate(backend: str, device: torch.device, training: bool, activation: str) -> bool:
    """Whether the training forward hands the backward relu's gate bits rather than its output."""
    return training and activation == "relu" and getattr(_dispatch.kernels(FAMILY, backend, device), "RELU_GATE", False)


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check(x, residual, running_mean, running_var, weight, bias, training: bool, eps: float, activation: str,
           backend: str) -> None:
    V.tensor(x, "input", OP, ndim=(2, 3, 4))
    V.optional_tensor(residual, "residual", OP)
    V.same_device_dtype(OP, "input", x, residual=residual)
    V.backend_dtype(OP, backend, x)
    V.activation(OP, "batchnorm", activation or None)
    c = x.shape[1]
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"{OP}: residual must have the input's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight),
                    ("bias", bias)):
        if t is None:
            continue
        V.tensor(t, name, OP, ndim=1)
        if t.device != x.device:
            raise RuntimeError(f"{OP}: {name} is on {t.device} but input is on {x.device}")
        V.shape(OP, name, t, (c,), "one per channel of the input")
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{OP}: running_mean and running_var must both be given or both be None")
    if not training and running_mean is None:
        raise ValueError(f"{OP}: running_mean and running_var must be defined in evaluation mode")
    if eps < 0 or (training and eps == 0):  # as torch: eps is what keeps a constant channel finite
        raise ValueError(f"{OP}: eps must be {'positive' if training else 'non-negative'}, got {eps}")
    if training and x.shape[0] * math.prod(x.shape[2:]) == 1:  # as torch (with no channels too)
        raise ValueError(f"{OP}: expected more than 1 value per channel when training, got input size "
                         f"{tuple(x.shape)}")


def channels_last(x: Tensor) -> bool:
    """Whether x is laid out channels-last: (N, H, W, C) or, for 3-D input, (N, L, C) in memory."""
    if x.dim() == 4:
        return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    if x.dim() == 3:
        n, c, l = x.shape
        return not x.is_contiguous() and x.stride() == (l * c, 1, c)
    return False


def reads_channels_last(x3: Tensor) -> bool:
    """How a backend reads a contract (N, C, S) view: channels-last unless NCS-contiguous. Views with
    S == 1 or C == 1 are both layouts at once; S == 1 ((N, C) input: N rows of C contiguous channels)
    is read channels-last, vectorized along C, ~50x faster than as N*C one-element planes."""
    return x3.shape[2] == 1 or not x3.is_contiguous()


def as_ncs(t: Tensor, cl: bool) -> Tensor:
    """t as the contract's (N, C, S) view, channels-last when cl (copying only if t is laid out otherwise)."""
    n, c = t.shape[0], t.shape[1]
    s = t.numel() // (n * c)
    if not cl:
        return t.contiguous().view(n, c, s)
    if t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last).view(n, c, s)
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def empty_ncs(x: Tensor, cl: bool) -> Tensor:
    """A new tensor of x's shape in the layout as_ncs(x, cl) has (works on fake tensors too)."""
    n, c = x.shape[0], x.shape[1]
    s = math.prod(x.shape[2:])
    if cl:
        return x.new_empty((n, s, c)).transpose(1, 2).view(x.shape)
    return x.new_empty(x.shape)


def fold_scale_shift(mean, var, weight, bias, eps):
    """(scale, shift) of bn_apply's contract, for backends that fold in PyTorch."""
    return _scale_shift(mean, torch.rsqrt(var + eps), weight, bias)


def _scale_shift(mean, invstd, weight, bias):
    """(scale, shift) from per-channel vectors all in the statistics dtype (the ops convert weight and
    bias once, with _to, before any kernel)."""
    scale = invstd if weight is None else weight * invstd
    # bias - mean * scale in one kernel (addcmul) where there is a bias
    shift = torch.mul(mean, scale).neg_() if bias is None else torch.addcmul(bias, mean, scale, value=-1)
    return scale.contiguous(), shift.contiguous()


# The op users see, dlkernels::batch_norm_residual, declares its in-place update of the running
# statistics in its schema. torch.library.register_autograd cannot give a mutating op an autograd formula, so it is a
# CompositeImplicitAutograd op made of two: a functional op with autograd that computes the output and
# the batch statistics (batch_norm_residual_functional), and a small mutating op that folds those
# into the running statistics (update_running_stats). torch.compile functionalizes the latter.
@_registration.composite_op(
    "dlkernels::batch_norm_residual",
    "(Tensor input, Tensor? residual, Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor? weight, "
    "Tensor? bias, bool training, float momentum, float eps, str activation, str backend) -> Tensor")
def batch_norm_residual_op(input, residual, running_mean, running_var, weight, bias, training, momentum, eps,
                           activation, backend):
    out, mean, var, _gate = batch_norm_residual_functional_op(
        input, residual, running_mean, running_var, weight, bias, training, eps, activation, backend)
    if training:
        _update_running_stats(update_running_stats_op, input, running_mean, running_var, mean, var, momentum)
    return out


def _update_running_stats(update, input, running_mean, running_var, mean, var, momentum) -> None:
    """The training step after the functional op: update (the op, or its kernel) folds the batch
    statistics into the running ones, where there are any."""
    if running_mean is not None and input.numel() > 0:  # torch leaves them as they are on an empty batch
        update(running_mean, running_var, mean, var, momentum, input.numel() // input.shape[1])


@_registration.custom_op("dlkernels::update_running_stats", mutates_args=("running_mean", "running_var"))
def update_running_stats_op(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, momentum: float,
                            count: int) -> None:
    """running = (1 - momentum) * running + momentum * batch, with the unbiased variance, as PyTorch."""
    # running + momentum * (batch - running), both statistics in one foreach kernel: two tensor ops a
    # step in all (on a GPU each small kernel costs a few us, as much as a whole pass over a late
    # ResNet stage; on a CPU each tiny op ~3 us of Python and dispatch)
    unbiased = var * (count / (count - 1))
    batch = [mean if mean.dtype == running_mean.dtype else mean.to(running_mean.dtype),
             unbiased if unbiased.dtype == running_var.dtype else unbiased.to(running_var.dtype)]
    torch._foreach_lerp_([running_mean, running_var], batch, momentum)


@update_running_stats_op.register_fake
def _(running_mean, running_var, mean, var, momentum, count):
    return None


@update_running_stats_op.register_vmap
def _(info, in_dims, running_mean, running_var, mean, var, momentum, count):
    """Under torch.vmap (a batch norm in training vmapped over, its batch statistics one per example or
    model): running statistics that carry the vmapped dimension too (an ensemble's, stacked) take their
    own example's step, as torch's batch norm does; unbatched ones cannot hold a step per example, and
    raise torch's error (without a rule the fallback raised one about out= and view ops)."""
    rm_dim, rv_dim, mean_dim, var_dim = in_dims[:4]
    if (mean_dim is not None and rm_dim is None) or (var_dim is not None and rv_dim is None):
        raise RuntimeError(
            f"{OP}: batch norm got a batched tensor as input while the running_mean or running_var, which "
            "will be updated in place, were not batched. If you are using a module and do not need eval mode, "
            "set `track_running_stats` to False (torch.func.replace_all_batch_norm_modules_ does it for a model)")

    def front(t, dim, running_dim):  # examples first where the running statistic carries them
        return t if running_dim is None else _registration.examples_first(t, dim, info.batch_size)

    update_running_stats_op.impl(front(running_mean, rm_dim, rm_dim), front(running_var, rv_dim, rv_dim),
                                 front(mean, mean_dim, rm_dim), front(var, var_dim, rv_dim), momentum, count)
    return None, None


@_registration.custom_op("dlkernels::batch_norm_residual_functional", mutates_args=())
def batch_norm_residual_functional_op(input: Tensor, residual: Optional[Tensor], running_mean: Optional[Tensor],
                                      running_var: Optional[Tensor], weight: Optional[Tensor],
                                      bias: Optional[Tensor], training: bool, eps: float, activation: str,
                                      backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out, mean, var, relu_gate): in training the batch statistics that normalized the input (biased
    variance); in evaluation empty tensors: the running statistics, inputs already, are what the
    backward uses (no copies of them per call). relu_gate: the gate bits the backward reads instead of
    out (writes_relu_gate), else an empty uint8 tensor."""
    return _functional(input, residual, running_mean, running_var, weight, bias, training, eps, activation, backend)


def _functional(input, residual, running_mean, running_var, weight, bias, training, eps, activation, backend,
                momentum=None):
    """The functional op's body. ``momentum`` (the eager training path only, _TrainingEager): also update the
    running statistics, in the training kernel where it can (the contract's UPDATES_RUNNING: vectors
    contiguous in the statistics dtype; _check has vetted the rest), else with update_running_stats_op's body."""
    sdtype = stats_dtype(input.dtype)
    if not training:
        out = _evaluate(input, residual, running_mean, running_var, weight, bias, eps, activation, backend)
        return (out, input.new_empty(0, dtype=sdtype), input.new_empty(0, dtype=sdtype),
                input.new_empty(0, dtype=torch.uint8))
    _check(input, residual, running_mean, running_var, weight, bias, True, eps, activation, backend)
    cl = channels_last(input)
    if input.numel() == 0:  # an empty batch: an empty output as torch's, and no kernel on empty arrays
        gate = relu_gate_bytes(0) if writes_relu_gate(backend, input.device, True, activation) else 0
        c = input.shape[1]
        return (empty_ncs(input, cl), input.new_zeros(c, dtype=sdtype), input.new_zeros(c, dtype=sdtype),
                input.new_zeros(gate, dtype=torch.uint8))
    k = _dispatch.kernels(FAMILY, backend, input.device)
    x3 = as_ncs(input, cl)
    r3 = None if residual is None else as_ncs(residual, cl)
    running = None
    if (momentum is not None and running_mean is not None and getattr(k, "UPDATES_RUNNING", False)
            and _kernel_vector(running_mean, sdtype) and _kernel_vector(running_var, sdtype)):
        running = (running_mean, running_var, momentum)
    y3, mean, var, gate = compose_forward_train(k, x3, r3, _to(weight, sdtype), _to(bias, sdtype), eps, activation,
                                                running)
    if running is not None:  # written in place by the kernel, not a torch op: counted as torch's update would be
        _increment_version((running_mean, running_var))
    elif momentum is not None:
        _update_running_stats(update_running_stats_op.impl, input, running_mean, running_var, mean, var, momentum)
    return y3.view_as(input), mean, var, input.new_empty(0, dtype=torch.uint8) if gate is None else gate


_increment_version = torch.autograd.graph.increment_version


@batch_norm_residual_functional_op.register_decomposition
def _(input, residual, running_mean, running_var, weight, bias, training, eps, activation, backend):
    """The functional op in torch ops (the statistics as the op returns them: not differentiable)."""
    _check(input, residual, running_mean, running_var, weight, bias, training, eps, activation, backend)
    if input.numel() == 0:
        return _functional(input, residual, running_mean, running_var, weight, bias, training, eps, activation,
                           backend)
    # the kernel contract's torch form (reference.py) on the contract's (N, C, S) views
    sdtype = stats_dtype(input.dtype)
    cl = channels_last(input)
    x3 = as_ncs(input, cl)
    mean, var = reference.bn_stats(x3) if training else (_to(running_mean, sdtype), _to(running_var, sdtype))
    out = reference.bn_apply(x3, None if residual is None else as_ncs(residual, cl), mean, var, _to(weight, sdtype),
                             _to(bias, sdtype), eps, activation).view_as(input)
    placeholder = input.new_empty(0, dtype=sdtype)
    stats = (mean.detach(), var.detach()) if training else (placeholder, placeholder.clone())
    return out, *stats, input.new_empty(0, dtype=torch.uint8)


def _kernel_vector(t: Tensor, sdtype: torch.dtype) -> bool:
    return t.dtype == sdtype and t.is_contiguous()


def _evaluate(input, residual, running_mean, running_var, weight, bias, eps, activation, backend) -> Tensor:
    """Evaluation's output, the functional op's first (its others are empty placeholders there)."""
    _check(input, residual, running_mean, running_var, weight, bias, False, eps, activation, backend)
    cl = channels_last(input)
    if input.numel() == 0:  # an empty batch: an empty output as torch's, and no kernel on empty arrays
        return empty_ncs(input, cl)
    sdtype = stats_dtype(input.dtype)
    k = _dispatch.kernels(FAMILY, backend, input.device)
    y3 = k.bn_apply(as_ncs(input, cl), None if residual is None else as_ncs(residual, cl), _to(running_mean, sdtype),
                    _to(running_var, sdtype), _to(weight, sdtype), _to(bias, sdtype), eps, activation)
    return y3.view_as(input)


def compose_forward_train(k, x3, r3, w, b, eps, activation, running=None):
    """(y3, mean, var, relu_gate or None): the backend's bn_forward_train, or its statistics pass then
    its apply pass. running: see the contract's UPDATES_RUNNING (only for backends that set it)."""
    if running is not None:
        return k.bn_forward_train(x3, r3, w, b, eps, activation, running)
    if hasattr(k, "bn_forward_train"):
        return k.bn_forward_train(x3, r3, w, b, eps, activation)
    mean, var = k.bn_stats(x3)
    return k.bn_apply(x3, r3, mean, var, w, b, eps, activation), mean, var, None


def _to(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """A per-channel vector as the kernels take it: contiguous, in the statistics dtype. Not a no-op
    aten.to when it is already: opcheck's schema check rejects an op that returns its input."""
    if t is None:
        return None
    return (t if t.dtype == dtype else t.to(dtype)).contiguous()


# Under torch.vmap the examples' channels become channels of one call (_registration.channels_of_examples):
# batch norm never mixes channels, so one call normalizes every example by its own statistics (training)
# or its own or shared running ones (evaluation), with per-example weight gradients.
@batch_norm_residual_functional_op.register_vmap
def _(info, in_dims, input, residual, running_mean, running_var, weight, bias, training, eps, activation, backend):
    n = info.batch_size
    out, mean, var, gate = batch_norm_residual_functional_op.default(
        channels_of_examples(input, in_dims[0], n),
        None if residual is None else channels_of_examples(residual, in_dims[1], n),
        *(per_channel_of_examples(t, d, n) for t, d in zip((running_mean, running_var, weight, bias),
                                                            in_dims[2:6])),
        training, eps, activation, backend)
    # No relu gate: its bits follow the whole call's layout, not an example's, so the backward takes relu's
    # mask from the output instead (what an empty gate tells _setup)
    stats_dim = 0 if training else None
    return ((examples_of_channels(out, n), mean.reshape(n, -1) if training else mean,
             var.reshape(n, -1) if training else var, gate.new_empty(0)), (1, stats_dim, stats_dim, None))


@batch_norm_residual_functional_op.register_fake
def _(input, residual, running_mean, running_var, weight, bias, training, eps, activation, backend):
    _check(input, residual, running_mean, running_var, weight, bias, training, eps, activation, backend)
    sdtype = stats_dtype(input.dtype)
    c = input.shape[1] if training else 0
    gate = relu_gate_bytes(input.numel()) if writes_relu_gate(backend, input.device, training, activation) else 0
    return (empty_ncs(input, channels_last(input)), input.new_empty(c, dtype=sdtype), input.new_empty(c, dtype=sdtype),
            input.new_empty(gate, dtype=torch.uint8))


@_registration.custom_op("dlkernels::batch_norm_residual_backward", mutates_args=())
def batch_norm_residual_backward_op(grad_out: Tensor, out: Optional[Tensor], relu_gate: Optional[Tensor],
                                    input: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                                    bias: Optional[Tensor],
                                    mean: Tensor, var: Tensor, eps: float, training: bool, activation: str,
                                    output_mask: list[bool], backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_input, grad_residual, grad_weight, grad_bias); those not asked for are empty tensors.
    ``mean``, ``var``: the statistics that normalized the input. relu needs its mask: ``relu_gate``
    where the forward wrote one, else ``out``; silu needs ``residual`` (to recompute the pre-activation)."""
    k = _dispatch.kernels(FAMILY, backend, input.device)
    sdtype = stats_dtype(input.dtype)
    cl = channels_last(input)
    x3 = as_ncs(input, cl)
    need_x, need_r, need_w, need_b = output_mask
    need_sums = (need_x and training) or need_w or need_b
    grad_x3, grad_r3, sum_dz, sum_dz_xhat = compose_backward(
        k, as_ncs(grad_out, cl), None if out is None else as_ncs(out, cl), relu_gate, x3,
        None if residual is None else as_ncs(residual, cl), mean, var, _to(weight, sdtype), _to(bias, sdtype), eps,
        training, activation, need_x, need_r, need_sums)
    need_w, need_b = need_w and weight is not None, need_b and bias is not None
    # each allocation or no-op cast from Python costs microseconds on a cold cache: only those needed
    empty = None if (need_x and need_r and need_w and need_b) else input.new_empty(0)
    return (grad_x3.view_as(input) if need_x else empty, grad_r3.view_as(input) if need_r else empty,
            _as(sum_dz_xhat, weight.dtype) if need_w else empty, _as(sum_dz, bias.dtype) if need_b else empty)


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def compose_backward(k, g3, y3, relu_gate, x3, r3, mean, var, weight, bias, eps, training, activation, need_x,
                     need_r, need_sums):
    """(grad_x3, grad_r3, sum_dz, sum_dz_xhat), each None where not needed: the backend's bn_backward,
    or its reduce pass (where the sums are needed) then its apply pass (backends without bn_backward
    write no gate: relu_gate is None there)."""
    if hasattr(k, "bn_backward"):
        return k.bn_backward(g3, y3, relu_gate, x3, r3, mean, var, weight, bias, eps, training, activation, need_x,
                             need_r, need_sums)
    invstd = torch.rsqrt(var + eps)
    scale, shift = _scale_shift(mean, invstd, weight, bias)
    # grad_residual = dz is an output anyway: the reduce pass, which forms dz, writes it (see the contract)
    sum_dz = sum_dz_xhat = dz3 = None
    if need_sums:
        sum_dz, sum_dz_xhat, dz3 = k.bn_backward_reduce(g3, y3, x3, r3, mean, invstd, scale, shift, activation,
                                                        bool(need_r) and activation != "")
    grad_r3 = dz3
    if dz3 is not None:
        need_r = False
        # The apply pass reads dz back instead of grad_y and y (or the residual) only where dz3 holds dz
        # as the sums saw it: a float16/bfloat16 dz3 is dz rounded, and grad_x subtracts the float32
        # sums' means from it, which at a few values per channel cancels to noise (Triton, 2 x 31
        # bfloat16, silu with a residual: 663x the gradient's norm off, against 0.016 reading grad_y).
        if dz3.dtype in (torch.float32, torch.float64):
            g3, y3, r3, activation = dz3, None, None, ""
    grad_x3 = None
    if need_x or need_r:
        if training and need_x:
            count = x3.shape[0] * x3.shape[2]
            c_dz, c_xhat = torch._foreach_div([sum_dz, sum_dz_xhat], count)  # one launch on a GPU
        else:  # evaluation, or only grad_residual (= dz), which does not depend on them
            c_dz = c_xhat = None
        grad_x3, gr3 = k.bn_backward_apply(g3, y3, x3, r3, mean, invstd, scale, shift, c_dz, c_xhat, activation,
                                           bool(need_r))
        if need_r:
            grad_r3 = gr3
    return grad_x3, grad_r3, sum_dz, sum_dz_xhat


@batch_norm_residual_backward_op.register_vmap
def _(info, in_dims, grad_out, out, relu_gate, input, residual, weight, bias, mean, var, eps, training, activation,
      output_mask, backend):
    if relu_gate is not None:  # the functional op's rule writes none (its bits have no per-example order)
        raise RuntimeError(f"{OP}: the backward under vmap takes relu's mask from the output, not a relu gate")
    n = info.batch_size
    images = [None if t is None else channels_of_examples(t, d, n)
              for t, d in zip((grad_out, out, input, residual), (in_dims[0], in_dims[1], in_dims[3], in_dims[4]))]
    vectors = [per_channel_of_examples(t, d, n) for t, d in zip((weight, bias, mean, var), in_dims[5:9])]
    gx, gr, gw, gb = batch_norm_residual_backward_op.default(
        images[0], images[1], relu_gate, images[2], images[3], *vectors, eps, training, activation, output_mask,
        backend)
    need_w, need_b = output_mask[2] and weight is not None, output_mask[3] and bias is not None
    return ((examples_of_channels(gx, n) if output_mask[0] else gx,
             examples_of_channels(gr, n) if output_mask[1] else gr,
             gw.reshape(n, -1) if need_w else gw, gb.reshape(n, -1) if need_b else gb),
            (1 if output_mask[0] else None, 1 if output_mask[1] else None, 0 if need_w else None,
             0 if need_b else None))


def _grads_in_torch_ops(grad_out, out, gate, input, residual, weight, bias, mean, var, eps, training, activation):
    """The four gradients as reference.grads_differentiable gives them (torch ops, differentiable to any
    order, the statistics recomputed in training), relu's mask from the gate bits or the output."""
    passes = None
    if activation == "relu":
        passes = relu_gate_passes(gate, input) if gate is not None else ~(out <= 0)
    return reference.grads_differentiable(grad_out, passes, input, residual, weight, bias, mean, var, eps, training,
                                          activation)


@batch_norm_residual_backward_op.register_decomposition
def _(grad_out, out, relu_gate, input, residual, weight, bias, mean, var, eps, training, activation, output_mask,
      backend):
    grads = _grads_in_torch_ops(grad_out, out, relu_gate, input, residual, weight, bias, mean, var, eps, training,
                                activation)
    return tuple(g if wanted and g is not None else input.new_empty(0) for g, wanted in zip(grads, output_mask))


@batch_norm_residual_backward_op.register_fake
def _(grad_out, out, relu_gate, input, residual, weight, bias, mean, var, eps, training, activation, output_mask,
      backend):
    need_x, need_r, need_w, need_b = output_mask
    cl = channels_last(input)
    return (empty_ncs(input, cl) if need_x else input.new_empty(0),
            empty_ncs(input, cl) if need_r else input.new_empty(0),
            weight.new_empty(weight.shape) if (need_w and weight is not None) else input.new_empty(0),
            bias.new_empty(bias.shape) if (need_b and bias is not None) else input.new_empty(0))


def _setup(ctx, inputs, output):
    input, residual, running_mean, running_var, weight, bias, training, eps, activation, backend = inputs
    out, mean, var, gate = output
    ctx.mark_non_differentiable(mean, var, gate)
    if not training:  # the statistics that normalized the input (the op returned empty ones)
        sdtype = stats_dtype(input.dtype)
        mean, var = _to(running_mean, sdtype), _to(running_var, sdtype)
    relu_out = activation == "relu" and gate.numel() == 0  # relu's mask from the output, not its gate bits
    ctx.save_for_backward(input, out if relu_out else None, gate if gate.numel() else None,
                          residual if activation == "silu" else None, weight, bias, mean, var)
    ctx.training, ctx.eps, ctx.activation, ctx.backend = training, eps, activation, backend
    ctx.has_residual = residual is not None


def _backward(ctx, grad_out, _grad_mean, _grad_var, _grad_gate):
    input, out, gate, residual, weight, bias, mean, var = ctx.saved_tensors
    needs = ctx.needs_input_grad
    need_r = ctx.has_residual and needs[1]
    if input.numel() == 0:  # an empty batch: every gradient is zero (the parameters' sums have no terms)
        zero = lambda t: None if t is None else torch.zeros_like(t)  # noqa: E731
        return (zero(input) if needs[0] else None, zero(input) if need_r else None, None, None,
                zero(weight) if needs[4] else None, zero(bias) if needs[5] else None, None, None, None, None)
    if torch.is_grad_enabled():
        # create_graph=True: this backward will be differentiated, through the batch statistics too,
        # which the kernels' backward takes as constants: the same gradients in torch ops instead
        gx, gr, gw, gb = _grads_in_torch_ops(grad_out, out, gate, input, residual, weight, bias, mean, var, ctx.eps,
                                             ctx.training, ctx.activation)
        return (gx if needs[0] else None, gr if need_r else None, None, None, gw if needs[4] else None,
                gb if needs[5] else None, None, None, None, None)
    # Without an activation grad_residual is grad_out itself (as for eager's add): handing it back
    # costs nothing, where the op (which may not return an alias of its input) would copy it.
    mask = [needs[0], need_r and ctx.activation != "", weight is not None and needs[4],
            bias is not None and needs[5]]
    gx, gr, gw, gb = batch_norm_residual_backward_op(
        grad_out, out, gate, input, residual, weight, bias, mean, var, ctx.eps, ctx.training, ctx.activation, mask,
        ctx.backend)
    if need_r and not mask[1]:
        gr = grad_out
    return (gx if mask[0] else None, gr if need_r else None, None, None, gw if mask[2] else None,
            gb if mask[3] else None, None, None, None, None)


batch_norm_residual_functional_op.register_autograd(_backward, setup_context=_setup)


def _jvp(inputs, output, tangents):
    """The output's tangent in torch ops (forward-mode AD is rare and each term is a pass): z = xhat * w +
    b + r with xhat = (x - mean) * invstd; in training mean and the biased variance are the batch's, so
    their tangents are mean(t_x) and 2 mean((x - mean) t_x) per channel, in evaluation the running
    statistics' own. The batch statistics, placeholders and gate are not differentiable (no tangent)."""
    x, r, running_mean, running_var, w, b, training, eps, activation, _ = inputs
    out = output[0]
    t_x, t_r, t_rm, t_rv, t_w, t_b = tangents[:6]
    if x.numel() == 0:
        return torch.zeros_like(out), None, None, None
    dims = [0, *range(2, x.dim())]
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    if training:
        mean, var = x.mean(dims, keepdim=True), x.var(dims, correction=0, keepdim=True)
        t_mean = None if t_x is None else t_x.mean(dims, keepdim=True)
        t_var = None if t_x is None else 2 * ((x - mean) * t_x).mean(dims, keepdim=True)
    else:
        mean, var = running_mean.view(shape), running_var.view(shape)
        t_mean = None if t_rm is None else t_rm.view(shape)
        t_var = None if t_rv is None else t_rv.view(shape)
    invstd = torch.rsqrt(var + eps)
    xhat = (x - mean) * invstd
    t_xhat = []
    if t_x is not None:
        t_xhat.append(t_x * invstd)
    if t_mean is not None:
        t_xhat.append(-t_mean * invstd)
    if t_var is not None:
        t_xhat.append(xhat * (-0.5 * t_var / (var + eps)))
    scale = 1 if w is None else w.view(shape)
    terms = [sum(t_xhat[1:], t_xhat[0]) * scale] if t_xhat else []
    terms += [t for t in (None if t_w is None else xhat * t_w.view(shape), None if t_b is None else t_b.view(shape),
                          t_r) if t is not None]
    t_z = _registration.tangent_sum(terms, out)
    if activation == "relu":
        t_z = torch.ops.aten.threshold_backward(t_z, out, 0)
    elif activation == "silu":
        z = xhat * scale + (0 if b is None else b.view(shape)) + (0 if r is None else r)
        sig = torch.sigmoid(z)
        t_z = t_z * sig * (1 + z * (1 - sig))
    return t_z, None, None, None


# in training the jvp does not read the running statistics, which the op updates in place right after
batch_norm_residual_functional_op.register_jvp(_jvp, unread=lambda inputs: (2, 3) if inputs[6] else ())


def _no_double_backward(ctx, *grads):
    raise NotImplementedError(
        "dlkernels::batch_norm_residual_backward is not differentiable; differentiate "
        "dlkernels.batch_norm_residual's backward with create_graph=True instead (its backward then runs "
        "in differentiable torch ops)")


batch_norm_residual_backward_op.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


class _TrainingEager(torch.autograd.Function):
    """batch_norm_residual_op in training, in plain eager mode where autograd records: the functional op's
    kernel, the update of the running statistics and the functional op's autograd (_setup, _backward) in
    one Function. The op's body calls them as two ops, each behind its own eager checks, and hands the
    batch statistics through autograd as outputs. Cold (each call after a layer-sized pass, as in a
    network or a benchmark loop) those layers cost more than their hot microseconds: two threads on the
    Zen4, channels-last with residual and relu, forward / backward, 8x728x19x19 1.50 / 1.71 -> 1.17 / 1.53
    ms, 32x2048x7x7 2.99 / 3.97 -> 2.78 / 3.89 (interleaved in one process, same kernels).
    The arguments are the op's, momentum in training's place, so _backward's gradients line up."""

    @staticmethod
    def forward(ctx, input, residual, running_mean, running_var, weight, bias, momentum, eps, activation, backend):
        args = (input, residual, running_mean, running_var, weight, bias, True, eps, activation, backend)
        out = _functional(*args, momentum=momentum)
        _setup(ctx, args, out)
        return _registration.owned(out[0])

    @staticmethod
    def backward(ctx, grad_out):
        return _backward(ctx, grad_out, None, None, None)


_training_eager = _registration.eager_apply(_TrainingEager)


@batch_norm_residual_op.register_eager
def _(input, residual, running_mean, running_var, weight, bias, training, momentum, eps, activation, backend):
    """The op in plain eager mode: training with autograd recording as one Function, else the body (whose ops
    then take the kernels directly)."""
    if training and _registration.records_autograd_eager(input, residual, running_mean, running_var, weight, bias):
        return _training_eager(input, residual, running_mean, running_var, weight, bias, momentum, eps,
                               activation, backend)
    return batch_norm_residual_op.impl(input, residual, running_mean, running_var, weight, bias, training, momentum,
                                       eps, activation, backend)
batch_norm_residual_functional_op.register_autocast(_registration.promote_activations)


def batch_norm_residual(input: Tensor, residual: Tensor | None, running_mean: Tensor | None,
                        running_var: Tensor | None, weight: Tensor | None = None, bias: Tensor | None = None,
                        training: bool = False, momentum: float = 0.1, eps: float = 1e-5, *,
                        activation: str | None = None, backend: str | None = None) -> Tensor:
    """``act(F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps) + residual)``
    in one fused pass (two in training: statistics, then the fused normalize-add-activate). ``residual``
    may be None; ``activation`` is None, "relu" or "silu". Training updates the running statistics in
    place as PyTorch does."""
    V.tensor(input, "input", OP, ndim=(2, 3, 4))
    name = _dispatch.resolve(FAMILY, backend, input.device)
    act = V.activation(OP, "batchnorm", activation)
    momentum, eps = V.number(OP, "momentum", momentum), V.number(OP, "eps", eps)
    if name == "torch":  # the custom op checks its arguments itself
        _check(input, residual, running_mean, running_var, weight, bias, training, eps, act, name)
        return reference.batch_norm_residual(input, residual, running_mean, running_var, weight, bias, training,
                                             momentum, eps, activation)
    if not training:
        # nothing to update: the functional op is the whole op, one dispatcher layer (~10 us) fewer
        args = (input, residual, running_mean, running_var, weight, bias, False, eps, act, name)
        if _registration.plain_eager(args) and not _registration.records_autograd_eager(*args):
            # nothing for autograd either: its kernel alone, without three placeholder outputs to allocate
            # (interleaved, Zen4, 32x2048x7x7 NCHW with residual and relu, inputs from DRAM: 1022 -> 955 us
            # and 1254 -> 1213, eager 2281 and 2743; 2x8x4x4 32 -> 27)
            return _registration.owned(_evaluate(input, residual, running_mean, running_var, weight, bias, eps, act,
                                                 name))
        return batch_norm_residual_functional_op(*args)[0]
    return batch_norm_residual_op(input, residual, running_mean, running_var, weight, bias, True, momentum, eps, act,
                                  name)
