"""fused batch norm + residual + activation: op.py (public function, torch.library ops, autograd),
reference.py (torch), and one kernel file per backend: triton_impl.py, numba_impl.py, cpp_impl.py."""
from .op import batch_norm_residual

__all__ = ["batch_norm_residual"]
