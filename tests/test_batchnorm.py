"""batch_norm_residual on every backend against PyTorch's unfused act(F.batch_norm(x) + r):
outputs, all gradients and running statistics over ranks, layouts, residual, activations, training
and evaluation; large means, size-1 channels; gradcheck, opcheck, torch.compile, bad inputs."""
import numpy as np
import pytest
import torch

import dlkernels
from dlkernels.batchnorm.op import as_ncs, relu_gate_bytes, writes_relu_gate
from dlkernels.batchnorm.reference import batch_norm_residual as reference
from helpers import DEVICE, KERNEL_BACKENDS, LARGE_BACKENDS, TOL, as64, assert_close, grads, leaf, no_vmap_fallback

# name -> (shape, channels_last): the three ranks, both layouts, odd sizes
LAYOUTS = {
    "2d": ((7, 5), False),
    "3d": ((3, 5, 11), False),
    "3d_cl": ((3, 5, 11), True),
    "4d": ((2, 5, 7, 3), False),
    "4d_cl": ((2, 5, 7, 3), True),
    # planes of 16-element multiples: Triton's tiled NCS path (odd planes take its flat path)
    "4d_planes": ((2, 3, 16, 16), False),
    # planes of >= 128 elements without a factor 4: Triton's flat reductions too, whose blocks of
    # 256 here each hold parts of up to three channels
    "4d_odd_planes": ((2, 5, 11, 13), False),
}


def _make(shape, channels_last, dtype, mean=0.5, std=2.0):
    x = torch.randn(shape, device=DEVICE, dtype=torch.float64) * std + mean
    return leaf(_in_layout(x.to(dtype), channels_last))


def _in_layout(x, channels_last):
    if channels_last:
        return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x.transpose(1, 2).contiguous().transpose(1, 2)
    return x.contiguous()


def _stats(c, dtype):
    return torch.randn(c, device=DEVICE).to(dtype) * 0.3, (torch.rand(c, device=DEVICE) + 0.5).to(dtype)


