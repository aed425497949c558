"""matmul and linear: public functions, torch.library ops, autograd and fake implementations.

Kernel contract: every backend module ``dlkernels/matmul/<backend>_impl.py`` provides

    mm(a, b, bias, bias_dim, activation) -> Tensor
        a (M, K) or (B, M, K); b (K, N) or (B, K, N), the same rank and batch B. Any strides:
        transposed views and a stride-0 (broadcast) batch come in as they are, never copied here.
        bias: None, or a contiguous 1-D tensor of length N (bias_dim=1, one value per column) or
        M (bias_dim=0, one per row). activation: "" or "relu" (after the bias; relu(nan) is nan).
        Returns act(a @ b + bias) as a new contiguous (M, N) / (B, M, N) tensor.

    bias_act_backward(grad_out, out, activation, bias_dim, need_bias) -> (grad_pre, grad_bias)
        grad_out, out: contiguous (M, N) or (B, M, N). grad_pre: for "relu", 0 where out <= 0 and
        grad_out elsewhere (torch.relu's backward: a NaN output passes its gradient), grad_out
        otherwise; grad_bias = grad_pre summed over every dim but ``bias_dim`` of the last
        two (None unless need_bias).

Inputs arrive validated (_validation) with one dtype the backend computes in and one device.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import _dispatch, _registration
from .. import _validation as V
from . import reference

FAMILY = "matmul"


def _kernels(backend: str, *operands: Tensor):
    """The backend's kernel module, or the torch reference where an operand is empty (M, N, K or a batch
    of 0: zeros plus the bias, or an empty result): no kernel runs on empty arrays."""
    for t in operands:
        if t.numel() == 0:
            return reference
    return _dispatch.kernels(FAMILY, backend, operands[0].device)


def _rows(t: Tensor) -> Tensor:
    """t as a 2-D (rows, last dimension) tensor: reshape(-1, k), whose -1 is ambiguous when a size is 0."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


# ---------------------------------------------------------------------------------------------
# checks and shapes shared by the real and the fake implementations
# ---------------------------------------------------------------------------------------------
def _check_matmul(a, b, backend: str) -> None:
    op = "dlkernels.matmul"
    V.tensor(a, "a", op)
    V.tensor(b, "b", op)
    V.same_device_dtype(op, "a", a, b=b)
    V.backend_dtype(op, backend, a)
    if a.dim() < 2 or b.dim() < 2:
        raise ValueError(f"{op}: the op takes inputs of 2 or more dimensions, got {a.dim()} and {b.dim()}")
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(f"{op}: inner sizes differ: a is {tuple(a.shape)} (K={a.shape[-1]}), "
                         f"b is {tuple(b.shape)} (K={b.shape[-2]})")
    if _broadcast(a.shape[:-2], b.shape[:-2]) is None:
        raise ValueError(f"{op}: batch dimensions {tuple(a.shape[:-2])} and {tuple(b.shape[:-2])} "
                         "do not broadcast")


def _check_linear(x, w, bias, activation: str, backend: str) -> None:
    op = "dlkernels.linear"
    V.tensor(x, "input", op)
    V.tensor(w, "weight", op, ndim=2)
    V.optional_tensor(bias, "bias", op, ndim=1)
    V.same_device_dtype(op, "input", x, weight=w, bias=bias)
    V.backend_dtype(op, backend, x)
    V.activation(op, "linear", activation or None)
    if x.dim() < 1 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"{op}: input's last dimension must equal weight.shape[1]={w.shape[1]}, "
                         f"got input of shape {tuple(x.shape)}")
    if bias is not None:
        V.shape(op, "bias", bias, (w.shape[0],), "out_features")


def _broadcast(s: tuple, t: tuple) -> list | None:
    """torch's broadcast of two batch shapes, or None; a few plain comparisons where
    torch.broadcast_shapes costs ~20 us a call, a third of a small op's whole overhead."""
    if len(s) < len(t):
        s, t = t, s
    out = list(s)
    for i in range(1, len(t) + 1):
        x, y = s[-i], t[-i]
        if x != y:
            if x == 1:
                out[-i] = y
            elif y != 1:
                return None
    return out


