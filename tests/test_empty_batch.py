"""An empty batch (N = 0: a detection head with no proposals, the last shard of a split batch) is input
torch accepts for every op here: the output is empty, the parameters' gradients are zero (sums of no
terms), batch norm's running statistics stay as they are. Every op and module must do the same on
every backend, without running a kernel on empty arrays (which raised: "input is empty", an empty
dimension, or the C++ extension's layout check). Images of height or width 0 stay an error, as in torch.
GEMMs with another empty dimension (K = 0 features, M or N = 0, an empty batch dimension of a batched
matmul) and batch norm over 0 channels answer as torch's too."""
import pytest
import torch
import torch.nn.functional as F

import dlkernels
import dlkernels.nn as dnn
from helpers import DEVICE, leaf


def _r(*shape, cl=False):
    t = torch.randn(*shape, device=DEVICE, dtype=torch.float64)
    return leaf(t.contiguous(memory_format=torch.channels_last) if cl else t)


def _cases(backend, cl):
    """(name, ours, torch's, inputs): functional ops on an empty batch of odd-sized images."""
    x = _r(0, 3, 5, 4, cl=cl)
    rm, rv = torch.randn(3, device=DEVICE, dtype=torch.float64), torch.rand(3, device=DEVICE, dtype=torch.float64)
    return [
        ("depthwise", lambda x, w, b: dlkernels.depthwise_conv2d(x, w, b, 2, 1, backend=backend),
         lambda x, w, b: F.conv2d(x, w, b, 2, 1, 1, 3), [x, _r(6, 1, 3, 3), _r(6)]),
        ("separable", lambda x, dw, pw, b: dlkernels.separable_conv2d(x, dw, pw, b, 1, "same", backend=backend),
         lambda x, dw, pw, b: F.conv2d(F.conv2d(x, dw, None, 1, "same", 1, 3), pw, b),
         [x, _r(3, 1, 3, 3), _r(4, 3, 1, 1), _r(4)]),
        ("pointwise", lambda x, w, b: dlkernels.pointwise_conv2d(x, w, b, backend=backend),
         lambda x, w, b: F.conv2d(x, w, b), [x, _r(4, 3, 1, 1), _r(4)]),
        ("linear", lambda x, w, b: dlkernels.linear(x, w, b, activation="relu", backend=backend),
         lambda x, w, b: F.relu(F.linear(x, w, b)), [_r(0, 5), _r(4, 5), _r(4)]),
        ("batch_norm_residual train", lambda x, r, w, b: dlkernels.batch_norm_residual(
            x, r, rm, rv, w, b, True, 0.1, 1e-5, activation="relu", backend=backend),
         lambda x, r, w, b: F.relu(F.batch_norm(x, rm.clone(), rv.clone(), w, b, True, 0.1, 1e-5) + r),
         [x, _r(0, 3, 5, 4, cl=cl), _r(3), _r(3)]),
        ("batch_norm_residual eval 1d", lambda x, w, b: dlkernels.batch_norm_residual(
            x, None, rm, rv, w, b, False, activation="silu", backend=backend),
         lambda x, w, b: F.silu(F.batch_norm(x, rm, rv, w, b, False)), [_r(0, 3), _r(3), _r(3)]),
    ], (rm, rv)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_ops_on_an_empty_batch(backend, channels_last):
    cases, stats = _cases(backend, channels_last)
    saved = [s.clone() for s in stats]
    for name, ours, theirs, inputs in cases:
        out, ref = ours(*inputs), theirs(*inputs)
        assert out.shape == ref.shape and out.dtype == ref.dtype, (name, out.shape, ref.shape)
        grads = torch.autograd.grad(out, inputs, torch.ones_like(out), allow_unused=True)
        for t, g in zip(inputs, grads):
            assert g is None or (g.shape == t.shape and not g.any()), name
        assert any(g is not None and g.numel() for g in grads), f"{name}: no parameter gradient came back"
    for s, v in zip(stats, saved):
        assert torch.equal(s, v), "running statistics changed on an empty batch"


