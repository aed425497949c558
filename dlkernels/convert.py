"""dlkernels.convert: swap an existing PyTorch model's layers for dlkernels' drop-in modules.

Module swaps (weights kept, shared with the original when ``inplace``):
  nn.Conv2d with groups == in_channels          -> dlkernels.nn.DepthwiseConv2d
  nn.Conv2d 1x1 (groups 1, no padding, any stride) -> dlkernels.nn.PointwiseConv2d
  nn.Linear                                    -> dlkernels.nn.Linear
  nn.BatchNorm2d / nn.BatchNorm1d (not fused)  -> dlkernels.nn.BatchNormResidual2d / 1d
Other convolutions stay PyTorch's (cuDNN/oneDNN convs are faster than an im2col GEMM).

Fusions, through torch.fx: a BatchNorm2d/1d whose output (and nothing else) is added to another
tensor, and/or then passed through ReLU or SiLU, becomes one BatchNormResidual module call
``act(bn(x) + other)``. The added tensor may be anything ``+`` takes there: the module fuses it when
it has the BN output's shape and dtype and otherwise adds it after the batch norm (an SE or FiLM term
that broadcasts), so no shape need be known here. An add of a parameter or constant is not fused. A
model fx cannot trace keeps its forward: it still gets the module swaps, with a warning naming the
fusions skipped.
"""
from __future__ import annotations

import copy
import operator
import warnings
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from . import nn as dnn
from .nn.modules import _DLKERNELS_MODULES

_BATCHNORMS = {nn.BatchNorm2d: dnn.BatchNormResidual2d, nn.BatchNorm1d: dnn.BatchNormResidual1d}

_ADD_FUNCTIONS = {operator.add, torch.add}
_ADD_INPLACE = {operator.iadd}  # ``a += b``: only fusable when a is the BN output (b keeps its value)
_ACT_FUNCTIONS = {torch.relu: "relu", F.relu: "relu", torch.relu_: "relu", F.relu_: "relu", F.silu: "silu"}
_ACT_METHODS = {"relu": "relu", "relu_": "relu"}
_ACT_MODULES = {nn.ReLU: "relu", nn.SiLU: "silu"}


@dataclass
class ConversionReport:
    """What ``convert`` did: ``replaced`` maps a module's qualified name to "Old -> New";
    ``fused`` lists the fusions ("name: BatchNorm2d + add + relu -> BatchNormResidual2d");
    ``skipped`` says which fusions could not be made and why; ``traced`` whether torch.fx traced it."""

    replaced: dict[str, str] = field(default_factory=dict)
    fused: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    traced: bool = False

    def __str__(self) -> str:
        lines = [f"dlkernels.convert: {len(self.replaced)} modules replaced, {len(self.fused)} fusions"
                 f"{'' if self.traced else ' (torch.fx could not trace the model: no fusions)'}"]
        lines += [f"  {name}: {what}" for name, what in self.replaced.items()]
        lines += [f"  fused {f}" for f in self.fused]
        lines += [f"  skipped {s}" for s in self.skipped]
        return "\n".join(lines)


class _Tracer(fx.Tracer):
    """torch.nn's modules and dlkernels' are leaves (their forward is not traced into)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _DLKERNELS_MODULES) or super().is_leaf_module(m, qualname)


def _share_state(new: nn.Module, old: nn.Module) -> nn.Module:
    """``new`` (built on the meta device) takes ``old``'s parameters and buffers themselves, and its mode."""
    for name, p in old._parameters.items():
        setattr(new, name, p)
    for name, b in old._buffers.items():
        setattr(new, name, b)
    new.train(old.training)
    return new


def _batchnorm(old: nn.Module, activation: str | None, backend: str | None) -> nn.Module:
    new = _BATCHNORMS[type(old)](old.num_features, old.eps, old.momentum, old.affine, old.track_running_stats,
                                 activation, backend=backend, device="meta")
    return _share_state(new, old)


def _swap(m: nn.Module, backend: str | None) -> nn.Module | None:
    """The dlkernels module replacing ``m`` (sharing its tensors), or None to keep it."""
    t = type(m)
    if t is nn.Linear:
        new = dnn.Linear(m.in_features, m.out_features, m.bias is not None, backend=backend, device="meta")
        return _share_state(new, m)
    if t is nn.Conv2d:
        if m.groups == m.in_channels:
            new = dnn.DepthwiseConv2d(m.in_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                                      m.bias is not None, m.out_channels // m.in_channels,
                                      padding_mode=m.padding_mode, backend=backend, device="meta")
            return _share_state(new, m)
        no_padding = m.padding in ((0, 0), "valid") or (m.padding == "same" and m.stride == (1, 1))
        if m.kernel_size == (1, 1) and m.groups == 1 and no_padding:
            new = dnn.PointwiseConv2d(m.in_channels, m.out_channels, m.bias is not None, stride=m.stride,
                                      backend=backend, device="meta")
            return _share_state(new, m)
    if t in _BATCHNORMS:
        return _batchnorm(m, None, backend)
    return None


def _swap_modules(root: nn.Module, backend: str | None, report: ConversionReport) -> nn.Module:
    done: dict[int, nn.Module | None] = {}  # a module shared by several parents is swapped once

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in parent.named_children():
            qual = f"{prefix}{name}"
            if id(child) not in done:
                done[id(child)] = _swap(child, backend)
                if done[id(child)] is None:
                    visit(child, qual + ".")
            new = done[id(child)]
            if new is not None:
                setattr(parent, name, new)
                report.replaced[qual] = f"{type(child).__name__} -> {type(new).__name__}"

    new_root = _swap(root, backend)
    if new_root is not None:
        report.replaced["(root)"] = f"{type(root).__name__} -> {type(new_root).__name__}"
        return new_root
    visit(root, "")
    return root


