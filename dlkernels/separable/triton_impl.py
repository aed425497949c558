"""Triton kernel for the fused separable conv2d forward (contract: dlkernels/separable/op.py).

One program owns a [BLOCK_P output pixels x BLOCK_O output channels] tile of y. For each block of
BLOCK_C depthwise channels it computes that slice of the depthwise output in registers (fp32, or
fp64 for fp64; the shared ``dw_tile`` of the depthwise kernels), casts it to the input dtype, as
the unfused pair of convs would round it, and feeds it to tl.dot against the matching
[BLOCK_C x BLOCK_O] tile of pw_weight^T. The depthwise intermediate never reaches memory.
Its backward runs on the depthwise and pointwise kernels (see op.py).

Where the pointwise GEMM dominates (hundreds of channels in and out), the fused kernel loses: it
recomputes the depthwise tile for every block of output channels and feeds tl.dot from registers
(H200, 2026-11-26: 19-55 TFLOP/s, 0.18-0.25x eager's two convs at Xception's 728->728 and
1024->1536). So on a GPU each new shape is timed once both ways, fused and in two passes (the
depthwise kernel into an intermediate, then the matmul kernel), by the GPU time of each (CUDA
graphs: the host cost of the two-pass path's extra launches is not the kernels'), and runs the
faster from then on.
Untuned (the GPU tests) and under the interpreter it runs the fused kernel; ``PATH`` pins a path.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton_common import INTERPRET, TunedKernel, align_of, autotuning, batch_slices, cdiv, cfg, graph_bench
from ..depthwise import triton_impl as depthwise
from ..depthwise.triton_impl import (acc_dtype, dw_tile, is_channels_last, new_output, pixel_align, pixel_stride,
                                     weight_taps)
from ..matmul import triton_impl as matmul
from ..pointwise.op import forward as pointwise_forward

# None: choose per shape (timed on a GPU when tuning, else fused); "fused" or "two_pass" pins it
PATH = None
_chosen: dict = {}
_timings: dict = {}  # the times (ms) each choice was made on, for benchmarks/gpu/probe.py
# the choice's timer: the paths' GPU time (tests on the CPU put a stand-in here)
_time_path = graph_bench


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: float32 follows torch.get_float32_matmul_precision() as torch's
    matmul does ("highest": full fp32; "high"/"medium": TF32); other dtypes multiply exactly."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def _bf16_dot_broken(dtype: torch.dtype) -> bool:
    """Triton's interpreter (3.9) multiplies bf16 tl.dot operands as their raw uint16 bits
    (np.matmul on the storage); there the kernel upcasts them to fp32 first, which gives the
    same products as the bf16 MMA with fp32 accumulation."""
    return INTERPRET and dtype == torch.bfloat16


@triton.jit
def _separable_fwd_kernel(x_ptr, dw_ptr, pw_ptr, b_ptr, y_ptr,
                          C_mid, O, M, H, W, Ho, Wo,
                          stride_xn, stride_xc, stride_xh, stride_xw,
                          stride_yn, stride_yc, stride_yp, stride_wc, stride_wt,
                          conv_sh, conv_sw, pad_h, pad_w, dil_h, dil_w,
                          KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
                          DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
                          ALIGN_X: tl.constexpr, ALIGN_Y: tl.constexpr, ALIGN_CM: tl.constexpr, ALIGN_O: tl.constexpr,
                          BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_O: tl.constexpr):
    # The O blocks of one pixel tile are consecutive program ids, so the x tile they all re-read
    # for the depthwise part is still in L2. (Flattened on axis 0: axis 1 is capped at 65535.)
    num_o_blocks = tl.cdiv(O, BLOCK_O)
    pid = tl.program_id(0)
    pid_o = pid % num_o_blocks
    pid_p = pid // num_o_blocks
    n = tl.program_id(1).to(tl.int64)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    mask_p = offs_p < Ho * Wo
    mask_o = offs_o < (O // ALIGN_O) * ALIGN_O  # == O and C_mid below: known factors let loads vectorize
    i = offs_p // Wo
    j = offs_p % Wo
    x_img = x_ptr + tl.multiple_of(n * stride_xn, ALIGN_X)
    acc = tl.zeros([BLOCK_P, BLOCK_O], dtype=ACC)
    for c0 in range(0, C_mid, BLOCK_C):
        # c0's multiple is not derived from the loop (sm_90 PTX at 728 channels: every load scalar)
        offs_c = tl.multiple_of(c0, BLOCK_C) + tl.arange(0, BLOCK_C)
        mask_c = offs_c < (C_mid // ALIGN_CM) * ALIGN_CM
        # masked channels and pixels come out as exact zeros, so the padded rows/cols of the dot
        # contribute nothing
        mid = dw_tile(x_img, dw_ptr, i, j, mask_p, offs_c, mask_c, M, H, W,
                      stride_xc, stride_xh, stride_xw, stride_wc, stride_wt, conv_sh, conv_sw, pad_h, pad_w,
                      dil_h, dil_w,
                      KH, KW, ACC, ALIGN_X, BLOCK_P, BLOCK_C)
        pw = tl.load(pw_ptr + offs_o[None, :] * ((C_mid // ALIGN_CM) * ALIGN_CM) + offs_c[:, None],
                     mask=mask_c[:, None] & mask_o[None, :], other=0.0)
        a = mid.to(pw_ptr.dtype.element_ty)
        if DOT_IN_FP32:  # bf16 under the interpreter: exact products of the rounded operands
            a = a.to(tl.float32)
            pw = pw.to(tl.float32)
        acc = tl.dot(a, pw, acc, input_precision=DOT_PRECISION, out_dtype=ACC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_o, mask=mask_o, other=0.0).to(ACC)[None, :]
    y_ptrs = (y_ptr + tl.multiple_of(n * stride_yn, ALIGN_Y) + tl.multiple_of(offs_p * stride_yp, ALIGN_Y)[:, None]
              + (offs_o * stride_yc)[None, :])
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_o[None, :])


# tl.dot needs every block dim >= 16. Pixel-major tiles suit both layouts here: the stores are
# contiguous along O for channels_last and along pixels for NCHW. num_stages=1 configs do not
# pipeline the tap loads (see _prune_by_smem); BLOCK_O=32 fits MobileNet's 24 outputs.
_CONFIGS = [
    cfg(BLOCK_P=64, BLOCK_C=32, BLOCK_O=64, num_warps=4, num_stages=2),
    cfg(BLOCK_P=128, BLOCK_C=32, BLOCK_O=64, num_warps=4, num_stages=2),
    cfg(BLOCK_P=64, BLOCK_C=32, BLOCK_O=128, num_warps=4, num_stages=2),
    cfg(BLOCK_P=128, BLOCK_C=32, BLOCK_O=128, num_warps=8, num_stages=2),
    cfg(BLOCK_P=128, BLOCK_C=64, BLOCK_O=128, num_warps=8, num_stages=2),
    cfg(BLOCK_P=64, BLOCK_C=16, BLOCK_O=64, num_warps=4, num_stages=3),
    cfg(BLOCK_P=32, BLOCK_C=32, BLOCK_O=32, num_warps=4, num_stages=2),
    cfg(BLOCK_P=64, BLOCK_C=32, BLOCK_O=32, num_warps=4, num_stages=1),
    cfg(BLOCK_P=128, BLOCK_C=32, BLOCK_O=32, num_warps=4, num_stages=1),
    cfg(BLOCK_P=128, BLOCK_C=64, BLOCK_O=64, num_warps=8, num_stages=1),
]
# Untuned (the GPU tests) a config whose shared memory fits every dtype and window.
_DEFAULT = cfg(BLOCK_P=64, BLOCK_C=32, BLOCK_O=64, num_warps=4, num_stages=1)
_SMEM_BUDGET = 200 * 1024


def _prune_by_smem(configs, named_args, **kwargs):
    """Drop configs whose shared memory cannot fit. With num_stages > 1 the software pipeliner
    stages every tap's [BLOCK_P, BLOCK_C] input load of the next channel block in shared memory:
    KH*KW of them, for float32 and float64 (the sm_90 compile of triton 3.6 stages none for 16-bit
    types, whose tiles feed the MMA from registers). A float64 5x5 window at 64x32 asked for 432 KB
    of the H200's 227 KB (2026-11-26: the two float64 separable tests that failed on the GPU)."""
    elem = named_args["x_ptr"].element_size()
    staged_taps = kwargs["KH"] * kwargs["KW"] if elem >= 4 else 0

    def smem(c):
        bp, bc, bo = c.kwargs["BLOCK_P"], c.kwargs["BLOCK_C"], c.kwargs["BLOCK_O"]
        return ((c.num_stages - 1) * staged_taps * bp * bc + c.num_stages * bc * bo + bp * bc) * elem

    return [c for c in configs if smem(c) <= _SMEM_BUDGET] or [_DEFAULT]


