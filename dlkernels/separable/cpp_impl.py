"""C++ kernel for the fused separable conv (csrc/separable.cpp): zero-copy numpy views in, the
output allocated here in x's memory format and filled in place. Contract: dlkernels/separable/op.py."""
from __future__ import annotations

from .. import _C
from .._cpp_common import np_view
from ..depthwise.cpp_impl import depthwise_fwd, is_channels_last, new_output
from ..matmul import cpp_impl as matmul_kernels
from ..pointwise.op import forward as pointwise_forward

# Channels_last, up to this many output pixels an image (12x12): the fused kernel's tasks (a few
# output rows of one image) feed its GEMM a pixel operand of a few dozen rows, mostly padding of the
# micro-kernel's tiles: then the depthwise pass over the whole batch and one GEMM over all N*Ho*Wo
# pixels run faster, the intermediate kept within a quarter of the LLC. Two threads, Zen5, 3x3, C ->
# O, fused -> two passes (ms): 8x512x3x3 -> 512 0.220 -> 0.148, 8x128x11x11 -> 128 0.103 -> 0.099,
# 32x512x7x7 -> 512 2.19 -> 1.97, Xception exit 8x1024x10x10 -> 1536 6.35 -> 5.98. From 14x14 on the
# fused kernel is as fast or faster (8x728x19x19 7.17 against 7.31). NCHW runs blocks of whole
# images through the two kernels in C++ at every size (csrc/separable.cpp, fwd_nchw).
TWO_PASS_MAX_PIXELS = 144


def _two_passes(x, dw_weight, out_hw) -> bool:
    mid_bytes = x.shape[0] * dw_weight.shape[0] * out_hw[0] * out_hw[1] * x.element_size()
    return (is_channels_last(x) and out_hw[0] * out_hw[1] <= TWO_PASS_MAX_PIXELS
            and 4 * mid_bytes <= _C.llc_bytes())


def separable_fwd(x, dw_weight, pw_weight, bias, stride, pad, dilation, out_hw):
    if _two_passes(x, dw_weight, out_hw):
        mid = depthwise_fwd(x, dw_weight, None, stride, pad, dilation, out_hw)
        return pointwise_forward(matmul_kernels, mid, pw_weight, bias)
    cl = is_channels_last(x)
    y = new_output(x, (x.shape[0], pw_weight.shape[0], *out_hw), cl)
    _C.separable_fwd(np_view(x), np_view(dw_weight), np_view(pw_weight), np_view(bias), np_view(y),
                     *stride, *pad, *dilation, cl)
    return y
