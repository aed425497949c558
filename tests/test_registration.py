"""The ways an op call runs (dlkernels/_registration.py): in plain eager mode the kernel body
directly, under its own autograd.Function; under a torch.func transform through an autograd.Function
the transforms accept; anywhere else (a dispatch mode, the profiler) through the dispatcher with the
autograd torch.library registered. All must give the same answer, and everything that watches the
dispatcher must still see the ops."""
import functools
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dlkernels
from dlkernels import _registration
from dlkernels.batchnorm.op import _TrainingEager
from helpers import DEVICE, KERNEL_BACKENDS, LARGE_BACKENDS, leaf

_F = torch.func


class Recorder(TorchDispatchMode):
    """A dispatch mode that passes every op through and notes its name."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _r(*shape, cl=False, dtype=torch.float32):
    t = torch.randn(*shape, device=DEVICE, dtype=dtype)
    return t.contiguous(memory_format=torch.channels_last) if cl else t


def _cases(backend, dtype=torch.float32):
    """(name, fn, tensor inputs, stateful tensors): each fn one op's public call, on odd sizes."""
    rm, rv = torch.randn(5, device=DEVICE, dtype=dtype), torch.rand(5, device=DEVICE, dtype=dtype) + 0.5
    draw = functools.partial(_r, dtype=dtype)
    return [
        ("linear", lambda x, w, b: dlkernels.linear(x, w, b, activation="relu", backend=backend),
         [leaf(draw(7, 3)), leaf(draw(5, 3)), leaf(draw(5))], []),
        ("matmul", lambda a, b: dlkernels.matmul(a, b, backend=backend),
         [leaf(draw(2, 3, 4)), leaf(draw(4, 5))], []),
        ("batch_norm_residual", lambda x, r, w, b: dlkernels.batch_norm_residual(
            x, r, rm, rv, w, b, True, 0.1, 1e-5, activation="silu", backend=backend),
         [leaf(draw(3, 5, 4, 3, cl=True)), leaf(draw(3, 5, 4, 3, cl=True)), leaf(draw(5)), leaf(draw(5))], [rm, rv]),
        ("depthwise_conv2d", lambda x, w, b: dlkernels.depthwise_conv2d(x, w, b, 2, 1, backend=backend),
         [leaf(draw(2, 3, 7, 5)), leaf(draw(6, 1, 3, 3)), leaf(draw(6))], []),
        ("separable_conv2d", lambda x, dw, pw, b: dlkernels.separable_conv2d(x, dw, pw, b, 1, "same", backend=backend),
         [leaf(draw(2, 3, 5, 7, cl=True)), leaf(draw(3, 1, 3, 3)), leaf(draw(4, 3, 1, 1)), leaf(draw(4))], []),
        ("pointwise_conv2d", lambda x, w, b: dlkernels.pointwise_conv2d(x, w, b, backend=backend),
         [leaf(draw(2, 3, 5, 4, cl=True)), leaf(draw(4, 3, 1, 1)), leaf(draw(4))], []),
    ]


OP_CASES = range(6)  # _cases' length


def _run(fn, inputs, state):
    """Forward, the gradients of every input for a fixed output gradient, and the state after."""
    out = fn(*inputs)
    grads = torch.autograd.grad(out, inputs, torch.ones_like(out).mul_(0.5).add_(out.detach().sin()))
    return [out.detach(), *grads, *(s.clone() for s in state)]


def _eager_functions() -> set:
    """The autograd.Functions of the eager path (not those torch.library registers for the dispatcher):
    each Op's own, and batch norm's training one."""
    ops = [o for name, m in list(sys.modules.items()) if name.startswith("dlkernels.") and name.endswith(".op")
           for o in vars(m).values() if isinstance(o, _registration.Op)]
    return {o.function for o in ops if o.function is not None} | {_TrainingEager}


