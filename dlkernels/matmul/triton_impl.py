"""Triton kernels for matmul/linear (the contract is op.py's docstring).

``mm`` is one tiled GEMM kernel: batch on grid axis 1, output tiles on axis 0 in grouped order,
K splits on axis 2, any strides (transposed views and stride-0 batches are read in place), bias
and ReLU fused into the epilogue. On a GPU it is autotuned; under TRITON_INTERPRET=1 (CPU) it runs
one fixed config, since tuning there would execute every config in the slow interpreter.

Split-K: a GEMM with few output tiles and a long K (a weight gradient, whose K is every pixel of the
batch) splits K over grid axis 2; each split writes its fp32 partial tile, and ``_sum_splits_kernel``
adds them and applies the bias and ReLU. No atomics, so results do not depend on the order in
which programs run.
``bias_act_backward`` is a two-level reduction: per-split partial bias sums (the ReLU mask is
applied and grad_pre written in the same pass), then one small kernel that adds the splits.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton_common import INTERPRET
from .._triton_common import MAX_GRID_YZ as _MAX_GRID_YZ
from .._triton_common import autotune
from .._triton_common import launch as _launch
from .._triton_common import align_of, batch_slices, cdiv, next_pow2, target_programs


# ---------------------------------------------------------------------------------------------
# GEMM
# ---------------------------------------------------------------------------------------------
def _cfg(bm, bn, bk, stages, warps, group_m=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m},
                         num_stages=stages, num_warps=warps)


# Hopper-sized tiles: the first five suit fp16/bf16 (and TF32 at BLOCK_K=32), the small ones cover
# skinny problems and float64, whose 8-byte operands leave room for fewer stages in shared memory.
_MM_CONFIGS = [
    _cfg(128, 256, 64, 3, 8),
    _cfg(128, 128, 64, 4, 8),
    _cfg(128, 256, 32, 3, 8),
    _cfg(64, 256, 32, 4, 4),
    _cfg(128, 128, 32, 4, 4),
    _cfg(128, 64, 32, 4, 4),
    _cfg(64, 128, 32, 4, 4),
    _cfg(64, 64, 32, 3, 4),
    _cfg(32, 64, 32, 5, 2),
]

# H100 has 228 KiB of shared memory per SM; leave room for the epilogue and the runtime.
_SMEM_BUDGET = 200 * 1024


def _prune_by_smem(configs, named_args, **kwargs):
    """Drop configs whose pipelined A/B tiles cannot fit in shared memory for this dtype (float64
    operands need twice float32's), instead of compiling them only to fail."""
    elem = named_args["a_ptr"].element_size()
    fits = [c for c in configs
            if (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"] * elem * c.num_stages
            <= _SMEM_BUDGET]
    return fits or [min(configs, key=lambda c: (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"])
                        * c.kwargs["BLOCK_K"] * c.num_stages)]


@triton.jit
def _mm_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, part_ptr,
    M, N, K, K_PER_SPLIT,
    stride_ab, stride_am, stride_ak,
    stride_bb, stride_bk, stride_bn,
    stride_cb, stride_cm, stride_cn,
    HAS_BIAS: tl.constexpr, BIAS_DIM: tl.constexpr, RELU: tl.constexpr, SPLIT_K: tl.constexpr,
    ACC_FP64: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    ALIGN_AB: tl.constexpr, ALIGN_AM: tl.constexpr, ALIGN_AK: tl.constexpr,
    ALIGN_BB: tl.constexpr, ALIGN_BK: tl.constexpr, ALIGN_BN: tl.constexpr, ALIGN_K: tl.constexpr,
    ALIGN_M: tl.constexpr, ALIGN_N: tl.constexpr, ALIGN_C: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # ALIGN_*: the largest power of two (<= 16) dividing each stride and K (_triton_common.align_of).
    # Triton only knows a stride divides by 16 or not: at K = 728 (8 * 91) every operand load was
    # scalar, and the pointwise GEMM of Xception's middle flow ran at 113 TFLOP/s (H200, 2026-11-26).
    pid = tl.program_id(0)
    pid_batch = tl.program_id(1).to(tl.int64)
    # Grouped order: GROUP_M consecutive tile rows sweep the columns together, so the A rows and
    # B columns they read are still in L2 when the neighbouring tiles need them.
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows/columns past the edge wrap onto valid ones, so the A/B loads need a mask only along K;
    # the wrapped results are never stored. int64 so that large matrices cannot overflow offsets.
    # M and N written as multiples of their known factors: the wrapped offsets then stay contiguous
    # in runs of ALIGN_M / ALIGN_N, which an M-contiguous A (a transposed operand) or a row-major B
    # needs for vector loads. With a bare % N at N = 728 those loads were scalar, and the
    # channels-last pointwise backward of Xception's middle flow ran at 0.2x cuDNN (H100, 2026-11-26).
    offs_am = (offs_m % ((M // ALIGN_M) * ALIGN_M)).to(tl.int64)
    offs_bn = (offs_n % ((N // ALIGN_N) * ALIGN_N)).to(tl.int64)
    a_ptrs = (a_ptr + tl.multiple_of(pid_batch * stride_ab, ALIGN_AB)
              + tl.multiple_of(offs_am * stride_am, ALIGN_AM)[:, None]
              + tl.multiple_of(offs_k * stride_ak, ALIGN_AK)[None, :])
    b_ptrs = (b_ptr + tl.multiple_of(pid_batch * stride_bb, ALIGN_BB)
              + tl.multiple_of(offs_k * stride_bk, ALIGN_BK)[:, None]
              + tl.multiple_of(offs_bn * stride_bn, ALIGN_BN)[None, :])
    # K as a multiple of its known factor: the K mask is then constant over runs a vector load spans
    k_end = (K // ALIGN_K) * ALIGN_K
    k_start = 0
    if SPLIT_K:
        # this program's split: K_PER_SPLIT is a multiple of 16, so the bounds keep ALIGN_K
        k_start = tl.program_id(2) * K_PER_SPLIT
        k_end = (tl.minimum(k_start + K_PER_SPLIT, k_end) // ALIGN_K) * ALIGN_K
        a_ptrs += k_start.to(tl.int64) * stride_ak
        b_ptrs += k_start.to(tl.int64) * stride_bk

    if ACC_FP64:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k_left = k_end - k0
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        if DOT_IN_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=acc.dtype)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    # The stores, too, see N and the output's row strides as multiples of their known factors
    # (ALIGN_N, ALIGN_C): at N = 728 every output element was stored alone (sm_90 PTX: 128 scalar
    # st.global a thread for a 128 x 256 bf16 tile, 2026-11-26).
    n_cols = (N // ALIGN_N) * ALIGN_N  # == N
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < n_cols)
    if SPLIT_K:
        # partial tile of split s at part[s, batch, M, N] (contiguous); the epilogue runs after the sum
        row = (tl.program_id(2) * tl.num_programs(1) + pid_batch) * M + offs_m.to(tl.int64)
        tl.store(part_ptr + tl.multiple_of(row * n_cols, ALIGN_N)[:, None] + offs_n[None, :], acc, mask=mask)
    else:
        acc = _bias_relu(acc, bias_ptr, offs_m[:, None], offs_n[None, :], M, n_cols, HAS_BIAS, BIAS_DIM, RELU)
        c_ptrs = (c_ptr + tl.multiple_of(pid_batch * stride_cb, ALIGN_C)
                  + tl.multiple_of(offs_m.to(tl.int64) * stride_cm, ALIGN_C)[:, None]
                  + offs_n.to(tl.int64)[None, :] * stride_cn)
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bias_relu(acc, bias_ptr, rows, cols, M, N,
               HAS_BIAS: tl.constexpr, BIAS_DIM: tl.constexpr, RELU: tl.constexpr):
    """The GEMM epilogue on acc, whose elements sit at rows (of a batch of M-row matrices) and
    columns cols (broadcast to acc's shape; columns past N are never stored): + bias, then ReLU."""
    if HAS_BIAS:
        if BIAS_DIM == 1:
            bias = tl.load(bias_ptr + cols, mask=cols < N, other=0.0)
        else:
            bias = tl.load(bias_ptr + rows % M)
        acc += bias.to(acc.dtype)
    if RELU:
        # where(acc < 0, ...) keeps NaN, as torch.relu does
        acc = tl.where(acc < 0, 0.0, acc)
    return acc


# Untuned (the GPU tests), the kernel runs a config whose tiles fit float64 operands too.
_mm_kernel_tuned = autotune(_mm_kernel, _MM_CONFIGS, ["M", "N", "K", "K_PER_SPLIT", "INPUT_PRECISION"],
                            default=_cfg(64, 64, 32, 3, 4),
                            prune_configs_by={"early_config_prune": _prune_by_smem})

# The one config the interpreter runs: large enough tiles to keep the number of (slow, Python-level)
# program instances down, small enough that edge masks are exercised by small test shapes.
_INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}


def _input_precision(dtype: torch.dtype, dot_in_fp32: bool) -> str:
    if dtype == torch.float64 or dot_in_fp32:
        return "ieee"
    if dtype == torch.float32:
        return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    # float16/bfloat16: Triton's default; their products are exact in the fp32 accumulator anyway
    return "tf32"


def _aligns(a3: torch.Tensor, b3: torch.Tensor, c3: torch.Tensor, k: int) -> dict:
    return dict(ALIGN_AB=align_of(a3.stride(0)), ALIGN_AM=align_of(a3.stride(1)), ALIGN_AK=align_of(a3.stride(2)),
                ALIGN_BB=align_of(b3.stride(0)), ALIGN_BK=align_of(b3.stride(1)), ALIGN_BN=align_of(b3.stride(2)),
                ALIGN_K=align_of(k), ALIGN_M=align_of(a3.shape[1]), ALIGN_N=align_of(b3.shape[2]),
                ALIGN_C=align_of(c3.stride(0), c3.stride(1)))


def _as_3d(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 3 else t.unsqueeze(0)


# None: split K where the output tiles are too few for the GPU (_k_splits); an int pins the number
# of splits (tests, where the interpreter's shapes are too small to choose it)
SPLIT_K = None


# The split-K cost model's two rates, as an H100 measured them (2026-11-26): one SM's share of the
# bf16 GEMM rate (780 TFLOP/s over 132 SMs) and the copy bandwidth (read + write)
_SM_FLOPS = 780e12 / 132
_COPY_BYTES_PER_S = 2.88e12


def _k_splits(nb: int, m: int, n: int, k: int, device: torch.device) -> tuple[int, int]:
    """(splits, K per split) for a GEMM of nb (m, n) outputs over k.

    Split where the output at the tuner's largest tiles (128 x 128) leaves SMs idle:
    the channels-last pointwise weight gradient (24 x 144 over K = 200704 at MobileNetV2's shape)
    had 2 programs and ran 35x slower than cuDNN (H100, 2026-11-26). Splitting s ways divides one
    program's walk over K (time t) by s, in waves of one 128 x 128 program per SM (its pipelined
    tiles take over half the shared memory), and adds the fp32 partials' round trip through memory
    (time p per split). s is the best of the most splits that fit one, two or three waves, with
    256 of K at least each, taken only where that saves a fifth of t: with 96 tiles (1536 x 1024
    over K = 6400, Xception exit's weight gradient) three splits ran three waves of a third of K
    each, as long as one wave of all of it, and the partials made the pass slower (H100,
    2026-11-26); a 1024^3 GEMM does not split either. Splits are multiples of 64 (of 16 for short
    K), so that every split starts on a BLOCK_K boundary and keeps K's ALIGN hint."""
    if SPLIT_K is not None:
        splits = max(1, min(SPLIT_K, cdiv(k, 16)))
    else:
        sms = max(1, target_programs(device) // 4)
        tiles = nb * cdiv(m, 128) * cdiv(n, 128)
        t = 2 * 128 * 128 * k / _SM_FLOPS
        p = 2 * 4 * nb * m * n / _COPY_BYTES_PER_S

        def cost(s):
            return cdiv(tiles * s, sms) * t / s + p * s

        cap = max(1, k // 256)
        splits = min({1} | {min(cap, max(1, waves * sms // tiles)) for waves in (1, 2, 3)}, key=cost)
        if cost(splits) > 0.8 * t:
            splits = 1
    if splits == 1:
        return 1, 0
    grain = 64 if k >= 64 * splits else 16
    k_per = cdiv(cdiv(k, splits), grain) * grain
    return cdiv(k, k_per), k_per


def mm(a: torch.Tensor, b: torch.Tensor, bias, bias_dim: int, activation: str) -> torch.Tensor:
    batched = a.dim() == 3
    a3, b3 = _as_3d(a), _as_3d(b)
    nb, m, k = a3.shape
    n = b3.shape[2]
    c3 = torch.empty((nb, m, n), dtype=a.dtype, device=a.device)
    out = c3 if batched else c3[0]
    if m == 0 or n == 0 or nb == 0:
        return out
    has_bias = bias is not None
    interpreting = INTERPRET
    kernel = _mm_kernel if interpreting else _mm_kernel_tuned
    # The interpreter's tl.dot multiplies bfloat16 operands' raw bits as integers; their exact
    # products in fp32 (ieee) give the same result. GPUs use bf16 tensor cores.
    dot_in_fp32 = interpreting and a.dtype == torch.bfloat16
    meta = dict(HAS_BIAS=has_bias, BIAS_DIM=bias_dim, RELU=activation == "relu",
                ACC_FP64=a.dtype == torch.float64, INPUT_PRECISION=_input_precision(a.dtype, dot_in_fp32),
                DOT_IN_FP32=dot_in_fp32)
    if interpreting:
        meta.update(_INTERPRET_CONFIG)
    splits, k_per = _k_splits(nb, m, n, k, a.device)
    meta["SPLIT_K"] = splits > 1
    for b in batch_slices(nb):
        sa, sb, sc = a3[b], b3[b], c3[b]
        # fp32 partial tiles (fp64 for float64), summed by _sum_splits with the epilogue
        part = torch.empty((splits, sc.shape[0], m, n), dtype=torch.float64 if meta["ACC_FP64"] else torch.float32,
                           device=a.device) if splits > 1 else sc

        def grid(meta_, nb_=sc.shape[0]):
            return (cdiv(m, meta_["BLOCK_M"]) * cdiv(n, meta_["BLOCK_N"]), nb_, splits)

        _launch(kernel, grid)(
            sa, sb, sc, bias if has_bias else sc, part,
            m, n, k, k_per,
            sa.stride(0), sa.stride(1), sa.stride(2),
            sb.stride(0), sb.stride(1), sb.stride(2),
            sc.stride(0), sc.stride(1), sc.stride(2),
            **meta, **_aligns(sa, sb, sc, k),
        )
        if splits > 1:
            _sum_splits(part, sc, bias, bias_dim, activation == "relu")
    return out


# ---------------------------------------------------------------------------------------------
# bias / activation backward
# ---------------------------------------------------------------------------------------------
@triton.jit
def _relu_mask(g, o):
    # as torch's threshold_backward: out <= 0 gives 0 (even for a NaN gradient); a NaN output passes
    return tl.where(o <= 0, tl.zeros_like(g), g)


@triton.jit
def _relu_grad_kernel(g_ptr, o_ptr, gp_ptr, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g = tl.load(g_ptr + offs, mask=mask)
    o = tl.load(o_ptr + offs, mask=mask)
    tl.store(gp_ptr + offs, _relu_mask(g, o), mask=mask)


@triton.jit
def _bias_grad_partial_kernel(
    g_ptr, o_ptr, gp_ptr, part_ptr,
    M, N, L, TILES_R, tiles_per_split,
    RELU: tl.constexpr, BIAS_DIM: tl.constexpr, ALIGN_N: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Partial sums of the (masked) gradient, viewed as R = B*M contiguous rows of N.

    bias_dim 1: the program owns BLOCK_C columns and sums row tiles [t*BLOCK_R, ...) of its split.
    bias_dim 0: the program owns BLOCK_R of the M rows and sums, over its split of the
    (batch, column tile) pairs, the tiles of those rows; L is the length of the bias (N or M).
    Each split writes its sums to part[split, :L]; tiles t of split s are s*tiles_per_split + i.
    With RELU the masked gradient (grad_pre) is stored on the way.
    ALIGN_N (align_of(N)): row starts and the column bound are written as multiples of it. Triton
    knows N only as divisible by 16 or not, and at N = 728 (8 x 91) every element was loaded alone:
    98 us for a 64x728x19x19 bf16 gradient on an H200 (2026-11-26), 8 us at N = 1536.
    """
    n_cols = (N // ALIGN_N) * ALIGN_N  # == N
    pid_l = tl.program_id(0)
    pid_s = tl.program_id(1)
    t_start = pid_s * tiles_per_split
    t_end = min(t_start + tiles_per_split, TILES_R)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=part_ptr.dtype.element_ty)
    for t in range(t_start, t_end):
        if BIAS_DIM == 1:
            rows = t * BLOCK_R + tl.arange(0, BLOCK_R)
            cols = pid_l * BLOCK_C + tl.arange(0, BLOCK_C)
            mask = (rows[:, None] < M) & (cols[None, :] < n_cols)
        else:
            n_ctiles = tl.cdiv(N, BLOCK_C)
            batch = t // n_ctiles
            m_rows = pid_l * BLOCK_R + tl.arange(0, BLOCK_R)
            rows = batch * M + m_rows
            cols = (t % n_ctiles) * BLOCK_C + tl.arange(0, BLOCK_C)
            mask = (m_rows[:, None] < M) & (cols[None, :] < n_cols)
        offs = tl.multiple_of(rows.to(tl.int64) * n_cols, ALIGN_N)[:, None] + cols[None, :]
        g = tl.load(g_ptr + offs, mask=mask, other=0.0)
        if RELU:
            g = _relu_mask(g, tl.load(o_ptr + offs, mask=mask, other=0.0))
            tl.store(gp_ptr + offs, g, mask=mask)
        acc += g.to(acc.dtype)
    if BIAS_DIM == 1:
        idx = pid_l * BLOCK_C + tl.arange(0, BLOCK_C)
        part = tl.sum(acc, axis=0)
    else:
        idx = pid_l * BLOCK_R + tl.arange(0, BLOCK_R)
        part = tl.sum(acc, axis=1)
    tl.store(part_ptr + pid_s * L + idx, part, mask=idx < L)


@triton.jit
def _sum_splits_kernel(part_ptr, out_ptr, bias_ptr, S, L, M, N,
                       HAS_BIAS: tl.constexpr, BIAS_DIM: tl.constexpr, RELU: tl.constexpr,
                       BLOCK: tl.constexpr):
    """out[l] = epilogue(sum over s of part[s, l]), added in part's dtype, stored in out's dtype;
    l runs row-major over a batch of (M, N) matrices, the epilogue is _bias_relu's."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < L
    acc = tl.zeros((BLOCK,), dtype=part_ptr.dtype.element_ty)
    part_ptrs = part_ptr + idx
    for _ in range(0, S):
        acc += tl.load(part_ptrs, mask=mask, other=0.0)
        part_ptrs += L
    acc = _bias_relu(acc, bias_ptr, idx // N, idx % N, M, N, HAS_BIAS, BIAS_DIM, RELU)
    tl.store(out_ptr + idx, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _sum_splits(partial: torch.Tensor, out: torch.Tensor, bias, bias_dim: int, relu: bool) -> None:
    """out (contiguous, a batch of (M, N) matrices) = epilogue(partial summed over dim 0)."""
    m, n = (out.shape[-2], out.shape[-1]) if out.dim() > 1 else (1, out.shape[0])
    length, block = out.numel(), 256
    _launch(_sum_splits_kernel, (cdiv(length, block),))(
        partial, out, bias if bias is not None else out, partial.shape[0], length, m, n,
        HAS_BIAS=bias is not None, BIAS_DIM=bias_dim, RELU=relu, BLOCK=block)


def bias_act_backward(grad_out: torch.Tensor, out: torch.Tensor, activation: str, bias_dim: int,
                      need_bias: bool):
    relu = activation == "relu"
    if not relu and not need_bias:
        return grad_out, None
    g3 = _as_3d(grad_out)
    nb, m, n = g3.shape
    grad_pre = torch.empty_like(grad_out) if relu else grad_out
    numel = grad_out.numel()
    if not need_bias:
        block = 1024
        if numel:
            _launch(_relu_grad_kernel, (cdiv(numel, block),))(
                grad_out, out, grad_pre, numel, BLOCK=block)
        return grad_pre, None

    length = n if bias_dim == 1 else m
    grad_bias = torch.empty(length, dtype=grad_out.dtype, device=grad_out.device)
    if numel == 0:
        # nothing to sum: the bias gradient is zero (no math, only a fill of the result)
        return grad_pre, grad_bias.zero_()
    # Tiles are 16 x 128 along the contiguous columns; for bias_dim 0 with narrow N the column tile
    # shrinks so that row tiles are not mostly masked out.
    block_c = min(128, next_pow2(n))
    block_r = max(16, 2048 // block_c) if bias_dim == 0 else 16
    if bias_dim == 1:
        n_l, tiles = cdiv(n, block_c), cdiv(nb * m, block_r)
    else:
        n_l, tiles = cdiv(m, block_r), nb * cdiv(n, block_c)
    splits = max(1, min(tiles, cdiv(target_programs(grad_out.device), n_l), _MAX_GRID_YZ))
    tiles_per_split = cdiv(tiles, splits)
    splits = cdiv(tiles, tiles_per_split)
    # fp32 partial sums for fp16/bf16/fp32 gradients, fp64 for fp64
    part_dtype = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
    partial = torch.empty((splits, length), dtype=part_dtype, device=grad_out.device)
    _launch(_bias_grad_partial_kernel, (n_l, splits))(
        grad_out, out, grad_pre, partial,
        nb * m if bias_dim == 1 else m, n, length, tiles, tiles_per_split,
        RELU=relu, BIAS_DIM=bias_dim, ALIGN_N=align_of(n), BLOCK_R=block_r, BLOCK_C=block_c,
    )
    _sum_splits(partial, grad_bias, None, 1, False)
    return grad_pre, grad_bias
