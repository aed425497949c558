"""matmul and linear on every backend against torch in float64: forward, every gradient, odd and
transposed shapes, broadcasting, gradcheck, opcheck, torch.compile, and bad inputs."""
import pytest
import torch
import torch.nn.functional as F

import dlkernels
from helpers import DEVICE, KERNEL_BACKENDS, as64, assert_close, grads, leaf, no_vmap_fallback

# (a shape, b shape): 1, primes, non-multiples of any block, batched and broadcast
SHAPES = [
    ((1, 1), (1, 1)),
    ((7, 13), (13, 5)),
    ((17, 1), (1, 31)),
    ((64, 97), (97, 33)),
    ((129, 37), (37, 70)),
    ((40, 24), (24, 56)),           # M, N multiples of 8 (ALIGN_M/N hints), not of a tile
    ((3, 5, 7), (3, 7, 4)),
    ((2, 3, 5, 7), (3, 7, 4)),      # broadcast batch
    ((5, 7), (2, 7, 4)),            # 2-D a, batched b
    ((2, 1, 6, 11), (1, 3, 11, 2)),  # both broadcast
    ((4, 9, 23), (23, 6)),          # batch folds into M
    # one or two column panels, A read in place by the C++ GEMM: full and partial row tiles, two K
    # slices (K > 256)
    ((50, 301), (301, 12)),
    ((50, 301), (301, 20)),
    ((50, 301), (301, 24)),          # the AVX-512 vector-and-a-half tile, whole (float32)
    # a shared by a batch of b with a few column panels each: the C++ GEMM runs the batch as one
    # product over all its columns, panels straddling two matrices; two K slices
    ((90, 301), (3, 301, 99)),
]


def _rand(shape, dtype, transposed=False):
    if transposed and len(shape) >= 2:  # same values, column-major storage
        return torch.randn(*shape[:-2], shape[-1], shape[-2], device=DEVICE).to(dtype).mT
    return torch.randn(shape, device=DEVICE).to(dtype)


@pytest.mark.parametrize("transposed", [False, True], ids=["contig", "transposed"])
@pytest.mark.parametrize("shapes", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}".replace(" ", ""))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_matmul_forward_backward(backend, dtype, shapes, transposed):
    a = leaf(_rand(shapes[0], dtype, transposed))
    b = leaf(_rand(shapes[1], dtype, transposed))
    out = dlkernels.matmul(a, b, backend=backend)
    ref = torch.matmul(as64(a), as64(b))
    assert out.dtype == dtype
    assert_close(out, ref, what="matmul")
    g = torch.randn_like(ref)
    ga, gb = grads(out, [a, b], g.to(dtype))
    a64, b64 = as64(a), as64(b)
    ra, rb = grads(torch.matmul(a64, b64), [a64, b64], g)
    assert_close(ga, ra, dtype, "grad a")
    assert_close(gb, rb, dtype, "grad b")


def test_matmul_low_precision(backend):
    # float16/bfloat16 are Triton-only; the CPU backends reject them with a clear error
    for dtype in (torch.float16, torch.bfloat16):
        a, b = _rand((33, 40), dtype), _rand((40, 17), dtype)
        if backend == "triton":
            assert_close(dlkernels.matmul(a, b, backend=backend), a.double() @ b.double(), dtype, "matmul lowp")
        else:
            with pytest.raises(TypeError, match="computes in float32, float64"):
                dlkernels.matmul(a, b, backend=backend)


def test_matmul_non_contiguous_slices(backend):
    a = torch.randn(20, 30, device=DEVICE)[::2, 1::3]       # (10, 10) with strides (60, 3)
    b = torch.randn(10, 40, device=DEVICE)[:, ::4]          # (10, 10) with strides (40, 4)
    assert_close(dlkernels.matmul(a, b, backend=backend), a.double() @ b.double(), what="strided")
    ab = torch.randn(3, 1, 10, 10, device=DEVICE).expand(3, 2, 10, 10)  # stride-0 batch
    assert_close(dlkernels.matmul(ab, b, backend=backend), ab.double() @ b.double(), what="expanded")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("m,k,n", [(55, 70, 22), (1, 70, 22), (7, 18, 1), (263, 300, 40)], ids=str)