@pytest.mark.parametrize("case", OP_CASES)
def test_eager_path_equals_dispatcher_path(backend, case):
    name, fn, inputs, state = _cases(backend)[case]
    saved = [s.clone() for s in state]
    eager = _run(fn, inputs, state)
    node = type(fn(*inputs).grad_fn)
    assert getattr(node, "_forward_cls", None) in _eager_functions(), \
        f"{name}: plain eager calls should skip the dispatcher, got a {node.__name__} node"
    for s, v in zip(state, saved):
        s.copy_(v)
    with Recorder() as mode:
        dispatched = _run(fn, inputs, state)
    assert f"dlkernels.{name}" in mode.seen or f"dlkernels.{name}_functional" in mode.seen, mode.seen
    assert len(eager) == len(dispatched)
    for i, (a, b) in enumerate(zip(eager, dispatched)):
        assert torch.equal(a, b), f"{name}: result {i} differs between the two paths"


@pytest.mark.parametrize("case", OP_CASES)
def test_tensor_left_by_a_finished_transform(backend, case):
    """A tensor kept from inside a finished torch.func transform (a dead functorch wrapper) goes through
    the dispatcher, whose functorch layer unwraps it (plain_eager): the output and the other inputs'
    gradients are the plain tensor's (as for torch's own ops, the wrapper itself is not in the graph),
    also where autograd records nothing (the cpp backend then raised "Cannot access data pointer")."""
    name, fn, inputs, state = _cases(backend)[case]
    kept = []

    def keep(x):
        kept.append(x)
        return (x * 2).sum()

    torch.func.grad(keep)(inputs[0].detach())
    dead = kept[0]
    assert torch._C._functorch.is_functorch_wrapped_tensor(dead)
    saved = [s.clone() for s in state]
    results = []
    for first in (inputs[0], dead):
        for s, v in zip(state, saved):
            s.copy_(v)
        out = fn(first, *inputs[1:])
        assert out.grad_fn is not None
        grads = torch.autograd.grad(out, inputs[1:], torch.ones_like(out).mul_(0.5).add_(out.detach().sin()))
        results.append([out.detach(), *grads, *(s.clone() for s in state)])
    for i, (a, b) in enumerate(zip(*results)):
        assert torch.equal(a, b), f"{name}: result {i} differs for the transform's leftover tensor"
    with torch.no_grad():  # where nothing is recorded: the kernels cannot read the wrapper itself
        assert torch.equal(fn(dead, *inputs[1:]), fn(inputs[0], *inputs[1:])), name


def _cotangent(out):
    return torch.ones_like(out).mul_(0.5).add_(out.detach().sin())


@pytest.mark.parametrize("case", OP_CASES)
def test_torch_func_vjp_and_grad_equal_eager(backend, case):
    """torch.func.vjp and torch.func.grad over each op give eager autograd's output, gradients and running
    statistics (torch.library's own autograd registration is rejected there: "must override the
    setup_context staticmethod")."""
    name, fn, inputs, state = _cases(backend)[case]
    saved = [s.clone() for s in state]
    eager = _run(fn, inputs, state)
    plain = [t.detach() for t in inputs]
    for s, v in zip(state, saved):
        s.copy_(v)
    out, vjp_fn = torch.func.vjp(fn, *plain)
    got = [out, *vjp_fn(_cotangent(eager[0])), *(s.clone() for s in state)]
    for i, (a, b) in enumerate(zip(got, eager)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=f"{name}: vjp result {i}")
    for s, v in zip(state, saved):
        s.copy_(v)
    cot = _cotangent(eager[0])
    grads = torch.func.grad(lambda *a: (fn(*a) * cot).sum(), argnums=tuple(range(len(plain))))(*plain)
    for i, (a, b) in enumerate(zip(grads, eager[1:])):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=f"{name}: grad {i}")


@pytest.mark.parametrize("case", OP_CASES)
def test_torch_func_grad_through_an_in_place_op_after(backend, case):
    """torch.func.grad where the op's output is modified in place after it (``out += identity``) equals
    the out-of-place gradient, or raises autograd's version-check error where torch's ops do (linear with
    relu saves its output, as torch's relu does): the transforms' Function saves for the backward only
    what the backward reads (saving the output as the jvp's primal too made every op raise)."""
    results = []
    for b in (backend, "torch"):
        name, fn, inputs, state = _cases(b)[case]
        plain = [t.detach() for t in inputs]
        saved = [s.clone() for s in state]
        grads = []
        for in_place in (True, False):
            for s, v in zip(state, saved):
                s.copy_(v)
            scaled = (lambda y: y.mul_(2)) if in_place else (lambda y: y * 2)
            try:
                grads.append(_F.grad(lambda *a: scaled(fn(*a)).sin().sum(), argnums=tuple(range(len(plain))))(*plain))
            except RuntimeError as e:
                assert in_place and "modified by an inplace operation" in str(e), e
                grads.append(None)
        results.append(grads)
    (in_place, out_of_place), (torch_in_place, _) = results
    assert (in_place is None) == (torch_in_place is None), f"{name}: raised {in_place is None}, torch's did not"
    for i, (a, b) in enumerate(zip(in_place or out_of_place, out_of_place)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=f"{name}: grad {i}")


