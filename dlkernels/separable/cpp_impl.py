"""C++ kernel for the fused separable conv (csrc/separable.cpp): zero-copy DLPack capsules in, the
output allocated here in x's memory format and filled in place. Contract: dlkernels/separable/op.py."""
from __future__ import annotations

from .. import _C
from .._cpp_common import c_arg as _c
from ..depthwise.cpp_impl import is_channels_last, new_output

# Channels_last planes of up to this many output pixels (12x12) run as blocks of whole images, the
# depthwise pass then one GEMM (csrc/separable.cpp, fwd_image_blocks: measurements there); NCHW
# always does.
IMAGE_BLOCK_MAX_PIXELS = 144


def separable_fwd(x, dw_weight, pw_weight, bias, stride, pad, dilation, out_hw):
    cl = is_channels_last(x)
    y = new_output(x, (x.shape[0], pw_weight.shape[0], *out_hw), cl)
    _C.separable_fwd(_c(x), _c(dw_weight), _c(pw_weight), _c(bias), _c(y),
                     *stride, *pad, *dilation, cl, IMAGE_BLOCK_MAX_PIXELS)
    return y
