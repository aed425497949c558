"""dlkernels.nn: each module against the torch module it replaces (parameters, init, state_dict,
repr, outputs and gradients in float64, running statistics), on every backend."""
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dlkernels
from helpers import KERNEL_BACKENDS
from dlkernels import _dispatch
from dlkernels import nn as dnn

pytestmark = pytest.mark.usefixtures("on_test_device")

ALL_BACKENDS = ["torch", *KERNEL_BACKENDS]


@pytest.fixture(params=ALL_BACKENDS)
def any_backend(request):
    return request.param


def twins(make_ours, make_torch):
    """(ours, theirs) built from the same seed, in float64: torch's init must give equal parameters."""
    torch.manual_seed(1234)
    ours = make_ours()
    torch.manual_seed(1234)
    theirs = make_torch()
    return ours.double(), theirs.double()


def assert_same_state(ours, theirs, tol=0.0):
    """Same keys, shapes and dtypes; values equal (to ``tol`` once kernels have updated running statistics)."""
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
        torch.testing.assert_close(a[k], b[k], rtol=tol, atol=tol, msg=k)


def run_both(ours, theirs, *inputs, rtol=1e-10, atol=1e-10):
    """Forward and backward through both on copies of the inputs; outputs, input and parameter
    gradients must agree."""
    xs_a = [x.detach().clone().requires_grad_() for x in inputs]
    xs_b = [x.detach().clone().requires_grad_() for x in inputs]
    ya, yb = ours(*xs_a), theirs(*xs_b)
    torch.testing.assert_close(ya, yb, rtol=rtol, atol=atol)
    g = torch.randn_like(yb)
    ya.backward(g)
    yb.backward(g)
    for xa, xb in zip(xs_a, xs_b):
        torch.testing.assert_close(xa.grad, xb.grad, rtol=rtol, atol=atol)
    for (name, pa), pb in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=rtol, atol=atol, msg=name)
    return ya


# ---------------------------------------------------------------------------------------------
# convolutions
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("c,m,k,stride,padding,dilation,bias,hw", [
    (3, 1, 3, 1, 1, 1, True, (7, 5)),
    (5, 2, 3, 2, 0, 1, False, (9, 11)),
    (2, 3, (3, 5), (1, 2), (2, 1), (2, 1), True, (8, 13)),
    (4, 1, 4, 1, "same", 1, True, (6, 7)),  # even kernel: the odd extra padding row goes after
    (1, 1, 1, 1, 0, 1, True, (1, 1)),
])
def test_depthwise_matches_conv2d(any_backend, c, m, k, stride, padding, dilation, bias, hw):
    ours, theirs = twins(
        lambda: dnn.DepthwiseConv2d(c, k, stride, padding, dilation, bias, m, backend=any_backend),
        lambda: nn.Conv2d(c, c * m, k, stride, padding, dilation, groups=c, bias=bias))
    assert_same_state(ours, theirs)
    assert repr(ours).startswith(repr(theirs).replace("Conv2d(", "DepthwiseConv2d(")[:-1])
    run_both(ours, theirs, torch.randn(2, c, *hw, dtype=torch.float64))


@pytest.mark.parametrize("mode", ["reflect", "circular"])
def test_depthwise_padding_modes(mode):
    ours, theirs = twins(lambda: dnn.DepthwiseConv2d(3, 3, padding=1, padding_mode=mode, backend="torch"),
                         lambda: nn.Conv2d(3, 3, 3, padding=1, groups=3, padding_mode=mode))
    run_both(ours, theirs, torch.randn(2, 3, 5, 6, dtype=torch.float64))


def test_depthwise_channels_last_and_unbatched(any_backend):
    ours, theirs = twins(lambda: dnn.DepthwiseConv2d(4, 3, padding=1, backend=any_backend),
                         lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4))
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64).to(memory_format=torch.channels_last)
    run_both(ours, theirs, x)
    run_both(ours, theirs, torch.randn(4, 6, 3, dtype=torch.float64))