@pytest.mark.parametrize("case", OP_CASES)
def test_torch_func_vmap_equals_a_loop(backend, case):
    """torch.vmap over the first input of each op, and per-example gradients (vmap of grad), equal a loop
    over the examples. A training batch norm whose running statistics are not batched raises torch's
    error: one running estimate cannot take a step per example."""
    name, fn, inputs, state = _cases(backend)[case]
    rest = [t.detach() for t in inputs[1:]]
    xs = torch.stack([inputs[0].detach(), torch.randn_like(inputs[0])])
    if state:
        with pytest.raises(RuntimeError, match="running_mean or running_var"):
            torch.func.vmap(lambda x: fn(x, *rest))(xs)
        return
    torch.testing.assert_close(torch.func.vmap(lambda x: fn(x, *rest))(xs), torch.stack([fn(x, *rest) for x in xs]),
                               rtol=1e-6, atol=1e-6)
    per_example = torch.func.vmap(torch.func.grad(lambda x: fn(x, *rest).sin().sum()))(xs)
    loop = [torch.autograd.grad(fn(x, *rest).sin().sum(), x)[0] for x in (leaf(x) for x in xs)]
    torch.testing.assert_close(per_example, torch.stack(loop), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", range(len(OP_CASES) + 2))
def test_batched_gradients_equal_a_loop(backend, case):
    """autograd.grad(is_grads_batched=True) (what jacobian(vectorize=True) and gradcheck's batched check
    run) hands the backward torch's older vmap's batched tensors, which the kernels cannot read: the ops
    take them through the dispatcher (the cpp backend raised "Cannot access data pointer"). Cases 6 and
    7: nn.Conv2d's im2col stem and the strided 1x1 shortcut's subsample, Functions of their own."""
    if case == 6:
        conv = dlkernels.nn.Conv2d(3, 4, 3, 2, 1, backend=backend).to(DEVICE)
        name, fn, inputs, state = "Conv2d", conv, [leaf(_r(2, 3, 7, 6, cl=True))], []
    elif case == 7:
        conv = dlkernels.nn.PointwiseConv2d(3, 4, stride=2, backend=backend).to(DEVICE)
        name, fn, inputs, state = "PointwiseConv2d", conv, [leaf(_r(2, 3, 7, 6, cl=True))], []
    else:
        name, fn, inputs, state = _cases(backend)[case]
    saved = [s.clone() for s in state]
    out = fn(*inputs)
    cots = torch.stack([_cotangent(out), torch.randn_like(out)])
    batched = torch.autograd.grad(out, inputs, cots, is_grads_batched=True)
    for i, cot in enumerate(cots):
        for s, v in zip(state, saved):
            s.copy_(v)
        one = torch.autograd.grad(fn(*inputs), inputs, cot)
        for j, (a, b) in enumerate(zip(batched, one)):
            torch.testing.assert_close(a[i], b, rtol=1e-5, atol=1e-5, msg=f"{name}: cotangent {i}, input {j}")


@pytest.mark.parametrize("case", range(len(OP_CASES) + 2))
def test_forward_ad_tangents(backend, case):
    """Forward-mode AD through every op (and nn.Conv2d's im2col stem and the strided 1x1 shortcut, which
    run torch ops there): a forward_ad dual level and torch.func.jvp give the same tangent, and it is the
    Jacobian's product, checked against the (separately tested) backward: <v, J t> = <J^T v, t> for random
    v and t, every input dual. (The kernels alone, and torch.library's Autograd kernel, which sees no input
    requiring grad, returned the output without its tangent.)"""
    if case == 6:
        fn, inputs = dlkernels.nn.Conv2d(3, 4, 3, 2, 1, backend=backend).to(DEVICE), [_r(2, 3, 7, 6, cl=True)]
    elif case == 7:
        fn, inputs = dlkernels.nn.PointwiseConv2d(3, 4, stride=2, backend=backend).to(DEVICE), [_r(2, 3, 7, 6, cl=True)]
    else:
        _, fn, inputs, _ = _cases(backend)[case]
    plain = [t.detach() for t in inputs]
    tangents = [torch.randn_like(t) for t in plain]
    fw = torch.autograd.forward_ad
    with fw.dual_level():
        out = fn(*(fw.make_dual(p, t) for p, t in zip(plain, tangents)))
        t_out = fw.unpack_dual(out).tangent
    assert t_out is not None and t_out.shape == out.shape
    _, t_func = torch.func.jvp(fn, tuple(plain), tuple(tangents))
    torch.testing.assert_close(t_func, t_out, rtol=1e-5, atol=1e-5)
    v = torch.randn_like(out)
    leaves = [leaf(p) for p in plain]
    grads = torch.autograd.grad(fn(*leaves), leaves, v)
    lhs = (v.double() * t_out.double()).sum()
    rhs = sum((g.double() * t.double()).sum() for g, t in zip(grads, tangents))
    # float32 terms: rounding of the order of 1e-6 of the sum of the products' magnitudes
    torch.testing.assert_close(lhs, rhs, rtol=1e-5, atol=1e-5 * float((v * t_out).abs().sum()))
    # the first input alone dual (the others' tangents None)
    _, t_first = torch.func.jvp(lambda a: fn(a, *plain[1:]), (plain[0],), (tangents[0],))
    lhs, rhs = (v.double() * t_first.double()).sum(), (grads[0].double() * tangents[0].double()).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-5, atol=1e-5 * float((v * t_first).abs().sum()))


