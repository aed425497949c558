"""The mini Xception-like model of "Deep Learning with Python" (2nd ed., ch. 9), on dlkernels."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._layers import Layers

WIDTHS = (32, 64, 128, 256, 512)


def max_pool_same(x: Tensor, kernel_size: int = 3, stride: int = 2) -> Tensor:
    """Keras' ``MaxPooling2D(kernel_size, stride, padding="same")``: output ceil(H / stride), the
    padding (never part of a max) split with the larger half after the input, which
    ``F.max_pool2d``'s symmetric padding cannot express."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):
        total = max((-(-size // stride) - 1) * stride + kernel_size - size, 0)
        pads += [total // 2, total - total // 2]
    if any(pads):
        x = F.pad(x, pads, value=float("-inf"))
    return F.max_pool2d(x, kernel_size, stride)


class XceptionBlock(nn.Module):
    """BN-ReLU-SeparableConv3x3-BN-ReLU-SeparableConv3x3-MaxPool(3, 2, same) + 1x1 stride-2 conv of the input."""

    def __init__(self, cin: int, cout: int, layers: Layers) -> None:
        super().__init__()
        self.bn1 = layers.bn2d(cin, "relu")
        self.sep1 = layers.separable(cin, cout, 3, padding=1)
        self.bn2 = layers.bn2d(cout, "relu")
        self.sep2 = layers.separable(cout, cout, 3, padding=1)
        self.residual = layers.pointwise(cin, cout, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        y = self.sep2(self.bn2(self.sep1(self.bn1(x))))
        return max_pool_same(y) + self.residual(x)


class MiniXception(nn.Module):
    """A 5x5 conv stem with 32 filters (no padding, no bias), five ``XceptionBlock``s of widths
    32..512 (each halves the resolution), global average pooling, dropout 0.5 and a dense layer.

    Input (N, in_channels, H, W), H and W at least 5 (32x32 keeps 1x1 after the last block)."""

    def __init__(self, num_classes: int, in_channels: int = 3, *, widths=WIDTHS, dropout: float = 0.5,
                 backend: str | None = None, reference: bool = False) -> None:
        super().__init__()
        layers = Layers(reference, backend)
        self.stem = layers.conv(in_channels, widths[0], 5)
        cins = (widths[0],) + tuple(widths[:-1])
        self.blocks = nn.Sequential(*[XceptionBlock(ci, co, layers) for ci, co in zip(cins, widths)])
        self.dropout = nn.Dropout(dropout)
        self.fc = layers.linear(widths[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(self.dropout(torch.mean(x, dim=(-2, -1))))


def mini_xception(num_classes: int, in_channels: int = 3, *, widths=WIDTHS, dropout: float = 0.5,
                  backend: str | None = None, reference: bool = False) -> MiniXception:
    """The mini Xception of DLwP ch. 9. ``widths`` (keyword) shrinks it for tests; ``backend`` fixes
    the backend of every layer; ``reference=True`` builds its pure-PyTorch twin (same state_dict keys)."""
    return MiniXception(num_classes, in_channels, widths=widths, dropout=dropout, backend=backend,
                        reference=reference)