def _matmul_shape(a: Tensor, b: Tensor) -> list[int]:
    return [*_broadcast(a.shape[:-2], b.shape[:-2]), a.shape[-2], b.shape[-1]]


# ---------------------------------------------------------------------------------------------
# dlkernels::matmul
# ---------------------------------------------------------------------------------------------
@_registration.custom_op("dlkernels::matmul", mutates_args=())
def matmul_op(a: Tensor, b: Tensor, backend: str) -> Tensor:
    _check_matmul(a, b, backend)
    k = _kernels(backend, a, b)
    if a.dim() == 2 and b.dim() == 2:
        return k.mm(a, b, None, 1, "")
    m, kk, n = a.shape[-2], a.shape[-1], b.shape[-1]
    if b.dim() == 2:
        # The batch of a folds into M: one GEMM instead of a loop (the linear-layer case).
        out = k.mm(_rows(a), b, None, 1, "")
        return out.reshape(*a.shape[:-2], m, n)
    shape = _matmul_shape(a, b)
    batch = shape[:-2]
    a3 = a.expand(*batch, m, kk).reshape(math.prod(batch), m, kk)
    b3 = b.expand(*batch, kk, n).reshape(math.prod(batch), kk, n)
    return k.mm(a3, b3, None, 1, "").reshape(shape)


@matmul_op.register_fake
def _(a, b, backend):
    _check_matmul(a, b, backend)
    return a.new_empty(_matmul_shape(a, b))


@matmul_op.register_vmap
def _(info, in_dims, a, b, backend):
    """Under torch.vmap one batched GEMM (the op broadcasts batch dimensions) instead of one a example: the
    vmapped dimension first, the batched operands' own batch dimensions padded to the larger rank."""
    a_dim, b_dim = in_dims[:2]
    rank = max(a.dim() - (a_dim is not None), b.dim() - (b_dim is not None))

    def leading(t, dim):
        if dim is None:  # broadcast against the other's leading vmapped dimension
            return t
        t = t.movedim(dim, 0)
        return t.reshape(t.shape[0], *([1] * (rank + 1 - t.dim())), *t.shape[1:])

    return matmul_op.default(leading(a, a_dim), leading(b, b_dim), backend), 0


def _backward_ops(backend: str, *tensors):
    """(mm, bias_act_backward) for a backward over ``tensors``: the ops, or, in a first-order backward
    in plain eager mode (grad mode off, nothing but autograd would see the ops), their kernels called
    directly on 2-D operands, which the forward's checks already vetted. The ops' layers (argument
    checks, Op.__call__, backend lookup) cost ~12 us a call, a third of a small layer's backward (5x7 @
    7x3 forward + backward 76 us, torch 27). A create_graph backward, torch.compile and other modes
    keep the ops, which they see and differentiate."""
    if torch.is_grad_enabled() or not _registration.plain_eager(tensors):
        return matmul_op, bias_act_backward_op
    k = _kernels(backend, *tensors)

    def mm(a, b, backend):
        return k.mm(a, b, None, 1, "") if a.dim() == 2 and b.dim() == 2 else matmul_op(a, b, backend)

    def bias_act(grad_out, out, activation, bias_dim, need_bias, backend):
        return k.bias_act_backward(grad_out.contiguous(), out.contiguous() if activation else grad_out, activation,
                                   bias_dim, need_bias)

    return mm, bias_act


def _matmul_setup(ctx, inputs, output):
    a, b, backend = inputs
    ctx.save_for_backward(a, b)
    ctx.backend = backend


