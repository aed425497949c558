"""pointwise_conv2d and the fused separable_conv2d on every backend against torch's convs in
float64: forward, every gradient, layouts, odd sizes; gradcheck, opcheck, torch.compile, bad inputs."""
import pytest
import torch
import torch.nn.functional as F

import dlkernels
from helpers import (DEVICE, KERNEL_BACKENDS, LARGE_BACKENDS, as64, assert_close, assert_close_non_finite, grads, leaf,
                     no_vmap_fallback)


def _x(shape, dtype, channels_last):
    x = torch.randn(shape, device=DEVICE).to(dtype)
    return leaf(x.contiguous(memory_format=torch.channels_last) if channels_last else x)


# (N, C, H, W, O)
# (3, 24, 2, 3, 20): few pixels an image, whose NCHW weight gradient is one GEMM over all of them
# (3, 300, 9, 11, 80): 99 pixels an image, whose NCHW forward and input gradient are each one GEMM
# over the batch's pixels in C++ (ColRuns), two K slices forward; (4, 270, 2, 3, 9): panels across
# several images, two K slices; (3, 5, 1, 1, 6): as few pixels in all as the GEMM's skinny path takes
PW_CASES = [(2, 3, 5, 7, 4), (1, 1, 1, 1, 1), (3, 17, 4, 3, 13), (1, 32, 9, 11, 40), (3, 24, 2, 3, 20),
            (3, 300, 9, 11, 80), (4, 270, 2, 3, 9), (3, 5, 1, 1, 6)]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("case", PW_CASES, ids=str)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_pointwise(backend, dtype, with_bias, case, channels_last):
    n, c, h, w, o = case
    x = _x((n, c, h, w), dtype, channels_last)
    wt = leaf(torch.randn(o, c, 1, 1, device=DEVICE).to(dtype) / c ** 0.5)
    b = leaf(torch.randn(o, device=DEVICE).to(dtype)) if with_bias else None
    out = dlkernels.pointwise_conv2d(x, wt, b, backend=backend)
    x64, w64, b64 = as64(x), as64(wt), as64(b)
    ref = F.conv2d(x64, w64, b64)
    assert_close(out, ref, what="pointwise")
    if channels_last and c > 1 and h * w > 1:
        assert out.is_contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(ref)
    for got, exp, name in zip(grads(out, [x, wt, b], g.to(dtype)), grads(ref, [x64, w64, b64], g), "xwb"):
        if exp is not None:
            assert_close(got, exp, dtype, f"grad {name}")


# (N, C, H, W, kernel, stride, padding, dilation, multiplier, O)
SEP_CASES = [
    (2, 3, 9, 7, 3, 1, 1, 1, 1, 5),
    (1, 4, 8, 8, 3, 2, "valid", 1, 1, 6),
    (2, 2, 11, 13, 5, 1, "same", 1, 2, 3),
    (1, 5, 7, 6, (3, 2), (2, 1), (1, 0), (1, 2), 1, 7),
    (1, 1, 1, 1, 1, 1, 0, 1, 1, 1),
    (1, 3, 13, 11, 3, 3, 2, 3, 3, 17),
    (2, 20, 6, 5, 3, 1, 1, 1, 1, 33),  # channels and outputs past one 16-wide block
    (1, 20, 21, 19, 3, 1, 1, 1, 1, 9),  # larger image: whole pixel tiles, several channel blocks
]


def _sep_ids(c):
    return "n{}c{}_{}x{}_k{}_s{}_p{}_d{}_m{}_o{}".format(*c).replace(" ", "")


