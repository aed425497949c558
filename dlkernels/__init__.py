"""dlkernels: depthwise-separable convolution, fused batch norm + residual + activation, and
matmul/linear, as torch.library ops with Triton (GPU), Numba (CPU) and C++ (CPU) kernels.

The functions mirror torch.nn.functional; each takes ``backend=`` ("triton", "numba", "cpp",
"torch" or None for automatic), see dlkernels/_dispatch.py.
"""
from ._dispatch import available_backends, use_backend
from .batchnorm import batch_norm_residual
from .depthwise import depthwise_conv2d
from .matmul import linear, matmul
from .pointwise import pointwise_conv2d
from .separable import separable_conv2d

from . import models, nn  # noqa: E402  (modules and models are built on the functions above)
from .convert import ConversionReport, convert  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "available_backends",
    "use_backend",
    "matmul",
    "linear",
    "depthwise_conv2d",
    "pointwise_conv2d",
    "separable_conv2d",
    "batch_norm_residual",
    "nn",
    "models",
    "convert",
    "ConversionReport",
]
