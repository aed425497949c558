"""im2col of a channels_last input and its adjoint: dlkernels.nn.Conv2d's dense k x k convs as a GEMM
over window rows (op.py: the autograd function; reference.py: torch; triton_impl.py, numba_impl.py,
cpp_impl.py: each backend's kernels)."""
from .op import nhwc_windows

__all__ = ["nhwc_windows"]