def _matmul_backward(ctx, grad):
    a, b = ctx.saved_tensors
    mm, _ = _backward_ops(ctx.backend, grad, a, b)
    grad_a = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_a = mm(grad, b.mT, ctx.backend).sum_to_size(a.shape)
    if ctx.needs_input_grad[1]:
        if b.dim() == 2:
            # sum over a's batch inside the GEMM: (B*M, K)^T @ (B*M, N)
            grad_b = mm(_rows(a).mT, _rows(grad), ctx.backend)
        else:
            grad_b = mm(a.mT, grad, ctx.backend).sum_to_size(b.shape)
    return grad_a, grad_b, None


matmul_op.register_autograd(_matmul_backward, setup_context=_matmul_setup)


@matmul_op.register_jvp
def _(inputs, output, tangents):
    a, b, backend = inputs
    t_a, t_b = tangents[:2]
    terms = _registration.product_rule(lambda x, y: matmul_op(x, y, backend), a, b, t_a, t_b)
    return _registration.tangent_sum(terms, output)
matmul_op.register_autocast(_registration.lower_precision)


# ---------------------------------------------------------------------------------------------
# dlkernels::linear and its epilogue backward
# ---------------------------------------------------------------------------------------------
@_registration.custom_op("dlkernels::linear", mutates_args=())
def linear_op(input: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str, backend: str) -> Tensor:
    _check_linear(input, weight, bias, activation, backend)
    bias = None if bias is None else bias.contiguous()
    if input.dim() == 2:
        return _kernels(backend, input, weight).mm(input, weight.t(), bias, 1, activation)
    out = _kernels(backend, input, weight).mm(_rows(input), weight.t(), bias, 1, activation)
    return out.reshape(*input.shape[:-1], weight.shape[0])


@matmul_op.register_decomposition
def _(a, b, backend):
    _check_matmul(a, b, backend)
    return reference.matmul(a, b)


@linear_op.register_decomposition
def _(input, weight, bias, activation, backend):
    _check_linear(input, weight, bias, activation, backend)
    return reference.linear(input, weight, bias, activation)


@linear_op.register_fake
def _(input, weight, bias, activation, backend):
    _check_linear(input, weight, bias, activation, backend)
    return input.new_empty((*input.shape[:-1], weight.shape[0]))


@linear_op.register_vmap
def _(info, in_dims, input, weight, bias, activation, backend):
    """Under torch.vmap: the examples' inputs are rows of one linear (per-example gradients); an ensemble's
    weights (batched) one batched GEMM, the bias and relu after it; both instead of one call an example."""
    x_dim, w_dim, b_dim = in_dims[:3]
    n = info.batch_size
    x = _registration.examples_first(input, x_dim, n)
    if w_dim is None and b_dim is None:
        return linear_op.default(x, weight, bias, activation, backend), 0
    _check_linear(x, _registration.one_example(weight, w_dim), _registration.one_example(bias, b_dim), activation,
                  backend)
    w = _registration.examples_first(weight, w_dim, n)
    out = matmul_op.default(x.reshape(n, -1, x.shape[-1]), w.mT, backend)
    if bias is not None:
        out = out + (bias.movedim(b_dim, 0)[:, None] if b_dim is not None else bias)
    if activation == "relu":
        out = out.relu()
    return out.reshape(*x.shape[:-1], w.shape[1]), 0


@_registration.custom_op("dlkernels::bias_act_backward", mutates_args=())
def bias_act_backward_op(grad_out: Tensor, out: Tensor, activation: str, bias_dim: int, need_bias: bool,
                         backend: str) -> tuple[Tensor, Tensor]:
    """(grad_pre, grad_bias). Op schemas have no optional returns: grad_pre is an empty tensor when
    there is no activation (it would equal grad_out), grad_bias an empty tensor unless need_bias."""
    grad_out = grad_out.contiguous()
    out = out.contiguous() if activation else grad_out  # read only for the relu mask: no copy otherwise
    g, gb = _kernels(backend, grad_out).bias_act_backward(grad_out, out, activation, bias_dim, need_bias)
    return (g if activation else grad_out.new_empty(0)), (gb if need_bias else grad_out.new_empty(0))


