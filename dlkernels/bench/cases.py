"""The one table of benchmark cases: both the pytest-benchmark suite (benchmarks/) and
``python -m dlkernels bench`` read CASES.

A case is a real layer shape from the op issues (Xception, MobileNetV2, ResNet-50 stages, linear
layers), one pass (forward, or forward+backward), one memory format and one batch-norm mode. Each
knows how to build its inputs, the unfused PyTorch function it is compared against, the dlkernels
call, and the fewest bytes and the FLOPs that pass needs (for the memory floor and the achieved
fraction of the machine's limits).

Tiers: 0 tiny shapes (per-call overhead and a smoke test of every path), 1 ``--quick``,
2 the default, 3 ``--full``; a preset runs every case of its tier and below.
"""
from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

import dlkernels

PRESETS = {"tiny": 0, "quick": 1, "default": 2, "full": 3}


class Unavailable(Exception):
    """A contender that cannot run here (op or kernel module not present yet, torch.compile broken)."""


@dataclass
class Problem:
    """One case made concrete: inputs and the functions every contender is built from.

    ``eager(*args)`` is the unfused PyTorch function; ``dl(backend, *args)`` the dlkernels call.
    Both return a tensor or a tuple of tensors. ``grad_args``: positions of args differentiated in
    forward+backward (parameters of nn.Module args are differentiated too); ``state_args``: positions
    mutated by a call (running statistics), compared after one call from the same start.
    """
    args: list
    eager: Callable[..., Any]
    dl: Callable[..., Any]
    bytes: int
    flops: int
    grad_args: tuple = ()
    state_args: tuple = ()
    tol: float = 0.0  # a case's own tolerance floor, where the dtype's base one cannot hold (say why)


@dataclass(frozen=True)
class Case:
    op: str          # public dlkernels function, or "model"
    layer: str       # where the shape comes from
    shape: str       # the shape, for people
    passes: str      # "fwd", "fwd+bwd", or TRAIN_STEP for a model's whole training step
    layout: str      # "nchw", "channels_last" or "-"
    mode: str        # "eval", "train" or "-"
    tier: int
    bound: str       # "memory", "compute" or "overhead" (the limit its fraction is taken of)
    compile: bool    # torch.compile of the eager function is a contender by default
    build: Callable[["Case", torch.dtype, torch.device, torch.Generator], Problem] = \
        field(compare=False, hash=False, repr=False)
    params: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def id(self) -> str:
        parts = [self.op, self.layer, self.shape, self.passes]
        parts += [p for p in (self.layout, self.mode) if p != "-"]
        return "-".join(p.replace(" ", "") for p in parts)

    @property
    def group(self) -> str:
        return OP_GROUP.get(self.op, self.op)


OP_GROUP = {"matmul": "matmul", "linear": "matmul", "depthwise_conv2d": "depthwise",
            "pointwise_conv2d": "pointwise", "separable_conv2d": "separable",
            "batch_norm_residual": "batchnorm", "model": "models"}


# ---------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------
def csv(text: str) -> list[str]:
    """The items of a comma-separated command-line value."""
    return [t.strip() for t in text.split(",") if t.strip()]


def dtypes_of(text: str) -> list[torch.dtype]:
    """The dtypes a --dtypes value names (default: float32)."""
    return [getattr(torch, d) for d in csv(text)] or [torch.float32]


def _randn(shape, dtype, device, gen, scale=1.0) -> Tensor:
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def _image(shape, layout, dtype, device, gen) -> Tensor:
    x = _randn(shape, dtype, device, gen)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def _dl_op(name: str) -> Callable[..., Any]:
    fn = getattr(dlkernels, name, None)
    if fn is None:
        raise Unavailable(f"dlkernels.{name} does not exist yet")
    return fn


