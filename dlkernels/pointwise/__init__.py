"""pointwise (1x1) conv: op.py (public function, op, autograd) on the matmul kernels; reference.py."""
from .op import pointwise_conv2d

__all__ = ["pointwise_conv2d"]
