"""ResNet-18/34/50 on dlkernels, module and state_dict names identical to torchvision's.

Each block ends in one fused ``relu(bn(conv(x)) + identity)`` (dlkernels.nn.BatchNormResidual2d);
the 3x3/7x7 convs run as im2col + dlkernels GEMM (dlkernels.nn.Conv2d), the 1x1 convs (Bottleneck,
downsampling shortcut) on the pointwise op.
"""
from __future__ import annotations

from torch import Tensor, nn

from ._layers import Layers


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None, layers: Layers) -> None:
        super().__init__()
        self.conv1 = layers.conv(inplanes, planes, 3, stride, 1)
        self.bn1 = layers.bn2d(planes, "relu")
        self.conv2 = layers.conv(planes, planes, 3, 1, 1)
        self.bn2 = layers.bn2d(planes, "relu")
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return self.bn2(self.conv2(self.bn1(self.conv1(x))), identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None, layers: Layers) -> None:
        super().__init__()
        self.conv1 = layers.conv(inplanes, planes, 1)
        self.bn1 = layers.bn2d(planes, "relu")
        self.conv2 = layers.conv(planes, planes, 3, stride, 1)  # stride on the 3x3, as torchvision (v1.5)
        self.bn2 = layers.bn2d(planes, "relu")
        self.conv3 = layers.conv(planes, planes * self.expansion, 1)
        self.bn3 = layers.bn2d(planes * self.expansion, "relu")
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        return self.bn3(self.conv3(out), identity)


class ResNet(nn.Module):
    """torchvision's ResNet (stem 7x7/2 conv, BN-ReLU, 3x3/2 max pool; four stages; average pool; fc).

    ``width`` (an extension; 64 is torchvision's) scales every stage's channels, for small tests."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], stages: list[int], num_classes: int = 1000, *,
                 in_channels: int = 3, width: int = 64, zero_init_residual: bool = False,
                 backend: str | None = None, reference: bool = False) -> None:
        super().__init__()
        layers = Layers(reference, backend)
        self.inplanes = width
        self.conv1 = layers.conv(in_channels, width, 7, 2, 3)
        self.bn1 = layers.bn2d(width, "relu")
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, stages[0], 1, layers)
        self.layer2 = self._make_layer(block, width * 2, stages[1], 2, layers)
        self.layer3 = self._make_layer(block, width * 4, stages[2], 2, layers)
        self.layer4 = self._make_layer(block, width * 8, stages[3], 2, layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = layers.linear(width * 8 * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, block, planes: int, blocks: int, stride: int, layers: Layers) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(layers.pointwise(self.inplanes, planes * block.expansion, stride),
                                       layers.bn2d(planes * block.expansion))
        mods = [block(self.inplanes, planes, stride, downsample, layers)]
        self.inplanes = planes * block.expansion
        mods += [block(self.inplanes, planes, 1, None, layers) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def resnet18(num_classes: int = 1000, **kwargs) -> ResNet:
    """ResNet-18; keywords: in_channels, width, zero_init_residual, backend, reference (pure-PyTorch twin)."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, **kwargs)


def resnet34(num_classes: int = 1000, **kwargs) -> ResNet:
    """ResNet-34; keywords as resnet18."""
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes, **kwargs)


def resnet50(num_classes: int = 1000, **kwargs) -> ResNet:
    """ResNet-50 (Bottleneck, stride on the 3x3 conv); keywords as resnet18."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, **kwargs)
