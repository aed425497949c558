"""dlkernels.convert: module swaps, fx fusions, same outputs and gradients, untraceable models."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dlkernels import nn as dnn
from dlkernels.convert import convert
from helpers import KERNEL_BACKENDS

pytestmark = pytest.mark.usefixtures("on_test_device")


class TVBasicBlock(nn.Module):
    """torchvision's BasicBlock forward: in-place ``out += identity`` and a shared in-place ReLU module."""

    def __init__(self, c, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, groups=cout, bias=False)  # depthwise
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = nn.Sequential(nn.Conv2d(c, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = self.downsample(x)  # computed after bn2: the fused call must move after it
        out += identity
        return self.relu(out)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = TVBasicBlock(3, 4, 2)
        self.fc = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 3)
        self.scale = nn.Parameter(torch.ones(6))

    def forward(self, x):
        y = self.block(x).mean((2, 3))
        z = self.fc(y)
        h = F.silu(self.bn(z) + z)
        return self.head(h * self.scale)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            return torch.relu(self.bn(self.fc(x)) + x)
        return x


@pytest.fixture(params=["torch", *KERNEL_BACKENDS])
def any_backend(request):
    return request.param


def _compare(model, converted, x, modes=(True, False)):
    for mode in modes:
        model.train(mode)
        converted.train(mode)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = model(xa), converted(xb)
        torch.testing.assert_close(yb, ya, rtol=1e-9, atol=1e-10)
        ya.square().sum().backward()
        yb.square().sum().backward()
        torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-8, atol=1e-10)
        grads = {n: p.grad for n, p in converted.named_parameters()}
        for n, p in model.named_parameters():
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-8, atol=1e-10, msg=n)
        model.zero_grad()
        converted.zero_grad()
    state = converted.state_dict()
    assert sorted(state) == sorted(model.state_dict())
    for n, a in model.state_dict().items():
        torch.testing.assert_close(state[n], a, rtol=1e-10, atol=1e-12, msg=n)


def test_convert_swaps_fuses_and_matches(any_backend):
    torch.manual_seed(0)
    model = Net().double()
    converted, report = convert(model, backend=any_backend)
    assert report.traced and isinstance(converted, torch.fx.GraphModule)
    mods = dict(converted.named_modules())
    assert type(mods["block.conv2"]) is dnn.DepthwiseConv2d
    assert type(mods["block.downsample.0"]) is dnn.PointwiseConv2d and mods["block.downsample.0"].stride == (2, 2)
    assert type(mods["block.conv1"]) is nn.Conv2d  # dense 3x3: left to PyTorch
    assert type(mods["fc"]) is dnn.Linear and type(mods["head"]) is dnn.Linear
    assert mods["block.bn1"].activation == "relu" and mods["block.bn2"].activation == "relu"
    assert type(mods["block.downsample.1"]) is dnn.BatchNormResidual2d and mods["block.downsample.1"].activation is None
    assert type(mods["bn"]) is dnn.BatchNormResidual1d and mods["bn"].activation == "silu"
    assert all(getattr(m, "backend", any_backend) == any_backend for m in mods.values())
    assert sorted(f.split(":")[0] for f in report.fused) == ["block.bn1", "block.bn2", "bn"]
    assert "BatchNorm2d + add + relu" in str(report)
    # the fused graph has no add/relu left for bn2 or bn: one call each
    code = converted.code
    assert code.count("relu") == 0 and "silu" not in code and "iadd" not in code
    _compare(model, converted, torch.randn(3, 3, 7, 6, dtype=torch.float64))


def test_convert_copies_unless_inplace():
    model = Net().double()
    converted, _ = convert(model, backend="torch")
    assert converted.fc.weight is not model.fc.weight
    converted.fc.weight.data.zero_()
    assert model.fc.weight.abs().sum() > 0
    shared, _ = convert(model, backend="torch", inplace=True)
    assert shared.fc.weight is model.fc.weight and shared.block.bn2.running_mean is model.block.bn2.running_mean


def test_untraceable_model_gets_swaps_and_warning(any_backend):
    torch.manual_seed(0)
    model = Untraceable().double()
    with pytest.warns(UserWarning, match=r"fusions were skipped for: bn"):
        converted, report = convert(model, backend=any_backend)
    assert not report.traced and report.fused == [] and "bn" in report.replaced
    assert type(converted.fc) is dnn.Linear and type(converted.bn) is dnn.BatchNormResidual1d
    _compare(model, converted, torch.randn(5, 4, dtype=torch.float64).abs())


def test_shared_and_non_residual_patterns_are_not_fused():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)
            self.bias = nn.Parameter(torch.randn(3, 1, 1))

        def forward(self, x):
            a = self.bn(x) + self.bias  # a broadcasting add of a parameter: not a residual
            return self.bn(a).relu()  # the module is called twice

    model = M().double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converted, report = convert(model, backend="torch")
    assert report.fused == [] and any("called 2 times" in s for s in report.skipped)
    _compare(model, converted, torch.randn(2, 3, 4, 4, dtype=torch.float64))


class Broadcasts(nn.Module):
    """Adds to batch norms that convert fuses without seeing shapes: an SE/FiLM term (N, C, 1, 1), a
    batch norm's (N, C, 1, 1) output added to a whole map, a residual of another dtype."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 4)
        self.bn_se, self.bn_up, self.bn_dtype = nn.BatchNorm2d(4), nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x):
        se = self.fc(x.mean((2, 3)))[:, :, None, None]
        y = torch.relu(self.bn_se(self.conv(x)) + se)
        y = F.silu(self.bn_up(x.mean((2, 3), keepdim=True)) + y)
        return self.bn_dtype(y) + y.float()


def test_fused_broadcasting_and_promoting_adds_match(any_backend):
    """Before, each of these fusions raised the op's residual-shape or dtype error in a model that ran."""
    torch.manual_seed(0)
    model = Broadcasts().double()
    converted, report = convert(model, backend=any_backend)
    assert sorted(f.split(":")[0] for f in report.fused) == ["bn_dtype", "bn_se", "bn_up"]
    _compare(model, converted, torch.randn(3, 4, 5, 7, dtype=torch.float64))


@pytest.mark.parametrize("layer", [nn.Linear(5, 3), nn.Conv2d(4, 8, 3, groups=4), nn.Conv2d(4, 6, 1),
                                   nn.BatchNorm2d(4)], ids=["linear", "depthwise", "pointwise", "batchnorm"])
def test_a_lone_layer_is_swapped(layer):
    """A model that is one swappable layer: fx traced into its forward, so nothing was swapped."""
    model = layer.double()
    converted, report = convert(model, backend="torch")
    assert type(converted).__module__ == "dlkernels.nn.modules" and list(report.replaced) == ["(root)"]
    x = torch.randn(2, 5, dtype=torch.float64) if isinstance(layer, nn.Linear) else \
        torch.randn(2, 4, 6, 6, dtype=torch.float64)
    _compare(model, converted, x)


def test_convert_torch_twin_of_reference_model():
    """A torchvision-style ResNet on PyTorch's modules, converted, gives the model's outputs."""
    from dlkernels import models

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                          TVBasicBlock(4, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).double()
    converted, report = convert(model, backend="torch")
    assert len(report.fused) == 3
    _compare(model, converted, torch.randn(2, 3, 6, 6, dtype=torch.float64))
    assert models  # the reference models need no conversion: they are built on dlkernels.nn