# A second derivative of a scalar in every input at once, outer transform over inner: the whole Hessian
# (torch.func.hessian is forward over reverse) ...
_SECOND_ORDER = {
    "fwd-rev": lambda f, n: _F.hessian(f, argnums=n),
    "rev-fwd": lambda f, n: _F.jacrev(_F.jacfwd(f, argnums=n), argnums=n),
    "fwd-fwd": lambda f, n: _F.jacfwd(_F.jacfwd(f, argnums=n), argnums=n),
    "rev-rev": lambda f, n: _F.jacrev(_F.jacrev(f, argnums=n), argnums=n),
    # torch.autograd.functional's forward mode: a forward_ad dual level over batched backward gradients
    "autograd-fwd-rev": lambda f, n: lambda *p: torch.autograd.functional.hessian(
        f, p, vectorize=True, outer_jacobian_strategy="forward-mode"),
}
# ... and, on the interpreted Triton kernels, its products with directions d (vmapped over them), by the
# same modes: a whole Hessian's inner jacfwd or outer jacrev runs a conv of a channel set per input
# element there (minutes). Forward over forward runs torch ops (nested_forward_ad), whole.
_SECOND_ORDER_PRODUCT = {
    "fwd-rev": lambda f, n, p, d: _F.jvp(_F.jacrev(f, argnums=n), p, d)[1],
    "rev-fwd": lambda f, n, p, d: _F.grad(lambda *q: _F.jvp(f, q, d)[1], argnums=n)(*p),
    "rev-rev": lambda f, n, p, d: _F.vjp(_F.jacrev(f, argnums=n), *p)[1](d),
}


@pytest.mark.parametrize("order", [o for o in _SECOND_ORDER if o != "autograd-fwd-rev"])
@pytest.mark.parametrize("case", OP_CASES)
def test_second_derivatives_equal_torchs(backend, case, order):
    """Second derivatives through each op by torch.func, in every order of forward and reverse mode, of a
    scalar of the op's output in every input, float64: the Hessian and running statistics of the function
    on torch's ops (backend "torch", the same draws), there taken by reverse over reverse
    (torch.autograd.functional.hessian: torch.func.hessian of F.batch_norm in training gets the block
    d(grad weight)/d(input) wrong, torch 2.13). Before: hessian raised over depthwise, separable and
    linear with relu (functorch's generated vmap rule paired the flattened sizes lists with the tangents;
    two backward ops had no jvp), reverse over forward and reverse over reverse raised over most ops (that
    rule read the forward's saved tensors with the backward's batch dimensions), and forward over forward
    answered wrong over every op (pytorch issue 197867)."""
    _assert_second_derivatives(backend, case, order)