@bias_act_backward_op.register_fake
def _(grad_out, out, activation, bias_dim, need_bias, backend):
    g = torch.empty_like(grad_out, memory_format=torch.contiguous_format) if activation else grad_out.new_empty(0)
    return g, grad_out.new_empty(grad_out.shape[-2 + bias_dim] if need_bias else 0)


@bias_act_backward_op.register_decomposition
def _(grad_out, out, activation, bias_dim, need_bias, backend):
    g, gb = reference.bias_act_backward(grad_out, out, activation, bias_dim, need_bias)
    return (g if activation else grad_out.new_empty(0)), (gb if need_bias else grad_out.new_empty(0))


@bias_act_backward_op.register_vmap
def _(info, in_dims, grad_out, out, activation, bias_dim, need_bias, backend):
    """Under torch.vmap (per-example gradients of a linear layer): relu's mask over all the examples' rows
    in one call, each example's bias gradient summed on its own."""
    n = info.batch_size
    g = _registration.examples_first(grad_out, in_dims[0], n)
    pre = g
    if activation:
        o = _registration.examples_first(out, in_dims[1], n)
        pre = bias_act_backward_op.default(_rows(g), _rows(o), activation,
                                           bias_dim, False, backend)[0].reshape(g.shape)
    # the bias runs along per-example dimension -2 + bias_dim (batched: one further), summed over the others
    keep = g.dim() - 2 + bias_dim
    grad_bias = pre.sum(dim=[k for k in range(1, g.dim()) if k != keep]) if need_bias else grad_out.new_empty(0)
    return (pre if activation else grad_out.new_empty(0), grad_bias), (0 if activation else None,
                                                                       0 if need_bias else None)


def _bias_act_setup(ctx, inputs, output):
    grad_out, out, activation, bias_dim, need_bias, backend = inputs
    ctx.save_for_backward(out if activation else None)
    ctx.shape, ctx.activation, ctx.bias_dim, ctx.need_bias = grad_out.shape, activation, bias_dim, need_bias


def _bias_act_double_backward(ctx, v_pre, v_bias):
    """bias_act_backward is linear in grad_out (relu's mask is constant almost everywhere, so out gets
    no gradient): grad_pre's and grad_bias's cotangents, the latter spread along the summed dimensions,
    masked as grad_out was. Torch ops, differentiable again for any order."""
    (out,) = ctx.saved_tensors
    total = v_pre if (ctx.activation and v_pre is not None) else None
    if ctx.need_bias and v_bias is not None:
        spread = (v_bias if ctx.bias_dim == 1 else v_bias[:, None]).expand(ctx.shape)
        total = spread if total is None else total + spread
    if total is not None and ctx.activation == "relu":
        total = torch.ops.aten.threshold_backward(total, out, 0)  # the first order's mask, NaN passing
    return total, None, None, None, None, None


bias_act_backward_op.register_autograd(_bias_act_double_backward, setup_context=_bias_act_setup)


@bias_act_backward_op.register_jvp
def _(inputs, output, tangents):
    """Linear in grad_out, as for the double backward: the op of grad_out's tangent (the placeholders'
    tangents empty as they are). Forward over reverse (torch.func.hessian) needs it."""
    grad_out, out, activation, bias_dim, need_bias, backend = inputs
    if tangents[0] is None:
        return tuple(torch.zeros_like(o) for o in output)
    return bias_act_backward_op(tangents[0], out, activation, bias_dim, need_bias, backend)


def _linear_setup(ctx, inputs, output):
    input, weight, bias, activation, backend = inputs
    ctx.save_for_backward(input, weight, output if activation else None)
    ctx.activation, ctx.backend, ctx.has_bias = activation, backend, bias is not None