_KEY = ["C_mid", "O", "M", "Ho", "Wo", "KH", "KW", "conv_sh", "conv_sw", "stride_xc"]
_separable_fwd = TunedKernel(_separable_fwd_kernel, _CONFIGS, _KEY, dict(BLOCK_P=32, BLOCK_C=16, BLOCK_O=16),
                             default=_DEFAULT, prune_configs_by={"early_config_prune": _prune_by_smem})


def separable_fwd(x, dw_weight, pw_weight, bias, stride, pad, dilation, out_hw):
    args = (x, dw_weight, pw_weight, bias, stride, pad, dilation, out_hw)
    path = PATH
    if path is None:
        path = _timed_choice(*args) if autotuning() else "fused"
    return (_two_pass if path == "two_pass" else _fused)(*args)


def _timed_choice(*args):
    x, dw_weight, pw_weight = args[:3]
    key = (tuple(x.shape), x.stride(), x.dtype, x.device, tuple(dw_weight.shape), pw_weight.shape[0],
           args[3] is not None, *args[4:])
    if key not in _chosen:
        runs = {"fused": lambda: _fused(*args), "two_pass": lambda: _two_pass(*args)}
        for run in runs.values():
            run()  # tunes its kernels before it is timed
        times = _timings[key] = {name: _time_path(run) for name, run in runs.items()}
        _chosen[key] = min(times, key=times.get)
    return _chosen[key]