def _size(shape, dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


def _conv_out(h, k, s, p):
    return (h + 2 * p - k) // s + 1


# ---------------------------------------------------------------------------------------------
# matmul / linear
# ---------------------------------------------------------------------------------------------
def _build_matmul(case: Case, dtype, device, gen) -> Problem:
    m, k, n = case.params["mkn"]
    a, b = _randn((m, k), dtype, device, gen), _randn((k, n), dtype, device, gen)
    e = lambda x: _size(x, dtype)  # noqa: E731
    fwd_bytes = e((m, k)) + e((k, n)) + e((m, n))
    bwd_bytes = e((m, n)) + 2 * e((m, k)) + 2 * e((k, n))
    bwd = case.passes == "fwd+bwd"
    return Problem([a, b], torch.matmul, lambda be, x, y: _dl_op("matmul")(x, y, backend=be),
                   fwd_bytes + bwd * bwd_bytes, 2 * m * n * k * (3 if bwd else 1), grad_args=(0, 1))


def _build_linear(case: Case, dtype, device, gen) -> Problem:
    rows, fin, fout = case.params["rows_in_out"]
    act = case.params.get("activation")
    x, w = _randn((rows, fin), dtype, device, gen), _randn((fout, fin), dtype, device, gen, fin ** -0.5)
    bias = _randn((fout,), dtype, device, gen)

    def eager(x, w, bias):
        y = F.linear(x, w, bias)
        return torch.relu(y) if act == "relu" else y

    e = lambda s: _size(s, dtype)  # noqa: E731
    fwd_bytes = e((rows, fin)) + e((fout, fin)) + e((fout,)) + e((rows, fout))
    bwd_bytes = e((rows, fout)) * (2 if act else 1) + 2 * e((rows, fin)) + 2 * e((fout, fin)) + e((fout,))
    bwd = case.passes == "fwd+bwd"
    return Problem([x, w, bias], eager,
                   lambda be, x, w, b: _dl_op("linear")(x, w, b, activation=act, backend=be),
                   fwd_bytes + bwd * bwd_bytes, 2 * rows * fin * fout * (3 if bwd else 1), grad_args=(0, 1, 2))


# ---------------------------------------------------------------------------------------------
# convolutions
# ---------------------------------------------------------------------------------------------
def _conv_shapes(p):
    n, c, h, k, s = p["n"], p["c"], p["hw"], p["k"], p["stride"]
    pad = k // 2
    ho = _conv_out(h, k, s, pad)
    return n, c, h, k, s, pad, ho


def _build_depthwise(case: Case, dtype, device, gen) -> Problem:
    n, c, h, k, s, pad, ho = _conv_shapes(case.params)
    x = _image((n, c, h, h), case.layout, dtype, device, gen)
    w, b = _randn((c, 1, k, k), dtype, device, gen, 1 / k), _randn((c,), dtype, device, gen)

    def eager(x, w, b):
        return F.conv2d(x, w, b, s, pad, 1, c)

    e = lambda sh: _size(sh, dtype)  # noqa: E731
    xin, yout = e((n, c, h, h)), e((n, c, ho, ho))
    bwd = case.passes == "fwd+bwd"
    return Problem([x, w, b], eager,
                   lambda be, x, w, b: _dl_op("depthwise_conv2d")(x, w, b, s, pad, 1, backend=be),
                   xin + yout + bwd * (yout + xin + xin), 2 * n * c * ho * ho * k * k * (3 if bwd else 1),
                   grad_args=(0, 1, 2))


def _build_pointwise(case: Case, dtype, device, gen) -> Problem:
    n, c, h, o = (case.params[key] for key in ("n", "c", "hw", "out"))
    x = _image((n, c, h, h), case.layout, dtype, device, gen)
    w, b = _randn((o, c, 1, 1), dtype, device, gen, c ** -0.5), _randn((o,), dtype, device, gen)
    e = lambda sh: _size(sh, dtype)  # noqa: E731
    xin, yout, wb = e((n, c, h, h)), e((n, o, h, h)), e((o, c))
    bwd = case.passes == "fwd+bwd"
    return Problem([x, w, b], lambda x, w, b: F.conv2d(x, w, b),
                   lambda be, x, w, b: _dl_op("pointwise_conv2d")(x, w, b, backend=be),
                   xin + yout + wb + bwd * (yout * 2 + xin * 2 + wb * 2), 2 * n * h * h * c * o * (3 if bwd else 1),
                   grad_args=(0, 1, 2))


def _build_separable(case: Case, dtype, device, gen) -> Problem:
    n, c, h, k, s, pad, ho = _conv_shapes(case.params)
    o = case.params["out"]
    x = _image((n, c, h, h), case.layout, dtype, device, gen)
    dw = _randn((c, 1, k, k), dtype, device, gen, 1 / k)
    pw = _randn((o, c, 1, 1), dtype, device, gen, c ** -0.5)
    b = _randn((o,), dtype, device, gen)

    def eager(x, dw, pw, b):
        return F.conv2d(F.conv2d(x, dw, None, s, pad, 1, c), pw, b)

    e = lambda sh: _size(sh, dtype)  # noqa: E731
    xin, yout = e((n, c, h, h)), e((n, o, ho, ho))
    bwd = case.passes == "fwd+bwd"
    flops = 2 * n * ho * ho * c * (k * k + o)
    return Problem([x, dw, pw, b], eager,
                   lambda be, x, dw, pw, b: _dl_op("separable_conv2d")(x, dw, pw, b, s, pad, 1, backend=be),
                   xin + yout + bwd * (yout + 2 * xin), flops * (3 if bwd else 1), grad_args=(0, 1, 2, 3))


# ---------------------------------------------------------------------------------------------
# batch norm + residual + activation
# ---------------------------------------------------------------------------------------------
def _build_batchnorm(case: Case, dtype, device, gen) -> Problem:
    n, c, h = case.params["n"], case.params["c"], case.params["hw"]
    act, has_res = case.params.get("activation"), case.params.get("residual", True)
    training = case.mode == "train"
    x = _image((n, c, h, h), case.layout, dtype, device, gen) * 2 + 0.5
    r = _image((n, c, h, h), case.layout, dtype, device, gen) if has_res else None
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    rm = _randn((c,), stat, device, gen, 0.1)
    rv = torch.rand((c,), generator=gen, dtype=torch.float64).add_(0.5).to(device=device, dtype=stat)
    # weight and bias in the statistics dtype, as mixed-precision training keeps a BatchNorm's
    # parameters (PyTorch's CUDA batch norm rejects bf16 parameters beside fp32 running stats)
    w, b = _randn((c,), stat, device, gen), _randn((c,), stat, device, gen)
    acts = {None: lambda t: t, "relu": torch.relu, "silu": F.silu}

    def eager(x, r, rm, rv, w, b):
        y = F.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5)
        return acts[act](y + r if r is not None else y)

    def dl(be, x, r, rm, rv, w, b):
        return _dl_op("batch_norm_residual")(x, r, rm, rv, w, b, training, 0.1, 1e-5, activation=act, backend=be)

    t = _size((n, c, h, h), dtype)
    # The fewest bytes: each tensor read or written once. Forward: read x (+ residual), write y; in
    # training the statistics read x first, and the apply's second read can come from cache (the
    # C++ NCS kernels run both passes by groups of channels, so, on small planes, and their backward
    # where a tensor is past half the LLC). Backward: read
    # grad_y and x (and for silu the residual or y, for its derivative), write grad_x and, with an
    # activation and a residual, grad_residual = dz (without one it is grad_y itself). Relu's derivative
    # needs one bit an element: written by the training forward, read by the backward (the C++ relu
    # gate; the output itself in evaluation, where the forward writes none).
    fwd = t * (2 + has_res)
    gate = t // 32 * 2 if training else t
    bwd = 3 * t + {None: 0, "relu": gate, "silu": t}[act] + t * (act is not None and has_res)
    return Problem([x, r, rm, rv, w, b], eager, dl, fwd + (case.passes == "fwd+bwd") * bwd,
                   n * c * h * h * (8 if training else 4), grad_args=(0, 1, 4, 5) if has_res else (0, 4, 5),
                   state_args=(2, 3) if training else ())


