"""Drop-in torch.nn modules on dlkernels' ops (parameters, buffers and state_dict keys of the torch
modules they replace)."""
from .modules import (BatchNormResidual1d, BatchNormResidual2d, Conv2d, DepthwiseConv2d, Linear, PointwiseConv2d,
                      SeparableConv2d, set_backend)

__all__ = ["Conv2d", "DepthwiseConv2d", "PointwiseConv2d", "SeparableConv2d", "BatchNormResidual2d",
           "BatchNormResidual1d", "Linear", "set_backend"]
