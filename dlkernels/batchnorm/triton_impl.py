"""Triton kernels for batch_norm_residual (the contract is op.py's docstring).

Every kernel walks x3 (N, C, S) in 3-D tiles [BLOCK_N, BLOCK_C, BLOCK_S] addressed through
(stride_xn, stride_xc, stride_xs), so one kernel serves the NCS and the channels-last layout: the
launcher only picks which tile axis is long (the contiguous one, S or C). residual3, grad_y3, y3
and the outputs share x3's strides. Arithmetic runs in the statistics dtype (float32, or float64
for float64 inputs), which is the dtype of the per-channel vectors.

The two reductions (bn_stats, bn_backward_reduce) are two-level: grid axis 0 is a block of
channels, axis 1 a split of the (N, S) tiles; each program writes its per-channel partial result
and a second small kernel combines the splits, so the result does not depend on atomics.

NCS planes that would break the tiles' vectors (short, or not a multiple of 16 elements) take flat
kernels instead, which read each image's C*S elements as one run (_flat_tile): the elementwise
passes always there, the reductions where the plane is long and has no factor 4 (_flat_reduction).
"""
from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from .._triton_common import MAX_GRID_YZ as _MAX_GRID_YZ
from .._triton_common import launch as _launch
from .._triton_common import align_of, cdiv, next_pow2, target_programs

# Elements per tile: 16 per thread at 4 warps, enough loads in flight to stream HBM.
_TILE = 2048
_NUM_WARPS = 4
# Longest run of channels along a channels-last row that one tile covers.
_MAX_BLOCK_C_CONTIG = 128
# Second level of the reductions: [splits x channels] tiles, so many channels' programs each merge
# many splits per step.
_MERGE_SPLITS = 32
_MERGE_C = 32


