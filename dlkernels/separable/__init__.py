"""fused depthwise-separable conv: op.py (public function, torch.library op, autograd), reference.py
(torch), and one kernel file per backend: triton_impl.py, numba_impl.py, cpp_impl.py."""
from .op import separable_conv2d

__all__ = ["separable_conv2d"]