@pytest.mark.parametrize("cin,cout,stride,bias,hw", [(3, 5, 1, True, (4, 7)), (6, 2, 2, False, (5, 9)),
                                                     (1, 1, 1, True, (1, 1)), (4, 3, (3, 1), True, (7, 4))])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_pointwise_matches_conv2d(any_backend, cin, cout, stride, bias, hw, channels_last):
    """A strided channels_last input is subsampled into a channels_last copy: the output and the
    input's gradient stay channels_last."""
    ours, theirs = twins(lambda: dnn.PointwiseConv2d(cin, cout, bias, stride=stride, backend=any_backend),
                         lambda: nn.Conv2d(cin, cout, 1, stride, bias=bias))
    assert_same_state(ours, theirs)
    assert repr(ours).startswith(repr(theirs).replace("Conv2d(", "PointwiseConv2d(")[:-1])
    x = torch.randn(3, cin, *hw, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = run_both(ours, theirs, x)
    if channels_last and cin > 1 and any_backend != "torch":
        assert y.is_contiguous(memory_format=torch.channels_last)
        # so is the input's gradient as autograd hands it on (in a model, to the layers before, which
        # would copy it back; .grad is restrided to the input's layout anyway)
        xg = x.detach().clone().requires_grad_()
        yg = ours(xg)
        (grad_x,) = torch.autograd.grad(yg, xg, torch.randn_like(yg))
        assert grad_x.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", [b for b in KERNEL_BACKENDS if b in ("cpp", "numba")][:1] or ["torch"])
def test_strided_pointwise_compiles_with_gradients(backend):
    """torch.compile(fullgraph=True) traces the strided channels_last subsample (its autograd.Function and
    the test for whether autograd records anything) with gradients on: output and gradients as eager."""
    torch._dynamo.reset()
    m = dnn.PointwiseConv2d(6, 4, True, stride=2, backend=backend).double()
    x = torch.randn(3, 6, 5, 9, dtype=torch.float64).contiguous(memory_format=torch.channels_last).requires_grad_()
    compiled = torch.compile(m, fullgraph=True)
    y, y_ref = compiled(x), m(x)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y_ref)
    got, want = torch.autograd.grad(y, (x, m.weight), g), torch.autograd.grad(y_ref, (x, m.weight), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def _torch_separable(cin, cout, k, stride, padding, dilation, bias, m):
    return nn.Sequential(OrderedDict(
        depthwise=nn.Conv2d(cin, cin * m, k, stride, padding, dilation, groups=cin, bias=False),
        pointwise=nn.Conv2d(cin * m, cout, 1, bias=bias)))


@pytest.mark.parametrize("cin,cout,k,stride,padding,dilation,bias,m,hw", [
    (3, 5, 3, 1, 1, 1, True, 1, (6, 7)),
    (4, 2, 3, 2, 0, 2, False, 2, (11, 9)),
    (2, 7, 5, 1, "same", 1, True, 1, (5, 5)),
])
def test_separable_matches_depthwise_then_pointwise(any_backend, cin, cout, k, stride, padding, dilation, bias, m,
                                                    hw):
    ours, theirs = twins(
        lambda: dnn.SeparableConv2d(cin, cout, k, stride, padding, dilation, bias, m, backend=any_backend),
        lambda: _torch_separable(cin, cout, k, stride, padding, dilation, bias, m))
    assert_same_state(ours, theirs)
    run_both(ours, theirs, torch.randn(2, cin, *hw, dtype=torch.float64))
    assert repr(ours).startswith(f"SeparableConv2d(\n  {cin}, {cout}, kernel_size=")


@pytest.mark.parametrize("cin,cout,k,stride,padding,dilation,groups,bias,hw", [
    (3, 4, 3, 1, 1, 1, 1, True, (5, 6)),
    (2, 5, 5, 1, 0, 1, 1, False, (7, 9)),
    (3, 8, 7, 2, 3, 1, 1, False, (11, 10)),
    (4, 6, 3, (2, 1), (0, 2), (1, 2), 2, True, (8, 7)),
    (2, 3, 2, 1, "same", 1, 1, True, (4, 5)),  # asymmetric "same": padded explicitly
    (2, 3, 3, 3, 2, 2, 1, True, (5, 6)),  # taps that land only in the padding for some outputs
    (3, 5, 3, 2, 1, 1, 1, True, (13, 7)),
    (2, 2, 3, 1, 1, 1, 1, False, (1, 1)),  # one pixel: every tap but the centre in the padding
])
@pytest.mark.parametrize("layout", ["nchw", "cl", "cl-weight"])
def test_conv2d_im2col_matches_conv2d(any_backend, cin, cout, k, stride, padding, dilation, groups, bias, hw,
                                      layout):
    """channels_last input (groups 1, dilation 1) takes the windows as a view of the NHWC input
    instead of F.unfold, in (C, kH, kW) order, or (kH, kW, C) for a channels_last weight (both views
    of the weight)."""
    ours, theirs = twins(
        lambda: dnn.Conv2d(cin, cout, k, stride, padding, dilation, groups, bias, backend=any_backend),
        lambda: nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, bias))
    assert_same_state(ours, theirs)
    x = torch.randn(2, cin, *hw, dtype=torch.float64)
    if layout != "nchw":
        x = x.contiguous(memory_format=torch.channels_last)
    if layout == "cl-weight":
        ours, theirs = ours.to(memory_format=torch.channels_last), theirs.to(memory_format=torch.channels_last)
    run_both(ours, theirs, x)
    if layout == "cl-weight":  # the gradient is a view of the GEMM's: in the weight's own layout
        assert ours.weight.grad.stride() == ours.weight.stride()


