"""dlkernels: depthwise-separable convolution, fused batch norm + residual + activation, and
matmul/linear, as torch.library ops with Triton (GPU), Numba (CPU) and C++ (CPU) kernels.

The functions mirror torch.nn.functional; each takes ``backend=`` ("triton", "numba", "cpp",
"torch" or None for automatic), see dlkernels/_dispatch.py.
"""
from ._dispatch import available_backends, use_backend
from .matmul import linear, matmul

__version__ = "0.1.0"

__all__ = [
    "available_backends",
    "use_backend",
    "matmul",
    "linear",
]
