"""A multilayer perceptron on dlkernels.nn.Linear and the fused 1-D batch norm."""
from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ._layers import Layers


class MLP(nn.Module):
    """Flatten, then per hidden width: Linear (no bias: the batch norm's shift replaces it) and
    ``relu(bn(.) + x)``, the residual x added when the layer keeps the width; then a Linear
    classifier."""

    def __init__(self, in_features: int, hidden: int | Sequence[int], num_classes: int, *,
                 backend: str | None = None, reference: bool = False) -> None:
        super().__init__()
        layers = Layers(reference, backend)
        widths = [hidden] if isinstance(hidden, int) else list(hidden)
        self.fcs = nn.ModuleList()
        self.bns = nn.ModuleList()
        prev = in_features
        for w in widths:
            self.fcs.append(layers.linear(prev, w, bias=False))
            self.bns.append(layers.bn1d(w, "relu"))
            prev = w
        self.head = layers.linear(prev, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        for fc, bn in zip(self.fcs, self.bns):
            y = fc(x)
            x = bn(y, x if x.shape == y.shape else None)
        return self.head(x)


def mlp(in_features: int, hidden: int | Sequence[int], num_classes: int, *, backend: str | None = None,
        reference: bool = False) -> MLP:
    """An MLP classifier; ``hidden`` is one width or a list of widths. ``reference=True`` builds its
    pure-PyTorch twin (same state_dict keys)."""
    return MLP(in_features, hidden, num_classes, backend=backend, reference=reference)