@pytest.mark.parametrize("backend", LARGE_BACKENDS)
@pytest.mark.parametrize("case", OP_CASES)
def test_autograd_functional_forward_mode_hessian_equals_torchs(backend, case):
    """torch.autograd.functional.hessian with its forward-mode outer Jacobian (a forward_ad dual level over
    batched backward gradients) through each op, as above. A training batch norm raised there once its
    running statistics, updated in place after the op, were saved for the backward (Op.register_jvp's
    unread). Not on the interpreted Triton kernels: the batched gradients run there one element at a
    time, minutes a case."""
    _assert_second_derivatives(backend, case, "autograd-fwd-rev")


def _assert_second_derivatives(backend, case, order):
    products = DEVICE.type == "cpu" and backend == "triton" and order in _SECOND_ORDER_PRODUCT
    results = []
    for b in (backend, "torch"):
        torch.manual_seed(case)
        name, fn, inputs, state = _cases(b, torch.float64)[case]
        plain = tuple(t.detach() for t in inputs)
        argnums = tuple(range(len(plain)))
        scalar = lambda *a: fn(*a).sin().sum()  # noqa: E731
        if b == "torch":
            h = torch.autograd.functional.hessian(scalar, plain)
        elif products:
            directions = [torch.randn(2, *p.shape, dtype=p.dtype, device=DEVICE) for p in plain]
            h = _F.vmap(lambda *d: _SECOND_ORDER_PRODUCT[order](scalar, argnums, plain, d))(*directions)
        else:
            h = _SECOND_ORDER[order](scalar, argnums)(*plain)
        results.append((h, [s.clone() for s in state]))
    (h, state), (want, want_state) = results
    if products:
        want = [sum(torch.einsum("ab,kb->ka", block.reshape(p.numel(), q.numel()), d.reshape(2, -1))
                    for block, q, d in zip(row, plain, directions)).reshape(2, *p.shape)
                for row, p in zip(want, plain)]
    torch.testing.assert_close(h, want, rtol=1e-9, atol=1e-9, msg=lambda m: f"{name}, {order}: {m}")
    torch.testing.assert_close(state, want_state, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", OP_CASES)
def test_third_derivative_by_nested_forward_equals_torchs(backend, case):
    """jvp of jvp of grad (the third derivative along two directions u, v) through each op, float64: the
    central difference along v of the Hessian's product with u, by reverse over reverse on torch's ops
    (backend "torch", the same draws). Torch's own third derivatives of F.batch_norm in training are
    wrong (by nested forward mode and by reverse three times, torch 2.13), so not those."""
    results = []
    for b in (backend, "torch"):
        torch.manual_seed(case)
        name, fn, inputs, _ = _cases(b, torch.float64)[case]
        plain = tuple(t.detach() for t in inputs)
        u, v = [tuple(torch.randn_like(p) for p in plain) for _ in range(2)]
        scalar = lambda *a: fn(*a).sin().sum()  # noqa: E731
        if b == backend:
            gradient = _F.grad(scalar, argnums=tuple(range(len(plain))))
            results.append(_F.jvp(lambda *p: _F.jvp(gradient, p, u)[1], plain, v)[1])
            continue

        def hessian_u(step):
            xs = [leaf(p + step * d) for p, d in zip(plain, v)]
            g = torch.autograd.grad(scalar(*xs), xs, create_graph=True)
            return torch.autograd.grad(sum((a * d).sum() for a, d in zip(g, u)), xs)

        step = 1e-5
        results.append([(a - c) / (2 * step) for a, c in zip(hessian_u(step), hessian_u(-step))])
    # the difference's truncation and rounding: ~1e-10 of the third derivative's scale, 1e-7 allowed
    torch.testing.assert_close(results[0], results[1], rtol=1e-7, atol=1e-7, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("case", OP_CASES)
def test_torch_op_forms_equal_the_kernels(backend, case, monkeypatch):
    """What each op runs under nested forward-mode AD (Op.register_decomposition: torch ops) gives what its
    kernels give, on the arguments of every op call that a forward and backward makes (forward and backward
    ops; recorded under a dispatch mode, where the backward calls its ops rather than their kernels). Every
    op with autograd has one, so nested forward mode never meets one without."""
    name, fn, inputs, state = _cases(backend)[case]
    calls = []
    original = _registration.Op.__call__

    def recording(op, *args):
        calls.append((op, args))
        return original(op, *args)

    with monkeypatch.context() as m, Recorder():
        m.setattr(_registration.Op, "__call__", recording)
        _run(fn, inputs, state)
    checked = set()
    for op, args in calls:
        if op.transformable is None:
            continue
        assert op.decomposition is not None, f"{op.qualname} has autograd but no torch-op form"
        args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        got, want = op.decomposition(*args), op.impl(*args)
        for i, (a, b) in enumerate(zip(*((x,) if isinstance(x, torch.Tensor) else x for x in (got, want)))):
            assert a.shape == b.shape and a.dtype == b.dtype, f"{op.qualname} output {i}"
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{op.qualname} output {i}: {m}")
        checked.add(op.name)
    assert name in checked or f"{name}_functional" in checked, checked


def test_vmap_batch_norm_with_batched_running_stats(backend):
    """An ensemble's batch norms vmapped over (running statistics stacked, one row per model): each model
    normalizes its own batch and updates its own running statistics, as torch's batch norm does, also
    where every model sees the same batch."""
    x = torch.randn(3, 4, 5, 6, device=DEVICE, dtype=torch.float64)

    def bn(a, m, v):
        return dlkernels.batch_norm_residual(a, None, m, v, None, None, True, 0.3, activation="relu", backend=backend)

    for shared in (False, True):
        rm = torch.randn(3, 5, device=DEVICE, dtype=torch.float64)
        rv = torch.rand(3, 5, device=DEVICE, dtype=torch.float64) + 0.5
        rm2, rv2 = rm.clone(), rv.clone()
        out = torch.func.vmap(lambda m, v: bn(x[0], m, v))(rm, rv) if shared else torch.func.vmap(bn)(x, rm, rv)
        ref = torch.stack([torch.relu(torch.nn.functional.batch_norm(x[0] if shared else x[i], rm2[i], rv2[i], None,
                                                                     None, True, 0.3)) for i in range(3)])
        torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(rm, rm2, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rv, rv2, rtol=1e-12, atol=1e-12)


def test_profiler_sees_the_ops(backend):
    x, w = leaf(_r(4, 3)), leaf(_r(2, 3))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        dlkernels.linear(x, w, backend=backend).sum().backward()
    names = {e.name for e in prof.events()}
    assert "dlkernels::linear" in names and "dlkernels::matmul" in names, sorted(n for n in names if "dlk" in n)


def test_no_grad_and_inference_mode_take_the_kernel_directly(backend):
    x, w = leaf(_r(4, 3)), leaf(_r(2, 3))
    ref = dlkernels.linear(x, w, backend=backend).detach()
    with torch.no_grad():
        out = dlkernels.linear(x, w, backend=backend)
    assert out.grad_fn is None and not out.requires_grad and torch.equal(out, ref)
    with torch.inference_mode():
        out = dlkernels.linear(x, w, backend=backend)
    assert out.is_inference() and torch.equal(out, ref)


@pytest.mark.parametrize("case", OP_CASES)
def test_jit_trace_records_the_op(backend, case):
    """torch.jit.trace (TorchScript, torch.onnx's older exporter) records each op as a dlkernels:: node, so
    the trace runs other inputs through the kernels: forward, gradients and running statistics equal the
    op called eagerly. The convolutions' sizes reach them as 0-dim tensors under the tracer, which its
    SymInt[] handling asserted on."""
    name, fn, inputs, state = _cases(backend)[case]
    others = [leaf(t.detach() + torch.randn_like(t)) for t in inputs]
    start = [s.clone() for s in state]
    traced = torch.jit.trace(fn, tuple(inputs), check_trace=False)  # the check would run it twice more
    assert f"dlkernels::{name}" in str(traced.graph)
    for s, s0 in zip(state, start):
        s.copy_(s0)
    got = _run(traced, others, state)
    for s, s0 in zip(state, start):
        s.copy_(s0)
    for a, b in zip(got, _run(fn, others, state)):
        assert torch.equal(a, b), name


def _view_output_cases(backend):
    """Ops whose kernels' results are reshaped views (a batch norm's (N, C, S) result, a batched or
    3-D GEMM's rows, a 1x1 conv's pixels): (name, fn, inputs), odd sizes, both layouts."""
    rm, rv = torch.randn(3, device=DEVICE), torch.rand(3, device=DEVICE) + 0.5
    return [
        ("linear 3-D", lambda x, w, b: dlkernels.linear(x, w, b, backend=backend),
         [leaf(_r(2, 5, 3)), leaf(_r(4, 3)), leaf(_r(4))]),
        ("matmul batched", lambda a, b: dlkernels.matmul(a, b, backend=backend), [leaf(_r(2, 3, 4)), leaf(_r(4, 5))]),
        ("pointwise nchw", lambda x, w, b: dlkernels.pointwise_conv2d(x, w, b, backend=backend),
         [leaf(_r(2, 3, 5, 4)), leaf(_r(6, 3, 1, 1)), leaf(_r(6))]),
        ("pointwise cl", lambda x, w, b: dlkernels.pointwise_conv2d(x, w, b, backend=backend),
         [leaf(_r(2, 3, 5, 4, cl=True)), leaf(_r(6, 3, 1, 1)), leaf(_r(6))]),
        ("batch norm train cl", lambda x, r, w, b: dlkernels.batch_norm_residual(
            x, r, rm, rv, w, b, True, 0.1, 1e-5, activation="silu", backend=backend),
         [leaf(_r(3, 3, 4, 5, cl=True)), leaf(_r(3, 3, 4, 5, cl=True)), leaf(_r(3)), leaf(_r(3))]),
        ("batch norm eval 3-D", lambda x, w, b: dlkernels.batch_norm_residual(
            x, None, rm, rv, w, b, False, 0.1, 1e-5, backend=backend), [leaf(_r(4, 3, 7)), leaf(_r(3)), leaf(_r(3))]),
        ("batch norm train 2-D", lambda x, w, b: dlkernels.batch_norm_residual(
            x, None, rm, rv, w, b, True, 0.1, 1e-5, backend=backend), [leaf(_r(6, 3)), leaf(_r(3)), leaf(_r(3))]),
    ]


@pytest.mark.parametrize("case", range(7))
def test_outputs_can_be_modified_in_place(backend, case):
    """``nn.ReLU(inplace=True)`` or ``out += identity`` after an op (torchvision's blocks): autograd forbids
    modifying in place a view made inside a custom Function, and these ops' results were such views
    (RuntimeError in the forward). The gradients through the in-place op are the out-of-place ones."""
    name, fn, inputs = _view_output_cases(backend)[case]
    out = fn(*inputs)
    assert not out._is_view(), name
    got = torch.autograd.grad(out.mul_(2).sum(), inputs)
    want = torch.autograd.grad((fn(*inputs) * 2).sum(), inputs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)



@pytest.mark.parametrize("backend", [b for b in KERNEL_BACKENDS if b in ("cpp", "numba")])
def test_compiled_torch_func_transform_raises_rather_than_answers(backend):
    """torch.compile of a torch.func transform over the ops is not supported (as for any op whose autograd
    torch.library registers): it must raise, never return a gradient (a Function applied while Dynamo
    traced the transform gave batch norm's evaluation gradient wrong)."""
    torch._dynamo.reset()
    x, rm, rv = torch.randn(2, 3, 4, 5), torch.randn(3), torch.rand(3) + 0.5

    def loss(a):
        return dlkernels.batch_norm_residual(a, a.cos(), rm, rv, None, None, False, activation="silu",
                                             backend=backend).sin().sum()

    with pytest.raises(Exception, match="setup_context"):
        torch.compile(lambda a: torch.func.grad(loss)(a), fullgraph=True)(x)
    torch._dynamo.reset()