# ---------------------------------------------------------------------------------------------
# shared device helpers
# ---------------------------------------------------------------------------------------------
@triton.jit
def _tile(t, pid_c, N, C, S, n_sblocks, stride_xn, stride_xc, stride_xs,
          BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
          ALIGN_N: tl.constexpr, ALIGN_C: tl.constexpr, ALIGN_S: tl.constexpr,
          COUNT_C: tl.constexpr, COUNT_S: tl.constexpr):
    """Offsets and mask of tile t of the (N, S) tiles, for channel block pid_c; and the channels."""
    nb = t // n_sblocks
    sb = t % n_sblocks
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_s = sb * BLOCK_S + tl.arange(0, BLOCK_S)
    # C and S as multiples of COUNT_* (their largest power-of-two factors): the masks are then known
    # constant over runs the loads can be vectorized by
    mask = (((offs_n < N)[:, None, None] & (offs_c < (C // COUNT_C) * COUNT_C)[None, :, None])
            & (offs_s < (S // COUNT_S) * COUNT_S)[None, None, :])
    # ALIGN_*: the largest power of two (<= 16) dividing each stride (_triton_common.align_of)
    offs = (tl.multiple_of(offs_n.to(tl.int64) * stride_xn, ALIGN_N)[:, None, None]
            + tl.multiple_of(offs_c.to(tl.int64) * stride_xc, ALIGN_C)[None, :, None]
            + tl.multiple_of(offs_s.to(tl.int64) * stride_xs, ALIGN_S)[None, None, :])
    return offs, mask, offs_c


@triton.jit
def _gather(ptr, c, mask_c):
    """A per-channel vector's values at channels c: a tile's channels shaped [1, BLOCK_C, 1] to
    broadcast over it, or one channel per element (the flat kernels)."""
    return tl.load(ptr + c, mask=mask_c, other=0.0)


@triton.jit
def _fold(mean_ptr, var_ptr, w_ptr, b_ptr, c, mask_c, eps, eps32, HAS_WEIGHT: tl.constexpr,
          HAS_BIAS: tl.constexpr):
    """(scale, shift) of channels c (any shape: a tile's channel vector, or one per element),
    folded here rather than by a torch prologue: on a GPU the prologue's five small kernels (add,
    rsqrt, mul, mul, add) cost more than the apply pass itself at ResNet's later stages (2026-11-26,
    H200: 39 us for a 9.6 us floor at 2048x7x7). eps comes twice: as float64 (the kernels'
    annotation) for float64 statistics, and rounded to float32 (a plain float argument) for float32
    ones, as torch rounds it, so that the flat kernels' per-element fold stays in float32."""
    var = _gather(var_ptr, c, mask_c)
    if var.dtype == tl.float64:
        scale = tl.math.rsqrt(var + eps)
    else:
        scale = tl.math.rsqrt(var + eps32)
    if HAS_WEIGHT:
        scale = _gather(w_ptr, c, mask_c) * scale
    shift = -_gather(mean_ptr, c, mask_c) * scale
    if HAS_BIAS:
        shift += _gather(b_ptr, c, mask_c)
    return scale, shift


@triton.jit
def _load(ptr, offs, mask, ct):
    return tl.load(ptr + offs, mask=mask, other=0.0).to(ct)


@triton.jit
def _pre_activation(x, r_ptr, offs, mask, scale, shift, HAS_RESIDUAL: tl.constexpr):
    """z = x * scale + shift (+ residual), in the statistics dtype."""
    z = x * scale + shift
    if HAS_RESIDUAL:
        z += _load(r_ptr, offs, mask, scale.dtype)
    return z


@triton.jit
def _activate(z, ACTIVATION: tl.constexpr):
    if ACTIVATION == "relu":
        # where(z < 0, ...) keeps NaN, as torch.relu does
        z = tl.where(z < 0, 0.0, z)
    elif ACTIVATION == "silu":
        z = z / (1.0 + tl.exp(-z))
    return z


@triton.jit
def _grad_pre_activation(gy_ptr, y_ptr, x_ptr, r_ptr, offs, mask, scale, shift,
                         HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr):
    """dz = grad_y * act'(z), and x, both in the statistics dtype."""
    ct = scale.dtype
    gy = _load(gy_ptr, offs, mask, ct)
    x = _load(x_ptr, offs, mask, ct)
    if ACTIVATION == "relu":
        # compared after conversion: exact, and the interpreter cannot compare bfloat16 directly
        dz = tl.where(_load(y_ptr, offs, mask, ct) <= 0, tl.zeros_like(gy), gy)
    elif ACTIVATION == "silu":
        z = _pre_activation(x, r_ptr, offs, mask, scale, shift, HAS_RESIDUAL)
        sig = 1.0 / (1.0 + tl.exp(-z))
        dz = gy * (sig * (1.0 + z * (1.0 - sig)))
    else:
        dz = gy
    return dz, x


@triton.jit
def _stats_shift(x_ptr, offs_c, C, stride_xc, ct):
    """x[0, c, 0], the per-channel shift the statistics are accumulated around: data near it
    subtract exactly (Sterbenz), so a mean far from zero costs no precision in the variance.
    Infinite or NaN samples give shift 0 (they make the statistics inf/NaN anyway)."""
    shift = _load(x_ptr, offs_c.to(tl.int64) * stride_xc, offs_c < C, ct)
    return tl.where(shift - shift == 0, shift, 0.0)


@triton.jit
def _welford_combine(mean_a, m2_a, n_a, mean_b, m2_b, n_b):
    """Chan et al.'s merge of two (mean, M2, count) summaries; empty ones (count 0) are neutral."""
    n = n_a + n_b
    w_b = tl.where(n == 0, 0.0, n_b / tl.where(n == 0, 1.0, n))
    delta = mean_b - mean_a
    return mean_a + delta * w_b, m2_a + m2_b + delta * delta * n_a * w_b, n


@triton.jit
def _welford_merge_axis(mean, m2, cnt, axis: tl.constexpr):
    """All (mean, M2, count) summaries along ``axis`` merged at once: the total mean is the
    count-weighted mean, and M2 gains each part's count * (its mean - total mean)^2. Plain sums,
    cheaper than a tuple tl.reduce (and far faster in the interpreter, which runs a custom combine
    function element by element)."""
    n = tl.sum(cnt, axis)
    mean_all = tl.sum(cnt * mean, axis) / tl.where(n == 0, 1.0, n)
    d = mean - tl.expand_dims(mean_all, axis)
    return mean_all, tl.sum(m2 + cnt * d * d, axis), n


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _stats_partial_kernel(
    x_ptr, part_mean_ptr, part_m2_ptr, part_n_ptr,
    N, C, S, stride_xn, stride_xc, stride_xs, n_sblocks, n_tiles, tiles_per_split,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    ALIGN_N: tl.constexpr, ALIGN_C: tl.constexpr, ALIGN_S: tl.constexpr,
    COUNT_C: tl.constexpr, COUNT_S: tl.constexpr,
):
    """Welford over this split's tiles of x - shift[c]: every tile slot keeps its own running
    (mean, M2, count), so the loop does no reductions; the slots are merged
    at the end and written (still shifted) to part_*[split, c]."""
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    ct = part_mean_ptr.dtype.element_ty
    shift = _stats_shift(x_ptr, pid_c * BLOCK_C + tl.arange(0, BLOCK_C), C, stride_xc, ct)[None, :, None]
    mean = tl.zeros((BLOCK_N, BLOCK_C, BLOCK_S), dtype=ct)
    m2 = tl.zeros((BLOCK_N, BLOCK_C, BLOCK_S), dtype=ct)
    cnt = tl.zeros((BLOCK_N, BLOCK_C, BLOCK_S), dtype=ct)
    t_start = pid_s * tiles_per_split
    t_end = min(t_start + tiles_per_split, n_tiles)
    for t in range(t_start, t_end):
        offs, mask, offs_c = _tile(t, pid_c, N, C, S, n_sblocks, stride_xn, stride_xc, stride_xs,
                                   BLOCK_N, BLOCK_C, BLOCK_S, ALIGN_N, ALIGN_C, ALIGN_S, COUNT_C, COUNT_S)
        x = _load(x_ptr, offs, mask, ct) - shift
        cnt_new = cnt + mask.to(ct)
        delta = x - mean
        mean = tl.where(mask, mean + delta / tl.where(mask, cnt_new, 1.0), mean)
        m2 = tl.where(mask, m2 + delta * (x - mean), m2)
        cnt = cnt_new
    mean, m2, cnt = _welford_merge_axis(mean, m2, cnt, 2)
    mean, m2, cnt = _welford_merge_axis(mean, m2, cnt, 0)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    out = pid_s * C + offs_c
    mask_c = offs_c < C
    tl.store(part_mean_ptr + out, mean, mask=mask_c)
    tl.store(part_m2_ptr + out, m2, mask=mask_c)
    tl.store(part_n_ptr + out, cnt, mask=mask_c)


@triton.jit
def _split_rows(offs_s, offs_c, n_splits, C, J, S, FLAT_BLOCK, FLAT: tl.constexpr):
    """Mask of the [splits x channels] partial entries that hold a summary. The tiled reductions
    write every entry; the flat ones (see _flat_reduction) write row n*J + j of channel c for the
    j-th block of image n that c's plane touches, and c's plane touches fewer than J of them."""
    m = (offs_s < n_splits)[:, None] & (offs_c < C)[None, :]
    if FLAT:
        touched = (offs_c * S + S - 1) // FLAT_BLOCK - (offs_c * S) // FLAT_BLOCK + 1
        m = m & ((offs_s % J)[:, None] < touched[None, :])
    return m


@triton.jit
def _stats_merge_kernel(x_ptr, part_mean_ptr, part_m2_ptr, part_n_ptr, mean_ptr, var_ptr, C, stride_xc,
                        n_splits, J, S, FLAT_BLOCK, FLAT: tl.constexpr,
                        BLOCK_SPLIT: tl.constexpr, BLOCK_C: tl.constexpr):
    """Merges the splits' summaries BLOCK_SPLIT at a time (hundreds of splits for channels-last:
    one at a time, two programs took 35 us on an H200)."""
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = offs_c < C
    ct = mean_ptr.dtype.element_ty
    mean = tl.zeros((BLOCK_C,), dtype=ct)
    m2 = tl.zeros((BLOCK_C,), dtype=ct)
    cnt = tl.zeros((BLOCK_C,), dtype=ct)
    for s0 in range(0, n_splits, BLOCK_SPLIT):
        offs_s = s0 + tl.arange(0, BLOCK_SPLIT)
        offs = offs_s[:, None] * C + offs_c[None, :]
        m = _split_rows(offs_s, offs_c, n_splits, C, J, S, FLAT_BLOCK, FLAT)
        # empty (masked) summaries have count 0: neutral in the merge
        mean_b, m2_b, n_b = _welford_merge_axis(tl.load(part_mean_ptr + offs, mask=m, other=0.0),
                                                tl.load(part_m2_ptr + offs, mask=m, other=0.0),
                                                tl.load(part_n_ptr + offs, mask=m, other=0.0), 0)
        mean, m2, cnt = _welford_combine(mean, m2, cnt, mean_b, m2_b, n_b)
    tl.store(mean_ptr + offs_c, mean + _stats_shift(x_ptr, offs_c, C, stride_xc, ct), mask=mask)
    tl.store(var_ptr + offs_c, m2 / tl.where(mask, cnt, 1.0), mask=mask)


@triton.jit
def _flat_tile(C, S: tl.constexpr, ALIGN_IMG: tl.constexpr, BLOCK: tl.constexpr):
    """Offsets, mask and channel of each element of flat block program_id(0) of image
    program_id(1), in an NCS-contiguous x3. The image's C*S elements are one contiguous run, so
    every load is a full-width vector whatever S is; S is constexpr so that the channel i // S
    is a multiply-shift, not a division (the 3-D tiles pad short planes: S = 49 ran 5x slower
    than channels-last on an H200, 2026-11-26). The image's length is written as a multiple of
    ALIGN_IMG, its known factor, for the mask to be constant over a vector: at 728 channels (C not
    a multiple of 16) of 19x19 every load and store was scalar (the PTX for sm_90; 45 % of copy on
    an H100, 2026-11-26)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    n = tl.program_id(1).to(tl.int64)
    mask = i < ((C * S) // ALIGN_IMG) * ALIGN_IMG
    return tl.multiple_of(n * (C * S), ALIGN_IMG) + i, mask, i // S


@triton.jit
def _flat_block(S: tl.constexpr, J, BLOCK: tl.constexpr):
    """(b, c0, row0) of flat block b = program_id(0) of image n = program_id(1): the first channel
    it touches, and n*J + b, from which each channel's row in the [N*J, C] partials is counted
    (_store_flat_summary). A block touches at most K = (BLOCK - 1) // S + 2 channels, c0 + k."""
    b = tl.program_id(0)
    return b, b * BLOCK // S, tl.program_id(1) * J + b


@triton.jit
def _store_flat_summary(ptr, value, ck, b, row0, C, S: tl.constexpr, BLOCK: tl.constexpr):
    """value, block b's summary of channel ck (>= the block's first channel), at row
    row0 - (the first block of ck's plane) of the [N*J, C] partials, if the block touches ck."""
    touches = (ck < C) & (ck * S < (b + 1) * BLOCK)
    tl.store(ptr + (row0 - (ck * S) // BLOCK) * C + ck, value, mask=touches)


@triton.jit
def _stats_partial_flat_kernel(x_ptr, part_mean_ptr, part_m2_ptr, part_n_ptr, C, S: tl.constexpr, J,
                               ALIGN_IMG: tl.constexpr, BLOCK: tl.constexpr):
    """Per-channel Welford summaries (mean, M2, count) of one flat block (see _flat_tile) around each
    channel's shift, two-pass over the block's values in registers."""
    K: tl.constexpr = (BLOCK - 1) // S + 2
    offs, mask, c = _flat_tile(C, S, ALIGN_IMG, BLOCK)
    ct = part_mean_ptr.dtype.element_ty
    x = _load(x_ptr, offs, mask, ct)
    b, c0, row0 = _flat_block(S, J, BLOCK)
    for k in tl.static_range(K):
        ck = c0 + k
        sel = mask & (c == ck)
        xs = tl.where(sel, x - _stats_shift(x_ptr, ck, C, S, ct), 0.0)
        cnt = tl.sum(sel.to(ct), 0)
        mean = tl.sum(xs, 0) / tl.maximum(cnt, 1.0)
        d = tl.where(sel, xs - mean, 0.0)
        _store_flat_summary(part_mean_ptr, mean, ck, b, row0, C, S, BLOCK)
        _store_flat_summary(part_m2_ptr, tl.sum(d * d, 0), ck, b, row0, C, S, BLOCK)
        _store_flat_summary(part_n_ptr, cnt, ck, b, row0, C, S, BLOCK)


@triton.jit
def _backward_reduce_partial_flat_kernel(
    gy_ptr, y_ptr, x_ptr, r_ptr, mean_ptr, invstd_ptr, scale_ptr, shift_ptr,
    part_dz_ptr, part_dzx_ptr, dz_ptr, C, S: tl.constexpr, J,
    HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr, WRITE_DZ: tl.constexpr,
    ALIGN_IMG: tl.constexpr, BLOCK: tl.constexpr,
):
    """_backward_reduce_partial_kernel's sums over one flat block, per channel it touches."""
    K: tl.constexpr = (BLOCK - 1) // S + 2
    offs, mask, c = _flat_tile(C, S, ALIGN_IMG, BLOCK)
    scale = _gather(scale_ptr, c, mask)
    dz, x = _grad_pre_activation(gy_ptr, y_ptr, x_ptr, r_ptr, offs, mask, scale,
                                 _gather(shift_ptr, c, mask), HAS_RESIDUAL, ACTIVATION)
    dz = tl.where(mask, dz, 0.0)
    if WRITE_DZ:
        tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)
    dzx = dz * ((x - _gather(mean_ptr, c, mask)) * _gather(invstd_ptr, c, mask))
    b, c0, row0 = _flat_block(S, J, BLOCK)
    for k in tl.static_range(K):
        ck = c0 + k
        sel = c == ck
        _store_flat_summary(part_dz_ptr, tl.sum(tl.where(sel, dz, 0.0), 0), ck, b, row0, C, S, BLOCK)
        _store_flat_summary(part_dzx_ptr, tl.sum(tl.where(sel, dzx, 0.0), 0), ck, b, row0, C, S, BLOCK)


@triton.jit
def _apply_body(x_ptr, r_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, y_ptr, eps, eps32, offs, mask, c, mask_c,
                HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                HAS_BIAS: tl.constexpr):
    scale, shift = _fold(mean_ptr, var_ptr, w_ptr, b_ptr, c, mask_c, eps, eps32, HAS_WEIGHT, HAS_BIAS)
    z = _pre_activation(_load(x_ptr, offs, mask, scale.dtype), r_ptr, offs, mask, scale, shift, HAS_RESIDUAL)
    tl.store(y_ptr + offs, _activate(z, ACTIVATION).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _apply_kernel(
    x_ptr, r_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, y_ptr, eps: tl.float64, eps32,
    N, C, S, stride_xn, stride_xc, stride_xs, n_sblocks, n_cblocks,
    HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    ALIGN_N: tl.constexpr, ALIGN_C: tl.constexpr, ALIGN_S: tl.constexpr,
    COUNT_C: tl.constexpr, COUNT_S: tl.constexpr,
):
    pid = tl.program_id(0)
    offs, mask, offs_c = _tile(pid // n_cblocks, pid % n_cblocks, N, C, S, n_sblocks,
                               stride_xn, stride_xc, stride_xs, BLOCK_N, BLOCK_C, BLOCK_S,
                               ALIGN_N, ALIGN_C, ALIGN_S, COUNT_C, COUNT_S)
    c = offs_c[None, :, None]
    _apply_body(x_ptr, r_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, y_ptr, eps, eps32, offs, mask, c, c < C,
                HAS_RESIDUAL, ACTIVATION, HAS_WEIGHT, HAS_BIAS)


@triton.jit
def _apply_flat_kernel(
    x_ptr, r_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, y_ptr, eps: tl.float64, eps32, C, S: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    ALIGN_IMG: tl.constexpr, BLOCK: tl.constexpr,
):
    offs, mask, c = _flat_tile(C, S, ALIGN_IMG, BLOCK)
    _apply_body(x_ptr, r_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, y_ptr, eps, eps32, offs, mask, c, mask,
                HAS_RESIDUAL, ACTIVATION, HAS_WEIGHT, HAS_BIAS)


@triton.jit
def _backward_reduce_partial_kernel(
    gy_ptr, y_ptr, x_ptr, r_ptr, mean_ptr, invstd_ptr, scale_ptr, shift_ptr,
    part_dz_ptr, part_dzx_ptr, dz_ptr,
    N, C, S, stride_xn, stride_xc, stride_xs, n_sblocks, n_tiles, tiles_per_split,
    HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr, WRITE_DZ: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    ALIGN_N: tl.constexpr, ALIGN_C: tl.constexpr, ALIGN_S: tl.constexpr,
    COUNT_C: tl.constexpr, COUNT_S: tl.constexpr,
):
    """Per-split sums of dz and dz * xhat, written to part_*[split, c]. xhat is formed per element
    from the given mean, so large means do not cancel in sum(dz * x) - mean * sum(dz). dz itself
    goes to dz_ptr when WRITE_DZ."""
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c = offs_c[None, :, None]
    mean = _gather(mean_ptr, c, c < C)
    invstd = _gather(invstd_ptr, c, c < C)
    scale = _gather(scale_ptr, c, c < C)
    shift = _gather(shift_ptr, c, c < C)
    acc_dz = tl.zeros((BLOCK_N, BLOCK_C, BLOCK_S), dtype=scale.dtype)
    acc_dzx = tl.zeros((BLOCK_N, BLOCK_C, BLOCK_S), dtype=scale.dtype)
    t_start = pid_s * tiles_per_split
    t_end = min(t_start + tiles_per_split, n_tiles)
    for t in range(t_start, t_end):
        offs, mask, offs_c = _tile(t, pid_c, N, C, S, n_sblocks, stride_xn, stride_xc, stride_xs,
                                   BLOCK_N, BLOCK_C, BLOCK_S, ALIGN_N, ALIGN_C, ALIGN_S, COUNT_C, COUNT_S)
        dz, x = _grad_pre_activation(gy_ptr, y_ptr, x_ptr, r_ptr, offs, mask, scale, shift,
                                     HAS_RESIDUAL, ACTIVATION)
        dz = tl.where(mask, dz, 0.0)
        if WRITE_DZ:
            tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)
        acc_dz += dz
        acc_dzx += dz * ((x - mean) * invstd)
    out = pid_s * C + offs_c
    mask_c = offs_c < C
    tl.store(part_dz_ptr + out, tl.sum(tl.sum(acc_dz, axis=2), axis=0), mask=mask_c)
    tl.store(part_dzx_ptr + out, tl.sum(tl.sum(acc_dzx, axis=2), axis=0), mask=mask_c)


@triton.jit
def _sum_splits_kernel(part_a_ptr, part_b_ptr, out_a_ptr, out_b_ptr, C, n_splits, J, S, FLAT_BLOCK,
                       FLAT: tl.constexpr, BLOCK_SPLIT: tl.constexpr, BLOCK_C: tl.constexpr):
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = offs_c < C
    acc_a = tl.zeros((BLOCK_SPLIT, BLOCK_C), dtype=out_a_ptr.dtype.element_ty)
    acc_b = tl.zeros((BLOCK_SPLIT, BLOCK_C), dtype=out_b_ptr.dtype.element_ty)
    for s0 in range(0, n_splits, BLOCK_SPLIT):
        offs_s = s0 + tl.arange(0, BLOCK_SPLIT)
        offs = offs_s[:, None] * C + offs_c[None, :]
        m = _split_rows(offs_s, offs_c, n_splits, C, J, S, FLAT_BLOCK, FLAT)
        acc_a += tl.load(part_a_ptr + offs, mask=m, other=0.0)
        acc_b += tl.load(part_b_ptr + offs, mask=m, other=0.0)
    tl.store(out_a_ptr + offs_c, tl.sum(acc_a, axis=0), mask=mask)
    tl.store(out_b_ptr + offs_c, tl.sum(acc_b, axis=0), mask=mask)


@triton.jit
def _backward_apply_body(gy_ptr, y_ptr, x_ptr, r_ptr, mean_ptr, invstd_ptr, scale_ptr, shift_ptr, c_dz_ptr,
                         c_xhat_ptr, gx_ptr, gr_ptr, offs, mask, c, mask_c,
                         HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr, NEED_GRAD_RESIDUAL: tl.constexpr,
                         CENTRE: tl.constexpr):
    scale = _gather(scale_ptr, c, mask_c)
    dz, x = _grad_pre_activation(gy_ptr, y_ptr, x_ptr, r_ptr, offs, mask, scale,
                                 _gather(shift_ptr, c, mask_c), HAS_RESIDUAL, ACTIVATION)
    if CENTRE:  # training
        xhat = (x - _gather(mean_ptr, c, mask_c)) * _gather(invstd_ptr, c, mask_c)
        gx = scale * (dz - _gather(c_dz_ptr, c, mask_c) - xhat * _gather(c_xhat_ptr, c, mask_c))
    else:  # evaluation: x not read (an infinite x would make it inf * 0)
        gx = scale * dz
    tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=mask)
    if NEED_GRAD_RESIDUAL:
        tl.store(gr_ptr + offs, dz.to(gr_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_apply_kernel(
    gy_ptr, y_ptr, x_ptr, r_ptr, mean_ptr, invstd_ptr, scale_ptr, shift_ptr, c_dz_ptr, c_xhat_ptr,
    gx_ptr, gr_ptr,
    N, C, S, stride_xn, stride_xc, stride_xs, n_sblocks, n_cblocks,
    HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr, NEED_GRAD_RESIDUAL: tl.constexpr, CENTRE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    ALIGN_N: tl.constexpr, ALIGN_C: tl.constexpr, ALIGN_S: tl.constexpr,
    COUNT_C: tl.constexpr, COUNT_S: tl.constexpr,
):
    pid = tl.program_id(0)
    offs, mask, offs_c = _tile(pid // n_cblocks, pid % n_cblocks, N, C, S, n_sblocks,
                               stride_xn, stride_xc, stride_xs, BLOCK_N, BLOCK_C, BLOCK_S,
                               ALIGN_N, ALIGN_C, ALIGN_S, COUNT_C, COUNT_S)
    c = offs_c[None, :, None]
    _backward_apply_body(gy_ptr, y_ptr, x_ptr, r_ptr, mean_ptr, invstd_ptr, scale_ptr, shift_ptr, c_dz_ptr,
                         c_xhat_ptr, gx_ptr, gr_ptr, offs, mask, c, c < C,
                         HAS_RESIDUAL, ACTIVATION, NEED_GRAD_RESIDUAL, CENTRE)


@triton.jit
def _backward_apply_flat_kernel(
    gy_ptr, y_ptr, x_ptr, r_ptr, mean_ptr, invstd_ptr, scale_ptr, shift_ptr, c_dz_ptr, c_xhat_ptr,
    gx_ptr, gr_ptr, C, S: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr, NEED_GRAD_RESIDUAL: tl.constexpr, CENTRE: tl.constexpr,
    ALIGN_IMG: tl.constexpr, BLOCK: tl.constexpr,
):
    offs, mask, c = _flat_tile(C, S, ALIGN_IMG, BLOCK)
    _backward_apply_body(gy_ptr, y_ptr, x_ptr, r_ptr, mean_ptr, invstd_ptr, scale_ptr, shift_ptr, c_dz_ptr,
                         c_xhat_ptr, gx_ptr, gr_ptr, offs, mask, c, mask,
                         HAS_RESIDUAL, ACTIVATION, NEED_GRAD_RESIDUAL, CENTRE)


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------
def _np2(v: int) -> int:
    # at least 1, so that an empty tensor still gets a valid geometry
    return next_pow2(max(1, v))


class _Geometry:
    """Tile sizes and tile counts for one x3: the long tile axis is the contiguous one."""

    def __init__(self, x3: torch.Tensor):
        n, c, s = x3.shape
        self.n, self.c, self.s = n, c, s
        self.strides = x3.stride()
        if self.strides[1] == 1 and c > 1:
            # channels-last: a tile row is a run of channels, several (n, s) positions deep
            bc = min(_np2(c), _MAX_BLOCK_C_CONTIG)
            bs = min(_np2(s), max(1, _TILE // bc))
        else:
            # NCS: a tile row is a run of S; short S packs several channels into the tile
            bs = min(_np2(s), _TILE)
            bc = min(_np2(c), max(1, _TILE // bs))
        bn = min(_np2(n), max(1, _TILE // (bc * bs)))
        self.blocks = dict(BLOCK_N=bn, BLOCK_C=bc, BLOCK_S=bs, ALIGN_N=align_of(self.strides[0]),
                           ALIGN_C=align_of(self.strides[1]), ALIGN_S=align_of(self.strides[2]),
                           COUNT_C=align_of(c), COUNT_S=align_of(s))
        self.n_sblocks = cdiv(s, bs)
        self.n_tiles = cdiv(n, bn) * self.n_sblocks
        self.n_cblocks = cdiv(c, bc)

    def dims(self):
        return (self.n, self.c, self.s, *self.strides, self.n_sblocks)

    def splits(self, device: torch.device) -> tuple[int, int]:
        """(number of splits, tiles per split) for a two-level reduction."""
        target = target_programs(device)
        splits = max(1, min(self.n_tiles, cdiv(target, self.n_cblocks), _MAX_GRID_YZ))
        per_split = cdiv(self.n_tiles, splits)
        return cdiv(self.n_tiles, per_split), per_split


def _flat_geometry(x3: torch.Tensor):
    """(grid, meta) of the flat kernels (see _flat_tile) for an NCS-contiguous x3 whose planes are
    short or not a multiple of 16 elements (where the 3-D tiles pad or split vectors), else None."""
    n, c, s = x3.shape
    if not x3.is_contiguous() or s == 1 or (s % 16 == 0 and s >= 256):
        return None
    if c * s >= 2 ** 31 or n > _MAX_GRID_YZ:  # int32 offsets within an image; grid axis 1
        return None
    return (cdiv(c * s, _TILE), n), dict(S=s, ALIGN_IMG=align_of(c * s), BLOCK=_TILE, num_warps=_NUM_WARPS)


def _flat_reduction(x3: torch.Tensor):
    """(grid, meta, J) of the flat reductions for an x3 the flat kernels take (_flat_geometry) whose
    planes are at least 128 elements long and have no factor 4 (19x19, 75x75), else None. There the
    3-D tiles load every element alone (the sm_90 PTX of the statistics pass at 75x75 and 19x19 had
    only scalar loads; batch norm training at 43-44 % of copy on an H100, 2026-11-26). A flat block
    reads the image as one run of vectors and sums each channel it touches apart. BLOCK is the
    largest power of two within 2*S (at most _TILE), so a block touches at most
    K = (BLOCK - 1) // S + 2 = 3 channels, and a channel's plane at most J = (S - 1) // BLOCK + 2
    blocks of an image: row n*J + j of the [N*J, C] partials holds its j-th block of image n, and
    the merge skips the rows a plane does not reach (_split_rows)."""
    n, c, s = x3.shape
    if s < 128 or align_of(s) > 2 or _flat_geometry(x3) is None:
        return None
    block = min(_TILE, 1 << ((2 * s).bit_length() - 1))
    meta = dict(S=s, ALIGN_IMG=align_of(c * s), BLOCK=block, num_warps=max(1, block // 512))
    return (cdiv(c * s, block), n), meta, (s - 1) // block + 2


def _launch_elementwise(flat_kernel, tiled_kernel, x3, geo: _Geometry, args: tuple, flags: dict) -> None:
    """One elementwise pass (apply, backward apply): its flat kernel where x3 suits it (see
    _flat_geometry), else its 3-D tiled one. Both take ``args`` first, then their geometry."""
    flat = _flat_geometry(x3)
    if flat is not None:
        grid, meta = flat
        _launch(flat_kernel, grid)(*args, geo.c, **flags, **meta)
    else:
        _launch(tiled_kernel, (geo.n_tiles * geo.n_cblocks,))(
            *args, *geo.dims(), geo.n_cblocks, **flags, **geo.blocks, num_warps=_NUM_WARPS)


def _float32(v: float) -> float:
    """v rounded to float32 (the value torch adds to a float32 tensor for a Python scalar)."""
    return struct.unpack("f", struct.pack("f", v))[0]


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _like_x(t, x3: torch.Tensor):
    """t with x3's strides (the kernels address every tensor through x3's strides). The contract
    gives them the same layout already; a size-1 dimension's stride is free, so compare the others."""
    if t is None:
        return None
    if all(size == 1 or st == sx for size, st, sx in zip(x3.shape, t.stride(), x3.stride())):
        return t
    out = torch.empty_like(x3, dtype=t.dtype)
    out.copy_(t)
    return out


def _new_like_x(x3: torch.Tensor) -> torch.Tensor:
    # x3 is dense in either layout, so empty_like keeps its strides exactly
    return torch.empty_like(x3)


def bn_stats(x3: torch.Tensor):
    geo = _Geometry(x3)
    sdt = _stats_dtype(x3.dtype)
    c = geo.c
    mean = torch.empty(c, dtype=sdt, device=x3.device)
    var = torch.empty(c, dtype=sdt, device=x3.device)
    if c == 0:
        return mean, var
    if geo.n_tiles == 0:
        # no elements: mean and variance are undefined, as in torch (0/0)
        return mean.fill_(float("nan")), var.fill_(float("nan"))
    flat = _flat_reduction(x3)
    if flat is not None:
        grid, meta, j = flat
        n_splits = geo.n * j
        parts = torch.empty((3, n_splits, c), dtype=sdt, device=x3.device)
        _launch(_stats_partial_flat_kernel, grid)(x3, parts[0], parts[1], parts[2], c, J=j, **meta)
    else:
        n_splits, per_split = geo.splits(x3.device)
        parts = torch.empty((3, n_splits, c), dtype=sdt, device=x3.device)
        _launch(_stats_partial_kernel, (geo.n_cblocks, n_splits))(
            x3, parts[0], parts[1], parts[2], *geo.dims(), geo.n_tiles, per_split,
            **geo.blocks, num_warps=_NUM_WARPS)
    _launch(_stats_merge_kernel, (cdiv(c, _MERGE_C),))(
        x3, parts[0], parts[1], parts[2], mean, var, c, x3.stride(1), n_splits, **_merge_rows(flat),
        BLOCK_SPLIT=_MERGE_SPLITS, BLOCK_C=_MERGE_C)
    return mean, var


def _merge_rows(flat) -> dict:
    """The merge kernels' description of the partial rows (_split_rows): from _flat_reduction, or
    every row for the tiled reductions."""
    if flat is None:
        return dict(J=1, S=1, FLAT_BLOCK=1, FLAT=False)
    _, meta, j = flat
    return dict(J=j, S=meta["S"], FLAT_BLOCK=meta["BLOCK"], FLAT=True)


def bn_apply(x3, residual3, mean, var, weight, bias, eps, activation):
    geo = _Geometry(x3)
    y3 = _new_like_x(x3)
    if x3.numel() == 0:
        return y3
    has_res = residual3 is not None
    residual3 = _like_x(residual3, x3)
    args = (x3, residual3 if has_res else x3, mean, var, mean if weight is None else weight,
            mean if bias is None else bias, y3, float(eps), _float32(eps))
    flags = dict(HAS_RESIDUAL=has_res, ACTIVATION=activation, HAS_WEIGHT=weight is not None,
                 HAS_BIAS=bias is not None)
    _launch_elementwise(_apply_flat_kernel, _apply_kernel, x3, geo, args, flags)
    return y3


def bn_backward_reduce(grad_y3, y3, x3, residual3, mean, invstd, scale, shift, activation, write_dz):
    geo = _Geometry(x3)
    c = geo.c
    # empty, not zeros: the kernels write every channel (a fill is one more kernel on a GPU)
    sum_dz = torch.empty(c, dtype=scale.dtype, device=x3.device)
    sum_dz_xhat = torch.empty(c, dtype=scale.dtype, device=x3.device)
    dz3 = _new_like_x(x3) if write_dz else None
    if c == 0 or geo.n_tiles == 0:
        return sum_dz.zero_(), sum_dz_xhat.zero_(), dz3
    has_res = residual3 is not None
    grad_y3, y3, residual3 = (_like_x(t, x3) for t in (grad_y3, y3, residual3))
    y3 = x3 if y3 is None else y3  # only "relu" reads y
    args = (grad_y3, y3, x3, residual3 if has_res else x3, mean, invstd, scale, shift)
    flags = dict(HAS_RESIDUAL=has_res, ACTIVATION=activation, WRITE_DZ=dz3 is not None)
    flat = _flat_reduction(x3)
    if flat is not None:
        grid, meta, j = flat
        n_splits = geo.n * j
        parts = torch.empty((2, n_splits, c), dtype=scale.dtype, device=x3.device)
        _launch(_backward_reduce_partial_flat_kernel, grid)(
            *args, parts[0], parts[1], parts[0] if dz3 is None else dz3, c, J=j, **flags, **meta)
    else:
        n_splits, per_split = geo.splits(x3.device)
        parts = torch.empty((2, n_splits, c), dtype=scale.dtype, device=x3.device)
        _launch(_backward_reduce_partial_kernel, (geo.n_cblocks, n_splits))(
            *args, parts[0], parts[1], parts[0] if dz3 is None else dz3, *geo.dims(), geo.n_tiles, per_split,
            **flags, **geo.blocks, num_warps=_NUM_WARPS)
    _launch(_sum_splits_kernel, (cdiv(c, _MERGE_C),))(
        parts[0], parts[1], sum_dz, sum_dz_xhat, c, n_splits, **_merge_rows(flat),
        BLOCK_SPLIT=_MERGE_SPLITS, BLOCK_C=_MERGE_C)
    return sum_dz, sum_dz_xhat, dz3


def bn_backward_apply(grad_y3, y3, x3, residual3, mean, invstd, scale, shift, c_dz, c_xhat,
                      activation, need_grad_residual):
    geo = _Geometry(x3)
    grad_x3 = _new_like_x(x3)
    grad_r3 = _new_like_x(x3) if need_grad_residual else None
    if x3.numel() == 0:
        return grad_x3, grad_r3
    has_res = residual3 is not None
    grad_y3, y3, residual3 = (_like_x(t, x3) for t in (grad_y3, y3, residual3))
    y3 = x3 if y3 is None else y3  # only "relu" reads y
    centre = c_dz is not None  # None in evaluation (see the contract): those pointers are then unread
    args = (grad_y3, y3, x3, residual3 if has_res else x3, mean, invstd, scale, shift,
            c_dz if centre else mean, c_xhat if centre else mean, grad_x3, grad_r3 if need_grad_residual else grad_x3)
    flags = dict(HAS_RESIDUAL=has_res, ACTIVATION=activation, NEED_GRAD_RESIDUAL=need_grad_residual, CENTRE=centre)
    _launch_elementwise(_backward_apply_flat_kernel, _backward_apply_kernel, x3, geo, args, flags)
    return grad_x3, grad_r3