# ---------------------------------------------------------------------------------------------
# reference models: one training step (forward, cross-entropy, backward, SGD step), or inference
# ---------------------------------------------------------------------------------------------
TRAIN_STEP = "fwd+bwd+sgd"
_optimizers: "weakref.WeakKeyDictionary[torch.nn.Module, torch.optim.Optimizer]" = weakref.WeakKeyDictionary()


def train_step(model: torch.nn.Module, x: Tensor, target: Tensor) -> tuple[Tensor, ...]:
    """One step as a training loop runs it: forward, loss, backward, SGD with momentum (one optimizer
    per model, kept across calls like a real loop's). Returns the loss and the updated parameters,
    which the accuracy check compares with the float64 step."""
    opt = _optimizers.get(model)
    if opt is None:
        opt = _optimizers[model] = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    with torch.enable_grad():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()
    opt.step()
    return (loss.detach(), *(p.detach() for p in model.parameters()))


def _build_model(case: Case, dtype, device, gen) -> Problem:
    models = getattr(dlkernels, "models", None)
    ctor = getattr(models, case.params["ctor"], None) if models is not None else None
    if ctor is None:
        raise Unavailable(f"dlkernels.models.{case.params['ctor']} does not exist yet")
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    model = ctor(*case.params["args"]).to(device=device, dtype=dtype)
    model.train(case.mode != "eval")  # inference cases run the model in eval mode, without grad
    for mod in model.modules():  # a step must be repeatable to be compared: no dropout masks
        if isinstance(mod, torch.nn.Dropout):
            mod.eval()
    x = _randn(case.params["input"], dtype, device, gen)
    if case.layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    nparams = sum(p.numel() for p in model.parameters())
    param_bytes = nparams * torch.empty((), dtype=dtype).element_size()

    if case.passes == TRAIN_STEP:
        target = torch.randint(0, case.params["classes"], (x.shape[0],), generator=gen).to(device)

        def eager(model, x, target):
            with dlkernels.use_backend("torch"):
                return train_step(model, x, target)

        def dl(be, model, x, target):
            with dlkernels.use_backend(be):
                return train_step(model, x, target)

        # state_args=(0,): every contender's accuracy check steps its own copy of the same model.
        # tol: a whole network has discrete choices (max-pool argmax, ReLU masks) that flip at near-ties
        # under float32 rounding in any implementation: one flipped max-pool window of 62k in
        # mini_xception moved every earlier gradient by 2e-3 norm-wise (measured; eager float32 happened
        # to flip none). A wrong kernel still gives O(1) errors.
        return Problem([model, x, target], eager, dl, param_bytes, 0, state_args=(0,),
                       tol=1e-2 if dtype != torch.float64 else 0.0)

    def eager(model, x):
        with dlkernels.use_backend("torch"):
            return model(x)

    def dl(be, model, x):
        with dlkernels.use_backend(be):
            return model(x)

    return Problem([model, x], eager, dl, param_bytes, 0, grad_args=())