def _run_both(backend, x, r, w, b, rm, rv, training, act, steps=1, momentum=0.1):
    """Runs dlkernels and the float64 reference `steps` times; returns outputs, grads, running stats."""
    c = x.shape[1]
    rm64, rv64 = (None, None) if rm is None else (rm.double().clone(), rv.double().clone())
    for _ in range(steps):
        out = dlkernels.batch_norm_residual(x, r, rm, rv, w, b, training, momentum, 1e-5, activation=act,
                                            backend=backend)
        ins64 = [as64(t) for t in (x, r, w, b)]
        ref = reference(ins64[0], ins64[1], rm64, rv64, ins64[2], ins64[3], training, momentum, 1e-5, act)
    g = torch.randn_like(ref)
    got = grads(out, [x, r, w, b], g.to(x.dtype))
    exp = grads(ref, ins64, g)
    assert c == ref.shape[1]
    return out, ref, got, exp, (rm, rv, rm64, rv64)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", [None, "relu", "silu"], ids=str)
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "plain"])
@pytest.mark.parametrize("layout", list(LAYOUTS), ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_forward_backward_running_stats(backend, dtype, layout, with_residual, activation, training):
    _check_forward_backward(backend, dtype, *LAYOUTS[layout], with_residual, activation, training)


# Passes whose arrays are past a third of the last-level cache write their outputs with non-temporal stores
# (C++); a tiny DLKERNELS_LLC_BYTES reaches that path on small tensors. Planes that straddle the kernels'
# 2048-element runs, and channels-last rows of 70, leave unaligned run ends; planes and rows of 64
# elements or more are written line by line (lines spanning runs and blocks), shorter ones through a
# per-thread block buffer.
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", [None, "relu", "silu"], ids=str)
@pytest.mark.parametrize("shape_cl", [((7, 5), False), ((2, 3, 37, 41), False), ((2, 70, 5, 3), True),
                                      ((3, 64, 5), True), ((3, 16, 11), True)],
                         ids=["2d", "4d_runs", "4d_cl70", "3d_cl64", "3d_cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_streamed_outputs(backend, dtype, shape_cl, activation, training, monkeypatch):
    monkeypatch.setenv("DLKERNELS_LLC_BYTES", "1")
    _check_forward_backward(backend, dtype, *shape_cl, True, activation, training)


def _check_forward_backward(backend, dtype, shape, cl, with_residual, activation, training):
    c = shape[1]
    x = _make(shape, cl, dtype)
    r = _make(shape, cl, dtype, mean=0.0, std=1.0) if with_residual else None
    w, b = leaf(torch.randn(c, device=DEVICE).to(dtype)), leaf(torch.randn(c, device=DEVICE).to(dtype))
    rm, rv = _stats(c, dtype)
    out, ref, got, exp, (rm, rv, rm64, rv64) = _run_both(backend, x, r, w, b, rm, rv, training, activation,
                                                         steps=3 if training else 1)
    assert_close(out, ref, what="output")
    if cl and x.dim() == 4:
        assert out.is_contiguous(memory_format=torch.channels_last), "output keeps channels_last"
    for g, e, name in zip(got, exp, ["input", "residual", "weight", "bias"]):
        if e is not None:
            assert_close(g, e, dtype, f"grad {name}", factor=4)  # reductions of N*S terms
    assert_close(rm, rm64, dtype, "running_mean")
    assert_close(rv, rv64, dtype, "running_var")


# NCS training with at least four channels a thread runs both passes per group of channels while the
# group's planes are cached (C++: ncs_resident): the forward and backward on small planes, the backward
# on larger ones when a tensor is past half the LLC (here: the streamed cases, a tiny LLC); evaluation's
# backward too where it needs the sums (weight or bias grads beside the input's). In blocks
# that split planes (2048 elements) and, for small planes, accumulator rows folded every 16 planes. Two
# threads, so the group and block edges fall the same on every machine; planes of 7x7 (N = 19 > 16),
# 2 (C = 37), 11x13 and 91x91 (one channel a group); 11x13 at N = 24 also folds the C++ sweep's
# accumulators between planes of 9 vectors (ncs_small_plane_sums, AMD family 19h).
# The C++ backend skips that order on AMD family 19h, where it measured slower (csrc/batchnorm.cpp:
# resident): DLKERNELS_AMD_FAMILY_19H stands in for cpuid, so that both orders run on every machine.
_GROUP_CASES = [(b, shape, family) for b in KERNEL_BACKENDS
                for shape in [(19, 9, 7, 7), (5, 37, 2), (3, 8, 11, 13), (24, 3, 11, 13), (2, 9, 91, 91)]
                for family in (["other", "amd19h"] if b == "cpp" else ["any"])
                if b in LARGE_BACKENDS or shape[-1] < 91]
_FAMILY_ENV = {"other": "0", "amd19h": "1"}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", [None, "relu", "silu"], ids=str)
@pytest.mark.parametrize("backend,shape,cpu", _GROUP_CASES, ids=str)
@pytest.mark.parametrize("streamed", [False, True], ids=["plain", "streamed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_channel_groups_in_cache(backend, dtype, streamed, shape, cpu, activation, training, monkeypatch):
    if streamed:
        monkeypatch.setenv("DLKERNELS_LLC_BYTES", "1")
    if cpu in _FAMILY_ENV:
        monkeypatch.setenv("DLKERNELS_AMD_FAMILY_19H", _FAMILY_ENV[cpu])
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _check_forward_backward(backend, dtype, shape, False, True, activation, training)
    finally:
        torch.set_num_threads(threads)


# The C++ channels-last sums walk rows four at a time or one at a time by the row's bytes and the CPU
# family (cl_sums_walk): rows of 40 (four), 70 (one on AMD family 19h) and 1100 floats (four), on both
# sides of that choice.
@pytest.mark.parametrize("backend", [b for b in KERNEL_BACKENDS if b == "cpp"])
@pytest.mark.parametrize("cpu", list(_FAMILY_ENV))
@pytest.mark.parametrize("channels", [40, 70, 1100])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_channels_last_row_walks(backend, cpu, channels, training, monkeypatch):
    monkeypatch.setenv("DLKERNELS_AMD_FAMILY_19H", _FAMILY_ENV[cpu])
    _check_forward_backward(backend, torch.float32, (3, channels, 5, 3), True, True, "relu", training)


# Autograd asks only for the gradients of inputs that require them: each subset takes its own path
# through the backward (the sums only for weight, bias or a training-mode input grad; grad_residual
# alone, or written by the reduce pass under an activation).
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", [None, "relu", "silu"], ids=str)
@pytest.mark.parametrize("wanted", ["x", "r", "w", "b", "rw", "xb"], ids=str)
def test_gradients_of_each_subset(backend, wanted, activation, training):
    shape, c = (3, 5, 7, 3), 5
    torch.manual_seed(0)
    x = _make(shape, True, torch.float32).detach().requires_grad_("x" in wanted)
    r = _make(shape, True, torch.float32, 0.0, 1.0).detach().requires_grad_("r" in wanted)
    w = torch.randn(c, device=DEVICE).requires_grad_("w" in wanted)
    b = torch.randn(c, device=DEVICE).requires_grad_("b" in wanted)
    rm, rv = _stats(c, torch.float32)
    inputs = [t for t, name in zip((x, r, w, b), "xrwb") if name in wanted]
    out = dlkernels.batch_norm_residual(x, r, rm.clone(), rv.clone(), w, b, training, activation=activation,
                                        backend=backend)
    ins64 = {name: as64(t).detach().requires_grad_(name in wanted) for t, name in zip((x, r, w, b), "xrwb")}
    ref = reference(ins64["x"], ins64["r"], rm.double(), rv.double(), ins64["w"], ins64["b"], training,
                    activation=activation)
    g = torch.randn_like(ref)
    got = grads(out, inputs, g.float())
    exp = grads(ref, [ins64[name] for name in wanted], g)
    for gt, e, name in zip(got, exp, wanted):
        assert_close(gt, e, torch.float32, f"grad {name}", factor=4)


@pytest.mark.parametrize("backend", [b for b in KERNEL_BACKENDS if b == "triton"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_planes_longer_than_a_block(backend, training):
    # a 47x47 plane spans three of the flat kernels' 2048-element blocks of an image, and a block
    # two planes: every partial row of the flat reductions is used, and the merge skips none
    _check_forward_backward(backend, torch.float32, (2, 3, 47, 47), False, True, "relu", training)


@pytest.mark.parametrize("shape", [(4, 3, 13, 9), (2, 3, 13, 11)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_large_mean_tiny_variance(backend, dtype, shape):
    # 1e4 + N(0, 1e-2): a naive E[x^2] - E[x]^2 loses every digit of the variance. The output and the
    # input grad are only as good as ulp(1e4)/1e-2 allows (PyTorch's own kernel folds the mean into a
    # shift as we do), so they are held to twice PyTorch's error in the same dtype; the statistics
    # (running_var) to the usual tolerance.
    x = leaf((torch.randn(shape, device=DEVICE, dtype=torch.float64) * 1e-2 + 1e4).to(dtype))
    r = leaf(torch.randn(shape, device=DEVICE).to(dtype))
    rm, rv = torch.zeros(3, device=DEVICE, dtype=dtype), torch.ones(3, device=DEVICE, dtype=dtype)
    out, ref, got, exp, (rm, rv, rm64, rv64) = _run_both(backend, x, r, None, None, rm, rv, True, "relu")
    assert_close(rv, rv64, dtype, "running_var")
    xe = leaf(x.detach())
    eager = reference(xe, r.detach(), None, None, None, None, True, activation="relu")
    g = torch.randn_like(eager)
    (eager_gx,) = grads(eager, [xe], g)
    (our_gx,) = grads(dlkernels.batch_norm_residual(xe, r.detach(), None, None, training=True, activation="relu",
                                                    backend=backend), [xe], g)
    x64 = as64(x)
    (ref_gx,) = grads(reference(x64, r.detach().double(), None, None, None, None, True, activation="relu"), [x64],
                      g.double())
    for name, ours, theirs, exact in (("output", out, eager, ref), ("grad input", our_gx, eager_gx, ref_gx)):
        torch_err = (theirs.double() - exact).abs().max().item()
        # the conditioning of x*scale + shift with |shift| ~ |mean|/std: a few ulps of it
        cond = 4 * torch.finfo(dtype).eps * 1e4 / 1e-2 * (exact.abs().max().item() if name != "output" else 1)
        tol = max(TOL[dtype] * exact.abs().max().item(), 2 * torch_err, cond if dtype == torch.float64 else 0)
        err = (ours.double() - exact).abs().max().item()
        assert err <= tol, f"{name}: error {err:.3e} > {tol:.3e} (PyTorch's own {dtype} error {torch_err:.3e})"


def test_one_value_per_channel(backend):
    x = torch.randn(1, 4, 1, 1, device=DEVICE)
    rm, rv = _stats(4, torch.float32)
    out = dlkernels.batch_norm_residual(x, None, rm, rv, training=False, activation="relu", backend=backend)
    assert_close(out, reference(x.double(), None, rm.double(), rv.double(), activation="relu"), what="eval N*S=1")
    with pytest.raises(ValueError, match="more than 1 value per channel when training"):
        dlkernels.batch_norm_residual(x, None, rm, rv, training=True, backend=backend)


@pytest.mark.parametrize("momentum", [0.1, 0.5, 0.9, 0.0, 1.0], ids=str)
@pytest.mark.parametrize("channels", [1, 37, 256], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_running_stats_update_paths_agree(backend, dtype, channels, momentum):
    """With autograd recording, plain eager training hands the running statistics to a kernel that can
    update them itself (C++); without it, update_running_stats_op does it in torch ops: the same numbers to
    the bit, for momenta on both sides of lerp's switch at 0.5 and channel counts past a vector."""
    x = torch.randn(3, channels, 5, 2, device=DEVICE, dtype=dtype) * 3 + 1
    start = _stats(channels, dtype)
    rm, rv = (t.clone() for t in start)
    dlkernels.batch_norm_residual(leaf(x), None, rm, rv, None, None, True, momentum, backend=backend).sum().backward()
    rm2, rv2 = (t.clone() for t in start)
    dlkernels.batch_norm_residual(x, None, rm2, rv2, None, None, True, momentum, backend=backend)
    assert torch.equal(rm, rm2) and torch.equal(rv, rv2)
    if momentum > 0:
        assert not torch.equal(rm, start[0]) and not torch.equal(rv, start[1])
    # both count as in-place updates: an evaluation graph that saved them refuses a stale backward alike
    assert rm._version == rm2._version > 0 and rv._version == rv2._version > 0


@pytest.mark.parametrize("layout", ["2d", "3d_cl", "4d", "4d_cl"], ids=str)
def test_evaluation_without_autograd_is_the_same_kernel(backend, layout):
    """Evaluation with nothing for autograd to record takes the kernel without the functional op's
    placeholder outputs: the same values as with autograd, a tensor of its own (not a view)."""
    shape, cl = LAYOUTS[layout]
    x, r = _make(shape, cl, torch.float32), _make(shape, cl, torch.float32)
    rm, rv = _stats(shape[1], torch.float32)
    w, b = leaf(torch.randn(shape[1], device=DEVICE)), leaf(torch.randn(shape[1], device=DEVICE))
    want = dlkernels.batch_norm_residual(x, r, rm, rv, w, b, activation="silu", backend=backend)
    with torch.no_grad():
        got = dlkernels.batch_norm_residual(x, r, rm, rv, w, b, activation="silu", backend=backend)
    plain = dlkernels.batch_norm_residual(x.detach(), r.detach(), rm, rv, w.detach(), b.detach(), activation="silu",
                                          backend=backend)
    for out in (got, plain):
        assert torch.equal(out, want.detach()) and out.stride() == want.stride() and not out._is_view()
        assert out.grad_fn is None


def test_single_channel_and_no_running_stats(backend):
    x = leaf(torch.randn(6, 1, 5, device=DEVICE, dtype=torch.float64))
    out = dlkernels.batch_norm_residual(x, None, None, None, training=True, activation="silu", backend=backend)
    x64 = as64(x)
    ref = reference(x64, None, None, None, training=True, activation="silu")
    assert_close(out, ref, what="C=1")
    (gx,) = grads(out, [x], torch.ones_like(out))
    (ex,) = grads(ref, [x64], torch.ones_like(ref))
    assert_close(gx, ex, what="grad C=1")


def test_relu_keeps_nan(backend):
    x = torch.randn(4, 3, 5, device=DEVICE)
    r = torch.randn(4, 3, 5, device=DEVICE)
    r[1, 2, 3] = float("nan")
    rm, rv = _stats(3, torch.float32)
    out = dlkernels.batch_norm_residual(x, r, rm, rv, activation="relu", backend=backend)
    assert torch.isnan(out[1, 2, 3]) and torch.isnan(out).sum() == 1


# Backends whose training forward hands relu's backward gate bits instead of the output (op.py's contract)
GATE_BACKENDS = [b for b in KERNEL_BACKENDS if writes_relu_gate(b, DEVICE, True, "relu")]


# The gate bits themselves, against the output they gate: exact zeros and a NaN among the outputs, and
# blocks whose ends fall inside a byte: planes straddling the 2048-element blocks (4d_runs), channel
# groups of 7x7 planes taken by two threads (groups), channels-last rows of 70 and of 5, streamed
# outputs (a tiny DLKERNELS_LLC_BYTES).
@pytest.mark.parametrize("streamed", [False, True], ids=["plain", "streamed"])
@pytest.mark.parametrize("shape_cl", [((7, 5), False), ((2, 3, 37, 41), False), ((19, 9, 7, 7), False),
                                      ((2, 70, 5, 3), True), ((3, 5, 11), True)],
                         ids=["2d", "4d_runs", "groups", "4d_cl70", "3d_cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("gate_backend", GATE_BACKENDS)
def test_relu_gate_bits(gate_backend, dtype, shape_cl, streamed, monkeypatch):
    if streamed:
        monkeypatch.setenv("DLKERNELS_LLC_BYTES", "1")
    shape, cl = shape_cl
    x = _make(shape, cl, dtype).detach()
    r = torch.randn(shape, device=DEVICE, dtype=dtype).view(-1)
    r[::5] = -1e30  # exact zeros out of relu
    r[7] = float("nan")
    r = _in_layout(r.view(shape), cl)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out, _, _, gate = torch.ops.dlkernels.batch_norm_residual_functional(
            x, r, None, None, None, None, True, 1e-5, "relu", gate_backend)
    finally:
        torch.set_num_threads(threads)
    assert gate.dtype == torch.uint8 and gate.numel() == relu_gate_bytes(x.numel())
    y3 = as_ncs(out, cl)
    flat = (y3.transpose(1, 2) if cl else y3).reshape(-1)  # memory order of the layout
    bits = torch.from_numpy(np.unpackbits(gate.cpu().numpy(), bitorder="little")[: flat.numel()].astype(bool))
    expect = ~(flat <= 0).cpu()
    assert (flat == 0).any() and torch.isnan(flat).any()
    assert torch.equal(bits, expect), f"{int((bits != expect).sum())} of {flat.numel()} gate bits wrong"


def test_gradcheck(backend):
    f64 = dict(device=DEVICE, dtype=torch.float64)
    for act, cl in (("relu", False), ("silu", True), (None, False)):
        x = _make((2, 3, 2, 2), cl, torch.float64)
        r = _make((2, 3, 2, 2), cl, torch.float64)
        w, b = leaf(torch.randn(3, **f64)), leaf(torch.randn(3, **f64))
        for training in (True, False):
            rm, rv = _stats(3, torch.float64)
            assert torch.autograd.gradcheck(
                lambda x, r, w, b: dlkernels.batch_norm_residual(x, r, rm.clone(), rv.clone(), w, b, training,
                                                                 activation=act, backend=backend), (x, r, w, b))


def test_gradgradcheck(backend):
    """Second derivatives (create_graph=True: double backward, gradient penalties): the backward then runs
    in torch ops (dlkernels/batchnorm/reference.py: grads_differentiable), through the batch statistics
    and relu's gate bits where the forward wrote them (C++ training), in both layouts."""
    f64 = dict(device=DEVICE, dtype=torch.float64)
    fast = backend == "triton"  # Triton's interpreter: a launch costs ~10-30 ms, so random projections
    for act, cl, training in (("relu", True, True), ("relu", False, False), ("silu", False, True), (None, True, False)):
        x = _make((3, 2, 3, 2), cl, torch.float64)
        r = _make((3, 2, 3, 2), cl, torch.float64)
        w, b = leaf(torch.randn(2, **f64)), leaf(torch.randn(2, **f64))
        rm, rv = _stats(2, torch.float64)
        assert torch.autograd.gradgradcheck(
            lambda x, r, w, b: dlkernels.batch_norm_residual(x, r, rm.clone(), rv.clone(), w, b, training,
                                                             activation=act, backend=backend), (x, r, w, b),
            fast_mode=fast), (act, cl, training)


def test_opcheck(backend):
    for cl in (False, True):
        x = _make((2, 3, 4, 5), cl, torch.float32)
        r = _make((2, 3, 4, 5), cl, torch.float32)
        w, b = leaf(torch.randn(3, device=DEVICE)), leaf(torch.randn(3, device=DEVICE))
        for training in (True, False):
            rm, rv = _stats(3, torch.float32)
            torch.library.opcheck(torch.ops.dlkernels.batch_norm_residual.default,
                                  (x, r, rm, rv, w, b, training, 0.1, 1e-5, "relu", backend))
            for act in ("silu", "relu"):
                torch.library.opcheck(torch.ops.dlkernels.batch_norm_residual_functional.default,
                                      (x, None, rm, rv, w, None, training, 1e-5, act, backend))


def test_compile_fullgraph_updates_running_stats(backend):
    def block(x, r, rm, rv, w, b):
        return dlkernels.batch_norm_residual(x, r, rm, rv, w, b, True, 0.1, 1e-5, activation="relu", backend=backend)

    x, r = leaf(torch.randn(4, 3, 5, 5, device=DEVICE)), leaf(torch.randn(4, 3, 5, 5, device=DEVICE))
    w, b = leaf(torch.rand(3, device=DEVICE) + 0.5), leaf(torch.randn(3, device=DEVICE))
    rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    out = torch.compile(block, fullgraph=True, backend="aot_eager")(x, r, rm, rv, w, b)
    rm64, rv64 = torch.zeros(3, dtype=torch.float64, device=DEVICE), torch.ones(3, dtype=torch.float64, device=DEVICE)
    ins64 = [as64(t) for t in (x, r, w, b)]
    ref = reference(ins64[0], ins64[1], rm64, rv64, ins64[2], ins64[3], True, 0.1, 1e-5, "relu")
    assert_close(out, ref, torch.float32, "compiled")
    assert_close(rm, rm64, torch.float32, "compiled running_mean")
    assert_close(rv, rv64, torch.float32, "compiled running_var")
    g = torch.randn_like(ref)
    for got, exp, name in zip(grads(out, [x, r, w, b], g.float()), grads(ref, ins64, g), "xrwb"):
        assert_close(got, exp, torch.float32, f"compiled grad {name}")


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS + ["torch"])
def test_bad_inputs(backend_name, on_test_device):
    x = torch.randn(2, 3, 4, 4)
    rm, rv = torch.zeros(3), torch.ones(3)
    f = dlkernels.batch_norm_residual
    with pytest.raises(TypeError, match="dense"):
        f(x, x.to_sparse(), rm, rv, backend=backend_name)
    with pytest.raises(ValueError, match="running_mean must have shape"):
        f(x, None, torch.zeros(4), torch.ones(4), backend=backend_name)
    with pytest.raises(ValueError, match="weight must have shape"):
        f(x, None, rm, rv, torch.ones(5), backend=backend_name)
    with pytest.raises(ValueError, match="residual must have the input's shape"):
        f(x, torch.randn(2, 3, 4, 5), rm, rv, backend=backend_name)
    with pytest.raises(TypeError, match="one dtype"):
        f(x, x.double(), rm, rv, backend=backend_name)
    with pytest.raises(RuntimeError, match="one device"):
        f(x, torch.randn(2, 3, 4, 4, device="meta"), rm, rv, backend=backend_name)
    with pytest.raises(TypeError, match="floating-point"):
        f(x.long(), None, rm, rv, backend=backend_name)
    with pytest.raises(ValueError, match="activation must be one of"):
        f(x, None, rm, rv, activation="gelu", backend=backend_name)
    with pytest.raises(ValueError, match="must be defined in evaluation mode"):
        f(x, None, None, None, training=False, backend=backend_name)
    with pytest.raises(ValueError, match="2, 3 or 4 dimensions"):
        f(torch.randn(5), None, None, None, training=True, backend=backend_name)
    with pytest.raises(ValueError, match="eps must be positive"):  # torch's rule: it keeps 1/sqrt finite
        f(x, None, rm, rv, training=True, eps=0.0, backend=backend_name)
    with pytest.raises(ValueError, match="eps must be non-negative"):
        f(x, None, rm, rv, training=False, eps=-1e-5, backend=backend_name)
    with pytest.raises(TypeError, match="momentum must be a float"):
        f(x, None, rm, rv, training=True, momentum=None, backend=backend_name)


def test_relu_backward_matches_torch_on_nan(backend):
    x = torch.randn(3, 2, 4, device=DEVICE, dtype=torch.float64)
    x[0, 0, 1] = float("nan")  # NaN statistics for channel 0: its outputs are NaN and pass gradients
    g = torch.randn_like(x)
    g[1, 1, :] = float("nan")  # NaN gradients where channel 1's output is <= 0 become 0
    xs = [leaf(x.clone()), leaf(x.clone())]
    out = dlkernels.batch_norm_residual(xs[0], None, None, None, training=True, activation="relu", backend=backend)
    ref = reference(xs[1], None, None, None, training=True, activation="relu")
    (ga,) = grads(out, [xs[0]], g)
    (gb,) = grads(ref, [xs[1]], g)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.equal(torch.isnan(ga), torch.isnan(gb))


@pytest.mark.parametrize("bad", [float("inf"), float("nan")], ids=["inf", "nan"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_non_finite_input_matches_torch(backend, bad, channels_last):
    """An infinite or NaN input value: in training its channel's statistics are NaN, so are its outputs and
    its running variance (the C++ clipped a NaN variance to 0: an infinite value then gave relu outputs of
    0 and blocked gradients torch passes); in evaluation the input's gradient is grad * scale, finite
    (every backend computed inf * 0 there)."""
    for training in (True, False):
        x = torch.randn(4, 3, 2, 3, device=DEVICE, dtype=torch.float64)
        x[1, 0, 1, 2] = bad
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        r = torch.randn_like(x)
        w, b = (torch.randn(3, device=DEVICE, dtype=torch.float64) for _ in range(2))
        g = torch.randn_like(x)
        stats = _stats(3, torch.float64)
        results = []
        for f in (lambda *a: dlkernels.batch_norm_residual(*a, activation="relu", backend=backend),
                  lambda *a: reference(*a, activation="relu")):
            rm, rv = (s.clone() for s in stats)
            ins = [leaf(x.clone()), leaf(r.clone()), rm, rv, leaf(w.clone()), leaf(b.clone())]
            out = f(*ins, training)
            results.append([out, *grads(out, [ins[0], ins[1], ins[4], ins[5]], g), rm, rv])
        for i, (a, e) in enumerate(zip(*results)):
            torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9, equal_nan=True,
                                       msg=lambda m: f"training={training}, result {i}: {m}")


@pytest.mark.parametrize("backend", [b for b in KERNEL_BACKENDS if b == "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_grad_input_with_residual_gradient(backend, dtype):
    """Asking for the residual's gradient must not change the input's: in half precision the apply pass
    once read back dz rounded to the input dtype and subtracted float32 means from it, which at two
    values per channel cancelled to noise (663x the gradient's norm off in bfloat16)."""
    x = (torch.randn(2, 31, device=DEVICE, dtype=torch.float64) * 10).to(dtype)
    r, g = torch.randn(2, 31, device=DEVICE).to(dtype), torch.randn(2, 31, device=DEVICE).to(dtype)
    got = []
    for need_r in (True, False):
        xx, rr = leaf(x.clone()), leaf(r.clone(), need_r)
        y = dlkernels.batch_norm_residual(xx, rr, None, None, None, None, True, activation="silu", backend=backend)
        got.append(torch.autograd.grad(y, xx, g)[0])
    if DEVICE.type == "cpu":  # the interpreter: bit for bit (a GPU's reductions may order adds otherwise)
        assert torch.equal(got[0], got[1])
    xx, rr = leaf(x.double()), leaf(r.double())
    ref = torch.autograd.grad(reference(xx, rr, None, None, None, None, True, activation="silu"), xx, g.double())[0]
    assert (got[0].double() - ref).norm() <= 0.05 * ref.norm()


@pytest.mark.parametrize("backend", [b for b in KERNEL_BACKENDS if b == "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["3d", "4d_cl"])
def test_low_precision(backend, dtype, layout):
    # Triton only: float32 statistics; output and grads are one rounding of an fp32 result
    shape, cl = LAYOUTS[layout]
    x, r = _make(shape, cl, dtype), _make(shape, cl, dtype, mean=0.0, std=1.0)
    w, b = leaf(torch.randn(5, device=DEVICE)), leaf(torch.randn(5, device=DEVICE))
    rm, rv = _stats(5, torch.float32)
    out, ref, got, exp, (rm, rv, rm64, rv64) = _run_both(backend, x, r, w, b, rm, rv, True, "silu")
    assert out.dtype == dtype
    assert_close(out, ref, what="output", factor=2)
    for g, e, name in zip(got, exp, ["input", "residual", "weight", "bias"]):
        assert_close(g, e, dtype, f"grad {name}", factor=8)
    assert_close(rm, rm64, torch.float32, "running_mean", factor=100)  # mean of bf16-rounded inputs


@pytest.mark.parametrize("layout", ["2d", "nchw", "channels_last"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", ["relu", "silu"])
@pytest.mark.parametrize("batched", ["x", "x+params", "x+stats", "x+residual+params+stats"])
def test_batch_norm_under_vmap(backend, layout, training, activation, batched):
    """torch.vmap over batch_norm_residual runs as one call over the examples' channels (no per-example
    fallback) and equals a loop: each example normalized by its own batch statistics in training, by the
    (shared or its own) running ones in evaluation, an ensemble's parameters and running statistics each
    its own; per-example gradients of the input and weight (vmap of grad) too, relu's mask included (the
    cpp training forward writes no gate bits there: they would follow the whole call's layout)."""
    n, c = 3, 5
    shape = {"2d": (4, c), "nchw": (4, c, 3, 2), "channels_last": (4, c, 3, 2)}[layout]
    x = torch.randn(n, *shape, device=DEVICE, dtype=torch.float64) + 0.5
    if layout == "channels_last":
        x = x.transpose(-3, -1).contiguous().transpose(-3, -1)
    r = torch.randn(n, *shape, device=DEVICE, dtype=torch.float64) if "residual" in batched else None
    stats = "stats" in batched
    rm = torch.randn(*((n,) if stats else ()), c, device=DEVICE, dtype=torch.float64)
    rv = torch.rand(*rm.shape, device=DEVICE, dtype=torch.float64) + 0.5
    if training and not stats:
        rm = rv = None  # one running estimate cannot take a step per example (test_registration checks the error)
    w = torch.randn(*((n,) if "params" in batched else ()), c, device=DEVICE, dtype=torch.float64)
    b = torch.randn(*w.shape, device=DEVICE, dtype=torch.float64)
    d_stats = 0 if (stats and rm is not None) else None
    dims = (0, 0 if r is not None else None, d_stats, d_stats, 0 if "params" in batched else None,
            0 if "params" in batched else None)
    saved = None if rm is None else (rm.clone(), rv.clone())

    def f(x_, w_, r_, m_, v_, b_):
        return dlkernels.batch_norm_residual(x_, r_, m_, v_, w_, b_, training, 0.2, activation=activation,
                                             backend=backend)

    def ref(x_, w_, r_, m_, v_, b_):
        y = torch.nn.functional.batch_norm(x_, m_, v_, w_, b_, training, 0.2) + (0 if r_ is None else r_)
        return torch.relu(y) if activation == "relu" else torch.nn.functional.silu(y)

    def pick(t, d, i):
        return None if t is None else (t[i] if d == 0 else t)

    in_dims = (0, dims[4], dims[1], dims[2], dims[3], dims[5])
    with no_vmap_fallback():
        out = torch.func.vmap(f, in_dims=in_dims)(x, w, r, rm, rv, b)
        after = None if rm is None else (rm.clone(), rv.clone())
        per_example = torch.func.vmap(torch.func.grad(lambda *a: f(*a).sin().sum(), argnums=(0, 1)),
                                      in_dims=in_dims)(x, w, r, rm, rv, b)
    ref_stats = None if saved is None else [t.clone() for t in saved]
    for i in range(n):
        stats_i = (None, None) if ref_stats is None else (pick(ref_stats[0], d_stats, i), pick(ref_stats[1], d_stats, i))
        args = (x[i], pick(w, dims[4], i), pick(r, dims[1], i), *stats_i, pick(b, dims[5], i))
        torch.testing.assert_close(out[i], ref(*args), rtol=1e-9, atol=1e-9)
        want = torch.func.grad(lambda *a: ref(*a).sin().sum(), argnums=(0, 1))(
            *(a.clone() if isinstance(a, torch.Tensor) else a for a in args))
        torch.testing.assert_close(per_example[0][i], want[0], rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(per_example[1][i], want[1], rtol=1e-7, atol=1e-9)
    if after is not None:  # each model's running statistics took its own step (once, in the first vmap)
        torch.testing.assert_close(after[0], ref_stats[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(after[1], ref_stats[1], rtol=1e-12, atol=1e-12)