def _is_add_of(node: fx.Node, bn: fx.Node) -> fx.Node | None:
    """The other operand when ``node`` is ``bn + other`` (either order) or ``bn += other``."""
    if len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS or \
            node.op == "call_method" and node.target == "add":
        other = b if a is bn else a if b is bn else None
    elif node.op == "call_function" and node.target in _ADD_INPLACE or \
            node.op == "call_method" and node.target == "add_":
        other = b if a is bn else None
    else:
        return None
    if not isinstance(other, fx.Node) or other is bn or other.op == "get_attr":
        return None
    return other


def _activation_of(node: fx.Node, x: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """"relu"/"silu" when ``node`` applies that activation to ``x`` (and nothing else), else None."""
    if node.op == "call_module":
        act = _ACT_MODULES.get(type(modules[node.target]))
        return act if node.args == (x,) else None
    extra_ok = set(node.kwargs) <= {"inplace"} and node.args[:1] == (x,)
    if node.op == "call_function" and node.target in _ACT_FUNCTIONS and extra_ok and len(node.args) <= 2:
        return _ACT_FUNCTIONS[node.target]
    if node.op == "call_method" and node.target in _ACT_METHODS and extra_ok and len(node.args) == 1:
        return _ACT_METHODS[node.target]
    return None


def _fuse(gm: fx.GraphModule, backend: str | None, report: ConversionReport) -> None:
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for bn in list(gm.graph.nodes):
        if bn.op != "call_module" or type(modules.get(bn.target)) not in _BATCHNORMS:
            continue
        if calls[bn.target] != 1:
            report.skipped.append(f"{bn.target}: the module is called {calls[bn.target]} times")
            continue
        if len(bn.args) != 1 or bn.kwargs:
            continue
        last, other, activation, steps = bn, None, None, [type(modules[bn.target]).__name__]
        users = list(last.users)
        if len(users) == 1 and (other := _is_add_of(users[0], last)) is not None:
            last = users[0]
            steps.append("add")
        users = list(last.users)
        if len(users) == 1 and (activation := _activation_of(users[0], last, modules)) is not None:
            last = users[0]
            steps.append(activation)
        if last is bn:
            continue
        fused = _batchnorm(modules[bn.target], activation, backend)
        gm.delete_submodule(bn.target)
        gm.add_submodule(bn.target, fused)
        # the new call goes where the last fused op was: the residual may be computed after the BN
        with gm.graph.inserting_before(last):
            args = (bn.args[0],) if other is None else (bn.args[0], other)
            new = gm.graph.call_module(bn.target, args)
        last.replace_all_uses_with(new)
        node = last
        while node is not bn:  # erase the chain backwards: each op's only user is gone by then
            prev = node.args[0] if node.args[0] is not other else node.args[1]
            gm.graph.erase_node(node)
            node = prev
        gm.graph.erase_node(bn)
        report.fused.append(f"{bn.target}: {' + '.join(steps)} -> {type(fused).__name__}"
                            f"{f'(activation={activation!r})' if activation else ''}")
        report.replaced[bn.target] = f"{steps[0]} -> {type(fused).__name__}"
    gm.graph.lint()
    gm.recompile()


def convert(model: nn.Module, *, backend: str | None = None, inplace: bool = False
            ) -> tuple[nn.Module, ConversionReport]:
    """Swap ``model``'s layers for dlkernels modules; returns ``(converted, report)``.

    ``backend`` is fixed on every new module (None: the scoped/automatic choice). Without
    ``inplace`` the model is deep-copied first; with it, nothing is copied: the converted model
    shares ``model``'s parameters and buffers (when fx cannot trace it, it is ``model`` itself, its
    children swapped).
    When torch.fx traces the model, ``converted`` is a ``torch.fx.GraphModule`` (the BatchNorm + add
    (+ ReLU/SiLU) fusions rewrite its forward) whose submodules are the converted ones; otherwise it
    is the model itself, with a warning naming the BatchNorm layers whose fusion was skipped.
    """
    target = model if inplace else copy.deepcopy(model)
    report = ConversionReport()
    if _swap(target, backend) is not None:  # the model is one layer (fx would trace into its forward)
        return _swap_modules(target, backend, report), report
    try:
        graph = _Tracer().trace(target)
    except Exception as err:  # noqa: BLE001 - any tracing failure means: no fusions, swaps only
        bns = [n for n, m in target.named_modules() if type(m) in _BATCHNORMS]
        report.skipped += [f"{n}: torch.fx cannot trace the model" for n in bns]
        warnings.warn(f"dlkernels.convert: torch.fx cannot trace {type(model).__name__} "
                      f"({type(err).__name__}: {err}); modules were swapped, but the BatchNorm + add "
                      f"(+ activation) fusions were skipped for: {', '.join(bns) or 'no BatchNorm layers'}",
                      stacklevel=2)
        return _swap_modules(target, backend, report), report
    report.traced = True
    gm = fx.GraphModule(target, graph, class_name=type(target).__name__)
    _fuse(gm, backend, report)
    _swap_modules(gm, backend, report)
    return gm, report


__all__ = ["convert", "ConversionReport"]
