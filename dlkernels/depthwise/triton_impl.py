"""Triton kernels for depthwise conv2d (contract: dlkernels/depthwise/op.py).

Every kernel addresses its tensors through (n, c, h, w) strides, so one kernel serves NCHW and
channels_last. Outputs are fresh tensors in the canonical strides of their format; for those the
flattened output pixel p = i * Wo + j sits at p * stride_w (stride_h == Wo * stride_w in both
formats), which keeps the store's contiguity visible to the compiler (Triton specialises a stride
equal to 1): along pixels for NCHW, along channels for channels_last.

The block shapes follow the layout: channels_last wants wide channel blocks (the contiguous axis),
NCHW wants long pixel runs and few channels, hence two autotune config lists per kernel.

Under TRITON_INTERPRET=1 (CPU) no autotuning happens: each kernel runs one fixed small config.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _validation as V
from .._triton_common import TunedKernel, align_of, batch_slices, cdiv, cfg, next_pow2, target_programs


def acc_dtype(dtype: torch.dtype):
    """Accumulator type: float64 for float64, else float32 (fp16/bf16 never accumulate in themselves)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def is_channels_last(t: torch.Tensor) -> bool:
    return V.memory_format(t) == torch.channels_last


def new_output(ref: torch.Tensor, shape, channels_last: bool) -> torch.Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=ref.dtype, device=ref.device, memory_format=fmt)


def pixel_stride(t: torch.Tensor) -> int:
    """Stride of the flattened (h, w) pixel index of a canonical NCHW or channels_last tensor."""
    return t.stride(3)


def pixel_align(t: torch.Tensor) -> int:
    """The kernels' ALIGN_* hint for an (n, c, h, w) tensor: what every pixel offset
    n*stride_n + h*stride_h + w*stride_w is a multiple of (the channel count for channels_last)."""
    return align_of(t.stride(0), t.stride(2), t.stride(3))