@pytest.mark.parametrize("k,stride,padding,dilation,hw", [
    ((3, 3), (1, 1), (1, 1), (1, 1), (5, 4)),
    ((3, 2), (2, 3), (2, 0), (2, 1), (7, 8)),
    ((5, 5), (2, 2), (2, 2), (1, 1), (3, 3)),   # kernel larger than the input, rows of padding only
    ((1, 1), (1, 1), (0, 0), (1, 1), (2, 3)),
])
@pytest.mark.parametrize("taps_first", [False, True])
def test_nhwc_windows(any_backend, k, stride, padding, dilation, hw, taps_first):
    """Conv2d's channels_last im2col (dlkernels/im2col: Triton, C++ and Numba kernels, the torch
    version for the torch backend): rows equal F.unfold's, the backward equals F.unfold's, in float64
    and float32; first and second derivatives pass gradcheck in float64."""
    from dlkernels.im2col import nhwc_windows
    for dtype in (torch.float64, torch.float32):
        x = torch.randn(2, 3, *hw, dtype=dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
        rows = nhwc_windows(x, k, stride, padding, dilation, taps_first, any_backend)
        x2 = x.detach().clone().requires_grad_()
        cols = F.unfold(x2, k, dilation, padding, stride)  # (N, C*kH*kW, L), (C, kH, kW) order
        if taps_first:
            cols = cols.unflatten(1, (3, k[0] * k[1])).transpose(1, 2).flatten(1, 2)
        cols = cols.transpose(1, 2).reshape(rows.shape)
        torch.testing.assert_close(rows, cols, rtol=0, atol=0)
        g = torch.randn_like(rows)
        (gx,), (gx2,) = torch.autograd.grad(rows, x, g), torch.autograd.grad(cols, x2, g)
        torch.testing.assert_close(gx, gx2)
        assert gx.is_contiguous(memory_format=torch.channels_last)
    fn = lambda t: nhwc_windows(t, k, stride, padding, dilation, taps_first, any_backend)  # noqa: E731
    # Triton's interpreter takes ~10-30 ms a launch: its gradchecks project onto random vectors
    fast = any_backend == "triton"
    assert torch.autograd.gradcheck(fn, (x.detach().double().requires_grad_(),), fast_mode=fast)
    assert torch.autograd.gradgradcheck(fn, (x.detach().double().requires_grad_(),), fast_mode=fast)


@pytest.mark.parametrize("c", [1, 2, 5, 23])
def test_nhwc_windows_channel_counts(any_backend, c):
    """Window runs of every length the C++ copies by size (a few bytes to past 256, float32 and
    float64), at a 5x5 kernel with padding: rows and their backward equal F.unfold's."""
    from dlkernels.im2col import nhwc_windows
    for dtype in (torch.float64, torch.float32):
        for taps_first in (False, True):
            x = torch.randn(2, c, 6, 7, dtype=dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
            rows = nhwc_windows(x, (5, 5), (1, 1), (2, 1), (1, 1), taps_first, any_backend)
            x2 = x.detach().clone().requires_grad_()
            cols = F.unfold(x2, (5, 5), 1, (2, 1), 1)
            if taps_first:
                cols = cols.unflatten(1, (c, 25)).transpose(1, 2).flatten(1, 2)
            cols = cols.transpose(1, 2).reshape(rows.shape)
            torch.testing.assert_close(rows, cols, rtol=0, atol=0)
            g = torch.randn_like(rows)
            torch.testing.assert_close(torch.autograd.grad(rows, x, g)[0], torch.autograd.grad(cols, x2, g)[0])


@pytest.mark.parametrize("backend", [b for b in KERNEL_BACKENDS if b == "cpp"])
def test_im2col_cpp_checks_its_buffers(backend):
    """The C++ im2col and its adjoint refuse buffers that do not match the geometry (a second fence
    behind the Python glue): no access outside what they were handed."""
    from dlkernels import _C
    x = torch.randn(2, 3, 5, 4).contiguous(memory_format=torch.channels_last)
    geo = (3, 3, 1, 1, 1, 1, 1, 1)
    rows = torch.empty(2 * 5 * 4, 27)
    _C.im2col(x.numpy(), rows.numpy(), *geo, True)  # the right buffers pass
    bad = [
        (lambda: _C.im2col(x.numpy(), torch.empty(2 * 5 * 4, 26).numpy(), *geo, True), "rows"),
        (lambda: _C.im2col(x.contiguous().numpy(), rows.numpy(), *geo, True), "x: not laid out"),
        (lambda: _C.im2col(x.double().numpy(), rows.numpy(), *geo, True), "rows: dtype"),
        (lambda: _C.im2col(x.numpy(), rows.numpy(), 9, 9, 1, 1, 1, 1, 1, 1, True), "larger than"),
        (lambda: _C.im2col(x.numpy(), rows.numpy(), 3, 3, 0, 1, 1, 1, 1, 1, True), "positive"),
        (lambda: _C.col2im(rows.numpy(), torch.empty(2, 3, 5, 5).numpy(), *geo, True), "rows: size"),
        (lambda: _C.col2im(rows.numpy(), x.int().numpy(), *geo, True), "float32 or float64"),
    ]
    for call, msg in bad:
        with pytest.raises(ValueError, match=msg):
            call()


def test_conv2d_unbatched_and_padding_mode():
    ours, theirs = twins(lambda: dnn.Conv2d(2, 3, 3, padding=1, padding_mode="replicate", backend="torch"),
                         lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="replicate"))
    run_both(ours, theirs, torch.randn(2, 4, 5, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# batch norm + residual + activation
# ---------------------------------------------------------------------------------------------
class TorchBNResidual(nn.Module):
    """act(bn(x) + residual) with torch's own BatchNorm module (its buffers are the reference)."""

    def __init__(self, bn, activation):
        super().__init__()
        self.bn, self.activation = bn, activation

    def forward(self, x, residual=None):
        y = self.bn(x)
        y = y if residual is None else y + residual
        return {"relu": torch.relu, "silu": F.silu, None: lambda t: t}[self.activation](y)


def _bn_pair(cls, torch_cls, c, backend, activation=None, **kw):
    torch.manual_seed(5)
    ours = cls(c, activation=activation, backend=backend, **kw).double()
    theirs = torch_cls(c, **kw).double()
    with torch.no_grad():  # non-trivial affine parameters and running statistics
        for t in (ours, theirs):
            torch.manual_seed(6)
            if t.weight is not None:
                t.weight.uniform_(0.5, 1.5)
                t.bias.uniform_(-0.5, 0.5)
            if t.running_mean is not None:
                t.running_mean.uniform_(-0.3, 0.3)
                t.running_var.uniform_(0.5, 2.0)
    return ours, theirs


def _check_bn_steps(ours, theirs, activation, shape, residual, steps=3):
    ref = TorchBNResidual(theirs, activation)
    for step in range(steps):
        x = torch.randn(*shape, dtype=torch.float64) * 2 + 1
        inputs = (x, torch.randn_like(x)) if residual else (x,)
        run_both(ours, ref, *inputs)
        assert_same_state(ours, theirs, 1e-12)
    ours.eval()
    theirs.eval()
    x = torch.randn(*shape, dtype=torch.float64)
    run_both(ours, ref, *((x, torch.randn_like(x)) if residual else (x,)))


@pytest.mark.parametrize("activation", [None, "relu", "silu"])
@pytest.mark.parametrize("residual", [False, True])
def test_batchnorm2d_training_and_eval(any_backend, activation, residual):
    ours, theirs = _bn_pair(dnn.BatchNormResidual2d, nn.BatchNorm2d, 3, any_backend, activation)
    assert_same_state(ours, theirs)
    _check_bn_steps(ours, theirs, activation, (4, 3, 5, 3), residual)
    assert int(ours.num_batches_tracked) == 3


@pytest.mark.parametrize("kw", [dict(momentum=None), dict(track_running_stats=False), dict(affine=False),
                                dict(momentum=0.3, eps=1e-3)])
def test_batchnorm2d_options(any_backend, kw):
    ours, theirs = _bn_pair(dnn.BatchNormResidual2d, nn.BatchNorm2d, 5, any_backend, "relu", **kw)
    assert_same_state(ours, theirs)
    _check_bn_steps(ours, theirs, "relu", (2, 5, 3, 4), residual=True)
    assert repr(ours) == repr(theirs).replace("BatchNorm2d(", "BatchNormResidual2d(")[:-1] + \
        f", activation='relu', backend={any_backend!r})"


def test_batchnorm2d_channels_last(any_backend):
    ours, theirs = _bn_pair(dnn.BatchNormResidual2d, nn.BatchNorm2d, 4, any_backend, "relu")
    x = torch.randn(2, 4, 3, 5, dtype=torch.float64).to(memory_format=torch.channels_last)
    run_both(ours, TorchBNResidual(theirs, "relu"), x, torch.randn_like(x))
    assert_same_state(ours, theirs, 1e-12)


@pytest.mark.parametrize("shape", [(6, 7), (3, 7, 5), (2, 7, 1)])
def test_batchnorm1d(any_backend, shape):
    ours, theirs = _bn_pair(dnn.BatchNormResidual1d, nn.BatchNorm1d, 7, any_backend, "relu")
    _check_bn_steps(ours, theirs, "relu", shape, residual=True, steps=2)
    with pytest.raises(ValueError):
        ours(torch.randn(2, 7, 3, 3, dtype=torch.float64))


def test_batchnorm_loads_torch_checkpoints():
    theirs = nn.BatchNorm2d(4)
    theirs(torch.randn(3, 4, 2, 2))
    ours = dnn.BatchNormResidual2d(4)
    ours.load_state_dict(theirs.state_dict())
    assert_same_state(ours, theirs)
    # checkpoints without num_batches_tracked load as they load into torch's module
    old = {k: v * 2 for k, v in theirs.state_dict().items() if k != "num_batches_tracked"}
    ours.load_state_dict(old)
    theirs.load_state_dict(old)
    assert_same_state(ours, theirs)


def test_activation_is_checked():
    with pytest.raises(ValueError, match="activation"):
        dnn.BatchNormResidual2d(3, activation="gelu")
    with pytest.raises(ValueError, match="activation"):
        dnn.Linear(3, 4, activation="silu")
    with pytest.raises(ValueError, match="depth_multiplier"):
        dnn.DepthwiseConv2d(3, 3, depth_multiplier=0)


# ---------------------------------------------------------------------------------------------
# linear
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("shape,bias", [((5, 7), True), ((2, 3, 7), False), ((1, 7), True), ((7,), True)])
def test_linear_matches_torch(any_backend, activation, shape, bias):
    ours, theirs = twins(lambda: dnn.Linear(7, 11, bias, activation, backend=any_backend),
                         lambda: nn.Linear(7, 11, bias))
    assert_same_state(ours, theirs)
    ref = nn.Sequential(theirs, nn.ReLU()) if activation else theirs
    run_both(ours, ref, torch.randn(*shape, dtype=torch.float64))
    assert repr(ours).startswith(repr(theirs).replace("Linear(", "Linear(")[:-1])


def test_linear_relu_propagates_nan(any_backend):
    lin = dnn.Linear(3, 2, activation="relu", backend=any_backend).double()
    x = torch.tensor([[float("nan"), 1.0, 2.0]], dtype=torch.float64)
    assert torch.isnan(lin(x)).all()


# ---------------------------------------------------------------------------------------------
# backend= per module
# ---------------------------------------------------------------------------------------------
def test_module_backend_wins_over_scope(monkeypatch):
    seen = []
    resolve = _dispatch.resolve

    def spy(family, backend, device):
        seen.append((family, backend))
        return resolve(family, backend, device)

    monkeypatch.setattr(_dispatch, "resolve", spy)
    model = nn.Sequential(dnn.Linear(4, 4, backend="torch"), dnn.BatchNormResidual1d(4, backend="torch"))
    with dlkernels.use_backend(KERNEL_BACKENDS[0] if KERNEL_BACKENDS else "torch"):
        model(torch.randn(3, 4))
    assert seen and all(b == "torch" for _, b in seen)
    seen.clear()
    dnn.set_backend(model, None)
    with dlkernels.use_backend("torch"):
        model(torch.randn(3, 4))
    assert seen and all(b is None for _, b in seen)
    assert "backend" not in repr(model)
