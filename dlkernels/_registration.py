"""How every dlkernels op is registered with PyTorch: ``custom_op`` below, used as torch's own.

``torch.library.custom_op`` wraps each call in Python layers of its own (a dynamo-disable wrapper, a
per-device kernel table, argument re-binding): ~30 µs a call on the 2-core Zen3 machine, more than a
small layer's kernel. The same op built from the lower-level public pieces -- ``Library.define`` with the
schema ``infer_schema`` derives from the type hints, the Python kernel registered for
CompositeExplicitAutograd (every device; the kernel module is chosen by the ``backend`` argument),
``torch.library.register_fake`` and ``torch.library.register_autograd`` -- is the same dispatcher op to
torch.compile, opcheck and autograd, for about a third of the call cost (dlkernels/bench measures it:
the "overhead" cases).

In eager mode on plain tensors, calling an ``Op`` object skips the dispatcher altogether (see
``Op.__call__``): the Python kernel runs directly, inside an ``autograd.Function`` built from the same
setup_context and backward where autograd has something to record. The dispatcher's Python layers cost
more than a small layer's kernels (a training-mode batch norm of 256x128: 176 us a call through them,
90 us of it in the kernel body). Under a torch.func transform (grad, vjp, jacrev, vmap, functional_call
training, per-example gradients) the op applies a third Function, one the transforms accept
(``transformable_function``), whose forward calls the op through the dispatcher. Everywhere else
(torch.compile, fake tensors and other dispatch or torch-function modes, tensor subclasses, meta tensors,
functorch wrappers, the profiler, autocast) the call goes through the dispatcher as registered.

Under ``torch.autocast`` an op's Autocast kernel (``Op.register_autocast``) casts its inputs first, as
autocast casts torch's own: the convolutions and GEMMs (``lower_precision``) to autocast's dtype where
the backend has kernels for it (Triton), else to float32, what the CPU backends compute in; batch norm
(``promote_activations``) runs in its input's dtype, the residual promoted with it, as torch's
``bn(x) + residual`` does. Without this, a layer fed by a torch op under autocast (a bfloat16 or
float16 activation against float32 weights) raised a dtype mismatch.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from ._validation import BACKEND_DTYPES

NAMESPACE = "dlkernels"
_lib = torch.library.Library(NAMESPACE, "FRAGMENT")


class Op:
    """A registered op: calling it is calling ``torch.ops.dlkernels.<name>.default`` (in plain eager mode
    without the dispatcher's layers, see ``__call__``); ``register_fake`` and ``register_autograd`` take
    the same arguments as CustomOpDef's."""

    def __init__(self, name: str, fn: Callable, mutates_args: Iterable[str]):
        self.name = name
        self.qualname = f"{NAMESPACE}::{name}"
        _lib.define(name + torch.library.infer_schema(fn, mutates_args=tuple(mutates_args)))
        impl = _owning_outputs(fn)
        _lib.impl(name, impl, "CompositeExplicitAutograd")
        self.default = getattr(getattr(torch.ops, NAMESPACE), name).default
        self.impl = impl  # the Python kernel itself (what the dispatcher calls below autograd)
        self.function: type[torch.autograd.Function] | None = None  # its autograd, for eager calls
        self.transformable: type[torch.autograd.Function] | None = None  # the same, for torch.func's transforms
        self.decomposition: Callable | None = None  # the op in torch ops, for nested forward-mode AD
        self.__doc__ = fn.__doc__

    def __call__(self, *args):
        if not plain_eager(args):
            if _tracing_state() is not None:
                args = jit_trace_sizes(args)
            # under a torch.func transform, and in a forward-AD dual level (through the dispatcher the op's
            # Autograd kernel sees no input requiring grad, and a dual input's tangent was dropped unseen)
            if self.transformable is not None and (transforming() or forward_ad_level()):
                if nested_forward_ad():  # every op with autograd has one (tests/test_registration.py)
                    return self.decomposition(*args)
                return self.transformable.apply(*map(_one_leaf, args))
            return call(self.default, *args)
        if records_autograd_eager(*args):
            if self.function is None:  # no autograd formula: the dispatcher raises torch's error
                return self.default(*args)
            return self._apply(*args)
        return self.impl(*args)

    def register_fake(self, fn: Callable) -> Callable:
        torch.library.register_fake(self.qualname, fn, lib=_lib)
        return fn

    def register_vmap(self, fn: Callable) -> Callable:
        """fn(info, in_dims, *args) -> (output, out_dims): the op under torch.vmap (torch.library.register_vmap)."""
        torch.library.register_vmap(self.qualname, fn, lib=_lib)
        return fn

    def register_autograd(self, backward: Callable, *, setup_context: Callable) -> None:
        torch.library.register_autograd(self.qualname, backward, setup_context=setup_context, lib=_lib)
        # What register_autograd builds around the dispatcher, built around the kernel instead. One
        # forward(ctx, ...) calls setup_context itself: with a separate setup_context staticmethod,
        # Function.apply binds the arguments through inspect.signature on every call (~40 us).
        impl = self.impl

        def forward(ctx, *args):
            out = impl(*args)
            setup_context(ctx, args, out)
            return out

        self.function = type(f"{self.name}_autograd", (torch.autograd.Function,), {
            "forward": staticmethod(forward), "backward": staticmethod(backward)})
        self._apply = eager_apply(self.function)
        self._autograd = (backward, setup_context)
        self.transformable = transformable_function(self.default, self.name, backward, setup_context)

    def register_jvp(self, jvp: Callable, *, unread: Callable[[tuple], Iterable[int]] | None = None) -> Callable:
        """``jvp(inputs, output, tangents)`` -> the output's tangent (a tuple for a tuple output; None where
        an output has none): forward-mode AD through the op (torch.func.jvp, jacfwd, a
        torch.autograd.forward_ad dual level), on its transformable Function. inputs and output are the
        primal call's; tangents follow inputs, None where an input has none. After register_autograd.
        ``unread(inputs)``: the positions of tensor inputs that jvp does not read for that call (None in
        its inputs then), which are then not saved: a tensor the caller mutates after the op (a batch
        norm's running statistics) must not be, or the backward's version check fails."""
        self.transformable = transformable_function(self.default, self.name, *self._autograd, jvp, unread)
        return jvp

    def register_decomposition(self, fn: Callable) -> Callable:
        """``fn(*args)``: the op in torch's differentiable ops (the same outputs, placeholders included),
        what it runs under nested forward-mode AD (``nested_forward_ad``)."""
        self.decomposition = fn
        return fn

    def register_autocast(self, cast: Callable[[tuple, str], tuple]) -> None:
        """Under torch.autocast on a device type, the op runs on ``cast(args, device_type)`` with that
        device's autocast excluded (what torch.library.register_autocast builds, with a cast that
        depends on the arguments: the backend, the input's dtype)."""
        for device_type in ("cpu", "cuda"):
            key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
            dispatch_key = getattr(torch._C.DispatchKey, key)
            excluded = torch._C.DispatchKeySet(dispatch_key)

            def run(*args, device_type=device_type, excluded=excluded):
                with torch._C._ExcludeDispatchKeyGuard(excluded):
                    return self.default(*cast(args, device_type))

            self.default.py_impl(dispatch_key)(run)  # the Python dispatcher's (tracing) view of the same
            _lib.impl(self.name, lambda _keyset, *args, run=run: run(*args), key, with_keyset=True)


def transformable_function(op: torch._ops.OpOverload, name: str, backward: Callable, setup_context: Callable,
                           jvp: Callable | None = None, unread: Callable[[tuple], Iterable[int]] | None = None
                           ) -> type[torch.autograd.Function]:
    """The op's autograd as an ``autograd.Function`` that torch.func's transforms take, applied where one
    is active (``Op.__call__``): the Function torch.library.register_autograd generates takes ctx in its
    forward and calls setup_context from there, which ``torch.func.grad``, ``vjp``, ``jacrev`` and
    ``vmap(grad(...))`` reject ("it must override the setup_context staticmethod"; pytorch issues
    168393, 170834, 179652), and a Function applied inside the op's Autograd kernel is already past
    the transforms' dispatch layer. Here the forward takes no ctx and calls the op itself (through the
    dispatcher, below the transform's level: a batched tensor meets the op's vmap rule there),
    setup_context is a staticmethod of its own, and vmap's rule over the Function is generated from
    the forward and the backward (both made of dispatcher ops)."""
    def forward(*args):
        return op(*args)

    attrs = {"forward": staticmethod(forward), "setup_context": staticmethod(setup_context),
             "backward": staticmethod(backward), "generate_vmap_rule": True}
    if jvp is not None:
        # The primals reach jvp through save_for_forward (tensors held on ctx would make a reference cycle
        # through the output's grad_fn), their places in the call as a template of markers. Under the
        # vmap rule functorch generates (its ctx a CtxCustomSave) both directions save one tuple, the
        # backward's tensors first: that rule keeps one record of the saved tensors' batch dimensions, the
        # last save's (torch 2.13), and with two different tuples the other direction read its tensors
        # against it (reverse over forward and torch.func.jacrev(jacrev) raised "flat_bdims must not be
        # None"). Elsewhere the backward saves only its own: an output modified in place after the op
        # (ReLU(inplace=True)) must not be saved for it, or its version check fails under torch.func.grad.
        def setup(ctx, inputs, output):
            recorder = _SaveRecorder(ctx)
            setup_context(recorder, inputs, output)
            outputs = output if isinstance(output, tuple) else (output,)
            skipped = set(unread(inputs)) if unread is not None else set()
            read = [None if i in skipped else t for i, t in enumerate(inputs)]
            primals = tuple(t for t in (*read, *outputs) if isinstance(t, torch.Tensor))
            if isinstance(ctx, _VmapRuleCtx):
                ctx.save_for_backward(*recorder.saved, *primals)
                ctx.save_for_forward(*recorder.saved, *primals)
                ctx.backward_saves = ctx.primals_from = len(recorder.saved)
            else:
                ctx.save_for_backward(*recorder.saved)
                ctx.save_for_forward(*primals)
                ctx.backward_saves, ctx.primals_from = None, 0
            ctx.jvp_call = ([_SAVED if isinstance(t, torch.Tensor) else t for t in read],
                            [_SAVED if isinstance(t, torch.Tensor) else t for t in outputs], isinstance(output, tuple))

        def backward_of_saved(ctx, *grads):
            return backward(_BackwardSaves(ctx), *grads)

        def forward_grad(ctx, *tangents):
            inputs, outputs, is_tuple = _fill(ctx.jvp_call, iter(ctx.saved_tensors[ctx.primals_from:]))
            return jvp(tuple(inputs), tuple(outputs) if is_tuple else outputs[0], tangents)

        attrs.update(setup_context=staticmethod(setup), backward=staticmethod(backward_of_saved),
                     jvp=staticmethod(forward_grad))
    return type(f"{name}_transformable", (torch.autograd.Function,), attrs)


_SAVED = object()  # a tensor's place in a call template (transformable_function's jvp)


class _CtxView:
    """A Function's ctx as an op's setup_context or backward sees it: attributes read and written on the
    ctx itself, the saved tensors the subclass's (transformable_function's one saved tuple)."""

    def __init__(self, ctx):
        object.__setattr__(self, "_ctx", ctx)

    def __getattr__(self, name):
        return getattr(self._ctx, name)

    def __setattr__(self, name, value):
        setattr(self._ctx, name, value)


class _SaveRecorder(_CtxView):
    """setup_context's ctx: what it saves for the backward is kept in ``saved``, not saved yet."""
    saved = ()

    def save_for_backward(self, *tensors):
        object.__setattr__(self, "saved", tensors)


class _BackwardSaves(_CtxView):
    """The backward's ctx: the saved tensors its setup_context saved (under a generated vmap rule, the
    first of the one tuple)."""

    @property
    def saved_tensors(self):
        saved = self._ctx.saved_tensors
        return saved if self._ctx.backward_saves is None else saved[:self._ctx.backward_saves]


_VmapRuleCtx = torch._functorch.autograd_function.CtxCustomSave  # the ctx of functorch's generated vmap rule


class _Leaf(list):
    """A list argument (sizes, an output mask) as one leaf of torch's pytrees, which flatten a list into
    its items. The vmap rule functorch generates for a Function pairs the flattened in_dims of its
    arguments with their tangents, one an argument: under vmap over jvp (torch.func.hessian's jacfwd over
    jacrev's batched vjp) an op with list arguments raised there ("leaves has length 8 but the spec refers
    to a pytree that holds 13 items"). As a list it passes wherever the op's list was taken."""


def _one_leaf(a):
    return _Leaf(a) if type(a) is list else a


def product_rule(f: Callable, x, w, t_x, t_w) -> list:
    """The tangent terms of f(x, w), f linear in each argument: f(t_x, w) and f(x, t_w), where given."""
    return [f(a, b) for a, b in ((t_x, w), (x, t_w)) if a is not None and b is not None]


def tangent_sum(terms: list, like: torch.Tensor) -> torch.Tensor:
    """The sum of a jvp's tangent terms (each of like's shape or broadcasting to it), zeros where none."""
    if not terms:
        return torch.zeros_like(like)
    total = sum(terms[1:], terms[0])
    return total.expand_as(like) if total.shape != like.shape else total


def _fill(call, saved):
    """(inputs, outputs, is_tuple) of a jvp call template, each tensor's place taken from saved in order."""
    inputs, outputs, is_tuple = call
    inputs = [next(saved) if t is _SAVED else t for t in inputs]
    return inputs, [next(saved) if t is _SAVED else t for t in outputs], is_tuple


def one_example(t: torch.Tensor | None, dim: int | None) -> torch.Tensor | None:
    """A vmap rule's argument as one example sees it (for the op's own checks): t itself when unbatched."""
    return t if t is None or dim is None else t.select(dim, 0)


def batched_first(t: torch.Tensor | None, dim: int | None) -> torch.Tensor | None:
    """A vmap rule's argument with its vmapped dimension first, an unbatched one as it is (it broadcasts)."""
    return t if t is None or dim is None else t.movedim(dim, 0)


def examples_as_batch(call: Callable, input: torch.Tensor, dim: int | None, n: int) -> tuple[torch.Tensor, int]:
    """A vmap rule for an op of (N, ...) images whose other arguments are unbatched: the examples folded
    into the batch, one call on (n*N, ...), the output's examples at dimension 0."""
    x = examples_first(input, dim, n)
    return call(x.flatten(0, 1)).unflatten(0, x.shape[:2]), 0


def examples_first(t: torch.Tensor, dim: int | None, n: int) -> torch.Tensor:
    """A vmap rule's argument with its n examples along dimension 0: t's vmapped dimension moved there, or
    (dim None: the same for every example) t expanded along a new one (a view either way)."""
    return t.expand(n, *t.shape) if dim is None else t.movedim(dim, 0)


# Ops whose channels never mix (depthwise conv, batch norm) run a vmapped call as one call over the
# examples' channels: per example they take a batch (N, C, ...) and per-channel weights (C*m, ...); the
# vmapped ones are (N, B*C, ...) and (B*C*m, ...), outputs mapped back alike.
def channels_of_examples(t: torch.Tensor, dim: int | None, n: int) -> torch.Tensor:
    """(N, C, ...) per example, vmapped at dim (None: the same for all n examples) -> (N, n*C, ...)."""
    t = examples_first(t, dim, n).movedim(0, 1)
    return t.reshape(t.shape[0], -1, *t.shape[3:])


def examples_of_channels(t: torch.Tensor, n: int) -> torch.Tensor:
    """channels_of_examples' inverse for an output: (N, n*C, ...) -> (N, n, C, ...), the examples at dim 1."""
    return t.reshape(t.shape[0], n, -1, *t.shape[2:])


def per_channel_of_examples(t: torch.Tensor | None, dim: int | None, n: int) -> torch.Tensor | None:
    """Per-channel weights (C*m, ...) or vectors (C,) per example, vmapped at dim -> (n*C*m, ...)."""
    return None if t is None else examples_first(t, dim, n).flatten(0, 1)


def transforming() -> bool:
    """Whether a torch.func transform (grad, vjp, jacrev, vmap, ...) is active, in eager mode. Under
    torch.compile the ops keep the dispatcher's registrations, so torch.compile of a torch.func transform
    over them raises torch's error, as over any op torch.library registers autograd for (applied while
    Dynamo traced a transform, the Function ran its forward on the transform's wrapped tensors, and one
    gradient came out wrong: batch norm's evaluation, torch 2.13)."""
    return not _is_compiling() and _functorch_level() is not None


def nested_forward_ad() -> bool:
    """Whether two or more forward-mode AD levels are open (torch.func.jvp or jacfwd levels: a
    torch.autograd.forward_ad dual level is the one level they all run on, and cannot nest), as in
    jacfwd(jacfwd(f)). There an autograd.Function's jvp formula is not itself differentiated by the
    outer levels: torch.func answers the higher derivatives through it as zero or partial (pytorch
    issue 197867, open; torch 2.13: the second derivative of a linear with relu, of batch norm, of
    every op here, silently wrong), so the ops run as torch ops."""
    return sum(1 for i in (_interpreter_stack() or ()) if i.key() == _JVP) >= 2


_interpreter_stack = torch._C._functorch.get_interpreter_stack
_JVP = torch._C._functorch.TransformType.Jvp


def forward_ad_level() -> bool:
    """Whether a forward-mode AD dual level (torch.autograd.forward_ad.dual_level) is open, in eager mode."""
    return not _is_compiling() and _forward_ad._current_level >= 0


def kernel_readable(t: torch.Tensor) -> bool:
    """Whether a kernel can read t's memory: t has storage of its own, unlike a functorch wrapper (a
    transform's tensor, or one kept from a finished transform) or a batched tensor of torch's older vmap
    (the gradients of ``autograd.grad(is_grads_batched=True)``, of ``jacobian(vectorize=True)``, of
    ``gradcheck(check_batched_grad=True)``), which the dispatcher unwraps or runs example by example."""
    return _has_storage(t)


def needs_torch_ops(t: torch.Tensor) -> bool:
    """Whether eager helpers with a kernel or an autograd.Function of their own (not a registered op) must
    run in torch ops for t: a torch.func transform is active (transforming), a forward-AD dual level is
    open, torch.jit.trace is recording, or the kernels cannot read t (kernel_readable; Dynamo cannot ask,
    and traces no such tensor). Torch's ops are what the transforms differentiate, batch and unwrap, and
    carry a dual's tangent; the tracer records torch's ops and registered ops, but never a kernel called
    from Python: its output would enter the trace as a constant, the same tensor for every later input."""
    return (transforming() or forward_ad_level() or _tracing_state() is not None
            or (not _is_compiling() and not kernel_readable(t)))


def jit_trace_sizes(args: tuple) -> tuple:
    """args with the sizes inside list arguments as ints. Under torch.jit.trace a tensor's sizes are 0-dim
    tensors (so that the trace can follow them), and a SymInt[] argument holding one failed an internal
    assert of the tracer (TraceTypeManual.cpp: iter->isIntList()). The trace then records the sizes, the
    output size of a convolution say, as constants, as it does every size Python computes with."""
    return tuple([int(v) if isinstance(v, torch.Tensor) else v for v in a] if isinstance(a, (list, tuple)) else a
                 for a in args)


def _owning_outputs(fn: Callable) -> Callable:
    """fn with every output that is a view (a kernel's (N, C, S) result viewed as the input's shape, a
    GEMM's rows viewed as an image) returned as a tensor of its own over the same memory (``detach``:
    no copy). Autograd forbids modifying in place a view made inside a custom Function, so without this
    ``nn.ReLU(inplace=True)`` or ``out += identity`` after a batch norm, a 1x1 conv or a batched GEMM
    raised (torchvision's blocks do both)."""
    def owning(*args):
        out = fn(*args)
        return tuple(map(owned, out)) if isinstance(out, tuple) else owned(out)  # map: no generator frame

    owning.__name__, owning.__doc__, owning.__wrapped__ = fn.__name__, fn.__doc__, fn
    return owning


def owned(t):
    """t (an output), as a tensor of its own over the same memory where it is a view (see _owning_outputs)."""
    return t.detach() if isinstance(t, torch.Tensor) and t._is_view() else t


def plain_eager(args: tuple) -> bool:
    """Whether nothing but autograd would see this call in the dispatcher: eager mode (not traced by
    torch.compile or torch.jit.trace, no dispatch or torch-function mode, no functorch transform, no
    profiler, no autocast, no forward-AD dual level: the kernel body alone dropped a dual input's
    tangent) and every tensor argument a plain, non-meta Tensor or Parameter with memory of its own
    (kernel_readable). Then ``Op.__call__`` may skip it."""
    if _is_compiling():  # first: Dynamo folds it to True and traces none of the rest
        return False
    if (_dispatch_modes() or _function_modes() or _tracing_state() is not None or _functorch_level() is not None
            or _profiler._is_profiler_enabled or _autocast() or _forward_ad._current_level >= 0):
        return False
    for a in args:
        if isinstance(a, _Tensor) and ((type(a) is not _Tensor and type(a) is not _Parameter) or a.is_meta
                                       or not _has_storage(a)):
            return False
    return True


# plain_eager's checks bound once: each torch.X.Y lookup is a chain of module-dict reads, and an op runs
# right after a layer-sized pass has flushed them from the caches. After a 64 MiB copy plain_eager took
# 29.6 us, bound 21.8 (hot ~2 either way); a whole tiny op, so timed, 3-14 us less (depthwise forward
# 1x8x6x6 165 -> 158 us, batch norm forward + backward 2x8x4x4 540 -> 526: near the noise, always that
# way). The profiler's flag is read from its module on every call (starting the profiler rebinds it).
_is_compiling = torch.compiler.is_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack
_function_modes = torch._C._is_torch_function_mode_enabled
_tracing_state = torch._C._get_tracing_state
_functorch_level = torch._C._functorch.peek_interpreter_stack
_has_storage = torch._C._has_storage
_autocast = torch._C._is_any_autocast_enabled
_profiler = torch.autograd.profiler
_forward_ad = torch.autograd.forward_ad  # its level is read on every call (a dual level rebinds it)
_Tensor = torch.Tensor
_Parameter = torch.nn.Parameter
_grad_enabled = torch.is_grad_enabled  # records_autograd's, bound alike: it runs beside plain_eager
_any_requires_grad = torch._C._any_requires_grad


_c_apply = torch._C._FunctionBase.__dict__["apply"]  # the C++ classmethod autograd.Function.apply ends in


def eager_apply(function: type[torch.autograd.Function]) -> Callable:
    """``function.apply`` for the calls plain_eager lets through: the C++ apply that
    autograd.Function.apply ends in, without its Python layer, whose one task there (no functorch
    transform active, every tensor with storage of its own: plain_eager) would be to unwrap the
    tensors a finished transform left behind. That layer (a setup_context lookup, a generator over the
    arguments) cost 20-30 us a call after a 64 MiB pass: a bare Function's forward 70-93 -> 49-64 us
    (Zen4). ``function`` must not define setup_context (apply would first bind the forward's default
    arguments)."""
    if torch.autograd.function._is_setup_context_defined(function.setup_context):
        raise TypeError(f"eager_apply: {function.__name__} defines setup_context; call its apply")
    return _c_apply.__get__(None, function)


def records_autograd(*args) -> bool:
    """Whether autograd records a call on ``args``: grad mode on and a tensor among them requiring grad.
    Where it does not, an ``autograd.Function`` is pure cost (``apply`` ~25 us a call even then)."""
    if _is_compiling():  # Dynamo cannot trace _any_requires_grad; it folds these to constants
        return torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
    return records_autograd_eager(*args)


def records_autograd_eager(*args) -> bool:
    """records_autograd where plain_eager has just held (not compiling): without asking again."""
    return _grad_enabled() and _any_requires_grad(*args)


def call(op: torch._ops.OpOverload, *args):
    """``op(*args)``, below the autograd layer when autograd has nothing to record (grad mode off, or
    no argument requires grad) and torch.compile is not tracing: that layer would only redispatch below
    itself (torch's ``forward_no_grad``), through ~17 us of Python a call on the 2-core Zen3 machine
    (a tiny depthwise conv: 72 -> 56 us). Every other dispatch key (fake tensors, functionalization,
    profiler, modes) still sees the op."""
    if torch.compiler.is_compiling() or records_autograd(*args):
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def autocast_dtype(backend: str, dtype: torch.dtype) -> torch.dtype:
    """What an op on ``backend`` computes in under autocast where torch would compute in ``dtype``:
    ``dtype`` where the backend has kernels for it, else float32 (the CPU backends' half-precision
    answer: float32 kernels, a float32 result)."""
    return dtype if dtype in BACKEND_DTYPES[backend] else torch.float32


def _cast(t, device_type: str, dtype: torch.dtype):
    """t as autocast casts an argument: floating-point tensors of that device but float64 to dtype."""
    if (isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type == device_type
            and t.dtype != torch.float64 and t.dtype != dtype):
        return t.to(dtype)
    return t


def lower_precision(args: tuple, device_type: str) -> tuple:
    """The cast of autocast's lower-precision ops (conv2d, linear, matmul) for an op whose last
    argument is its backend: every floating-point tensor to autocast's dtype (float32 on the CPU
    backends, see autocast_dtype)."""
    dtype = autocast_dtype(args[-1], torch.get_autocast_dtype(device_type))
    return tuple(_cast(a, device_type, dtype) for a in args)


def promote_activations(args: tuple, device_type: str) -> tuple:
    """Batch norm's cast (input, residual first, backend last): torch runs batch norm in its input's
    dtype and ``bn(x) + residual`` in the two dtypes' promotion, so both go to that dtype (float32 on
    the CPU backends for half precision); the per-channel tensors stay as they are."""
    x, residual = args[0], args[1]
    dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    dtype = autocast_dtype(args[-1], dtype)
    return (_cast(x, device_type, dtype), _cast(residual, device_type, dtype)) + tuple(args[2:])


def autocast_input(t: torch.Tensor, backend: str) -> torch.Tensor:
    """t cast as lower_precision casts an op's tensors, where autocast is on for t's device: for a
    module that computes on its input before its op does (Conv2d's im2col rows)."""
    device_type = t.device.type
    return lower_precision((t, backend), device_type)[0] if torch.is_autocast_enabled(device_type) else t


def _op_name(qualname: str) -> str:
    """"dlkernels::name" -> "name"; another namespace is an error."""
    namespace, name = qualname.split("::")
    if namespace != NAMESPACE:
        raise ValueError(f"dlkernels ops live in the {NAMESPACE!r} namespace, got {qualname!r}")
    return name


class CompositeOp:
    """An op defined by its schema string whose CompositeImplicitAutograd body calls Op objects, so its
    autograd is theirs (register_autograd cannot give a mutating op a formula). Calling it runs its eager
    body (``register_eager``; by default the body itself) where ``Op.__call__`` would skip the dispatcher
    (``plain_eager``), else ``torch.ops.dlkernels.<name>.default``."""

    def __init__(self, name: str, schema: str, body: Callable):
        _lib.define(name + schema)
        torch.library.impl(_lib, name, "CompositeImplicitAutograd")(body)
        self.default = getattr(getattr(torch.ops, NAMESPACE), name).default
        self.impl = self.eager = body
        self.__doc__ = body.__doc__

    def register_eager(self, fn: Callable) -> Callable:
        """fn runs the op in plain eager mode instead of the body: the same computation with fewer
        layers (one autograd.Function around what the body's ops do one by one, say), the check of
        plain_eager made once for the whole op."""
        self.eager = fn
        return fn

    def __call__(self, *args):
        if plain_eager(args):
            return self.eager(*args)
        if _tracing_state() is not None:
            args = jit_trace_sizes(args)
        # under a torch.func transform the body itself, whose Op calls apply their transformable Functions
        # (the body run by the dispatcher would call them past the transform's layer)
        return self.impl(*args) if transforming() else self.default(*args)


def composite_op(qualname: str, schema: str) -> Callable[[Callable], CompositeOp]:
    """Decorator: ``@composite_op("dlkernels::name", "(Tensor x, ...) -> Tensor")`` over the op's body."""
    name = _op_name(qualname)
    return lambda body: CompositeOp(name, schema, body)


def custom_op(qualname: str, *, mutates_args: Iterable[str]) -> Callable[[Callable], Op]:
    """Decorator: ``@custom_op("dlkernels::name", mutates_args=())`` over a type-annotated kernel."""
    name = _op_name(qualname)
    return lambda fn: Op(name, fn, mutates_args)