# ---------------------------------------------------------------------------------------------
# shared device helper: a [BLOCK_P pixels x BLOCK_C channels] tile of the depthwise output
# ---------------------------------------------------------------------------------------------
@triton.jit
def dw_tile(x_img, w_ptr, i, j, mask_p, offs_c, mask_c, M, H, W,
            stride_xc, stride_xh, stride_xw, stride_wc, stride_wt, conv_sh, conv_sw, pad_h, pad_w, dil_h, dil_w,
            KH: tl.constexpr, KW: tl.constexpr, ACC: tl.constexpr, ALIGN_X: tl.constexpr,
            BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """sum over taps of weight[c, p, q] * x[c // M, i*sH - pT + p*dH, j*sW - pL + q*dW], in ACC.
    Out-of-range taps, pixels and channels read zero. Also used by the fused separable kernel.
    The weight of channel c, tap t is at w_ptr + c * stride_wc + t * stride_wt (see weight_taps)."""
    mask_c2 = mask_c[None, :]
    w_row = w_ptr + offs_c * stride_wc
    # One pointer tile for the window's top-left tap; every other tap is it plus a scalar offset,
    # a multiple of ALIGN_X written as such so that the loads stay vectors. Recomputing each tap's
    # addresses from (h, w) took 13 integer instructions a pixel-tap (sm_90 SASS of a 64x32 bf16
    # channels-last tile: 848 instructions a thread for 16 outputs, 230 of them IMAD).
    h0 = i * conv_sh - pad_h
    w0 = j * conv_sw - pad_w
    x_tap0 = (x_img + (tl.multiple_of(h0 * stride_xh, ALIGN_X) + tl.multiple_of(w0 * stride_xw, ALIGN_X))[:, None]
              + ((offs_c // M) * stride_xc)[None, :])
    step_h = (dil_h * (stride_xh // ALIGN_X)) * ALIGN_X
    step_w = (dil_w * (stride_xw // ALIGN_X)) * ALIGN_X
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
    for p in tl.static_range(KH):
        h = h0 + p * dil_h
        row_ok = mask_p & (h >= 0) & (h < H)
        for q in tl.static_range(KW):
            w = w0 + q * dil_w
            ok = row_ok & (w >= 0) & (w < W)
            xv = tl.load(x_tap0 + (p * step_h + q * step_w), mask=ok[:, None] & mask_c2, other=0.0)
            wv = tl.load(w_row + (p * KW + q) * stride_wt, mask=mask_c, other=0.0)
            acc += xv.to(ACC) * wv.to(ACC)[None, :]
    return acc


def weight_taps(weight: torch.Tensor, channel_runs: bool):
    """(weight, stride_wc, stride_wt) for the kernels' weight reads. Tiles that span runs of
    channels (channels_last, and the separable kernel's) read a tap's weights for the run:
    tap-major (KH*KW, C) makes it contiguous, one vector load instead of one load per channel (in
    the sm_90 SASS of a 32x64 bf16 tile: 72 scalar weight loads beside 19 vector loads of x).
    NCHW tiles have 1-4 channels: the weight as given, no transposing kernel."""
    c_out = weight.shape[0]
    if not channel_runs:
        return weight, weight.stride(0), 1
    # Rows padded to a multiple of 16 elements (never read: the channel mask stops at c_out): a
    # row stride of c_out = 728 (8 x 91) hid the rows' alignment from Triton, which loaded every
    # tap weight alone (sm_90 PTX of a 32x64 bf16 tile: 32 scalar loads a thread, 2026-11-26).
    taps = weight.reshape(c_out, -1)
    row = cdiv(c_out, 16) * 16
    wt = taps.new_empty((taps.shape[1], row))[:, :c_out]
    wt.copy_(taps.t())
    return wt, 1, row


@triton.jit
def pixel_tile(pid, Ho, Wo, BLOCK_P: tl.constexpr, TILE_W: tl.constexpr):
    """(offs_p, i, j, mask) of pixel tile ``pid`` of an Ho x Wo image: a run of BLOCK_P flattened
    pixels (TILE_W == 0), or a block of BLOCK_P // TILE_W rows of TILE_W pixels. The block keeps a
    tap's rows above and below inside the tile, so they come from L1 rather than L2, and its
    columns are contiguous runs the compiler can see (no division by a runtime width)."""
    if TILE_W == 0:
        offs_p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
        i = offs_p // Wo
        j = offs_p % Wo
        mask_p = offs_p < Ho * Wo
    else:
        n_tw = tl.cdiv(Wo, TILE_W)
        i = (pid // n_tw) * (BLOCK_P // TILE_W) + tl.arange(0, BLOCK_P) // TILE_W
        j = (pid % n_tw) * TILE_W + tl.arange(0, BLOCK_P) % TILE_W
        mask_p = (i < Ho) & (j < Wo)
        offs_p = i * Wo + j
    return offs_p, i, j, mask_p


def pixel_tiles(ho: int, wo: int, meta) -> int:
    """How many pixel tiles of ``meta``'s shape (see pixel_tile; ROWS > 0: the forward's walk,
    BLOCK_P columns by about ROWS rows, see dw_walk) cover an ho x wo image."""
    bp, tw, rows = meta["BLOCK_P"], meta.get("TILE_W", 0), meta.get("ROWS", 0)
    if rows and meta.get("WALK"):
        return cdiv(wo, bp) * cdiv(ho, rows)
    if tw == 0:
        return cdiv(ho * wo, bp)
    return cdiv(ho, bp // tw) * cdiv(wo, tw)


# ---------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------
@triton.jit
def in_range(mask, h, H):
    """mask where 0 <= h < H, for a scalar h (an image row). Compares as tensors: the interpreter
    (3.9) turns a tensor & scalar-bool into int32, which tl.load refuses as a mask."""
    hv = tl.full(mask.shape, 0, tl.int32) + h
    return mask & (hv >= 0) & (hv < H)


@triton.jit
def dw_walk_row(x_col, h, H, stride_xh, step_w, cols, KW: tl.constexpr, ALIGN_X: tl.constexpr):
    """The KW shifted [columns, channels] tiles of input row h (zeros outside the image), raw."""
    x_row = x_col + tl.multiple_of(h * stride_xh, ALIGN_X)
    xs = ()
    for q in tl.static_range(KW):
        xs = xs + (tl.load(x_row + q * step_w, mask=in_range(cols[q], h, H), other=0.0),)
    return xs


@triton.jit
def dw_walk(x_img, w_ptr, b_ptr, y_img, offs_c, mask_c, M, H, W, Ho, Wo,
            stride_xc, stride_xh, stride_xw, stride_yc, stride_yp, stride_wc, stride_wt,
            conv_sw, pad_h, pad_w, dil_w,
            KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
            ALIGN_X: tl.constexpr, ALIGN_Y: tl.constexpr,
            BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr):
    """The forward's row walk, for windows up to 3x3 at vertical stride and dilation 1: the program
    owns BLOCK_P output columns of about ROWS consecutive rows and steps down the input rows. Each
    input row is loaded and converted once and feeds the KH output rows it touches (the KH - 1 not
    yet finished ride along as partial sums s1, s2), the tap weights stay in registers, and every
    address and column mask is computed once: 22-23 sm_90 instructions an output against the
    tile's 51, and 0.375 loads against 1.7. Loads run two rows ahead of the FMAs: a walk that waited for
    each row's loads (and reloaded fp32 weights every row) lost to the tiles (H200, 2026-11-27)."""
    n_tw = tl.cdiv(Wo, BLOCK_P)
    pid = tl.program_id(0)
    rows = tl.cdiv(Ho, tl.cdiv(Ho, ROWS))  # balanced: 19 rows at ROWS = 16 are 10 + 9, not 16 + 3
    i0 = (pid // n_tw) * rows
    i1 = tl.minimum(i0 + rows, Ho)
    j = (pid % n_tw) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_j = j < Wo
    w0 = j * conv_sw - pad_w
    x_col = x_img + tl.multiple_of(w0 * stride_xw, ALIGN_X)[:, None] + ((offs_c // M) * stride_xc)[None, :]
    step_w = (dil_w * (stride_xw // ALIGN_X)) * ALIGN_X
    cols = ()
    for q in tl.static_range(KW):
        w = w0 + q * dil_w
        cols = cols + (((w >= 0) & (w < W) & mask_j)[:, None] & mask_c[None, :],)
    ws = ()
    for t in tl.static_range(KH * KW):
        ws = ws + (tl.load(w_ptr + offs_c * stride_wc + t * stride_wt, mask=mask_c, other=0.0).to(ACC)[None, :],)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)[None, :]
    y_col = y_img + tl.multiple_of(j * stride_yp, ALIGN_Y)[:, None] + (offs_c * stride_yc)[None, :]
    row_y = ((Wo * stride_yp) // ALIGN_Y) * ALIGN_Y
    mask_out = mask_j[:, None] & mask_c[None, :]
    # s_k (k = 1, 2) is output row i0 + t - KH + k before step t and takes window row KH - k; a
    # fresh sum takes row 0; step t finishes output row i0 + t - (KH - 1), stored once it is >= i0
    # (the first KH - 1 steps only fill the partial sums).
    s1 = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
    s2 = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
    h = i0 - pad_h
    xs = dw_walk_row(x_col, h, H, stride_xh, step_w, cols, KW, ALIGN_X)
    x1 = dw_walk_row(x_col, h + 1, H, stride_xh, step_w, cols, KW, ALIGN_X)
    for t in range(0, i1 - i0 + KH - 1):
        x2 = dw_walk_row(x_col, h + 2, H, stride_xh, step_w, cols, KW, ALIGN_X)
        fresh = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
        for q in tl.static_range(KW):
            xq = xs[q].to(ACC)
            fresh += xq * ws[q]
            if KH > 1:
                s1 += xq * ws[(KH - 1) * KW + q]
            if KH > 2:
                s2 += xq * ws[(KH - 2) * KW + q]
        if KH == 1:
            done = fresh
        else:
            done = s1
        if HAS_BIAS:
            done += bias
        i = i0 + t - (KH - 1)
        tl.store(y_col + i * row_y, done.to(y_img.dtype.element_ty), mask=in_range(mask_out, i - i0, Ho))
        if KH == 2:
            s1 = fresh
        if KH == 3:
            s1 = s2
            s2 = fresh
        xs = x1
        x1 = x2
        h += 1


@triton.jit
def _dw_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr,
                   C_out, M, H, W, Ho, Wo,
                   stride_xn, stride_xc, stride_xh, stride_xw,
                   stride_yn, stride_yc, stride_yp, stride_wc, stride_wt,
                   conv_sh, conv_sw, pad_h, pad_w, dil_h, dil_w,
                   KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
                   ALIGN_X: tl.constexpr, ALIGN_Y: tl.constexpr, ALIGN_C: tl.constexpr,
                   BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, TILE_W: tl.constexpr,
                   ROWS: tl.constexpr, WALK: tl.constexpr):
    # ROWS > 0 and WALK (the launcher's: channels_last, window <= 3x3, vertical stride and
    # dilation 1): dw_walk; else one tile of BLOCK_P pixels (pixel_tile) x BLOCK_C channels.
    pid_c = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < (C_out // ALIGN_C) * ALIGN_C  # == C_out, its known factor lets loads vectorize
    x_img = x_ptr + tl.multiple_of(n * stride_xn, ALIGN_X)
    y_img = y_ptr + tl.multiple_of(n * stride_yn, ALIGN_Y)
    if ROWS > 0 and WALK:
        dw_walk(x_img, w_ptr, b_ptr, y_img, offs_c, mask_c, M, H, W, Ho, Wo,
                stride_xc, stride_xh, stride_xw, stride_yc, stride_yp, stride_wc, stride_wt,
                conv_sw, pad_h, pad_w, dil_w, KH, KW, HAS_BIAS, ACC, ALIGN_X, ALIGN_Y, BLOCK_P, BLOCK_C, ROWS)
    else:
        offs_p, i, j, mask_p = pixel_tile(tl.program_id(0), Ho, Wo, BLOCK_P, TILE_W)
        acc = dw_tile(x_img, w_ptr, i, j, mask_p, offs_c, mask_c, M, H, W,
                      stride_xc, stride_xh, stride_xw, stride_wc, stride_wt, conv_sh, conv_sw, pad_h, pad_w,
                      dil_h, dil_w, KH, KW, ACC, ALIGN_X, BLOCK_P, BLOCK_C)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)[None, :]
        y_ptrs = y_img + tl.multiple_of(offs_p * stride_yp, ALIGN_Y)[:, None] + (offs_c * stride_yc)[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_c[None, :])


# channels_last: channel blocks are the contiguous (vectorised) axis; NCHW: pixel runs. The
# weight gradient walks flat pixel runs; the forward and input gradient also try 2-D pixel blocks
# (TILE_W > 0, see pixel_tile), and the tuner picks per shape.
_FLAT_CL = [(32, 64, 4), (64, 64, 4), (16, 128, 4), (32, 128, 8), (64, 32, 4), (128, 32, 8)]
_FLAT_NCHW = [(128, 1, 4), (256, 1, 4), (512, 1, 8), (128, 2, 4), (256, 2, 8), (128, 4, 4)]
# (BLOCK_P, BLOCK_C, TILE_W, num_warps)
_BLOCKS_CL = [(32, 64, 8, 4), (64, 64, 8, 8), (16, 128, 4, 4), (64, 32, 8, 4), (64, 32, 16, 4), (128, 32, 16, 8)]
_BLOCKS_NCHW = [(256, 1, 32, 4), (512, 1, 64, 8), (256, 1, 16, 4), (128, 2, 16, 4), (512, 1, 32, 8)]
# Tried and dropped (H200, 2026-11-26): ROWS = 4-8 tiles a program walking down a column of 2-D
# blocks, so that the rows a tile shares with the one above come from this SM's L1. The tuner
# picked single flat tiles over them at 64x144x56x56 and 64x728x19x19 (stride 1, 36 and 34 % of copy).


def _configs(flat, blocks=(), blocks_first=False):
    """Config list; its first entry is what runs untuned (the GPU tests)."""
    if not blocks:
        return [cfg(BLOCK_P=p, BLOCK_C=c, num_warps=nw) for p, c, nw in flat]
    flat = [cfg(BLOCK_P=p, BLOCK_C=c, TILE_W=0, num_warps=nw) for p, c, nw in flat]
    blocks = [cfg(BLOCK_P=p, BLOCK_C=c, TILE_W=tw, num_warps=nw) for p, c, tw, nw in blocks]
    return blocks + flat if blocks_first else flat + blocks


# untuned, channels_last runs 2-D blocks and NCHW flat runs, so the GPU tests compile both
_BWD_IN_CONFIGS_CL = _configs(_FLAT_CL, _BLOCKS_CL, blocks_first=True)
_BWD_IN_CONFIGS_NCHW = _configs(_FLAT_NCHW, _BLOCKS_NCHW)
# The forward's row walk (ROWS > 0, see dw_walk): (BLOCK_P columns, BLOCK_C, ROWS, num_warps), a
# column of 8 channels a thread; narrow blocks for the 10- and 19-wide Xception rows.
_WALK_CL = [(16, 64, 16, 4), (8, 128, 16, 4), (16, 128, 16, 8), (32, 32, 16, 4), (8, 64, 32, 2), (4, 128, 16, 2)]
# Tried and dropped (H200 run 11, 2026-11-27): more warps an SM. ncu had the 64x32 tile at 128
# registers (16 warps an SM, 0.67 issued a cycle per scheduler) and the walk at 156 (12 warps,
# 0.52). Register caps (maxnreg 80/96) spilled the tiles, 1.2-5x slower; tiles of 8 outputs a thread
# lost to those of 16; the walk capped at 128 won the tuner's timing by 1-5 % and left the bench's
# times unchanged (benchmarks/gpu/dwdiag.py times every config of a case).


def _fwd_configs(tiles, walk=()):
    """The forward's list: the walk's configs, then the tiles' (ROWS = 0). The first runs untuned
    (the GPU tests): the walk where it applies, else a flat tile of its shape (see _prune_walk)."""
    return ([cfg(BLOCK_P=p, BLOCK_C=c, TILE_W=0, ROWS=r, num_warps=nw, num_stages=1) for p, c, r, nw in walk]
            + [triton.Config(dict(c.kwargs, ROWS=0), num_warps=c.num_warps, num_stages=c.num_stages) for c in tiles])


def _prune_walk(configs, named_args, **kwargs):
    """The walk's configs only where it applies (WALK); elsewhere they would compile tiles again.
    A list of walk configs alone (untuned) stays: without WALK they run as flat tiles."""
    return [c for c in configs if kwargs["WALK"] or c.kwargs["ROWS"] == 0] or configs


_FWD_CONFIGS_CL = _fwd_configs(_BWD_IN_CONFIGS_CL, _WALK_CL)
_FWD_CONFIGS_NCHW = _fwd_configs(_BWD_IN_CONFIGS_NCHW)
_FWD_KEY = ["C_out", "M", "Ho", "Wo", "KH", "KW", "conv_sh", "conv_sw", "dil_h"]
# The interpreter runs 2-D blocks for channels_last and flat runs for NCHW, so the CPU tests cover both;
# the channels-last forward runs the walk where it applies (3 rows of 4 columns: partial row groups
# and column tiles), else flat tiles of 4 pixels.
_INTERPRET_CL = dict(BLOCK_P=32, BLOCK_C=16, TILE_W=4)
_INTERPRET_NCHW = dict(BLOCK_P=64, BLOCK_C=2, TILE_W=0)
_dw_fwd_cl = TunedKernel(_dw_fwd_kernel, _FWD_CONFIGS_CL, _FWD_KEY, dict(BLOCK_P=4, BLOCK_C=16, TILE_W=0, ROWS=3),
                         prune_configs_by={"early_config_prune": _prune_walk})
_dw_fwd_nchw = TunedKernel(_dw_fwd_kernel, _FWD_CONFIGS_NCHW, _FWD_KEY, dict(_INTERPRET_NCHW, ROWS=0))


def depthwise_fwd(x, weight, bias, stride, pad, dilation, out_hw):
    n, c, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    ho, wo = out_hw
    cl = is_channels_last(x)
    y = new_output(x, (n, c_out, ho, wo), cl)
    kernel = _dw_fwd_cl if cl else _dw_fwd_nchw
    wt, stride_wc, stride_wt = weight_taps(weight, cl)
    for b in batch_slices(n):
        grid = lambda META, nb=y[b].shape[0]: (pixel_tiles(ho, wo, META), cdiv(c_out, META["BLOCK_C"]), nb)
        kernel(grid, x[b], wt, bias if bias is not None else weight, y[b],
               c_out, c_out // c, h, w, ho, wo,
               *x.stride(), y.stride(0), y.stride(1), pixel_stride(y), stride_wc, stride_wt,
               stride[0], stride[1], pad[0], pad[1], dilation[0], dilation[1],
               KH=kh, KW=kw, HAS_BIAS=bias is not None, ACC=acc_dtype(x.dtype),
               ALIGN_X=pixel_align(x), ALIGN_Y=pixel_align(y),
               ALIGN_C=align_of(c_out), WALK=cl and stride[0] == 1 and dilation[0] == 1 and kh <= 3 and kw <= 3)
    return y


# ---------------------------------------------------------------------------------------------
# backward: input gradient (gather form of the transposed conv, no atomics)
# ---------------------------------------------------------------------------------------------
@triton.jit
def _dw_bwd_input_kernel(gy_ptr, w_ptr, gx_ptr,
                         C, M, H, W, Ho, Wo,
                         stride_gn, stride_gc, stride_gh, stride_gw,
                         stride_xn, stride_xc, stride_xp, stride_wc, stride_wt,
                         pad_h, pad_w, dil_h, dil_w,
                         SH: tl.constexpr, SW: tl.constexpr,
                         KH: tl.constexpr, KW: tl.constexpr, ACC: tl.constexpr,
                         ALIGN_G: tl.constexpr, ALIGN_X: tl.constexpr, ALIGN_C: tl.constexpr,
                         BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, TILE_W: tl.constexpr):
    # grad_x[n, c, h, w] = sum_{r < M, taps} weight[c*M + r, p, q] * grad_y[n, c*M + r, i, j]
    # over the taps with i*SH = h + pT - p*dH (and likewise j) landing on an output pixel.
    # The conv strides are constexpr so that the divisions below are shifts / vanish for 1 and 2.
    pid_c = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    offs_p, h, w, mask_p = pixel_tile(tl.program_id(0), H, W, BLOCK_P, TILE_W)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < (C // ALIGN_C) * ALIGN_C  # == C, its known factor lets loads vectorize
    mask_c2 = mask_c[None, :]
    gy_img = gy_ptr + tl.multiple_of(n * stride_gn, ALIGN_G)
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
    for r in range(0, M):
        o = offs_c * M + r
        gy_chan = (o * stride_gc)[None, :]
        w_row = w_ptr + o * stride_wc
        for p in tl.static_range(KH):
            th = h + pad_h - p * dil_h
            i = th // SH
            row_ok = mask_p & (th >= 0) & (i < Ho)
            if SH > 1:
                row_ok = row_ok & (th - i * SH == 0)
            for q in tl.static_range(KW):
                tw = w + pad_w - q * dil_w
                j = tw // SW
                ok = row_ok & (tw >= 0) & (j < Wo)
                if SW > 1:
                    ok = ok & (tw - j * SW == 0)
                g = tl.load(gy_img + (tl.multiple_of(i * stride_gh, ALIGN_G)
                                      + tl.multiple_of(j * stride_gw, ALIGN_G))[:, None] + gy_chan,
                            mask=ok[:, None] & mask_c2, other=0.0)
                wv = tl.load(w_row + (p * KW + q) * stride_wt, mask=mask_c, other=0.0)
                acc += g.to(ACC) * wv.to(ACC)[None, :]
    gx_ptrs = (gx_ptr + tl.multiple_of(n * stride_xn, ALIGN_X) + tl.multiple_of(offs_p * stride_xp, ALIGN_X)[:, None]
               + (offs_c * stride_xc)[None, :])
    tl.store(gx_ptrs, acc.to(gx_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_c2)


_BWD_IN_KEY = ["C", "M", "H", "W", "KH", "KW", "SH", "SW"]
_dw_bwd_input_cl = TunedKernel(_dw_bwd_input_kernel, _BWD_IN_CONFIGS_CL, _BWD_IN_KEY, _INTERPRET_CL)
_dw_bwd_input_nchw = TunedKernel(_dw_bwd_input_kernel, _BWD_IN_CONFIGS_NCHW, _BWD_IN_KEY, _INTERPRET_NCHW)


def depthwise_bwd_input(grad_y, weight, in_hw, stride, pad, dilation, *, in_channels=None):
    """The op calls this with a multiplier of 1 (C is not known from grad_y and weight alone, see
    op.py); a caller that knows C may pass ``in_channels`` to handle m > 1 in one pass."""
    n, c_out, ho, wo = grad_y.shape
    _, _, kh, kw = weight.shape
    h, w = in_hw
    c = c_out if in_channels is None else int(in_channels)
    if c < 1 or c_out % c != 0:
        raise ValueError(f"depthwise_bwd_input: {c_out} output channels are not a multiple of in_channels={c}")
    m = c_out // c
    cl = is_channels_last(grad_y)
    gx = new_output(grad_y, (n, c, h, w), cl)
    kernel = _dw_bwd_input_cl if cl else _dw_bwd_input_nchw
    wt, stride_wc, stride_wt = weight_taps(weight, cl)
    for b in batch_slices(n):
        grid = lambda META, nb=gx[b].shape[0]: (pixel_tiles(h, w, META), cdiv(c, META["BLOCK_C"]), nb)
        kernel(grid, grad_y[b], wt, gx[b],
               c, m, h, w, ho, wo,
               *grad_y.stride(), gx.stride(0), gx.stride(1), pixel_stride(gx), stride_wc, stride_wt,
               pad[0], pad[1], dilation[0], dilation[1],
               SH=stride[0], SW=stride[1], KH=kh, KW=kw, ACC=acc_dtype(grad_y.dtype),
               ALIGN_G=pixel_align(grad_y),
               ALIGN_X=pixel_align(gx), ALIGN_C=align_of(c))
    return gx


# ---------------------------------------------------------------------------------------------
# backward: weight (+ bias) gradient, a deterministic two-level reduction
# ---------------------------------------------------------------------------------------------
@triton.jit
def _dw_bwd_weight_partial_kernel(gy_ptr, x_ptr, part_ptr,
                                  C_out, M, H, W, Ho, Wo, TOTAL, CHUNK, KH, KW,
                                  stride_gn, stride_gc, stride_gh, stride_gw,
                                  stride_xn, stride_xc, stride_xh, stride_xw,
                                  conv_sh, conv_sw, pad_h, pad_w, dil_h, dil_w,
                                  QW: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
                                  ALIGN_G: tl.constexpr, ALIGN_X: tl.constexpr, ALIGN_C: tl.constexpr,
                                  BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # Program (tap group, channel block, chunk) sums grad_y * x over its CHUNK of the flattened
    # (n, i, j) output pixels for QW taps q0..q0+QW-1 of window row r, and writes
    # part[chunk, c, r*KW + q]; group KH * ceil(KW / QW) is the bias (x := 1 at q == 0). The taps are
    # one [pixels, QW, channels] tile: grad_y is loaded once for all of them, and no tap is
    # unrolled (unrolled over a 5x5 window the kernel took 15 s per config to compile). The
    # launcher picks QW per layout (see depthwise_bwd_weight). The group is the fastest grid axis,
    # so the groups of one chunk run together and share it in L2.
    NQ = tl.cdiv(KW, QW)
    r = tl.program_id(0) // NQ
    q0 = (tl.program_id(0) % NQ) * QW
    pid_c = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < (C_out // ALIGN_C) * ALIGN_C  # == C_out, its known factor lets loads vectorize
    gy_chan = (offs_c * stride_gc)[None, :]
    x_chan = ((offs_c // M) * stride_xc)[None, None, :]
    offs_q = q0 + tl.arange(0, QW)
    tap_h = r * dil_h - pad_h
    tap_w = offs_q * dil_w - pad_w
    # the group's real taps (none in the bias group), and the bias column; per-row bounds rather
    # than `vector & (r < KH)`, which the interpreter (3.9) evaluates to int32, not a mask
    tap_ok = offs_q < tl.where(r < KH, KW, 0)
    is_bias = offs_q < tl.where(r == KH, 1, 0)
    start = pid_k * CHUNK
    end = tl.minimum(start + CHUNK, TOTAL)
    acc = tl.zeros([BLOCK_P, QW, BLOCK_C], dtype=ACC)
    for p0 in range(start, end, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask_p = offs_p < end
        n = (offs_p // (Ho * Wo)).to(tl.int64)
        rem = offs_p % (Ho * Wo)
        i = rem // Wo
        j = rem % Wo
        g = tl.load(gy_ptr + (tl.multiple_of(n * stride_gn, ALIGN_G) + tl.multiple_of(i * stride_gh, ALIGN_G)
                              + tl.multiple_of(j * stride_gw, ALIGN_G))[:, None] + gy_chan,
                    mask=mask_p[:, None] & mask_c[None, :], other=0.0).to(ACC)
        h = i * conv_sh + tap_h
        w = j[:, None] * conv_sw + tap_w[None, :]
        ok = (mask_p & (h >= 0) & (h < H))[:, None] & tap_ok[None, :] & (w >= 0) & (w < W)
        x_pix = ((tl.multiple_of(n * stride_xn, ALIGN_X) + tl.multiple_of(h * stride_xh, ALIGN_X)
                  + tl.multiple_of(j * conv_sw * stride_xw, ALIGN_X))[:, None]
                 + tl.multiple_of(tap_w * stride_xw, ALIGN_X)[None, :])
        xv = tl.load(x_ptr + x_pix[:, :, None] + x_chan, mask=ok[:, :, None] & mask_c[None, None, :],
                     other=0.0).to(ACC)
        if HAS_BIAS:
            xv = tl.where(is_bias[None, :, None], 1.0, xv)
            ok = ok | (mask_p[:, None] & is_bias[None, :])
        # Taps in the padding add nothing, rather than grad_y * 0 (NaN for an infinite or NaN grad_y),
        # as torch's float32 CPU kernel and the C++ and Numba backends do.
        acc += tl.where(ok[:, :, None], g[:, None, :] * xv, 0.0)
    ncol = KH * KW + HAS_BIAS
    col = r * KW + offs_q
    part = part_ptr + pid_k.to(tl.int64) * C_out * ncol + (offs_c * ncol)[None, :] + col[:, None]
    tl.store(part, tl.sum(acc, axis=0), mask=(tap_ok | is_bias)[:, None] & mask_c[None, :])


@triton.jit
def _dw_bwd_weight_reduce_kernel(part_ptr, gw_ptr, gb_ptr, R, NUM_CHUNKS,
                                 NTAP: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
                                 BLOCK_R: tl.constexpr):
    # Sums part[:, r] over the chunks in a fixed order (deterministic) and scatters column r =
    # c * NCOL + tap into grad_weight[c, tap] or, for tap == NTAP, grad_bias[c].
    NCOL: tl.constexpr = NTAP + HAS_BIAS
    offs = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask = offs < R
    acc = tl.zeros([BLOCK_R], dtype=ACC)
    ptrs = part_ptr + offs
    for _ in range(0, NUM_CHUNKS):
        acc += tl.load(ptrs, mask=mask, other=0.0)
        ptrs += R  # pointer arithmetic is 64-bit: no int32 overflow of k * R
    c = offs // NCOL
    t = offs % NCOL
    tl.store(gw_ptr + c * NTAP + t, acc.to(gw_ptr.dtype.element_ty), mask=mask & (t < NTAP))
    if HAS_BIAS:
        tl.store(gb_ptr + c, acc.to(gb_ptr.dtype.element_ty), mask=mask & (t == NTAP))


_BWD_W_KEY = ["C_out", "M", "Ho", "Wo", "CHUNK", "KH", "KW", "conv_sh", "conv_sw"]
# The weight gradient's tiles are [BLOCK_P, QW, BLOCK_C]: smaller pixel-channel blocks than the
# forward's, so that a 5x5 window's 8-wide tap axis still fits the registers (see _prune_wgrad).
_WGRAD_CL = [(32, 32, 4), (16, 64, 4), (64, 32, 8), (32, 64, 8), (16, 128, 8), (8, 128, 4)]
_WGRAD_NCHW = [(128, 1, 4), (256, 1, 4), (512, 1, 8), (128, 2, 4), (64, 4, 4)]
_ACC_REGS = 64  # fp32 accumulator registers a thread may hold


def _prune_wgrad(configs, named_args, **kwargs):
    """Drop configs whose accumulator tile would spill: BLOCK_P * QW * BLOCK_C over the threads."""
    qw = kwargs["QW"]

    def regs(c):
        return c.kwargs["BLOCK_P"] * qw * c.kwargs["BLOCK_C"] // (32 * c.num_warps)

    return [c for c in configs if regs(c) <= _ACC_REGS] or [min(configs, key=regs)]


_dw_bwd_weight_cl = TunedKernel(_dw_bwd_weight_partial_kernel, _configs(_WGRAD_CL), _BWD_W_KEY,
                                dict(BLOCK_P=32, BLOCK_C=16), prune_configs_by={"early_config_prune": _prune_wgrad})
_dw_bwd_weight_nchw = TunedKernel(_dw_bwd_weight_partial_kernel, _configs(_WGRAD_NCHW), _BWD_W_KEY,
                                  dict(BLOCK_P=64, BLOCK_C=2), prune_configs_by={"early_config_prune": _prune_wgrad})
_dw_bwd_weight_reduce = TunedKernel(_dw_bwd_weight_reduce_kernel,
                                    [cfg(BLOCK_R=256), cfg(BLOCK_R=1024, num_warps=8)], ["R", "NUM_CHUNKS"],
                                    dict(BLOCK_R=256))

# pixels per reduction chunk: a multiple of every BLOCK_P above, so chunks never split a block
_CHUNK_QUANTUM = 512


def depthwise_bwd_weight(grad_y, x, kernel_hw, stride, pad, dilation, need_bias):
    n, c_out, ho, wo = grad_y.shape
    _, c, h, w = x.shape
    kh, kw = kernel_hw
    total = n * ho * wo
    # Enough chunks to fill the GPU together with the channel blocks, each a few blocks long; the
    # channel-block count depends on the tuned BLOCK_C, so aim at the smallest (1 for NCHW).
    cl = is_channels_last(x)
    ntap = kh * kw
    ncol = ntap + int(need_bias)
    # Taps a program: channels_last, a window row (grad_y loaded once for its KW taps: the Xception
    # middle fwd+bwd 230 -> 227 us, MobileNetV2 5x5 984 -> 929 us on the H200); NCHW, one (a
    # program a window row, with 1-4 channels a block, had 2.5x fewer programs, each 3x longer:
    # the MobileNetV2 NCHW fwd+bwd went from 1.15 to 2.35 ms, the Xception middle from 0.46 to 0.72).
    qw = next_pow2(kw) if cl else 1
    groups = kh * cdiv(kw, qw) + int(need_bias)  # programs per (channel block, chunk)
    c_blocks_min = cdiv(c_out, 128) if cl else c_out
    want = max(1, cdiv(target_programs(x.device), c_blocks_min * groups))
    chunk = max(_CHUNK_QUANTUM, cdiv(cdiv(total, want), _CHUNK_QUANTUM) * _CHUNK_QUANTUM)
    num_chunks = cdiv(total, chunk)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    part = torch.empty((num_chunks, c_out * ncol), dtype=acc, device=x.device)
    kernel = _dw_bwd_weight_cl if cl else _dw_bwd_weight_nchw
    grid = lambda META: (groups, cdiv(c_out, META["BLOCK_C"]), num_chunks)
    kernel(grid, grad_y, x, part,
           c_out, c_out // c, h, w, ho, wo, total, chunk, kh, kw,
           *grad_y.stride(), *x.stride(),
           stride[0], stride[1], pad[0], pad[1], dilation[0], dilation[1],
           QW=qw, HAS_BIAS=bool(need_bias), ACC=acc_dtype(x.dtype),
           ALIGN_G=pixel_align(grad_y),
           ALIGN_X=pixel_align(x), ALIGN_C=align_of(c_out))
    gw = torch.empty((c_out, 1, kh, kw), dtype=x.dtype, device=x.device)
    gb = torch.empty((c_out,), dtype=x.dtype, device=x.device) if need_bias else None
    r = c_out * ncol
    grid_r = lambda META: (cdiv(r, META["BLOCK_R"]),)
    _dw_bwd_weight_reduce(grid_r, part, gw, gb if gb is not None else gw, r, num_chunks,
                          NTAP=ntap, HAS_BIAS=bool(need_bias), ACC=acc_dtype(x.dtype))
    return gw, gb
