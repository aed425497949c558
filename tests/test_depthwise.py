"""depthwise_conv2d on every backend against F.conv2d(groups=C) in float64: forward and every
gradient over kernel sizes, strides, paddings, dilations, multipliers, odd sizes and layouts;
gradcheck, opcheck, torch.compile, and bad inputs."""
import pytest
import torch
import torch.nn.functional as F

import dlkernels
from dlkernels import _dispatch
from helpers import (DEVICE, KERNEL_BACKENDS, LARGE_BACKENDS, as64, assert_close, assert_close_non_finite, grads, leaf,
                     no_vmap_fallback)

# (N, C, H, W, kernel, stride, padding, dilation, multiplier)
CASES = [
    (2, 3, 9, 7, 3, 1, 1, 1, 1),
    (1, 4, 8, 8, 3, 2, 1, 1, 1),
    (2, 5, 11, 13, 5, 1, 2, 1, 1),
    (1, 2, 13, 11, 7, 3, 3, 1, 1),
    (2, 3, 6, 5, 2, 1, 0, 1, 1),            # even kernel
    (1, 3, 7, 7, 1, 1, 0, 1, 2),            # 1x1, multiplier 2
    (2, 2, 10, 9, (3, 5), (1, 2), (1, 2), 1, 1),  # non-square kernel, stride pair, padding pair
    (1, 3, 12, 11, 3, 1, 2, 2, 1),          # dilation 2
    (1, 2, 13, 13, 3, 2, 3, 3, 3),          # dilation 3, multiplier 3
    (2, 4, 7, 5, 3, 1, "same", 1, 1),
    (1, 3, 8, 6, 4, 1, "same", 2, 2),       # even kernel, asymmetric "same"
    (1, 2, 9, 7, 3, 2, "valid", 1, 1),
    (3, 1, 1, 1, 1, 1, 0, 1, 1),            # H = W = 1, C = 1
    (1, 3, 1, 17, 3, 1, 1, 1, 1),           # H = 1 with padding
    (2, 1, 17, 1, (1, 3), 1, (0, 1), 1, 2),  # W = 1
    (1, 2, 5, 5, 3, 3, 0, 1, 1),            # stride equal to kernel
    (1, 17, 19, 23, 3, 1, 1, 1, 1),         # prime channels and sizes
    (1, 263, 7, 6, 3, 1, 1, 1, 1),          # wide channels (C++ channels_last weight grad: staged rows)
    (1, 16, 33, 30, 3, 2, 1, 2, 1),         # larger image: whole 2-D pixel tiles, stride and dilation 2
    (1, 3, 9, 20, (3, 7), (2, 1), 0, (1, 3), 1),  # window spanning 19 of 20 columns: 2 outputs a row
]


def _ids(c):
    return "n{}c{}_{}x{}_k{}_s{}_p{}_d{}_m{}".format(*c).replace(" ", "")


def _inputs(case, dtype, channels_last, bias=True):
    n, c, h, w, k, s, p, d, m = case
    kh, kw = (k, k) if isinstance(k, int) else k
    x = torch.randn(n, c, h, w, device=DEVICE).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c * m, 1, kh, kw, device=DEVICE).to(dtype) / (kh * kw) ** 0.5
    b = torch.randn(c * m, device=DEVICE).to(dtype) if bias else None
    return leaf(x), leaf(weight), (leaf(b) if bias else None), dict(stride=s, padding=p, dilation=d)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_forward_backward(backend, dtype, case, channels_last):
    x, w, b, kw = _inputs(case, dtype, channels_last)
    out = dlkernels.depthwise_conv2d(x, w, b, backend=backend, **kw)
    x64, w64, b64 = as64(x), as64(w), as64(b)
    ref = F.conv2d(x64, w64, b64, groups=x.shape[1], **kw)
    assert_close(out, ref, what="forward")
    fmt = torch.channels_last if channels_last and x.shape[1] > 1 and x.shape[2] * x.shape[3] > 1 else None
    if fmt is not None:
        assert out.is_contiguous(memory_format=fmt), "output must keep the channels_last input's format"
    g = torch.randn_like(ref)
    for got, exp, name in zip(grads(out, [x, w, b], g.to(dtype)), grads(ref, [x64, w64, b64], g), "xwb"):
        assert_close(got, exp, dtype, f"grad {name}")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_non_finite_values(backend, channels_last):
    """Infinities and NaNs reach the outputs and every gradient where torch's do, and only there: an
    inf in the last pixel of a 9x11 plane, a NaN in the last grad_y element of another and an inf in
    the first of a third (only the taps that read them may be non-finite: the C++ weight gradient's
    zero-padded sums would make 0 * inf = NaN of the others without its finiteness check, whose
    last, partial vector holds that grad_y element). Against torch in float32: its float32 kernel
    skips the window's padding, as dlkernels does, where its float64 one multiplies grad_y by the
    padding's zeros (a NaN grad_y then makes every tap of the channel NaN)."""
    x = torch.randn(2, 3, 9, 11, device=DEVICE)
    x[0, 1, 8, 10] = float("inf")
    x[1, 0, 3, 4] = -float("inf")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(3, 1, 3, 3, device=DEVICE), torch.randn(3, device=DEVICE)
    g = torch.randn(2, 3, 9, 11, device=DEVICE)
    g[1, 2, 8, 10] = float("nan")
    g[0, 0, 0, 0] = float("inf")
    ins, ref_ins = [leaf(t) for t in (x, w, b)], [leaf(t) for t in (x, w, b)]
    out = dlkernels.depthwise_conv2d(*ins, 1, 1, backend=backend)
    ref = F.conv2d(*ref_ins, 1, 1, groups=3)
    for got, exp, name in zip([out, *grads(out, ins, g)], [ref, *grads(ref, ref_ins, g)], ["out", "x", "w", "b"]):
        assert_close_non_finite(got, exp, name)