def test_matmul_stride_zero_operands(backend, dtype, m, k, n):
    # Expanded operands (a row or column broadcast, stride 0) come to the kernels as they are. An A
    # whose rows were one expanded row was once read past its end as a packed panel (NaN, garbage).
    row_a = torch.randn(k, device=DEVICE, dtype=dtype).expand(m, k)       # strides (0, 1)
    col_a = torch.randn(m, 1, device=DEVICE, dtype=dtype).expand(m, k)    # strides (1, 0)
    row_b = torch.randn(n, device=DEVICE, dtype=dtype).expand(k, n)       # strides (0, 1)
    col_b = torch.randn(k, 1, device=DEVICE, dtype=dtype).expand(k, n)    # strides (1, 0)
    dense_a, dense_b = torch.randn(m, k, device=DEVICE, dtype=dtype), torch.randn(k, n, device=DEVICE, dtype=dtype)
    for name, a, b in [("row a", row_a, dense_b), ("column a", col_a, dense_b), ("row b", dense_a, row_b),
                       ("column b", dense_a, col_b), ("both", row_a, col_b)]:
        assert_close(dlkernels.matmul(a, b, backend=backend), a.double() @ b.double(), dtype, name)
    # the backward multiplies by an expanded output gradient (e.g. of a mean or a sum)
    a, b = leaf(dense_a), leaf(dense_b)
    a64, b64 = as64(a), as64(b)
    g = torch.randn(n, device=DEVICE, dtype=torch.float64).expand(m, n)
    out = dlkernels.matmul(a, b, backend=backend)
    for got, exp, name in zip(grads(out, [a, b], g.to(dtype)), grads(a64 @ b64, [a64, b64], g), "ab"):
        assert_close(got, exp, dtype, f"grad {name}, expanded grad_out")
    w = leaf(torch.randn(n, k, device=DEVICE, dtype=dtype))
    w64 = as64(w)
    out, ref = dlkernels.linear(row_a, w, backend=backend), F.linear(row_a.double(), w64)
    assert_close(out, ref, dtype, "linear of an expanded input")
    assert_close(grads(out, [w], g.to(dtype))[0], grads(ref, [w64], g)[0], dtype, "linear grad w, expanded input")


