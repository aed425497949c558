"""torch.autocast (dlkernels/_registration.py: Op.register_autocast): under autocast an op casts its
inputs as torch's own op would, then runs. The convolutions and GEMMs go to autocast's dtype where the
backend has kernels for it (Triton) and to float32 on the CPU backends; batch norm runs in its input's
dtype promoted with the residual's. So an op under autocast must equal the same op called outside
autocast on inputs cast that way -- forward and every gradient, bit for bit -- and a model that mixes
torch's layers with dlkernels' trains under autocast, where it raised a dtype mismatch before."""
import pytest
import torch
import torch.nn.functional as F

import dlkernels
import dlkernels.nn as dnn
from dlkernels._registration import autocast_dtype
from helpers import DEVICE, LARGE_BACKENDS, TOL, leaf

LOW = torch.bfloat16  # autocast's dtype here: the one both CPU and CUDA autocast take


def _r(*shape, dtype=torch.float32, cl=False):
    t = torch.randn(*shape, device=DEVICE).to(dtype)
    return t.contiguous(memory_format=torch.channels_last) if cl else t


def _cases(backend):
    """(name, fn, inputs, stateful tensors, batch norm?): activations in bfloat16 as a torch layer under
    autocast hands them on, parameters in float32; odd sizes."""
    rm, rv = torch.randn(5, device=DEVICE), torch.rand(5, device=DEVICE) + 0.5
    return [
        ("linear", lambda x, w, b: dlkernels.linear(x, w, b, activation="relu", backend=backend),
         [leaf(_r(7, 3, dtype=LOW)), leaf(_r(5, 3)), leaf(_r(5))], [], False),
        ("matmul", lambda a, b: dlkernels.matmul(a, b, backend=backend),
         [leaf(_r(2, 3, 4, dtype=LOW)), leaf(_r(4, 5))], [], False),
        ("pointwise_conv2d", lambda x, w, b: dlkernels.pointwise_conv2d(x, w, b, backend=backend),
         [leaf(_r(2, 3, 5, 4, dtype=LOW, cl=True)), leaf(_r(6, 3, 1, 1)), leaf(_r(6))], [], False),
        ("depthwise_conv2d", lambda x, w, b: dlkernels.depthwise_conv2d(x, w, b, 2, 1, backend=backend),
         [leaf(_r(2, 3, 7, 5, dtype=LOW)), leaf(_r(6, 1, 3, 3)), leaf(_r(6))], [], False),
        ("separable_conv2d", lambda x, dw, pw, b: dlkernels.separable_conv2d(x, dw, pw, b, 1, "same", backend=backend),
         [leaf(_r(2, 3, 5, 7, dtype=LOW, cl=True)), leaf(_r(3, 1, 3, 3)), leaf(_r(4, 3, 1, 1)), leaf(_r(4))], [],
         False),
        # the residual in float32 (a block's identity from before autocast): bn(x) + r promotes to it
        ("batch_norm_residual", lambda x, r, w, b: dlkernels.batch_norm_residual(
            x, r, rm, rv, w, b, True, 0.1, 1e-5, activation="relu", backend=backend),
         [leaf(_r(3, 5, 4, 3, dtype=LOW, cl=True)), leaf(_r(3, 5, 4, 3, cl=True)), leaf(_r(5)), leaf(_r(5))],
         [rm, rv], True),
    ]


def _run(fn, inputs, state):
    out = fn(*inputs)
    grads = torch.autograd.grad(out, inputs, out.detach().sin().add_(0.5))
    return [out.detach(), *grads, *(s.clone() for s in state)]


def _explicit(fn, inputs, dtype, bn):
    """fn on inputs cast to dtype in the graph, as autocast's cast would be (batch norm: input and
    residual only), outside autocast."""
    def cast(i, t):
        return t.to(dtype) if (not bn or i < 2) and t.dtype != dtype else t
    return lambda *xs: fn(*(cast(i, t) for i, t in enumerate(xs)))


@pytest.mark.parametrize("case", range(6))
def test_op_under_autocast_is_the_op_on_cast_inputs(backend, case):
    name, fn, inputs, state, bn = _cases(backend)[case]
    # torch computes the GEMMs and convs in bfloat16 under autocast, batch norm + float32 residual in float32
    want = autocast_dtype(backend, torch.float32 if bn else LOW)
    saved = [s.clone() for s in state]
    with torch.autocast(DEVICE.type, dtype=LOW):
        got = _run(fn, inputs, state)
    assert got[0].dtype == want, f"{name}: output {got[0].dtype}, expected {want}"
    for t, g in zip(inputs, got[1:]):
        assert g.dtype == t.dtype, f"{name}: a gradient in {g.dtype} for an input in {t.dtype}"
    for s, v in zip(state, saved):
        s.copy_(v)
    expected = _run(_explicit(fn, inputs, want, bn), inputs, state)
    for i, (a, b) in enumerate(zip(got, expected)):
        # bit for bit on the CPU; a GPU's reductions may order their adds differently between two runs
        tol = 0 if DEVICE.type == "cpu" else TOL[a.dtype]
        torch.testing.assert_close(a, b, rtol=tol, atol=tol,
                                   msg=lambda m: f"{name}: result {i} differs from the op on cast inputs: {m}")


