"""How every dlkernels op is registered with PyTorch: ``custom_op`` below, used as torch's own.

``torch.library.custom_op`` wraps each call in Python layers of its own (a dynamo-disable wrapper, a
per-device kernel table, argument re-binding): ~30 µs a call on the 2-core Zen3 machine, more than a
small layer's kernel. The same op built from the lower-level public pieces -- ``Library.define`` with the
schema ``infer_schema`` derives from the type hints, the Python kernel registered for
CompositeExplicitAutograd (every device; the kernel module is chosen by the ``backend`` argument),
``torch.library.register_fake`` and ``torch.library.register_autograd`` -- is the same dispatcher op to
torch.compile, opcheck and autograd, for about a third of the call cost (dlkernels/bench measures it:
the "overhead" cases).
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

NAMESPACE = "dlkernels"
_lib = torch.library.Library(NAMESPACE, "FRAGMENT")


class Op:
    """A registered op: calling it calls ``torch.ops.dlkernels.<name>.default``; ``register_fake`` and
    ``register_autograd`` take the same arguments as CustomOpDef's."""

    def __init__(self, name: str, fn: Callable, mutates_args: Iterable[str]):
        self.name = name
        self.qualname = f"{NAMESPACE}::{name}"
        _lib.define(name + torch.library.infer_schema(fn, mutates_args=tuple(mutates_args)))
        _lib.impl(name, fn, "CompositeExplicitAutograd")
        self.default = getattr(getattr(torch.ops, NAMESPACE), name).default
        self.impl = fn  # the Python kernel itself (what the dispatcher calls below autograd)
        self.__doc__ = fn.__doc__

    def __call__(self, *args):
        return call(self.default, *args)

    def register_fake(self, fn: Callable) -> Callable:
        torch.library.register_fake(self.qualname, fn, lib=_lib)
        return fn

    def register_autograd(self, backward: Callable, *, setup_context: Callable) -> None:
        torch.library.register_autograd(self.qualname, backward, setup_context=setup_context, lib=_lib)


def call(op: torch._ops.OpOverload, *args):
    """``op(*args)``, below the autograd layer when autograd has nothing to record (grad mode off, or
    no argument requires grad) and torch.compile is not tracing: that layer would only redispatch below
    itself (torch's ``forward_no_grad``), through ~17 us of Python a call on the 2-core Zen3 machine
    (a tiny depthwise conv: 72 -> 56 us). Every other dispatch key (fake tensors, functionalization,
    profiler, modes) still sees the op."""
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and torch._C._any_requires_grad(*args)):
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def custom_op(qualname: str, *, mutates_args: Iterable[str]) -> Callable[[Callable], Op]:
    """Decorator: ``@custom_op("dlkernels::name", mutates_args=())`` over a type-annotated kernel."""
    namespace, name = qualname.split("::")
    if namespace != NAMESPACE:
        raise ValueError(f"dlkernels ops live in the {NAMESPACE!r} namespace, got {qualname!r}")
    return lambda fn: Op(name, fn, mutates_args)


def library() -> torch.library.Library:
    """The one Library fragment every dlkernels op is defined in (for ops defined by schema string)."""
    return _lib
