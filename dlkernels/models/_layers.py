"""One place that builds the layers of the reference models, on dlkernels or on torch.nn only.

``Layers(reference=True)`` builds the pure-PyTorch twin of a model: the same architecture and
state_dict keys from ``nn.Conv2d``/``nn.BatchNorm2d``/``nn.Linear`` (plus a small torch module for
``act(bn(x) + residual)``), so one model's weights load into the other and tests compare them.
"""
from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from .. import nn as dnn
from ..batchnorm.reference import activate as _act  # the one definition of the activations


class _TorchBatchNormResidual:
    """``act(bn(x) + residual)`` from PyTorch's own ops: the twin of dlkernels.nn.BatchNormResidual*d."""

    def __init__(self, num_features: int, activation: str | None = None, **kw) -> None:
        super().__init__(num_features, **kw)
        self.activation = activation

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        y = super().forward(input)
        return _act(y if residual is None else y + residual, self.activation)


class TorchBatchNormResidual2d(_TorchBatchNormResidual, nn.BatchNorm2d):
    pass


class TorchBatchNormResidual1d(_TorchBatchNormResidual, nn.BatchNorm1d):
    pass


class TorchLinear(nn.Linear):
    """``act(nn.Linear(x))``: the twin of dlkernels.nn.Linear."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str | None = None) -> None:
        super().__init__(in_features, out_features, bias)
        self.activation = activation

    def forward(self, input: Tensor) -> Tensor:
        return _act(super().forward(input), self.activation)


class Layers:
    """Layer constructors of one model: dlkernels modules (fixed to ``backend``), or, with
    ``reference=True``, their torch.nn twins."""

    def __init__(self, reference: bool = False, backend: str | None = None) -> None:
        self.reference = reference
        self.backend = backend

    def conv(self, cin: int, cout: int, kernel_size: int, stride: int = 1, padding: int = 0,
             bias: bool = False) -> nn.Module:
        if self.reference:
            return nn.Conv2d(cin, cout, kernel_size, stride, padding, bias=bias)
        if kernel_size == 1 and padding == 0:
            return self.pointwise(cin, cout, stride, bias)
        return dnn.Conv2d(cin, cout, kernel_size, stride, padding, bias=bias, backend=self.backend)

    def pointwise(self, cin: int, cout: int, stride: int = 1, bias: bool = False) -> nn.Module:
        if self.reference:
            return nn.Conv2d(cin, cout, 1, stride, bias=bias)
        return dnn.PointwiseConv2d(cin, cout, bias, stride=stride, backend=self.backend)

    def separable(self, cin: int, cout: int, kernel_size: int, padding: int = 0, bias: bool = False) -> nn.Module:
        if self.reference:
            return nn.Sequential(OrderedDict(
                depthwise=nn.Conv2d(cin, cin, kernel_size, padding=padding, groups=cin, bias=False),
                pointwise=nn.Conv2d(cin, cout, 1, bias=bias)))
        return dnn.SeparableConv2d(cin, cout, kernel_size, padding=padding, bias=bias, backend=self.backend)

    def bn2d(self, num_features: int, activation: str | None = None) -> nn.Module:
        if self.reference:
            return TorchBatchNormResidual2d(num_features, activation)
        return dnn.BatchNormResidual2d(num_features, activation=activation, backend=self.backend)

    def bn1d(self, num_features: int, activation: str | None = None) -> nn.Module:
        if self.reference:
            return TorchBatchNormResidual1d(num_features, activation)
        return dnn.BatchNormResidual1d(num_features, activation=activation, backend=self.backend)

    def linear(self, cin: int, cout: int, bias: bool = True, activation: str | None = None) -> nn.Module:
        if self.reference:
            return TorchLinear(cin, cout, bias, activation)
        return dnn.Linear(cin, cout, bias, activation, backend=self.backend)
