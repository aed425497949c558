"""dlkernels.models: each reference model against its pure-PyTorch twin (same weights, float64):
outputs, gradients and running statistics on every backend; torchvision's ResNet names and sizes;
torch.compile(fullgraph=True), torch.export and torch.jit.trace equal to eager."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F

from dlkernels import models
from dlkernels.models.mini_xception import max_pool_same
from helpers import KERNEL_BACKENDS, LARGE_BACKENDS

pytestmark = pytest.mark.usefixtures("on_test_device")

ALL_BACKENDS = ["torch", *KERNEL_BACKENDS]
# torch.compile traces the ops' fake implementations: the interpreted Triton kernels cannot run
# under it (see NOTES.md), the CPU backends and "torch" can.
# One backend keeps the suite's time down (each compile takes tens of seconds on 2 cores).
COMPILE_BACKENDS = [b for b in KERNEL_BACKENDS if b in ("cpp", "numba")][:1] or ["torch"]

# tiny configurations: the architecture of each model, at widths the suite runs in seconds
TINY = {
    "mini_xception": (lambda **kw: models.mini_xception(5, 2, widths=(4, 8, 8), **kw), (3, 2, 12, 12)),
    "resnet18": (lambda **kw: models.resnet18(4, width=4, **kw), (2, 3, 20, 20)),
    "resnet50": (lambda **kw: models.resnet50(3, width=2, in_channels=1, **kw), (2, 1, 20, 20)),
    "mlp": (lambda **kw: models.mlp(12, [8, 8, 6], 5, **kw), (6, 3, 4)),
}


def _pair(name, backend):
    make, shape = TINY[name]
    torch.manual_seed(0)
    ours = make(backend=backend).double()
    twin = make(reference=True).double()
    assert list(ours.state_dict()) == list(twin.state_dict())
    with torch.no_grad():  # non-trivial BN statistics and affine parameters
        for m in ours.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    twin.load_state_dict(ours.state_dict())
    return ours, twin, torch.randn(*shape, dtype=torch.float64)


def _step(model, x, seed):
    torch.manual_seed(seed)  # the same dropout mask in both models
    y = model(x)
    F.cross_entropy(y, torch.arange(len(x)) % y.shape[1]).backward()
    return y


def _assert_same_step(model, twin, ya, yb, mode):
    """A step's outputs, parameter gradients and state (running statistics) equal the twin's."""
    torch.testing.assert_close(ya, yb, rtol=1e-9, atol=1e-10)
    for (n, pa), pb in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-7, atol=1e-9, msg=f"{mode}: {n}")
    for (n, sa), sb in zip(model.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(sa, sb, rtol=1e-10, atol=1e-12, msg=n)


@pytest.mark.parametrize("name", list(TINY))
def test_model_matches_torch_twin(any_backend, name):
    ours, twin, x = _pair(name, any_backend)
    for mode in (True, False):
        ours.train(mode)
        twin.train(mode)
        _assert_same_step(ours, twin, _step(ours, x, 1), _step(twin, x, 1), mode)
        ours.zero_grad()
        twin.zero_grad()


@pytest.fixture(params=ALL_BACKENDS)
def any_backend(request):
    return request.param


# (whole models under torch.func: not on the interpreted Triton kernels, ~20 s a model there; the ops' own
# torch.func and vmap tests run every backend)
@pytest.mark.parametrize("backend", LARGE_BACKENDS)
@pytest.mark.parametrize("name", ["mini_xception", "resnet18"])
def test_vmapped_ensemble_matches_each_model(backend, name):
    """Three models' parameters and buffers stacked (torch.func.stack_module_state) and run at once by vmap
    over functional_call, in evaluation and in training (each model's running statistics updated as its
    own): the modules' layout choices are not asked of vmap's batched tensors (it cannot answer)."""
    members = [_pair(name, backend)[0] for _ in range(3)]
    x = _pair(name, backend)[2]
    for member in members:
        for m in member.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    base = copy.deepcopy(members[0]).to("meta")
    for mode in (False, True):
        for member in members:
            member.train(mode)
        params, buffers = torch.func.stack_module_state(members)
        out = torch.func.vmap(lambda p, b: torch.func.functional_call(base.train(mode), (p, b), (x,)))(params, buffers)
        want = torch.stack([member(x) for member in members])
        torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-10)
        for k, stacked in buffers.items():
            torch.testing.assert_close(stacked, torch.stack([dict(m.named_buffers())[k] for m in members]),
                                       rtol=1e-10, atol=1e-12, msg=k)


@pytest.mark.parametrize("backend", LARGE_BACKENDS)
@pytest.mark.parametrize("name", ["mini_xception", "resnet18", "mlp"])
def test_torch_func_training_step_matches_backward(backend, name):
    """A training step through torch.func (functional_call, grad; the batch norms without running
    statistics, torch.func.replace_all_batch_norm_modules_, as torch.func asks of torch's own) gives the
    parameters' gradients loss.backward() gives: every layer, the im2col stem and strided shortcut
    included, under the transform. In evaluation, per-example gradients (vmap of grad) equal a loop."""
    ours, _, x = _pair(name, backend)
    ours.train()
    if name == "mini_xception":  # the same (no) dropout mask either way
        ours.dropout.p = 0.0
    torch.func.replace_all_batch_norm_modules_(ours)
    labels = torch.arange(len(x)) % 3

    def loss(params, xb, yb):
        return F.cross_entropy(torch.func.functional_call(ours, params, (xb,)), yb)

    params = {k: v.detach() for k, v in ours.named_parameters()}
    grads = torch.func.grad(loss)(params, x, labels)
    loss(dict(ours.named_parameters()), x, labels).backward()
    for n, p in ours.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-9, atol=1e-12, msg=n)
    if name == "mlp":
        ours, _, x = _pair(name, backend)
        ours.eval()
        params = {k: v.detach() for k, v in ours.named_parameters()}
        buffers = dict(ours.named_buffers())

        def example_loss(p, xi, yi):
            return F.cross_entropy(torch.func.functional_call(ours, (p, buffers), (xi[None],)), yi[None])

        per_example = torch.func.vmap(torch.func.grad(example_loss), in_dims=(None, 0, 0))(params, x, labels)
        for i in range(len(x)):
            ours.zero_grad()
            example_loss(dict(ours.named_parameters()), x[i], labels[i]).backward()
            for n, p in ours.named_parameters():
                torch.testing.assert_close(per_example[n][i], p.grad, rtol=1e-9, atol=1e-12, msg=f"{i}: {n}")


@pytest.mark.parametrize("backend", LARGE_BACKENDS)
@pytest.mark.parametrize("name", ["mini_xception", "resnet18", "mlp"])
def test_hessian_vector_product_matches_the_twin(backend, name):
    """Forward over reverse through a whole model (jvp of grad of the loss in the parameters: a
    Hessian-vector product, what second-order optimizers and influence functions take), in both modes
    (training with the batch norms' running statistics off, as torch.func asks), equals the twin's."""
    for mode in (False, True):
        products = []
        ours, twin, x = _pair(name, backend)
        for model in (ours, twin):
            model.train(mode)
            if name == "mini_xception":
                model.dropout.p = 0.0
            if mode:
                torch.func.replace_all_batch_norm_modules_(model)
            params = {k: v.detach() for k, v in model.named_parameters()}
            buffers = dict(model.named_buffers())
            labels = torch.arange(len(x)) % 3

            def loss(p):
                return F.cross_entropy(torch.func.functional_call(model, (p, buffers), (x,)), labels)

            torch.manual_seed(5)
            direction = {k: torch.randn_like(p) for k, p in params.items()}
            products.append(torch.func.jvp(torch.func.grad(loss), (params,), (direction,))[1])
        for k, want in products[1].items():
            torch.testing.assert_close(products[0][k], want, rtol=1e-9, atol=1e-9 * float(want.abs().max()),
                                       msg=f"{'training' if mode else 'evaluation'}: {k}")


@pytest.mark.parametrize("builder,params,last", [
    (models.resnet18, 11_689_512, "layer4.1.bn2.num_batches_tracked"),
    (models.resnet34, 21_797_672, "layer4.2.bn2.num_batches_tracked"),
    (models.resnet50, 25_557_032, "layer4.2.bn3.num_batches_tracked"),
])
def test_resnet_has_torchvisions_names_and_sizes(builder, params, last):
    model = builder(1000)
    keys = list(model.state_dict())
    # torchvision's order: stem, the four stages, fc; shortcut as downsample.0 (conv) / .1 (BN)
    assert keys[:6] == ["conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
                        "bn1.num_batches_tracked"]
    assert keys[-3:] == [last, "fc.weight", "fc.bias"]
    assert "layer2.0.downsample.0.weight" in keys and "layer2.0.downsample.1.running_var" in keys
    assert "layer1.0.downsample.0.weight" in keys if builder is models.resnet50 else \
        "layer1.0.downsample.0.weight" not in keys
    assert sum(p.numel() for p in model.parameters()) == params
    twin = builder(1000, reference=True)
    twin.load_state_dict(model.state_dict())
    assert {k: v.shape for k, v in twin.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_mini_xception_architecture():
    model = models.mini_xception(10, 1)
    assert [b.sep2.pointwise.out_channels for b in model.blocks] == [32, 64, 128, 256, 512]
    assert model.stem.kernel_size == (5, 5) and model.stem.out_channels == 32 and model.stem.bias is None
    assert model.dropout.p == 0.5 and model.fc.in_features == 512
    with torch.no_grad(), __import__("dlkernels").use_backend("torch"):
        model.eval()
        feats = model.blocks(model.stem(torch.randn(2, 1, 32, 32)))
    assert feats.shape == (2, 512, 1, 1)  # 32 -> 28 (5x5 valid) -> 14, 7, 4, 2, 1


@pytest.mark.parametrize("size", [1, 2, 5, 7, 8])
def test_max_pool_same_is_keras_same_padding(size):
    x = torch.randn(2, 3, size, size + 1, dtype=torch.float64)
    y = max_pool_same(x)
    assert y.shape[-2:] == (-(-size // 2), -(-(size + 1) // 2))
    # TensorFlow/Keras "same": total padding (out-1)*stride + k - size, total // 2 of it before the
    # input and the rest (the odd one) after, so window i starts at row 2i - total // 2
    def before(n):
        return max((-(-n // 2) - 1) * 2 + 3 - n, 0) // 2

    top, left = before(size), before(size + 1)
    for i in range(y.shape[-2]):
        for j in range(y.shape[-1]):
            r0, c0 = max(2 * i - top, 0), max(2 * j - left, 0)
            win = x[..., r0:2 * i - top + 3, c0:2 * j - left + 3]
            torch.testing.assert_close(y[..., i, j], win.amax(dim=(-2, -1)))


def test_mlp_residual_only_at_equal_widths():
    model = models.mlp(12, [8, 8, 6], 5)
    assert [fc.out_features for fc in model.fcs] == [8, 8, 6]
    assert model.fcs[0].bias is None and model.head.bias is not None


@pytest.mark.parametrize("backend", LARGE_BACKENDS)
@pytest.mark.parametrize("name", ["mini_xception", "resnet18", "mlp"])
def test_jit_trace_matches_the_twin(backend, name):
    """A model traced by torch.jit.trace, saved and loaded, runs a new input as its twin does, in both
    modes: outputs, gradients and running statistics. Before, dlkernels.nn.Conv2d's im2col kernel entered
    the trace as a constant (a traced Conv2d answered every input with the traced one's windows, and
    tracing a ResNet raised "unordered_map::at")."""
    ours, twin, x = _pair(name, backend)
    x2 = torch.randn_like(x)
    for mode in (False, True):
        ours.train(mode)
        twin.train(mode)
        torch.manual_seed(1)
        traced = torch.jit.trace(ours, x, check_trace=False)  # one step on x (the check would redo it
        torch.manual_seed(1)                                  # and compare dropout's draws)
        twin(x)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
        buffer.seek(0)
        loaded = torch.jit.load(buffer)
        _assert_same_step(loaded, twin, _step(loaded, x2, 2), _step(twin, x2, 2), mode)
        twin.zero_grad()


@pytest.mark.parametrize("backend", LARGE_BACKENDS)
@pytest.mark.parametrize("name", ["mini_xception", "resnet18", "mlp"])
def test_export_with_a_dynamic_batch_matches_the_twin(backend, name):
    """torch.export.export with the batch dimension dynamic: the exported program, run on another batch
    size, answers as the twin does, in evaluation and in training (where it also steps the running
    statistics, a mutation the ops' schemas declare)."""
    ours, twin, x = _pair(name, backend)
    if name == "mini_xception":  # dropout draws from another RNG stream in an exported program
        ours.dropout.p = twin.dropout.p = 0.0
    x2 = torch.randn(x.shape[0] + 2, *x.shape[1:], dtype=x.dtype)
    batch = torch.export.Dim("batch", min=2, max=64)
    for mode in (False, True):
        ours.train(mode)
        twin.train(mode)
        program = torch.export.export(ours, (x,), dynamic_shapes=({0: batch},))
        assert "dlkernels" in str(program.graph)
        exported = program.module()
        torch.testing.assert_close(exported(x2), twin(x2), rtol=1e-9, atol=1e-10)
        for (n, sa), sb in zip(exported.state_dict().items(), twin.state_dict().values()):
            torch.testing.assert_close(sa, sb, rtol=1e-10, atol=1e-12, msg=n)


@pytest.mark.slow
@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
@pytest.mark.parametrize("name", list(TINY))
def test_compile_fullgraph_matches_eager(backend, name):
    """Also with the batch dimension dynamic: one graph a mode serves another batch size."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    ours, _, x = _pair(name, backend)
    torch._dynamo.mark_dynamic(x, 0)
    other = torch.randn(x.shape[0] + 3, *x.shape[1:], dtype=x.dtype)
    compiled = torch.compile(ours, fullgraph=True)
    for mode in (False, True):
        ours.train(mode)
        for batch in (x, other):
            with torch.no_grad():
                torch.manual_seed(2)
                eager = ours(batch)
                state = {k: v.clone() for k, v in ours.state_dict().items()}
                torch.manual_seed(2)
                out = compiled(batch)
            # dropout draws from another RNG stream when compiled: compare the train-mode outputs of
            # models without dropout only
            if not (mode and name == "mini_xception"):
                torch.testing.assert_close(out, eager, rtol=1e-9, atol=1e-10)
            assert out.shape == eager.shape and torch.isfinite(out).all()
            if mode:  # the compiled training step updates the running statistics as eager does
                for k, v in ours.state_dict().items():
                    if k.endswith("num_batches_tracked"):
                        assert int(v) == int(state[k]) + 1, k
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2  # one a mode, for both batches