BUILDERS = {"matmul": _build_matmul, "linear": _build_linear, "depthwise_conv2d": _build_depthwise,
            "pointwise_conv2d": _build_pointwise, "separable_conv2d": _build_separable,
            "batch_norm_residual": _build_batchnorm, "model": _build_model}
BOUND = {"matmul": "compute", "linear": "compute", "depthwise_conv2d": "memory", "pointwise_conv2d": "compute",
         "separable_conv2d": "compute", "batch_norm_residual": "memory", "model": "compute"}
COMPILE = {"separable_conv2d", "batch_norm_residual", "model"}


def _case(op, layer, shape, passes, tier, layout="-", mode="-", bound=None, **params) -> Case:
    return Case(op, layer, shape, passes, layout, mode, tier, bound or BOUND[op], op in COMPILE,
                BUILDERS[op], params)


def _table() -> list[Case]:
    cases: list[Case] = []
    add = cases.append
    layouts = ("nchw", "channels_last")

    # per-call overhead (tier 0, forward, tiny) and a tiny forward+backward of each op's every path
    add(_case("matmul", "overhead", "8x8x8", "fwd", 0, bound="overhead", mkn=(8, 8, 8)))
    add(_case("matmul", "tiny", "5x7x3", "fwd+bwd", 0, mkn=(5, 7, 3)))
    add(_case("linear", "overhead", "4x16->8", "fwd", 0, bound="overhead", rows_in_out=(4, 16, 8)))
    add(_case("linear", "tiny", "5x7->3relu", "fwd+bwd", 0, rows_in_out=(5, 7, 3), activation="relu"))
    tiny_conv = dict(n=2, c=3, hw=7, k=3, stride=1)
    add(_case("depthwise_conv2d", "overhead", "1x8x6x6k3", "fwd", 0, "nchw", bound="overhead",
              n=1, c=8, hw=6, k=3, stride=1))
    add(_case("pointwise_conv2d", "overhead", "1x8x6x6->8", "fwd", 0, "nchw", bound="overhead",
              n=1, c=8, hw=6, out=8))
    add(_case("separable_conv2d", "overhead", "1x8x6x6k3->8", "fwd", 0, "nchw", bound="overhead",
              n=1, c=8, hw=6, k=3, stride=1, out=8))
    add(_case("batch_norm_residual", "overhead", "2x8x4x4", "fwd", 0, "nchw", "eval", bound="overhead",
              n=2, c=8, hw=4, activation="relu"))
    for layout in layouts:
        add(_case("depthwise_conv2d", "tiny", "2x3x7x7k3s2", "fwd+bwd", 0, layout, **{**tiny_conv, "stride": 2}))
        add(_case("pointwise_conv2d", "tiny", "2x3x7x7->5", "fwd+bwd", 0, layout, n=2, c=3, hw=7, out=5))
        add(_case("separable_conv2d", "tiny", "2x3x7x7k3->5", "fwd+bwd", 0, layout, **tiny_conv, out=5))
        add(_case("batch_norm_residual", "tiny", "2x3x5x5", "fwd+bwd", 0, layout, "train",
                  n=2, c=3, hw=5, activation="relu"))

    # matmul / linear (issue 3): square GEMMs and linear layers
    for size in (512, 1024, 2048):
        add(_case("matmul", "square", f"{size}^3", "fwd", 1 if size == 512 else 2, mkn=(size,) * 3))
        add(_case("matmul", "square", f"{size}^3", "fwd+bwd", 2 if size < 2048 else 3, mkn=(size,) * 3))
    for layer, rows, fin, fout, act, tier in (("mlp-hidden", 512, 1024, 4096, "relu", 1),
                                              ("resnet50-fc", 32, 2048, 1000, None, 2)):
        shape = f"{rows}x{fin}->{fout}" + (act or "")
        for passes in ("fwd", "fwd+bwd"):
            add(_case("linear", layer, shape, passes, tier, rows_in_out=(rows, fin, fout), activation=act))

    # depthwise / pointwise / separable (issue 4), N=8
    conv_layers = [  # layer, C, HxW, k, stride, pointwise out, quick
        ("xception-entry", 128, 75, 3, 1, 128, True),
        ("xception-entry", 256, 38, 3, 2, 256, False),
        ("xception-middle", 728, 19, 3, 1, 728, True),
        ("xception-exit", 1024, 10, 3, 1, 1536, False),
        ("mobilenetv2", 144, 56, 3, 1, 24, False),
        ("mobilenetv2", 144, 56, 5, 1, 24, False),
        ("mobilenetv2", 96, 112, 3, 2, 24, False),
        ("mobilenetv2", 96, 112, 5, 2, 24, False),
    ]
    for layer, c, hw, k, s, out, quick in conv_layers:
        p = dict(n=8, c=c, hw=hw, k=k, stride=s)
        dshape = f"8x{c}x{hw}x{hw}k{k}s{s}"
        for passes in ("fwd", "fwd+bwd"):
            for layout in layouts:
                tier = 1 if quick and passes == "fwd" and (layer == "xception-entry" or layout == "nchw") else 2
                add(_case("depthwise_conv2d", layer, dshape, passes, tier, layout, **p))
                add(_case("separable_conv2d", layer, f"{dshape}->{out}", passes,
                          1 if quick and passes == "fwd" and layout == "nchw" else 2, layout, **p, out=out))
    for layer, c, hw, out in (("xception-middle", 728, 19, 728), ("xception-exit", 1024, 10, 1536),
                              ("mobilenetv2", 144, 56, 24), ("xception-entry", 128, 75, 128)):
        for passes in ("fwd", "fwd+bwd"):
            for layout in layouts:
                tier = 1 if layer == "xception-middle" and passes == "fwd" and layout == "channels_last" else 2
                add(_case("pointwise_conv2d", layer, f"8x{c}x{hw}x{hw}->{out}", passes, tier, layout,
                          n=8, c=c, hw=hw, out=out))

    # batch norm + residual + activation (issue 5): ResNet-50 stages (N=32, relu) and Xception (N=8,
    # bn(x) + shortcut); training forward+backward and evaluation forward
    bn_layers = [("resnet50-stage1", 32, 256, 56, "relu"), ("resnet50-stage2", 32, 512, 28, "relu"),
                 ("resnet50-stage3", 32, 1024, 14, "relu"), ("resnet50-stage4", 32, 2048, 7, "relu"),
                 ("xception-entry", 8, 128, 75, None), ("xception-middle", 8, 728, 19, None)]
    for layer, n, c, hw, act in bn_layers:
        shape = f"{n}x{c}x{hw}x{hw}" + (f"+res{act}" if act else "+res")
        for mode, passes in (("eval", "fwd"), ("train", "fwd+bwd")):
            for layout in layouts:
                tier = 1 if layer == "resnet50-stage2" and layout == "channels_last" else 2
                add(_case("batch_norm_residual", layer, shape, passes, tier, layout, mode,
                          n=n, c=c, hw=hw, activation=act))
    for layout in layouts:
        add(_case("batch_norm_residual", "resnet50-stage1", "32x256x56x56+silu", "fwd+bwd", 3, layout, "train",
                  n=32, c=256, hw=56, activation="silu", residual=False))

    # reference models, one training step (forward, loss, backward, optimizer)
    add(_case("model", "mlp", "digits 256x64->128->10", TRAIN_STEP, 1, "-", "train", ctor="mlp",
              args=(64, 128, 10), classes=10, input=(256, 64)))
    add(_case("model", "mini_xception", "8x1x48x48->7", TRAIN_STEP, 1, "channels_last", "train",
              ctor="mini_xception", args=(7, 1), classes=7, input=(8, 1, 48, 48)))
    add(_case("model", "resnet18", "8x3x64x64->10", TRAIN_STEP, 2, "channels_last", "train", ctor="resnet18",
              args=(10,), classes=10, input=(8, 3, 64, 64)))
    add(_case("model", "resnet50", "8x3x224x224->1000", TRAIN_STEP, 3, "channels_last", "train", ctor="resnet50",
              args=(1000,), classes=1000, input=(8, 3, 224, 224)))
    add(_case("model", "resnet34", "8x3x64x64->10", TRAIN_STEP, 3, "channels_last", "train", ctor="resnet34",
              args=(10,), classes=10, input=(8, 3, 64, 64)))
    # and inference (eval mode, forward only)
    add(_case("model", "mlp", "digits 256x64->128->10", "fwd", 1, "-", "eval", ctor="mlp", args=(64, 128, 10),
              input=(256, 64)))
    add(_case("model", "mini_xception", "8x1x48x48->7", "fwd", 1, "channels_last", "eval", ctor="mini_xception",
              args=(7, 1), input=(8, 1, 48, 48)))
    add(_case("model", "resnet18", "8x3x64x64->10", "fwd", 2, "channels_last", "eval", ctor="resnet18",
              args=(10,), input=(8, 3, 64, 64)))
    return cases