@pytest.mark.parametrize("backend", [b for b in dlkernels.available_backends(DEVICE) if b != "torch"])
def test_modules_on_an_empty_batch(backend):
    torch.manual_seed(0)
    layers = [(dnn.Conv2d(3, 4, 3, padding=1, backend=backend), torch.nn.Conv2d(3, 4, 3, padding=1)),
              (dnn.Conv2d(4, 4, 3, stride=2, groups=2, backend=backend), torch.nn.Conv2d(4, 4, 3, stride=2, groups=2)),
              (dnn.PointwiseConv2d(4, 5, stride=2, backend=backend), torch.nn.Conv2d(4, 5, 1, stride=2)),
              (dnn.BatchNormResidual2d(5, activation="relu", backend=backend),
               torch.nn.Sequential(torch.nn.BatchNorm2d(5), torch.nn.ReLU()))]
    ours = torch.nn.Sequential(*(a for a, _ in layers)).to(DEVICE, torch.float64)
    theirs = torch.nn.Sequential(*(b for _, b in layers)).to(DEVICE, torch.float64)
    theirs.load_state_dict({k.replace("3.", "3.0."): v for k, v in ours.state_dict().items()})
    for cl in (False, True):
        x = _r(0, 3, 9, 7, cl=cl)
        out, ref = ours(x), theirs(x)
        assert out.shape == ref.shape == (0, 5, 2, 2)
        out.sum().backward()
        for name, p in ours.named_parameters():
            assert p.grad is not None and not p.grad.any(), name
        assert torch.equal(ours[3].running_mean, theirs[3][0].running_mean)


def test_empty_images_are_rejected(backend):
    x = _r(2, 3, 0, 4)
    with pytest.raises(ValueError, match="empty spatial dimension"):
        dlkernels.depthwise_conv2d(x, _r(3, 1, 3, 3), None, 1, 2, backend=backend)
    with pytest.raises(ValueError, match="empty spatial dimension"):
        dlkernels.separable_conv2d(x, _r(3, 1, 3, 3), _r(4, 3, 1, 1), None, 1, 2, backend=backend)


def _gemm_cases(backend):
    """(name, ours, torch's, input shapes): GEMMs with an empty dimension other than the batch, which
    torch answers (K = 0: zeros plus the bias; M or N = 0: an empty result)."""
    mm = (lambda a, b: dlkernels.matmul(a, b, backend=backend)), torch.matmul
    lin = (lambda x, w, b: dlkernels.linear(x, w, b, activation="relu", backend=backend),
           lambda x, w, b: F.relu(F.linear(x, w, b)))
    return [
        ("mm K=0", *mm, [(3, 0), (0, 4)]), ("mm M=0", *mm, [(0, 5), (5, 4)]), ("mm N=0", *mm, [(3, 5), (5, 0)]),
        ("bmm K=0", *mm, [(2, 3, 0), (2, 0, 4)]), ("bmm M=0", *mm, [(2, 0, 5), (5, 4)]),
        ("bmm N=0", *mm, [(2, 3, 5), (1, 5, 0)]), ("bmm batch 0 of 2", *mm, [(2, 0, 3, 5), (2, 1, 5, 4)]),
        ("linear K=0", *lin, [(3, 0), (4, 0), (4,)]), ("linear 3-D K=0", *lin, [(2, 3, 0), (4, 0), (4,)]),
        ("linear N=0", *lin, [(3, 5), (0, 5), (0,)]),
    ]


@pytest.mark.parametrize("case", range(10))
def test_gemms_with_an_empty_dimension(backend, case):
    name, ours, theirs, shapes = _gemm_cases(backend)[case]
    inputs = [_r(*s) for s in shapes]
    out, ref = ours(*inputs), theirs(*inputs)
    assert out.shape == ref.shape, (name, out.shape, ref.shape)
    torch.testing.assert_close(out, ref)
    grad = torch.rand_like(ref)
    got = torch.autograd.grad(out, inputs, grad, allow_unused=True)
    want = torch.autograd.grad(ref, inputs, grad, allow_unused=True)
    for t, g, w in zip(inputs, got, want):
        w = torch.zeros_like(t) if w is None else w
        assert g is not None and g.shape == t.shape, name
        torch.testing.assert_close(g, w, msg=name)


def test_batch_norm_training_with_no_channels(backend):
    x, rm, rv = _r(4, 0, 3, 2), torch.zeros(0, dtype=torch.float64), torch.ones(0, dtype=torch.float64)
    out = dlkernels.batch_norm_residual(x, None, rm, rv, training=True, backend=backend)
    assert out.shape == x.shape
    (gx,) = torch.autograd.grad(out, x, torch.ones_like(out))
    assert gx.shape == x.shape