def test_without_autocast_mixed_dtypes_still_raise(backend):
    with pytest.raises(TypeError, match="dtype"):
        dlkernels.linear(_r(7, 3, dtype=LOW), _r(5, 3), backend=backend)


def _mixed_model(backend, reference: bool):
    """torch's layers and dlkernels' interleaved (reference: torch's in dlkernels' place), the same weights."""
    layers = [
        (torch.nn.Conv2d(3, 8, 3, padding=1), None),
        (torch.nn.BatchNorm2d(8), dnn.BatchNormResidual2d(8, backend=backend)),
        (torch.nn.ReLU(), None),
        (torch.nn.Conv2d(8, 8, 3, padding=1), dnn.Conv2d(8, 8, 3, padding=1, backend=backend)),
        (torch.nn.Conv2d(8, 8, 3, padding=1, groups=8), dnn.DepthwiseConv2d(8, 3, padding=1, backend=backend)),
        (torch.nn.Conv2d(8, 6, 1, stride=2), dnn.PointwiseConv2d(8, 6, stride=2, backend=backend)),
        (torch.nn.Flatten(), None),
        (torch.nn.Linear(6 * 5 * 5, 16), None),
        (torch.nn.Linear(16, 4), dnn.Linear(16, 4, backend=backend)),
    ]
    torch.manual_seed(0)
    ref = torch.nn.Sequential(*(t for t, _ in layers))
    for t in ref.modules():
        if hasattr(t, "reset_parameters"):
            t.reset_parameters()
    model = ref if reference else torch.nn.Sequential(*(t if d is None else d for t, d in layers))
    model.load_state_dict(ref.state_dict())
    return model.to(DEVICE)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("backend", LARGE_BACKENDS)
def test_mixed_model_trains_under_autocast(backend, channels_last):
    x = _r(4, 3, 9, 9, cl=channels_last)
    target = torch.randint(0, 4, (4,), device=DEVICE)

    def step(reference: bool, autocast: bool):
        model = _mixed_model(backend, reference)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        with torch.autocast(DEVICE.type, dtype=LOW, enabled=autocast):
            loss = F.cross_entropy(model(x), target)
        loss.backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and p.grad.dtype == p.dtype and p.grad.isfinite().all(), name
        return torch.cat([loss.detach().float().reshape(1)] + [p.grad.flatten() for p in model.parameters()])

    exact = step(reference=True, autocast=False)  # torch's layers, float32
    ours, torchs = step(reference=False, autocast=True), step(reference=True, autocast=True)
    # Against float32, ours under autocast is at most torch's own autocast error off (twice, with a floor):
    # where our layers compute in float32 (the CPU backends) it is smaller; through a training-mode batch
    # norm, whose backward cancels most of the gradient, bfloat16's error is large relative to the result.
    err, torch_err = (ours - exact).norm(), (torchs - exact).norm()
    assert err <= 2 * torch_err + 1e-3 * exact.norm(), (err, torch_err, exact.norm())


@pytest.mark.parametrize("backend", LARGE_BACKENDS)
def test_compiled_under_autocast(backend):
    x, w, b = leaf(_r(6, 5, dtype=LOW)), leaf(_r(4, 5)), leaf(_r(4))
    rm, rv = torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE)

    def block(x, w, b):
        y = dlkernels.linear(x, w, b, backend=backend)
        return dlkernels.batch_norm_residual(y, None, rm, rv, None, None, True, 0.1, 1e-5, activation="relu",
                                             backend=backend)

    compiled = torch.compile(block, fullgraph=True)
    results = []
    for f in (block, compiled):
        rm.zero_(), rv.fill_(1)
        with torch.autocast(DEVICE.type, dtype=LOW):
            out = f(x, w, b)
        results.append(_run(lambda *a: out, [x, w, b], [rm, rv]))
    assert results[0][0].dtype == autocast_dtype(backend, LOW)
    for i, (a, e) in enumerate(zip(*results)):
        torch.testing.assert_close(a, e, rtol=TOL[a.dtype], atol=TOL[a.dtype], msg=lambda m: f"result {i}: {m}")