def _inside_sum(xp, g, p, q, stride, pad=2):
    """Per channel, the sum of g * x over the outputs whose tap (p, q) reads inside x (xp: x padded by
    pad on each side), padding never multiplied."""
    h, w = xp.shape[2] - 2 * pad, xp.shape[3] - 2 * pad
    rows = [i for i in range(g.shape[2]) if 0 <= i * stride + p - pad < h]
    cols = [j for j in range(g.shape[3]) if 0 <= j * stride + q - pad < w]
    xs = xp[:, :, [i * stride + p for i in rows]][:, :, :, [j * stride + q for j in cols]]
    return (g[:, :, rows][:, :, :, cols] * xs).sum((0, 2, 3))


@pytest.mark.parametrize("backend", LARGE_BACKENDS)
@pytest.mark.parametrize("stride", [1, 2])
def test_non_finite_values_channel_blocks(backend, stride):
    """As above on 64 channels of 7x7 planes, which the C++ forward and weight gradient take in
    channel blocks (two threads): the weight gradient's taps skip the staged padding. torch's float32
    kernel at this shape does not (every tap of a channel with a NaN or infinite grad_y is NaN), so the
    weight gradient is held to the sum over the (output, tap) pairs inside the input, in float64."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.randn(2, 64, 7, 7, device=DEVICE)
        x[0, 1, 6, 6] = float("inf")
        w, b = torch.randn(64, 1, 5, 5, device=DEVICE), torch.randn(64, device=DEVICE)
        ho = 7 if stride == 1 else 4
        g = torch.randn(2, 64, ho, ho, device=DEVICE)
        g[1, 2, ho - 1, ho - 1] = float("nan")
        g[0, 0, 0, 0] = float("inf")
        ins, ref_ins = [leaf(t) for t in (x, w, b)], [leaf(t) for t in (x, w, b)]
        out = dlkernels.depthwise_conv2d(*ins, stride, 2, backend=backend)
        ref = F.conv2d(*ref_ins, stride, 2, groups=64)
        got, exp = [out, *grads(out, ins, g)], [ref, *grads(ref, ref_ins, g)]
        xp, g64 = F.pad(x.double(), (2, 2, 2, 2)), g.double()
        exp[2] = torch.stack([torch.stack([  # tap (p, q): the outputs whose read is not padding
            _inside_sum(xp, g64, p, q, stride) for q in range(5)], -1) for p in range(5)], -2)[:, None].float()
        for gt, e, name in zip(got, exp, ["out", "x", "w", "b"]):
            assert_close_non_finite(gt, e, name)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("backend", LARGE_BACKENDS)
@pytest.mark.parametrize("k, stride, pad", [(3, 1, 1), (5, 1, (2, 0)), (3, 2, 0)], ids=["k3s1", "k5s1p20", "k3s2"])
def test_channels_last_large_input(backend, k, stride, pad):
    """A large input (8 MiB): rows of several 32-pixel runs, the next row prefetched across images
    in the C++ forward; 37 channels (vector tails), a width not a multiple of any pixel block."""
    x = torch.randn(2, 37, 181, 157, device=DEVICE).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(37, 1, k, k, device=DEVICE) / k, torch.randn(37, device=DEVICE)
    out = dlkernels.depthwise_conv2d(x, w, b, stride, pad, backend=backend)
    ref = F.conv2d(x.double(), w.double(), b.double(), stride, pad, groups=37)
    assert_close(out, ref, torch.float32, "forward")
    assert out.is_contiguous(memory_format=torch.channels_last)


# Window heights 1-8 at stride 1, channels_last, on images shorter and taller than the window (a
# row-walking forward, which keeps KH - 1 partial output rows open, was tried on the GPU and is
# kept in git history: 1dc8e1b; see benchmarks/gpu/NOTES.md).
@pytest.mark.parametrize("kh", range(1, 9))
@pytest.mark.parametrize("case", [(1, 5, 3, 7, 3, 1, 1), (2, 3, 11, 6, 2, 1, 0)], ids=["3x7", "11x6"])
def test_window_heights(backend, kh, case):
    n, c, h, w, kw, s, pw = case
    test_forward_backward(backend, torch.float32, (n, c, h, w, (kh, kw), s, (kh // 2 + kh % 2, pw), 1, 1), True)


# Pixel rows of 2-8 KiB of channels (Xception's exit flow has 1024): the C++ channels_last kernels pad
# the taps of the weights and of the weight-gradient sums apart, and store blocks of 5 pixels x whole
# cache lines where the output width is a multiple of 5 (10 at stride 1, 5 at stride 2).
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("case", [(1, 1024, 10, 10, 3, 1, 1, 1, 1), (2, 512, 10, 10, 3, 2, 1, 1, 1)], ids=_ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("backend", LARGE_BACKENDS)
def test_wide_channel_rows(backend, dtype, case, channels_last):
    test_forward_backward(backend, dtype, case, channels_last)


def _random_cases(count, seed=2026):
    """Seeded random geometries that torch accepts: kernels 1-7 (non-square), strides 1-3, dilations
    1-3, paddings 0-3 per side or "same" (stride 1), sizes 1-45 wide (half of them barely wider
    than a dilated window), multipliers 1-3, channels from 1 to 64 (vector tails). A sweep like this (31,830 cases against torch) found a window
    spanning nearly the whole row, which no hand-picked case had."""
    import random
    rng, cases = random.Random(seed), []
    while len(cases) < count:
        k = (rng.choice([1, 2, 3, 5, 7]), rng.choice([1, 2, 3, 5, 7]))
        s = (rng.randint(1, 3), rng.randint(1, 3))
        d = (rng.choice([1, 1, 2, 3]), rng.choice([1, 1, 2, 3]))
        p = "same" if s == (1, 1) and rng.random() < 0.2 else (rng.randint(0, 3), rng.randint(0, 3))
        pad = (0, 0) if p == "same" else p
        h, w = rng.randint(1, 24), rng.randint(1, 45)
        if rng.random() < 0.5:  # a window nearly as wide as the padded row: outputs 1-3 wide, dilated
            k, d = (k[0], max(k[1], 3)), (d[0], rng.choice([2, 3]))
            w = max(1, (k[1] - 1) * d[1] + 1 - 2 * pad[1] + rng.randint(0, 3))
        if h + 2 * pad[0] < (k[0] - 1) * d[0] + 1 or w + 2 * pad[1] < (k[1] - 1) * d[1] + 1:
            continue
        cases.append((rng.randint(1, 2), rng.choice([1, 3, 8, 17, 40, 64]), h, w, k, s, p, d, rng.randint(1, 3)))
    return cases


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("case", _random_cases(32), ids=_ids)
@pytest.mark.parametrize("backend", LARGE_BACKENDS)
def test_random_geometries(backend, case, channels_last):
    test_forward_backward(backend, torch.float64, case, channels_last)


# Channels-last rows of 16+ pixels whose windows lie inside the input and at most 2 that do not: on
# AVX-512 builds the C++ forward (and the stride-1 input gradient, a forward) reads those from x's
# rows in place and computes the edge pixels apart, as does the weight gradient of 3x3 windows at
# stride 2 (ClRowSource); channels with vector tails, padding on one side or both, dilation 2. At
# 3x3 stride 1, channels ending in half a 64-byte vector and a scalar rest (29 floats: 16 + 8 + 5;
# 29 doubles: 3 x 8 + 4 + 1; 728 floats), in place and, on rows under 16, staged. Rows of 10 and of
# 17 in place are swept in blocks of 5 and 6 (with_sweep_block).
@pytest.mark.parametrize("case", [(2, 37, 9, 40, 3, 2, 1, 1, 1), (1, 24, 7, 36, 3, 1, 1, 1, 1),
                                  (1, 40, 6, 45, 5, 2, 2, 1, 1), (1, 16, 5, 38, 3, 2, (1, 0), 1, 1),
                                  (1, 16, 8, 40, 3, 2, 2, 2, 1), (1, 29, 6, 20, 3, 1, 1, 1, 1),
                                  (2, 29, 5, 11, 3, 1, 1, 1, 1), (1, 728, 4, 19, 3, 1, 1, 1, 1),
                                  (2, 48, 3, 10, 3, 1, 1, 1, 1)], ids=_ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("backend", LARGE_BACKENDS)
def test_channels_last_rows_in_place(backend, dtype, case):
    test_forward_backward(backend, dtype, case, True)


# Channels-last windows 5 and 7 wide, channels a multiple of 16 floats (8 doubles): on AVX-512 builds
# the C++ forward takes 64-byte vectors there (cl_staged_row_kw), in blocks of 8-16 pixels
# (with_pixel_block: rows of 13, 21 and 29 leave a last block moved back) or, on rows of 5-7 pixels,
# one block of the row's width (4 pixels under 5); a 3x5 window reaches the same kernel, and at
# stride 1 so do channels that end in half a 64-byte vector (72, 40, 24 floats; the rest in 32-byte
# blocks). Rows of 1024 floats (pixels 4 KiB apart) take 10- or 5-pixel blocks. streamed: every
# output treated as leaving the cache, so that the rows go out in non-temporal stores
# (cl_staged_row_streamed). 3x3 at stride 1 with
# pixels of an odd number of half lines (72, 56 and 24 floats, 20 doubles) stream every other pixel's
# lines and the lines two pixels share (cl_staged_row_pairs): rows of odd widths (the pixels' line
# phase alternating from row to row), of 45 (two runs, a shared line across them), of 9 from staged
# rows ("valid": the whole row one piece).
@pytest.mark.parametrize("case", [(2, 32, 11, 13, 5, 1, 2, 1, 1), (1, 48, 12, 21, 5, 2, 2, 1, 1),
                                  (1, 16, 9, 10, (3, 5), 1, (1, 2), 1, 1), (2, 32, 6, 7, 5, 1, 2, 1, 1),
                                  (1, 32, 10, 13, 7, 1, 3, 1, 1), (1, 16, 9, 6, 7, 1, 3, 1, 1),
                                  (1, 16, 8, 29, 5, 1, 2, 1, 1), (1, 32, 5, 4, 5, 1, 2, 1, 1),
                                  (1, 1024, 3, 10, 3, 1, 1, 1, 1), (1, 1024, 3, 15, 3, 1, 1, 1, 1),
                                  (1, 72, 5, 19, 3, 1, 1, 1, 1), (1, 56, 4, 20, 3, 1, 1, 1, 1),
                                  (1, 24, 3, 45, 3, 1, 1, 1, 1), (2, 20, 3, 23, 3, 1, 1, 1, 1),
                                  (2, 40, 4, 11, 3, 1, "valid", 1, 1), (1, 72, 6, 13, 5, 1, 2, 1, 1),
                                  (1, 40, 5, 19, 7, 1, 3, 1, 1), (2, 24, 5, 11, (5, 3), 1, (2, 1), 1, 1)], ids=_ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("streamed", [False, True], ids=["plain", "streamed"])
@pytest.mark.parametrize("backend", LARGE_BACKENDS)
def test_channels_last_wide_vectors(backend, dtype, streamed, case, monkeypatch):
    if streamed:
        monkeypatch.setenv("DLKERNELS_LLC_BYTES", "1")
    test_forward_backward(backend, dtype, case, True)


# NCHW planes with rows of 32 floats or more (16 doubles): the C++ 3x3 kernels of dilation 1 and
# stride 1 or 2 whose taps are fixed while compiling (4-row blocks: 37 and 19 rows leave 2- and
# 1-row groups; widths leave a partial last vector). On AVX-512 builds 3x3, 5x5 and 7x7 at stride 1
# (and 3x3 at stride 2 on rows of 16-31) run in blocks of two 64-byte vectors, the row's last block
# moved back to end at its end (rows of 16, 18, 19, 20, 33, 37: overlapping vectors), rows of 8-15 in
# two 32-byte vectors (3x3 valid, 11 outputs), 3x3 at stride 2 from 32 outputs with a one-vector last
# block (36 and 33 columns), 5x5 at stride 2 in one-vector blocks; 7x7 valid with 5 outputs and
# dilation 2 take the generic kernel. Every kernel prefetches output rows ahead for writing; the input
# gradient at stride 1 runs through the same kernels (flipped), and the next plane's input is
# prefetched (planes of 4 KiB and more; multiplier 2 reads each plane twice; planes split in row blocks
# where there are few).
@pytest.mark.parametrize("case", [(2, 5, 37, 35, 3, 1, 1, 1, 1), (1, 3, 38, 71, 3, 2, 1, 1, 1),
                                  (1, 2, 35, 67, 3, 2, "valid", 1, 1), (1, 2, 34, 40, 3, 1, 1, 1, 2),
                                  (2, 9, 40, 33, 3, 1, 0, 1, 1), (1, 3, 23, 37, 5, 1, 2, 1, 1), (2, 2, 16, 16, 5, 1, 2, 1, 1),
                                  (1, 2, 41, 35, 5, 2, 2, 1, 1), (1, 2, 19, 40, 5, 2, "valid", 1, 2),
                                  (1, 3, 21, 19, 7, 1, 3, 1, 1), (1, 2, 15, 11, 7, 1, 0, 1, 1), (1, 2, 12, 13, 3, 1, 0, 1, 1),
                                  (1, 2, 20, 39, 3, 2, 1, 1, 1), (1, 2, 23, 41, 3, 1, 1, 2, 1)], ids=_ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("backend", LARGE_BACKENDS)
def test_nchw_wide_rows(backend, dtype, case):
    test_forward_backward(backend, dtype, case, False)


# NCHW at stride 2 on planes past the small-plane kernels, multiplier 1: the C++ input gradient runs by
# phases and interleaves them into grad_x's rows, with non-temporal stores where a row is whole cache
# lines (32, 48, 64 floats; 16 doubles at 16 wide) and grad_x leaves the cache (a tiny
# DLKERNELS_LLC_BYTES here); odd heights, 3x3 and 5x5, one-sided padding, rows that are not whole
# lines (40 floats) beside them.
@pytest.mark.parametrize("case", [(1, 3, 21, 32, 3, 2, 1, 1, 1), (2, 2, 17, 48, 5, 2, 2, 1, 1),
                                  (1, 2, 18, 64, 3, 2, (1, 0), 1, 1), (1, 3, 19, 16, 3, 2, 1, 1, 1),
                                  (1, 2, 20, 40, 3, 2, 1, 1, 1)], ids=_ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("backend", LARGE_BACKENDS)
def test_nchw_stride2_streamed_input_grad(backend, dtype, case, monkeypatch):
    monkeypatch.setenv("DLKERNELS_LLC_BYTES", "1")
    test_forward_backward(backend, dtype, case, False)


# NCHW at stride 2 on small planes: AVX-512 builds stage the input's four row/column-parity planes
# and sweep the output plane whole (fwd_masked_s2): even and odd sizes (a last even column or row
# without its odd partner), 5x5 and 3x5 windows, one-sided padding, a multiplier of 2, outputs
# under one vector (3x3) and over (19x19); "valid" padding and padding that leaves input beyond the
# phase planes fall back to the row kernels.
@pytest.mark.parametrize("case", [(2, 5, 14, 14, 3, 2, 1, 1, 1), (1, 3, 15, 13, 5, 2, 2, 1, 2),
                                  (1, 4, 7, 8, (3, 5), 2, (1, 2), 1, 1), (2, 3, 9, 20, 4, 2, 1, 1, 1),
                                  (1, 2, 5, 6, 3, 2, (1, 0), 1, 1), (1, 3, 38, 37, 3, 2, 1, 1, 1),
                                  (1, 2, 14, 15, 3, 2, "valid", 1, 1), (1, 2, 11, 11, 3, 2, 0, 1, 1)], ids=_ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("backend", LARGE_BACKENDS)
def test_nchw_stride2_small_planes(backend, dtype, case):
    test_forward_backward(backend, dtype, case, False)


# NCHW planes of at most 16x16 with 8+ channels, multiplier 1, at stride > 1, with 25+ taps or on
# planes of at most 8x8: AVX-512 builds transpose blocks of 16 (float64: 8) channels into a padded
# [row][column][channel] buffer and back (depthwise_blocked.h). Whole blocks and a partial last one
# (17, 33, 9 channels; 9 and 12 in one partial block), 5x5 and 7x7 windows, one larger than the plane
# (taps in the padding only), non-square and even windows, strides 2, 3 and a pair, dilation 2,
# "same" and "valid", 1x1 planes. The input gradient too (a stride-1 forward over grad_y spread by the
# stride, taps flipped) at stride > 1 or on planes up to 8x8; padding past the window's reach (c16 6x6
# k3 s2 p3) declines to the phased gather. The weight gradient takes the blocks where there are at
# least two a thread (two threads here, so the same cases do on every machine): 64-100 channels, a
# partial last block (72, 65), and 10x10 3x3 at stride 1, whose forward keeps the masked sweep.
@pytest.mark.parametrize("case", [(2, 16, 7, 7, 5, 1, 2, 1, 1), (1, 17, 7, 7, 5, 1, 2, 1, 1), (2, 9, 8, 8, 3, 1, 1, 1, 1),
                                  (1, 33, 14, 14, 5, 2, 2, 1, 1), (2, 24, 13, 11, (3, 5), (1, 2), (1, 2), 1, 1),
                                  (1, 8, 16, 16, 3, 2, 1, 2, 1), (1, 40, 5, 3, 7, 1, 3, 1, 1), (3, 16, 1, 1, 5, 1, 2, 1, 1),
                                  (1, 12, 11, 13, 5, 3, 0, 1, 1), (1, 16, 8, 8, 4, 1, "same", 1, 1),
                                  (1, 16, 15, 16, 3, 2, "valid", 1, 1), (2, 64, 7, 7, 3, 1, 1, 1, 1),
                                  (1, 72, 14, 14, 5, 2, 2, 1, 1), (3, 100, 10, 10, 3, 1, 1, 1, 1),
                                  (1, 65, 9, 13, (3, 5), (2, 1), (0, 2), 2, 1), (1, 16, 6, 6, 3, 2, 3, 1, 1)], ids=_ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("backend", LARGE_BACKENDS)
def test_nchw_channel_blocks(backend, dtype, case):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        test_forward_backward(backend, dtype, case, False)
    finally:
        torch.set_num_threads(threads)


# NCHW planes whose output keeps the input's size at stride 1 and that hold at most 7200 / K
# elements: AVX-512 builds sweep them whole in 64-byte vectors (depthwise_masked.h), the input
# gradient too (multipliers 2 and 3 sum several grad_y planes) and, with 8+ output channels, the
# weight gradient (one thread per channel). Where the taps' flat offsets span at most four vectors
# (all of these in float32; in float64, 8 lanes, the 7x7 and smaller) the forward and the multiplier-1 input
# gradient load each plane vector once and shift it in registers (register_block: 28x28's 49 whole
# vectors in blocks of 8, the last moved back; 361 and 49 elements end in a partial vector), else
# each tap loads masked. Planes of 1 to 784 elements, dilation 2, a non-square and an even ("same":
# asymmetric padding) window.
@pytest.mark.parametrize("case", [(2, 5, 7, 7, 3, 1, 1, 1, 2), (1, 3, 10, 10, 5, 1, 2, 1, 3), (2, 9, 19, 19, 3, 1, 1, 1, 1),
                                  (1, 6, 28, 28, 3, 1, 1, 1, 1), (3, 16, 4, 4, 3, 1, "same", 2, 1), (1, 8, 1, 1, 3, 1, 1, 1, 1),
                                  (2, 4, 5, 3, (3, 5), 1, "same", 1, 2), (2, 8, 6, 7, 2, 1, "same", 1, 1)], ids=_ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("backend", LARGE_BACKENDS)
def test_nchw_small_same_planes(backend, dtype, case):
    test_forward_backward(backend, dtype, case, False)


# c16/c32 3x3: whole lines of channels per pixel, which the C++ row kernel streams itself (5-pixel
# blocks; 13 and 6 output columns leave a partial last block; on AVX-512 builds c16k3s1 and c16k3d21,
# rows of 8+ pixels at stride 1, take 8-pixel blocks of 64-byte vectors); the others store plainly. The
# stride-2 input gradients (c64k5s2, c32k3s2) stream from its 4-pixel blocks, beside single pixels
# stored plainly at the borders; c256k3s2 from 2-pixel blocks in float32 (4 would alias) and plainly in
# float64. c16k5s1, c32k5s2 and c16k35: 5-wide windows of 8+ output pixels, which AVX-512 builds stream
# from 8-pixel blocks of 64-byte vectors (13 and 11 columns leave a partial last block).
@pytest.mark.parametrize("case", [(2, 37, 13, 11, 3, 1, 1, 1), (1, 64, 9, 12, 5, 2, 2, 1), (3, 9, 5, 4, 3, 1, 4, 1),
                                  (2, 16, 9, 13, 3, 1, 1, 1), (1, 32, 11, 12, 3, 2, 1, 1),
                                  (1, 16, 12, 11, 3, 1, (2, 1), (2, 1)), (1, 256, 7, 9, 3, 2, 1, 1),
                                  (2, 16, 9, 13, 5, 1, 2, 1), (1, 32, 11, 21, 5, 2, 2, 1), (1, 16, 7, 10, (3, 5), 1, (1, 2), 1)],
                         ids=["c37k3s1", "c64k5s2", "c9k3p4", "c16k3s1", "c32k3s2", "c16k3d21", "c256k3s2",
                              "c16k5s1", "c32k5s2", "c16k35"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_channels_last_streamed_output(backend, dtype, case, monkeypatch):
    """Where input + output exceed a third of the last-level cache the C++ channels_last forward (and
    the backward-input: at stride 1 the same kernel) streams its output with non-temporal stores; a
    tiny DLKERNELS_LLC_BYTES reaches that path on small tensors (other backends ignore it)."""
    monkeypatch.setenv("DLKERNELS_LLC_BYTES", "1")
    n, c, h, w, k, s, p, d = case
    x = leaf(torch.randn(n, c, h, w, device=DEVICE, dtype=dtype).contiguous(memory_format=torch.channels_last))
    kh, kw = (k, k) if isinstance(k, int) else k
    weight, b = leaf(torch.randn(c, 1, kh, kw, device=DEVICE, dtype=dtype)), leaf(torch.randn(c, device=DEVICE, dtype=dtype))
    out = dlkernels.depthwise_conv2d(x, weight, b, s, p, d, backend=backend)
    ins64 = [as64(t) for t in (x, weight, b)]
    ref = F.conv2d(*ins64, s, p, d, groups=c)
    assert_close(out, ref, dtype, "forward")
    assert out.is_contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(ref)
    for got, exp, name in zip(grads(out, [x, weight, b], g.to(dtype)), grads(ref, ins64, g), "xwb"):
        assert_close(got, exp, dtype, f"grad {name}")


def test_no_bias_unbatched_and_non_contiguous(backend):
    x = leaf(torch.randn(2, 6, 12, 10, device=DEVICE)[:, ::2, 1:, 1:9])  # channel- and row-strided view
    w = leaf(torch.randn(3, 1, 3, 3, device=DEVICE))
    out = dlkernels.depthwise_conv2d(x, w, None, 1, 1, backend=backend)
    x64, w64 = as64(x), as64(w)
    ref = F.conv2d(x64, w64, None, 1, 1, groups=3)
    assert_close(out, ref, what="non-contiguous")
    g = torch.randn_like(ref)
    for got, exp, name in zip(grads(out, [x, w], g.float()), grads(ref, [x64, w64], g), "xw"):
        assert_close(got, exp, torch.float32, f"grad {name}")
    u = torch.randn(3, 7, 5, device=DEVICE)
    assert_close(dlkernels.depthwise_conv2d(u, w.detach(), padding=1, backend=backend),
                 F.conv2d(u.double(), w.detach().double(), padding=1, groups=3), what="unbatched")


def test_gradcheck(backend):
    # small: gradcheck runs the op twice per input element, and Triton's interpreter is slow
    x = leaf(torch.randn(1, 2, 4, 5, device=DEVICE, dtype=torch.float64))
    w = leaf(torch.randn(4, 1, 3, 2, device=DEVICE, dtype=torch.float64))
    b = leaf(torch.randn(4, device=DEVICE, dtype=torch.float64))
    assert torch.autograd.gradcheck(
        lambda x, w, b: dlkernels.depthwise_conv2d(x, w, b, (2, 1), (1, 0), (1, 2), backend=backend), (x, w, b))
    xc = leaf(x.detach().contiguous(memory_format=torch.channels_last))
    assert torch.autograd.gradcheck(lambda x, w: dlkernels.depthwise_conv2d(x, w, None, 1, "same", backend=backend),
                                    (xc, w))


def test_gradgradcheck(backend):
    """Second derivatives: the backward's own gradients are the forward, input- and weight-gradient
    kernels again (depthwise/op.py: _double_backward), at a stride, a multiplier of 2 and channels_last."""
    x = leaf(torch.randn(1, 2, 4, 5, device=DEVICE, dtype=torch.float64))
    w = leaf(torch.randn(4, 1, 3, 2, device=DEVICE, dtype=torch.float64))
    b = leaf(torch.randn(4, device=DEVICE, dtype=torch.float64))
    fast = backend == "triton"
    assert torch.autograd.gradgradcheck(
        lambda x, w, b: dlkernels.depthwise_conv2d(x, w, b, (2, 1), (1, 0), (1, 2), backend=backend), (x, w, b),
        fast_mode=fast)
    xc = leaf(x.detach().contiguous(memory_format=torch.channels_last))
    assert torch.autograd.gradgradcheck(
        lambda x, w: dlkernels.depthwise_conv2d(x, w, None, 1, "same", backend=backend), (xc, w), fast_mode=fast)


def test_opcheck(backend):
    for cl in (False, True):
        x = torch.randn(2, 3, 7, 6, device=DEVICE)
        x = leaf(x.contiguous(memory_format=torch.channels_last) if cl else x)
        w, b = leaf(torch.randn(6, 1, 3, 3, device=DEVICE)), leaf(torch.randn(6, device=DEVICE))
        torch.library.opcheck(torch.ops.dlkernels.depthwise_conv2d.default,
                              (x, w, b, [2, 1], [1, 1], [1, 1], [4, 6], backend))
        g = torch.randn(2, 6, 4, 6, device=DEVICE)
        torch.library.opcheck(torch.ops.dlkernels.depthwise_conv2d_backward.default,
                              (g, x.detach(), w.detach(), [2, 1], [1, 1], [1, 1], [True, True, True], backend))


def test_compile_fullgraph(backend):
    def block(x, w, b):
        return torch.relu(dlkernels.depthwise_conv2d(x, w, b, 1, 1, backend=backend))

    x = torch.randn(2, 4, 8, 8, device=DEVICE).contiguous(memory_format=torch.channels_last)
    w, b = leaf(torch.randn(4, 1, 3, 3, device=DEVICE)), leaf(torch.randn(4, device=DEVICE))
    out = torch.compile(block, fullgraph=True, backend="aot_eager")(x, w, b)
    assert_close(out, block(x.double(), w.double(), b.double()), torch.float32, "compiled")
    out.sum().backward()
    assert w.grad is not None


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS + ["torch"])
def test_bad_inputs(backend_name, on_test_device):
    x = torch.randn(2, 3, 8, 8)
    w = torch.randn(3, 1, 3, 3)
    f = dlkernels.depthwise_conv2d
    with pytest.raises(TypeError, match="dense"):
        f(x.to_sparse(), w, backend=backend_name)
    with pytest.raises(ValueError, match=r"\(C\*m, 1, kH, kW\)"):
        f(x, torch.randn(3, 3, 3, 3), backend=backend_name)
    with pytest.raises(ValueError, match=r"C = input.shape\[-3\] = 3"):
        f(x, torch.randn(4, 1, 3, 3), backend=backend_name)  # channel mismatch
    with pytest.raises(ValueError, match="stride must be >= 1"):
        f(x, w, stride=0, backend=backend_name)
    with pytest.raises(ValueError, match="stride must be >= 1"):
        f(x, w, stride=(1, -1), backend=backend_name)
    with pytest.raises(ValueError, match="padding must be >= 0"):
        f(x, w, padding=-1, backend=backend_name)
    with pytest.raises(ValueError, match="dilation must be >= 1"):
        f(x, w, dilation=0, backend=backend_name)
    with pytest.raises(TypeError, match="floating-point"):
        f(x.to(torch.int32), w.to(torch.int32), backend=backend_name)
    with pytest.raises(ValueError, match="kernel can't be greater"):
        f(torch.randn(1, 3, 2, 2), w, backend=backend_name)
    with pytest.raises(ValueError, match="'same' is not supported for strided"):
        f(x, w, stride=2, padding="same", backend=backend_name)
    with pytest.raises(ValueError, match="bias must have shape"):
        f(x, w, torch.randn(4), backend=backend_name)
    with pytest.raises(ValueError, match="3 or 4 dimensions"):
        f(torch.randn(8, 8), w, backend=backend_name)
    with pytest.raises(TypeError, match="one dtype"):
        f(x, w.double(), backend=backend_name)
    with pytest.raises(ValueError, match="padding must be 'same', 'valid'"):
        f(x, w, padding="full", backend=backend_name)


@pytest.mark.parametrize("backend", [b for b in KERNEL_BACKENDS if b == "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_low_precision(backend, dtype, channels_last):
    # Triton only (the CPU backends reject 16-bit types): fp32 accumulation, one rounding of the output
    x, w, b, kw = _inputs((2, 5, 9, 7, 3, 2, 1, 1, 2), dtype, channels_last)
    out = dlkernels.depthwise_conv2d(x, w, b, backend=backend, **kw)
    x64, w64, b64 = as64(x), as64(w), as64(b)
    ref = F.conv2d(x64, w64, b64, groups=5, **kw)
    assert out.dtype == dtype
    assert_close(out, ref, what="forward")
    g = torch.randn_like(ref)
    for got, exp, name in zip(grads(out, [x, w, b], g.to(dtype)), grads(ref, [x64, w64, b64], g), "xwb"):
        assert_close(got, exp, dtype, f"grad {name}", factor=4)


@pytest.mark.parametrize("case", [(2, 5, 7, 7, 3, 1, 1, 2), (1, 3, 10, 10, 5, 1, 2, 3), (1, 3, 9, 11, 3, 1, 1, 2)],
                         ids=["c5m2p7", "c3m3p10", "c3m2p9x11"])
@pytest.mark.parametrize("backend", LARGE_BACKENDS)
def test_input_gradient_kernel_multiplier(backend, case):
    """The backends' input-gradient kernels also take the multiplier in one call (in_channels; the op
    calls them once per j with m = 1): grad_x(c) sums the m grad_y planes c*m + j, small "same" planes
    included (the C++ masked sweep)."""
    kernels = _dispatch.kernels("depthwise", backend, DEVICE)
    n, c, h, w, k, s, p, m = case
    x = torch.randn(n, c, h, w, dtype=torch.float64, device=DEVICE, requires_grad=True)
    weight = torch.randn(c * m, 1, k, k, dtype=torch.float64, device=DEVICE)
    y = F.conv2d(x, weight, None, s, p, 1, groups=c)
    gy = torch.randn_like(y)
    (ref,) = torch.autograd.grad(y, x, gy)
    got = kernels.depthwise_bwd_input(gy, weight, (h, w), (s, s), (p, p), (1, 1), in_channels=c)
    assert_close(got, ref, torch.float64, "grad x")


@pytest.mark.parametrize("multiplier", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("batched", ["x", "w+b", "x+w+b"])
def test_depthwise_under_vmap(backend, multiplier, channels_last, batched):
    """torch.vmap over depthwise_conv2d, whichever of input, weight and bias is vmapped (per-example inputs,
    an ensemble's weights), runs as one call over the examples' channels (no per-example fallback) and
    equals a loop; so do per-example gradients of everything vmapped (vmap of grad)."""
    n, c = 3, 3
    x = torch.randn(n, 2, c, 7, 6, device=DEVICE, dtype=torch.float64)
    x = x if "x" in batched else x[0]
    if channels_last:
        x = x.transpose(-3, -1).contiguous().transpose(-3, -1)
    w = torch.randn(n, c * multiplier, 1, 3, 3, device=DEVICE, dtype=torch.float64)
    w = w if "w" in batched else w[0]
    b = torch.randn(n, c * multiplier, device=DEVICE, dtype=torch.float64)
    b = b if "b" in batched else b[0]
    dims = tuple(0 if k in batched else None for k in ("x", "w", "b"))
    pick = [lambda t, i, d=d: t[i] if d == 0 else t for d in dims]

    def f(*a):
        return dlkernels.depthwise_conv2d(*a, 2, 1, backend=backend)

    def ref(*a):
        return F.conv2d(*a, 2, 1, 1, c)

    argnums = tuple(i for i, d in enumerate(dims) if d == 0)
    with no_vmap_fallback():
        out = torch.func.vmap(f, in_dims=dims)(x, w, b)
        per_example = torch.func.vmap(torch.func.grad(lambda *a: f(*a).sin().sum(), argnums=argnums), in_dims=dims)(x, w, b)
    for i in range(n):
        args = [p(t, i) for p, t in zip(pick, (x, w, b))]
        torch.testing.assert_close(out[i], ref(*args), rtol=1e-9, atol=1e-9)
        want = torch.func.grad(lambda *a: ref(*a).sin().sum(), argnums=argnums)(*args)
        for got, wnt in zip(per_example, want):
            torch.testing.assert_close(got[i], wnt, rtol=1e-9, atol=1e-9)