def _two_pass(x, dw_weight, pw_weight, bias, stride, pad, dilation, out_hw):
    mid = depthwise.depthwise_fwd(x, dw_weight, None, stride, pad, dilation, out_hw)
    return pointwise_forward(matmul, mid, pw_weight, bias)


def _fused(x, dw_weight, pw_weight, bias, stride, pad, dilation, out_hw):
    n, c, h, w = x.shape
    c_mid, _, kh, kw = dw_weight.shape
    o = pw_weight.shape[0]
    ho, wo = out_hw
    y = new_output(x, (n, o, ho, wo), is_channels_last(x))
    # the depthwise tile spans BLOCK_C channels in either layout: tap-major weights
    dw_t, stride_wc, stride_wt = weight_taps(dw_weight, channel_runs=True)
    for b in batch_slices(n):
        grid = lambda META, nb=y[b].shape[0]: (cdiv(o, META["BLOCK_O"]) * cdiv(ho * wo, META["BLOCK_P"]), nb)
        _separable_fwd(grid, x[b], dw_t, pw_weight, bias if bias is not None else pw_weight, y[b],
                       c_mid, o, c_mid // c, h, w, ho, wo,
                       *x.stride(), y.stride(0), y.stride(1), pixel_stride(y), stride_wc, stride_wt,
                       stride[0], stride[1], pad[0], pad[1], dilation[0], dilation[1],
                       KH=kh, KW=kw, HAS_BIAS=bias is not None, ACC=acc_dtype(x.dtype),
                       DOT_PRECISION=dot_precision(x.dtype), DOT_IN_FP32=_bf16_dot_broken(x.dtype),
                       ALIGN_X=pixel_align(x), ALIGN_Y=pixel_align(y),
                       ALIGN_CM=align_of(c_mid), ALIGN_O=align_of(o))
    return y
