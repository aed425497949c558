"""Reference models built on dlkernels' ops; each builder's ``reference=True`` gives its pure-PyTorch twin."""
from .mini_xception import MiniXception, mini_xception
from .mlp import MLP, mlp
from .resnet import ResNet, resnet18, resnet34, resnet50

MODELS = {"mini_xception": mini_xception, "resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50,
          "mlp": mlp}

__all__ = ["mini_xception", "resnet18", "resnet34", "resnet50", "mlp", "MiniXception", "ResNet", "MLP", "MODELS"]
