"""depthwise conv: op.py (public function, torch.library ops, autograd), reference.py (torch), and
one kernel file per backend: triton_impl.py, numba_impl.py, cpp_impl.py."""
from .op import depthwise_conv2d

__all__ = ["depthwise_conv2d"]