CASES: list[Case] = _table()
assert len({c.id for c in CASES}) == len(CASES), "case ids must be unique"
OPS = tuple(dict.fromkeys(c.op for c in CASES))


# On a GPU the layer cases run with a batch of at least GPU_MIN_BATCH: at the CPU's N=8 an Xception
# depthwise layer moves ~20 MB in ~10 us, inside the 50 MB L2 and no longer than a launch, so
# neither bandwidth nor kernel speed could be read off it. Tiny and overhead cases keep their size.
GPU_MIN_BATCH = 64


def for_device(case: Case, device_type: str) -> Case:
    """The case as it runs on ``device_type`` (its batch raised on a GPU, its label to match)."""
    n = case.params.get("n")
    if device_type != "cuda" or n is None or n >= GPU_MIN_BATCH or case.tier == 0 \
            or not case.shape.startswith(f"{n}x"):
        return case
    return replace(case, shape=f"{GPU_MIN_BATCH}x{case.shape[len(f'{n}x'):]}",
                   params={**case.params, "n": GPU_MIN_BATCH})


def select(preset: str = "default", ops: list[str] | None = None, device_type: str = "cpu") -> list[Case]:
    """The cases of a preset, optionally only some ops (op names or groups: "matmul", "batchnorm", ...),
    as they run on ``device_type``."""
    tier = PRESETS[preset]
    wanted = set(ops or ())
    return [for_device(c, device_type) for c in CASES
            if c.tier <= tier and (not wanted or c.op in wanted or c.group in wanted)]


def to_float64(args: list) -> list:
    """The same inputs in float64 (the reference's), modules deep-copied."""
    out = []
    for a in args:
        if isinstance(a, torch.nn.Module):
            out.append(copy.deepcopy(a).double())
        elif isinstance(a, Tensor) and a.is_floating_point():  # class labels stay integers
            out.append(a.detach().double().contiguous(memory_format=format_of(a)))
        else:
            out.append(a)
    return out


def format_of(t: Tensor):
    return torch.channels_last if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) \
        and not t.is_contiguous() else torch.contiguous_format


def clone_args(args: list, state: tuple) -> list:
    """Fresh copies of the mutated args (a model a training step updates included), so every
    contender starts from the same state."""
    return [(copy.deepcopy(a) if isinstance(a, torch.nn.Module) else a.clone()) if i in state else a
            for i, a in enumerate(args)]