def _linear_backward(ctx, grad):
    input, weight, out = ctx.saved_tensors
    g2 = _rows(grad)
    need_bias = ctx.has_bias and ctx.needs_input_grad[2]
    grad_bias = None
    mm, bias_act = _backward_ops(ctx.backend, grad, input, weight)
    if ctx.activation or need_bias:
        o2 = _rows(out) if out is not None else g2
        g_pre, grad_bias = bias_act(g2, o2, ctx.activation, 1, need_bias, ctx.backend)
        g2 = g_pre if ctx.activation else g2
        grad_bias = grad_bias if need_bias else None
    grad_input = grad_weight = None
    if ctx.needs_input_grad[0]:
        grad_input = mm(g2, weight, ctx.backend).reshape(input.shape)
    if ctx.needs_input_grad[1]:
        grad_weight = mm(g2.t(), _rows(input), ctx.backend)
    return grad_input, grad_weight, grad_bias, None, None


linear_op.register_autograd(_linear_backward, setup_context=_linear_setup)


@linear_op.register_jvp
def _(inputs, output, tangents):
    """Linear in the input and in the weight, then relu's mask as torch's relu carries a tangent (zero where
    the output is <= 0, a NaN output passing it)."""
    input, weight, bias, activation, backend = inputs
    t_in, t_w, t_b = tangents[:3]
    terms = _registration.product_rule(lambda x, w: linear_op(x, w, None, "", backend), input, weight, t_in, t_w)
    if t_b is not None:
        terms.append(t_b)
    tangent = _registration.tangent_sum(terms, output)
    return torch.ops.aten.threshold_backward(tangent, output, 0) if activation == "relu" else tangent
linear_op.register_autocast(_registration.lower_precision)


# ---------------------------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------------------------
def _device_of(t) -> torch.device:
    return t.device if isinstance(t, Tensor) else torch.device("cpu")


def matmul(a: Tensor, b: Tensor, *, backend: str | None = None) -> Tensor:
    """``torch.matmul(a, b)`` on dlkernels' kernels, batch dimensions broadcast as torch does.

    1-D operands are promoted as torch promotes them (a: prepend 1; b: append 1) and the added
    dimension is removed from the result.
    """
    name = _dispatch.resolve(FAMILY, backend, _device_of(a))
    if isinstance(a, Tensor) and isinstance(b, Tensor) and (a.dim() == 0 or b.dim() == 0):
        raise ValueError(f"dlkernels.matmul: both arguments need at least 1 dimension (as torch.matmul's), got "
                         f"{a.dim()}-D and {b.dim()}-D")
    if name == "torch":
        _check_matmul(a if a.dim() != 1 else a[None], b if b.dim() != 1 else b[:, None], name)
        return reference.matmul(a, b)
    a_vec, b_vec = isinstance(a, Tensor) and a.dim() == 1, isinstance(b, Tensor) and b.dim() == 1
    if a_vec or b_vec:
        # both promoted before the call, the added dimensions removed after it, b's (last) first
        out = matmul(a.unsqueeze(0) if a_vec else a, b.unsqueeze(-1) if b_vec else b, backend=name)
        out = out.squeeze(-1) if b_vec else out
        return out.squeeze(-1 if b_vec else -2) if a_vec else out
    return matmul_op(a, b, name)


def linear(input: Tensor, weight: Tensor, bias: Tensor | None = None, *, activation: str | None = None,
           backend: str | None = None) -> Tensor:
    """``F.linear(input, weight, bias)`` (input ``(*, in)``, weight ``(out, in)``), then ``activation``
    (None or "relu") fused into the GEMM's epilogue."""
    name = _dispatch.resolve(FAMILY, backend, _device_of(input))
    act = V.activation("dlkernels.linear", "linear", activation)
    if name == "torch":
        _check_linear(input, weight, bias, act, name)
        return reference.linear(input, weight, bias, activation)
    return linear_op(input, weight, bias, act, name)


def flops_matmul(m: int, n: int, k: int, batch: int = 1) -> int:
    """Floating-point operations of one (batched) GEMM, for benchmarks' FLOP/s."""
    return 2 * m * n * k * batch


__all__ = ["matmul", "linear", "flops_matmul"]