def test_matmul_one_dim(backend):
    a, b, v = torch.randn(5, 7, device=DEVICE), torch.randn(2, 7, 3, device=DEVICE), torch.randn(7, device=DEVICE)
    assert_close(dlkernels.matmul(a, v, backend=backend), a.double() @ v.double(), what="matrix @ vector")
    assert_close(dlkernels.matmul(v, b, backend=backend), v.double() @ b.double(), what="vector @ batch")
    w = leaf(torch.randn(7, device=DEVICE))
    vv = leaf(v.clone())
    dot = dlkernels.matmul(vv, w, backend=backend)  # a 0-d result, as torch's dot
    ref = vv.double() @ w.double()
    assert_close(dot, ref, what="vector @ vector")
    g = torch.randn((), device=DEVICE, dtype=torch.float64)
    for got, exp, name in zip(grads(dot, [vv, w], g.float()), grads(ref, [vv, w], g), "ab"):
        assert_close(got, exp, torch.float32, f"vector @ vector grad {name}")
    with pytest.raises(ValueError, match="2 or more dimensions"):
        torch.ops.dlkernels.matmul(v, a.t(), backend)


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("in_shape", [(1, 1), (13, 29), (2, 5, 29), (3, 1, 4, 29)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_linear(backend, dtype, in_shape, with_bias, activation):
    k = in_shape[-1]
    x = leaf(torch.randn(in_shape, device=DEVICE).to(dtype))
    w = leaf(torch.randn(11, k, device=DEVICE).to(dtype) / k ** 0.5)
    b = leaf(torch.randn(11, device=DEVICE).to(dtype)) if with_bias else None
    out = dlkernels.linear(x, w, b, activation=activation, backend=backend)
    x64, w64, b64 = as64(x), as64(w), as64(b)
    ref = F.linear(x64, w64, b64)
    ref = torch.relu(ref) if activation else ref
    assert_close(out, ref, what="linear")
    g = torch.randn_like(ref)
    for got, exp, name in zip(grads(out, [x, w, b], g.to(dtype)), grads(ref, [x64, w64, b64], g), ["x", "w", "b"]):
        if exp is not None:
            assert_close(got, exp, dtype, f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_few_rows_against_transposed_b(backend, dtype):
    # A few rows of a against many columns of a b stored column-major (a linear layer's weight.t() at
    # a small batch): the C++ GEMM computes (a @ b)^T = b^T a^T and transposes it back, the bias and
    # ReLU fused into the swapped product (csrc/matmul.cpp, gemm_swaps): full and partial row tiles,
    # one and two K slices, the largest M it swaps
    for shapes in (((5, 40), (40, 70)), ((33, 301), (301, 130)), ((128, 128), (128, 257)), ((70, 90), (90, 149))):
        test_matmul_forward_backward(backend, dtype, shapes, True)
    for m, k, n in ((6, 50, 40), (31, 77, 200), (100, 257, 300)):
        x = leaf(torch.randn(m, k, device=DEVICE).to(dtype))
        w = leaf(torch.randn(n, k, device=DEVICE).to(dtype) / k ** 0.5)
        b = leaf(torch.randn(n, device=DEVICE).to(dtype))
        out = dlkernels.linear(x, w, b, activation="relu", backend=backend)
        x64, w64, b64 = as64(x), as64(w), as64(b)
        ref = torch.relu(F.linear(x64, w64, b64))
        assert_close(out, ref, what="linear")
        g = torch.randn_like(ref)
        for got, exp, name in zip(grads(out, [x, w, b], g.to(dtype)), grads(ref, [x64, w64, b64], g), "xwb"):
            assert_close(got, exp, dtype, f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_streamed_output(backend, dtype, monkeypatch):
    # Where a GEMM's operands and C outgrow a third of the LLC and K is one slice, the C++ GEMM
    # writes whole C tiles with non-temporal stores (rows of 16-float multiples; edge tiles stay
    # plain); a tiny DLKERNELS_LLC_BYTES reaches that path on small matrices (other backends ignore it)
    monkeypatch.setenv("DLKERNELS_LLC_BYTES", "1")
    # ((40, 37), (3, 37, 64)): a shared by a batch of whole-panel matrices, streamed as one product
    for shapes in (((50, 37), (37, 32)), ((3, 7, 20), (3, 20, 16)), ((61, 300), (300, 48)), ((40, 37), (3, 37, 64))):
        test_matmul_forward_backward(backend, dtype, shapes, False)
    test_linear(backend, dtype, (2, 5, 29), True, "relu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_long_k(backend, dtype):
    # C small and K long: the C++ GEMM splits K across its threads and adds the partial Cs with the
    # epilogue (bias, ReLU); a weight gradient's K is every pixel of the batch
    test_matmul_forward_backward(backend, dtype, ((24, 3001), (3001, 40)), False)
    test_matmul_forward_backward(backend, dtype, ((24, 3001), (3001, 40)), True)
    test_linear(backend, dtype, (100, 2000), True, "relu")
    test_linear(backend, dtype, (4, 25, 1999), True, None)


TRITON = [b for b in KERNEL_BACKENDS if b == "triton"]
# K long enough to split: plain, batched, broadcast batch, batch folded into M, prime K
SPLIT_SHAPES = [((129, 37), (37, 70)), ((3, 5, 70), (3, 70, 4)), ((2, 3, 5, 53), (3, 53, 4)),
                ((4, 9, 97), (97, 6)), ((50, 301), (301, 12))]


@pytest.mark.parametrize("backend", TRITON)
def test_split_k_choice(backend, monkeypatch):
    # The split-K cost model on an H100's 132 SMs, at the shapes whose measurements shaped it:
    # 2 output tiles over a long K split to one full wave; 96 tiles do not split (three waves of a
    # third of K each took as long, plus the partials); big square and MLP GEMMs never split
    from dlkernels.matmul import triton_impl
    monkeypatch.setattr(triton_impl, "target_programs", lambda device: 4 * 132)
    cuda = torch.device("cuda")
    splits = lambda m, n, k, nb=1: triton_impl._k_splits(nb, m, n, k, cuda)[0]
    assert splits(24, 144, 200704) == 66     # MobileNetV2 channels-last weight gradient
    assert splits(32, 1000, 2048) == 8       # ResNet-50 fc forward: 256 of K per split at least
    assert 2 <= splits(728, 728, 23104) <= 7  # Xception middle weight gradient, 36 tiles
    assert splits(1536, 1024, 6400) == 1     # Xception exit weight gradient, 96 tiles
    assert splits(24, 144, 200704, nb=70) == 1
    for m, n, k in ((1024, 1024, 1024), (512, 4096, 1024), (4096, 1024, 512), (1000, 2048, 32)):
        assert splits(m, n, k) == 1
    _, k_per = triton_impl._k_splits(1, 24, 144, 200704, cuda)
    assert k_per % 64 == 0 and 65 * k_per < 200704 <= 66 * k_per


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("splits", [2, 7])
@pytest.mark.parametrize("shapes", SPLIT_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}".replace(" ", ""))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_split_k(backend, dtype, shapes, splits, monkeypatch):
    # Triton's split-K path (partial tiles, then a sum with the epilogue), which a GPU takes where
    # the output has few tiles and K is long; the interpreter's shapes are too small to choose it
    from dlkernels.matmul import triton_impl
    monkeypatch.setattr(triton_impl, "SPLIT_K", splits)
    test_matmul_forward_backward(backend, dtype, shapes, False)


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("activation", [None, "relu"])
def test_split_k_epilogue(backend, activation, monkeypatch):
    # the bias (per column; per row: test_pointwise_split_k) and the ReLU, applied after the sum
    from dlkernels.matmul import triton_impl
    monkeypatch.setattr(triton_impl, "SPLIT_K", 3)
    test_linear(backend, torch.float32, (2, 5, 61), True, activation)
    for dtype in (torch.float16, torch.bfloat16):
        a, bm = _rand((33, 80), dtype), _rand((80, 17), dtype)
        assert_close(dlkernels.matmul(a, bm, backend=backend), a.double() @ bm.double(), dtype, "split lowp")


def test_linear_relu_keeps_nan(backend):
    x = torch.randn(4, 6, device=DEVICE)
    x[1, 2] = float("nan")
    w = torch.randn(5, 6, device=DEVICE)
    out = dlkernels.linear(x, w, activation="relu", backend=backend)
    ref = torch.relu(F.linear(x.double(), w.double()))
    assert torch.isnan(out[1]).all() and not torch.isnan(out[0]).any()
    assert_close(out, ref, what="relu nan")


def test_gradcheck(backend):
    a = leaf(torch.randn(3, 4, 5, device=DEVICE, dtype=torch.float64))
    b = leaf(torch.randn(5, 2, device=DEVICE, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda a, b: dlkernels.matmul(a, b, backend=backend), (a, b))
    x = leaf(torch.randn(2, 3, 5, device=DEVICE, dtype=torch.float64))
    w = leaf(torch.randn(4, 5, device=DEVICE, dtype=torch.float64))
    bias = leaf(torch.randn(4, device=DEVICE, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda x, w, b: dlkernels.linear(x, w, b, activation="relu", backend=backend),
                                    (x, w, bias))


def test_gradgradcheck(backend):
    """Second derivatives, the bias and ReLU epilogue's backward (bias_act_backward) included."""
    a = leaf(torch.randn(3, 4, 5, device=DEVICE, dtype=torch.float64))
    b = leaf(torch.randn(5, 2, device=DEVICE, dtype=torch.float64))
    fast = backend == "triton"
    assert torch.autograd.gradgradcheck(lambda a, b: dlkernels.matmul(a, b, backend=backend), (a, b), fast_mode=fast)
    x = leaf(torch.randn(2, 3, 5, device=DEVICE, dtype=torch.float64))
    w = leaf(torch.randn(4, 5, device=DEVICE, dtype=torch.float64))
    bias = leaf(torch.randn(4, device=DEVICE, dtype=torch.float64))
    for act in ("relu", None):
        assert torch.autograd.gradgradcheck(
            lambda x, w, b: dlkernels.linear(x, w, b, activation=act, backend=backend), (x, w, bias), fast_mode=fast)


def test_opcheck(backend):
    a = leaf(torch.randn(2, 5, 7, device=DEVICE))
    b = leaf(torch.randn(7, 3, device=DEVICE))
    torch.library.opcheck(torch.ops.dlkernels.matmul.default, (a, b, backend))
    x, w, bias = leaf(torch.randn(6, 7, device=DEVICE)), leaf(torch.randn(3, 7, device=DEVICE)), \
        leaf(torch.randn(3, device=DEVICE))
    torch.library.opcheck(torch.ops.dlkernels.linear.default, (x, w, bias, "relu", backend))
    torch.library.opcheck(torch.ops.dlkernels.linear.default, (x, w, None, "", backend))


def test_compile_fullgraph(backend):
    def mlp(x, w1, b1, w2):
        return dlkernels.matmul(dlkernels.linear(x, w1, b1, activation="relu", backend=backend), w2, backend=backend)

    x = torch.randn(8, 16, device=DEVICE)
    w1, b1, w2 = (leaf(torch.randn(s, device=DEVICE)) for s in [(32, 16), (32,), (32, 4)])
    compiled = torch.compile(mlp, fullgraph=True, backend="aot_eager")
    out = compiled(x, w1, b1, w2)
    assert_close(out, mlp(x.double(), w1.double(), b1.double(), w2.double()), torch.float32, "compiled")
    out.sum().backward()
    assert w1.grad is not None and torch.isfinite(w1.grad).all()


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS + ["torch"])
def test_bad_inputs(backend_name, on_test_device):
    a, b = torch.randn(3, 4), torch.randn(5, 6)
    with pytest.raises(ValueError, match="inner sizes"):
        dlkernels.matmul(a, b, backend=backend_name)
    with pytest.raises(TypeError, match="floating-point"):
        dlkernels.matmul(torch.ones(3, 4, dtype=torch.int64), torch.ones(4, 2, dtype=torch.int64), backend=backend_name)
    with pytest.raises(TypeError, match="one dtype"):
        dlkernels.matmul(torch.randn(3, 4), torch.randn(4, 2, dtype=torch.float64), backend=backend_name)
    with pytest.raises(ValueError, match="do not broadcast"):
        dlkernels.matmul(torch.randn(2, 3, 4), torch.randn(3, 4, 2), backend=backend_name)
    with pytest.raises(ValueError, match="weight.shape"):
        dlkernels.linear(torch.randn(3, 4), torch.randn(2, 5), backend=backend_name)
    with pytest.raises(ValueError, match="2 dimensions"):
        dlkernels.linear(torch.randn(3, 4), torch.randn(2, 3, 4), backend=backend_name)
    with pytest.raises(ValueError, match="bias must have shape"):
        dlkernels.linear(torch.randn(3, 4), torch.randn(2, 4), torch.randn(3), backend=backend_name)
    with pytest.raises(ValueError, match="activation"):
        dlkernels.linear(torch.randn(3, 4), torch.randn(2, 4), activation="gelu", backend=backend_name)
    with pytest.raises(ValueError, match="at least 1 dimension"):
        dlkernels.matmul(torch.randn(()), torch.randn(3), backend=backend_name)
    with pytest.raises(TypeError, match="dense"):  # (the cpp backend raised torch's "Cannot access data pointer")
        dlkernels.matmul(torch.randn(3, 4).to_sparse(), torch.randn(4, 2), backend=backend_name)
    with pytest.raises(TypeError, match="dense"):
        dlkernels.linear(torch.randn(3, 4), torch.randn(2, 4).to_sparse(), backend=backend_name)


def test_mixed_devices(backend):
    with pytest.raises(RuntimeError, match="one device"):
        torch.ops.dlkernels.matmul(torch.randn(3, 4), torch.randn(4, 2, device="meta"), backend)


def test_relu_backward_matches_torch_on_nan(backend):
    # torch's relu backward: 0 where the output is <= 0 (even for a NaN gradient); a NaN output
    # passes its gradient through
    x = torch.tensor([[float("nan"), -1.0, 2.0, 0.5]], device=DEVICE, dtype=torch.float64)
    w = leaf(torch.eye(4, device=DEVICE, dtype=torch.float64))
    g = torch.tensor([[1.0, float("nan"), 1.0, 3.0]], device=DEVICE, dtype=torch.float64)
    w_ref = leaf(w.detach().clone())
    (gw,) = grads(dlkernels.linear(x, w, activation="relu", backend=backend), [w], g)
    (gr,) = grads(torch.relu(F.linear(x, w_ref)), [w_ref], g)
    gx_pre, _ = torch.ops.dlkernels.bias_act_backward(g, torch.relu(x), "relu", 1, False, backend)
    assert torch.equal(torch.isnan(gx_pre), torch.isnan(torch.where(torch.relu(x) <= 0, 0, g)))
    assert torch.equal(torch.isnan(gw), torch.isnan(gr))


@pytest.mark.parametrize("rows", [1, 3, 4, 129, 263], ids=lambda r: f"rows{r}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_bias_act_backward_sums(backend, rows, dtype):
    """The bias gradient's sums (per column, bias_dim 1; per row over a batch, bias_dim 0) and relu's
    masked gradient: rows not a multiple of the C++ kernel's four at a time nor of its 128-row blocks,
    columns below and above the 256-byte width where it switches to one row at a time."""
    for n in (1, 5, 24, 64, 65, 130):
        g = torch.randn(rows, n, device=DEVICE, dtype=dtype)
        out = torch.randn(rows, n, device=DEVICE, dtype=dtype)
        for act in ("relu", ""):
            pre, gb = torch.ops.dlkernels.bias_act_backward(g, out, act, 1, True, backend)
            want = torch.where(out <= 0, 0, g) if act else g
            if act:
                assert torch.equal(pre, want)
            assert_close(gb, want.double().sum(0), what=f"column sums {rows}x{n} {act}")
        g3 = torch.randn(3, rows, n, device=DEVICE, dtype=dtype)
        _, gb = torch.ops.dlkernels.bias_act_backward(g3, g3, "", 0, True, backend)
        assert_close(gb, g3.double().sum((0, 2)), what=f"row sums 3x{rows}x{n}")


@pytest.mark.parametrize("kernel", ["mm", "mm_scalar_for_test"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cpp_gemm_epilogue(kernel, dtype):
    # The C++ GEMM's whole contract, as its other C++ callers use it: out = act((out if accumulate
    # else 0) + a @ b + bias), bias per column or per row, through the SIMD and the portable scalar
    # micro-kernels, in the plain order and the swapped one (few rows against a column-major b)
    pytest.importorskip("dlkernels._C")
    from dlkernels import _C
    mm = getattr(_C, kernel)
    torch.manual_seed(7)
    # (24 and 12 columns: AVX-512's vector-and-a-half tile, float32 and float64, over two K slices)
    for (m, k, n), b_col_major in (((37, 61, 45), False), ((37, 61, 45), True), ((37, 61, 90), True),
                                   ((9, 130, 70), True), ((37, 300, 24), False), ((37, 300, 12), True)):
        a = torch.randn(m, k, dtype=dtype)
        b = torch.randn(n, k, dtype=dtype).t() if b_col_major else torch.randn(k, n, dtype=dtype)
        for bias_dim in (0, 1):
            bias = torch.randn(m if bias_dim == 0 else n, dtype=dtype)
            for relu in (False, True):
                for accumulate in (False, True):
                    out = torch.randn(m, n, dtype=dtype)
                    pre = (out.double() if accumulate else 0) + a.double() @ b.double() + (
                        bias.double()[:, None] if bias_dim == 0 else bias.double())
                    mm(a.numpy(), b.numpy(), bias.numpy(), bias_dim, relu, out.numpy(), accumulate)
                    assert_close(out, torch.relu(pre) if relu else pre, dtype,
                                 f"{kernel} {m}x{k}x{n} col-major b {b_col_major} bias_dim {bias_dim} relu {relu} "
                                 f"accumulate {accumulate}")


@pytest.mark.parametrize("sa,sb", [((4, 5), (5, 6)), ((2, 4, 5), (5, 6)), ((4, 5), (3, 5, 6)), ((2, 1, 4, 5), (3, 5, 6))])
@pytest.mark.parametrize("batched", ["a", "b", "both"])
def test_matmul_under_vmap_is_one_batched_gemm(backend, sa, sb, batched):
    """torch.vmap over matmul equals a loop over the examples, with either or both operands vmapped and
    per-example ranks that differ, in one batched call (the vmap rule; torch's per-example fallback,
    which warns, would be one call an example)."""
    n = 3
    a = torch.randn(n, *sa, device=DEVICE) if batched != "b" else torch.randn(*sa, device=DEVICE)
    b = torch.randn(n, *sb, device=DEVICE) if batched != "a" else torch.randn(*sb, device=DEVICE)
    dims = (None if batched == "b" else 0, None if batched == "a" else 0)
    with no_vmap_fallback():
        out = torch.func.vmap(lambda x, y: dlkernels.matmul(x, y, backend=backend), in_dims=dims)(a, b)
    want = torch.stack([torch.matmul(a[i] if dims[0] == 0 else a, b[i] if dims[1] == 0 else b) for i in range(n)])
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("x_shape", [(7,), (4, 7), (2, 4, 7)])
@pytest.mark.parametrize("batched", ["x", "w", "b", "x+w", "w+b", "x+w+b"])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_linear_under_vmap(backend, x_shape, batched, activation):
    """torch.vmap over linear: the examples' inputs as rows of one linear, or an ensemble's weights and
    biases as one batched GEMM; equal to a loop, without torch's per-example fallback. Per-example
    gradients (vmap of grad) through linear and matmul equal autograd example by example."""
    n = 3
    x = torch.randn(n, *x_shape, device=DEVICE) if "x" in batched else torch.randn(*x_shape, device=DEVICE)
    w = torch.randn(n, 5, 7, device=DEVICE) if "w" in batched else torch.randn(5, 7, device=DEVICE)
    bias = torch.randn(n, 5, device=DEVICE) if "b" in batched else torch.randn(5, device=DEVICE)
    dims = tuple(0 if k in batched else None for k in ("x", "w", "b"))
    with no_vmap_fallback():
        out = torch.func.vmap(lambda x_, w_, b_: dlkernels.linear(x_, w_, b_, activation=activation, backend=backend),
                              in_dims=dims)(x, w, bias)
    pick = [lambda t, i, d=d: t[i] if d == 0 else t for d in dims]
    want = torch.stack([F.linear(pick[0](x, i), pick[1](w, i), pick[2](bias, i)) for i in range(n)])
    torch.testing.assert_close(out, want.relu() if activation else want, rtol=1e-5, atol=1e-5)
    if batched != "x":
        return
    w2 = torch.randn(5, 3, device=DEVICE)

    def f(p, xi):
        return dlkernels.matmul(dlkernels.linear(xi, p[0], p[1], activation=activation, backend=backend), p[2],
                                backend=backend).sin().sum()

    with no_vmap_fallback():
        per_example = torch.func.vmap(torch.func.grad(f), in_dims=(None, 0))((w, bias, w2), x)
    for i in range(n):
        params = [leaf(t) for t in (w, bias, w2)]
        for got, want in zip(per_example, torch.autograd.grad(f(params, x[i]), params)):
            torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-5)