def _check_forward(backend, dtype, case, channels_last, what="separable"):
    """Runs one SEP_CASES case forward against the float64 two-conv reference and checks the
    output and its layout; returns (out, the inputs, their float64 copies, the reference)."""
    n, c, h, w, k, s, p, d, m, o = case
    kh, kw = (k, k) if isinstance(k, int) else k
    x = _x((n, c, h, w), dtype, channels_last)
    dw = leaf(torch.randn(c * m, 1, kh, kw, device=DEVICE).to(dtype) / (kh * kw) ** 0.5)
    pw = leaf(torch.randn(o, c * m, 1, 1, device=DEVICE).to(dtype) / (c * m) ** 0.5)
    b = leaf(torch.randn(o, device=DEVICE).to(dtype))
    out = dlkernels.separable_conv2d(x, dw, pw, b, s, p, d, backend=backend)
    ins64 = [as64(t) for t in (x, dw, pw, b)]
    ref = F.conv2d(F.conv2d(ins64[0], ins64[1], None, s, p, d, groups=c), ins64[2], ins64[3])
    assert_close(out, ref, what=what)
    if channels_last and c > 1 and h * w > 1 and out.shape[2] * out.shape[3] > 1:
        assert out.is_contiguous(memory_format=torch.channels_last)
    return out, [x, dw, pw, b], ins64, ref


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("case", SEP_CASES, ids=_sep_ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_separable(backend, dtype, case, channels_last):
    out, ins, ins64, ref = _check_forward(backend, dtype, case, channels_last)
    g = torch.randn_like(ref)
    for got, exp, name in zip(grads(out, ins, g.to(dtype)), grads(ref, ins64, g), ["x", "dw", "pw", "b"]):
        assert_close(got, exp, dtype, f"grad {name}")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_non_finite_values(backend, channels_last):
    """An inf in x and a NaN in grad_y reach the output and every gradient where torch's two convs
    put them, and only there (as test_depthwise's test_non_finite_values: against torch in float32,
    whose depthwise weight gradient skips the window's padding)."""
    x = torch.randn(2, 4, 9, 11, device=DEVICE)
    x[0, 1, 8, 10] = float("inf")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dw, pw, b = torch.randn(4, 1, 3, 3, device=DEVICE), torch.randn(5, 4, 1, 1, device=DEVICE), torch.randn(5, device=DEVICE)
    g = torch.randn(2, 5, 9, 11, device=DEVICE)
    g[1, 2, 8, 10] = float("nan")
    ins, ref_ins = [leaf(t) for t in (x, dw, pw, b)], [leaf(t) for t in (x, dw, pw, b)]
    out = dlkernels.separable_conv2d(*ins, 1, 1, backend=backend)
    ref = F.conv2d(F.conv2d(ref_ins[0], ref_ins[1], None, 1, 1, groups=4), ref_ins[2], ref_ins[3])
    for got, exp, name in zip([out, *grads(out, ins, g)], [ref, *grads(ref, ref_ins, g)], ["out", "x", "dw", "pw", "b"]):
        assert_close_non_finite(got, exp, name)


# Pixel rows of 2-8 KiB of channels, as in test_depthwise's test_wide_channel_rows: the fused C++
# kernel's depthwise part pads its weight taps apart and stores whole-line pixel blocks. And the
# C++ GEMM's 4 x 3-vector tile (17-24 float or 9-12 double outputs): 300 channels in two K slices,
# 35 pixels, so a partial last tile of rows. And NCHW planes of wide rows (test_depthwise's
# test_nchw_wide_rows).
WIDE_CASES = [(1, 1024, 10, 10, 3, 1, 1, 1, 1, 24), (2, 512, 10, 10, 3, 2, 1, 1, 1, 8),
              (1, 300, 7, 5, 3, 1, 1, 1, 1, 20), (1, 300, 7, 5, 3, 1, 1, 1, 1, 11),
              # NCHW rows of 32 or more: the C++ 3x3 fixed-tap kernels, prefetched planes
              (2, 6, 37, 35, 3, 1, 1, 1, 1, 7), (1, 4, 38, 71, 3, 2, 1, 1, 2, 5),
              # channels-last stride 2, 19 interior pixels a row: x read in place
              (1, 37, 9, 40, 3, 2, 1, 1, 1, 6)]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("case", WIDE_CASES, ids=_sep_ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("backend", LARGE_BACKENDS)
def test_separable_wide_channel_rows(backend, dtype, case, channels_last):
    test_separable(backend, dtype, case, channels_last)


@pytest.mark.parametrize("backend", [b for b in KERNEL_BACKENDS if b == "cpp"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("case", SEP_CASES + WIDE_CASES, ids=_sep_ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_separable_cpp_fused_on_small_planes(backend, dtype, case, channels_last, monkeypatch):
    """The C++ backend runs channels-last planes of up to 12x12 outputs as blocks of images (a
    depthwise pass then one GEMM); its row-block fused kernel still takes any plane given to it (the
    cases above at 12x12 or fewer reach it here; NCHW always runs as image blocks)."""
    from dlkernels.separable import cpp_impl
    monkeypatch.setattr(cpp_impl, "IMAGE_BLOCK_MAX_PIXELS", 0)
    test_separable(backend, dtype, case, channels_last)


@pytest.mark.parametrize("backend", [b for b in KERNEL_BACKENDS if b == "triton"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("case", SEP_CASES[:4] + SEP_CASES[-2:], ids=_sep_ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_two_pass_forward(backend, dtype, case, channels_last, monkeypatch):
    # Triton's other forward path (depthwise kernel, then matmul kernel), which a GPU picks where it
    # times faster; the backward does not depend on the path
    from dlkernels.separable import triton_impl
    monkeypatch.setattr(triton_impl, "PATH", "two_pass")
    _check_forward(backend, dtype, case, channels_last, what="separable (two passes)")


@pytest.mark.parametrize("backend", [b for b in KERNEL_BACKENDS if b == "triton"])
def test_timed_path_choice(backend, monkeypatch):
    # Tuned, Triton times each new shape fused and in two passes, then runs the faster. On CUDA the
    # real timer (graph_bench: CUDA graphs); under the interpreter a stand-in that runs the path and
    # makes two passes the faster, so the choice differs from the untuned default (fused).
    from dlkernels.separable import triton_impl
    monkeypatch.setattr(triton_impl, "autotuning", lambda: True)
    monkeypatch.setattr(triton_impl, "_chosen", {})
    monkeypatch.setattr(triton_impl, "_timings", {})
    if DEVICE.type != "cuda":
        costs = {"fused": 2.0, "two_pass": 1.0}
        order = iter(costs)  # _timed_choice times fused, then two passes
        monkeypatch.setattr(triton_impl, "_time_path", lambda run: (run(), costs[next(order)])[1])
    _check_forward(backend, torch.float32, SEP_CASES[1], True, what="separable (timed choice)")
    [(key, times)] = triton_impl._timings.items()
    assert set(times) == {"fused", "two_pass"} and all(t > 0 for t in times.values())
    chosen = triton_impl._chosen[key]
    assert chosen == min(times, key=times.get)
    if DEVICE.type != "cuda":
        assert chosen == "two_pass"
    # the choice is kept: the next call of that shape runs the chosen path alone, untimed
    ran = []
    for name in ("_fused", "_two_pass"):
        path = getattr(triton_impl, name)
        monkeypatch.setattr(triton_impl, name, lambda *a, _p=path, _n=name: (ran.append(_n), _p(*a))[1])
    _check_forward(backend, torch.float32, SEP_CASES[1], True, what="separable (kept choice)")
    assert ran == ["_" + chosen] and len(triton_impl._timings) == 1


@pytest.mark.parametrize("llc_bytes", ["1", "9216"], ids=["one_image_blocks", "blocks_2_2_1"])
def test_separable_nchw_image_blocks(backend, llc_bytes, monkeypatch):
    # The C++ NCHW forward runs blocks of whole images (the depthwise output of a block filling a
    # quarter of the LLC) through the depthwise kernels and then the GEMM; a small
    # DLKERNELS_LLC_BYTES makes several blocks: one image each, or 5 images of 1152 float64 bytes of
    # intermediate as 2 + 2 + 1 (other backends ignore it)
    monkeypatch.setenv("DLKERNELS_LLC_BYTES", llc_bytes)
    _check_forward(backend, torch.float64, (5, 4, 6, 6, 3, 1, 1, 1, 1, 7), False)
    _check_forward(backend, torch.float64, (3, 3, 13, 11, 3, 3, 2, 3, 3, 17), False)
    _check_forward(backend, torch.float32, (4, 20, 6, 5, 3, 2, 1, 1, 1, 33), False)


@pytest.mark.parametrize("backend", [b for b in KERNEL_BACKENDS if b == "triton"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_pointwise_split_k(backend, channels_last, monkeypatch):
    # Triton's split-K GEMM, which a GPU takes for the channels-last weight gradient (K = every
    # pixel of the batch); NCHW brings the bias per row of the output
    from dlkernels.matmul import triton_impl
    monkeypatch.setattr(triton_impl, "SPLIT_K", 3)
    test_pointwise(backend, torch.float32, True, (3, 17, 4, 3, 13), channels_last)


def test_separable_unbatched_no_bias(backend):
    x = torch.randn(3, 6, 5, device=DEVICE)
    dw, pw = torch.randn(3, 1, 3, 3, device=DEVICE), torch.randn(4, 3, 1, 1, device=DEVICE)
    out = dlkernels.separable_conv2d(x, dw, pw, None, 1, 1, backend=backend)
    ref = F.conv2d(F.conv2d(x.double(), dw.double(), None, 1, 1, groups=3), pw.double())
    assert_close(out, ref, what="unbatched")


# non-contiguous views: a subsampled channels_last tensor (ResNet's strided 1x1 shortcut), a
# subsampled NCHW one, a channel slice of a channels_last one, an NCHW tensor with H and W swapped
VIEWS = {
    "cl-subsampled": lambda t: t.contiguous(memory_format=torch.channels_last)[..., ::2, 1::2],
    "nchw-subsampled": lambda t: t[..., ::2, 1::2],
    "cl-channel-slice": lambda t: t.contiguous(memory_format=torch.channels_last)[:, 1:],
    "hw-transposed": lambda t: t.transpose(2, 3),
}
CONV_OPS = {
    "pointwise": (lambda x, w, b, backend: dlkernels.pointwise_conv2d(x, w, b, backend=backend),
                  lambda x, w, b: F.conv2d(x, w, b), (5, 4, 1, 1)),
    "depthwise": (lambda x, w, b, backend: dlkernels.depthwise_conv2d(x, w, b, 1, 1, backend=backend),
                  lambda x, w, b: F.conv2d(x, w, b, 1, 1, groups=4), (4, 1, 3, 3)),
    "separable": (lambda x, w, b, backend: dlkernels.separable_conv2d(x, DW, w, b, 1, 1, backend=backend),
                  lambda x, w, b: F.conv2d(F.conv2d(x, DW.double(), None, 1, 1, groups=4), w, b), (5, 4, 1, 1)),
}
DW = torch.randn(4, 1, 3, 3, device=DEVICE)


@pytest.mark.parametrize("op", list(CONV_OPS))
@pytest.mark.parametrize("view", list(VIEWS))
def test_non_contiguous_views(backend, op, view):
    """A non-contiguous input is copied to NCHW (torch's own convs do not agree on a rule here: float64
    keeps a subsampled channels_last input channels_last, float32 oneDNN gives NCHW), and an NCHW
    output comes back whatever the input's strides, as the fake implementation says under
    torch.compile, whose Inductor may hand the op other strides than it traced; values and gradients
    equal to torch's."""
    ours, theirs, wshape = CONV_OPS[op]
    x = leaf(VIEWS[view](torch.randn(3, 5 if view == "cl-channel-slice" else 4, 9, 8, device=DEVICE)))
    w, b = leaf(torch.randn(*wshape, device=DEVICE)), leaf(torch.randn(wshape[0], device=DEVICE))
    out = ours(x, w, b, backend)
    ins64 = [as64(t) for t in (x, w, b)]
    ref = theirs(*ins64)
    assert_close(out, ref, what=view)
    assert out.is_contiguous()
    g = torch.randn_like(ref)
    for got, exp, name in zip(grads(out, [x, w, b], g.float()), grads(ref, ins64, g), "xwb"):
        assert_close(got, exp, torch.float32, f"{view} grad {name}")


def test_gradcheck(backend):
    f64 = dict(device=DEVICE, dtype=torch.float64)
    # small: gradcheck runs the op twice per input element, and Triton's interpreter is slow
    x = leaf(torch.randn(1, 3, 4, 3, **f64))
    dw, pw, b = leaf(torch.randn(6, 1, 2, 2, **f64)), leaf(torch.randn(3, 6, 1, 1, **f64)), leaf(torch.randn(3, **f64))
    assert torch.autograd.gradcheck(
        lambda x, dw, pw, b: dlkernels.separable_conv2d(x, dw, pw, b, 2, 1, backend=backend), (x, dw, pw, b))
    xc = leaf(x.detach().contiguous(memory_format=torch.channels_last))
    assert torch.autograd.gradcheck(lambda x, w, b: dlkernels.pointwise_conv2d(x, w, b, backend=backend),
                                    (xc, leaf(torch.randn(2, 3, 1, 1, **f64)), leaf(torch.randn(2, **f64))))


def test_gradgradcheck(backend):
    """Second derivatives of the fused op and of the 1x1 conv with a bias (per-row bias sums)."""
    f64 = dict(device=DEVICE, dtype=torch.float64)
    x = leaf(torch.randn(1, 3, 4, 3, **f64))
    dw, pw, b = leaf(torch.randn(6, 1, 2, 2, **f64)), leaf(torch.randn(3, 6, 1, 1, **f64)), leaf(torch.randn(3, **f64))
    fast = backend == "triton"
    assert torch.autograd.gradgradcheck(
        lambda x, dw, pw, b: dlkernels.separable_conv2d(x, dw, pw, b, 2, 1, backend=backend), (x, dw, pw, b),
        fast_mode=fast)
    for cl in (False, True):
        xp = leaf(x.detach().contiguous(memory_format=torch.channels_last) if cl else x.detach())
        assert torch.autograd.gradgradcheck(lambda x, w, b: dlkernels.pointwise_conv2d(x, w, b, backend=backend),
                                            (xp, leaf(torch.randn(2, 3, 1, 1, **f64)), leaf(torch.randn(2, **f64))),
                                            fast_mode=fast)


def test_opcheck(backend):
    for cl in (False, True):
        x = _x((2, 3, 6, 5), torch.float32, cl)
        dw, pw, b = leaf(torch.randn(3, 1, 3, 3, device=DEVICE)), leaf(torch.randn(4, 3, 1, 1, device=DEVICE)), \
            leaf(torch.randn(4, device=DEVICE))
        torch.library.opcheck(torch.ops.dlkernels.separable_conv2d.default,
                              (x, dw, pw, b, [1, 1], [1, 1], [1, 1], [6, 5], backend))
        torch.library.opcheck(torch.ops.dlkernels.pointwise_conv2d.default, (x, pw, b, backend))


def test_compile_fullgraph(backend):
    def block(x, dw, pw, b):
        return torch.relu(dlkernels.separable_conv2d(x, dw, pw, b, 1, 1, backend=backend))

    x = torch.randn(2, 4, 6, 6, device=DEVICE).contiguous(memory_format=torch.channels_last)
    dw, pw, b = leaf(torch.randn(4, 1, 3, 3, device=DEVICE)), leaf(torch.randn(8, 4, 1, 1, device=DEVICE)), \
        leaf(torch.randn(8, device=DEVICE))
    out = torch.compile(block, fullgraph=True, backend="aot_eager")(x, dw, pw, b)
    assert_close(out, block(x.double(), dw.double(), pw.double(), b.double()), torch.float32, "compiled")
    out.sum().backward()
    assert dw.grad is not None and pw.grad is not None


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS + ["torch"])
def test_bad_inputs(backend_name, on_test_device):
    x = torch.randn(2, 3, 8, 8)
    dw, pw = torch.randn(3, 1, 3, 3), torch.randn(4, 3, 1, 1)
    with pytest.raises(ValueError, match=r"weight must have shape \(O, 3, 1, 1\)"):
        dlkernels.separable_conv2d(x, dw, torch.randn(4, 5, 1, 1), backend=backend_name)
    with pytest.raises(ValueError, match=r"weight must have shape \(O, 3, 1, 1\)"):
        dlkernels.pointwise_conv2d(x, torch.randn(4, 3, 3, 3), backend=backend_name)
    with pytest.raises(ValueError, match=r"O >= 1"):  # as torch: no output channels is an error
        dlkernels.separable_conv2d(x, dw, torch.randn(0, 3, 1, 1), backend=backend_name)
    with pytest.raises(ValueError, match=r"\(C\*m, 1, kH, kW\)"):
        dlkernels.separable_conv2d(x, torch.randn(2, 1, 3, 3), pw, backend=backend_name)
    with pytest.raises(ValueError, match="stride must be >= 1"):
        dlkernels.separable_conv2d(x, dw, pw, stride=0, backend=backend_name)
    with pytest.raises(ValueError, match="bias must have shape"):
        dlkernels.separable_conv2d(x, dw, pw, torch.randn(3), backend=backend_name)
    with pytest.raises(TypeError, match="floating-point"):
        dlkernels.pointwise_conv2d(x.long(), pw.long(), backend=backend_name)


@pytest.mark.parametrize("backend", [b for b in KERNEL_BACKENDS if b == "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision(backend, dtype):
    # Triton only: the depthwise tile is rounded to the input dtype before tl.dot (as the two-conv
    # sequence rounds its intermediate), so two roundings: twice the one-rounding tolerance
    x = _x((2, 20, 6, 5), dtype, True)
    dw = torch.randn(20, 1, 3, 3, device=DEVICE).to(dtype) / 3
    pw = torch.randn(17, 20, 1, 1, device=DEVICE).to(dtype) / 20 ** 0.5
    b = torch.randn(17, device=DEVICE).to(dtype)
    out = dlkernels.separable_conv2d(x, dw, pw, b, 1, 1, backend=backend)
    ref = F.conv2d(F.conv2d(x.double(), dw.double(), None, 1, 1, groups=20), pw.double(), b.double())
    assert out.dtype == dtype
    assert_close(out, ref, what="separable", factor=2)


@pytest.mark.parametrize("op", ["separable", "pointwise"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("ensemble", [False, True])
def test_separable_and_pointwise_under_vmap(backend, op, channels_last, ensemble):
    """torch.vmap over separable_conv2d and pointwise_conv2d equals a loop, without torch's per-example
    fallback anywhere: per-example inputs as one batch (per-example gradients of the weights included:
    the backward runs on the depthwise and matmul rules), an ensemble's weights as a depthwise call over
    the examples' channels and a batched GEMM."""
    n, c, o = 3, 3, 4
    x = torch.randn(n, 2, c, 6, 5, device=DEVICE, dtype=torch.float64)
    if channels_last:
        x = x.transpose(-3, -1).contiguous().transpose(-3, -1)
    dw = torch.randn(*((n,) if ensemble else ()), c, 1, 3, 3, device=DEVICE, dtype=torch.float64)
    pw = torch.randn(*((n,) if ensemble else ()), o, c, 1, 1, device=DEVICE, dtype=torch.float64)
    b = torch.randn(*((n,) if ensemble else ()), o, device=DEVICE, dtype=torch.float64)
    d = 0 if ensemble else None
    if op == "separable":
        def f(x_, dw_, pw_, b_):
            return dlkernels.separable_conv2d(x_, dw_, pw_, b_, 1, 1, backend=backend)

        def ref(x_, dw_, pw_, b_):
            return F.conv2d(F.conv2d(x_, dw_, None, 1, 1, 1, c), pw_, b_)
    else:
        def f(x_, dw_, pw_, b_):
            return dlkernels.pointwise_conv2d(x_, pw_, b_, backend=backend)

        def ref(x_, dw_, pw_, b_):
            return F.conv2d(x_, pw_, b_)
    dims = (0, d, d, d)
    argnums = (0, 1, 2, 3) if op == "separable" else (0, 2, 3)
    with no_vmap_fallback():
        out = torch.func.vmap(f, in_dims=dims)(x, dw, pw, b)
        per_example = torch.func.vmap(torch.func.grad(lambda *a: f(*a).sin().sum(), argnums=argnums), in_dims=dims)(
            x, dw, pw, b)
    for i in range(n):
        args = [t[i] if dd == 0 else t for t, dd in zip((x, dw, pw, b), dims)]
        torch.testing.assert_close(out[i], ref(*args), rtol=1e-9, atol=1e-9)
        want = torch.func.grad(lambda *a: ref(*a).sin().sum(), argnums=argnums)(*args)
        for got, wnt in zip(per_example, want):
            torch.testing.assert_close(got[i], wnt, rtol=1e-9, atol=1e-9)
