"""matmul / linear: op.py (public functions, torch.library ops, autograd), reference.py (torch),
and one kernel file per backend: triton_impl.py, numba_impl.py, cpp_impl.py."""
from .op import linear, matmul

__all__ = ["matmul", "linear"]
