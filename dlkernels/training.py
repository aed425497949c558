"""python -m dlkernels train: train a reference model on dlkernels' kernels.

The data set is scikit-learn's bundled handwritten digits (1,797 8x8 grey images, no download),
split 80/20 (stratified, by --seed) into training and held-out test images. The convolutional
models see the images upsampled to --image-size (32 keeps a 1x1 map after mini_xception's five
stride-2 stages). --compare trains the same seed again on backend "torch" (PyTorch's own ops) and
prints both loss curves, and writes them as a PNG.
"""
from __future__ import annotations

import argparse
import contextlib
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import dlkernels

from . import models

DTYPES = {"float32": torch.float32, "float64": torch.float64}
CONV_MODELS = ("mini_xception", "resnet18", "resnet34", "resnet50")


@dataclass
class Run:
    backend: str
    losses: list[float] = field(default_factory=list)  # per training step
    epoch_loss: list[float] = field(default_factory=list)
    epoch_time: list[float] = field(default_factory=list)  # seconds of training (forward+backward+step)
    test_acc: list[float] = field(default_factory=list)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dlkernels train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=[*CONV_MODELS, "mlp"], default="mini_xception")
    p.add_argument("--dataset", choices=["digits"], default="digits")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--backend", choices=[*dlkernels._dispatch.BACKENDS, "auto"], default="auto",
                   help="backend of every op (default: the automatic choice)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--image-size", type=int, default=32, help="side the 8x8 digits are upsampled to (conv models)")
    p.add_argument("--hidden", default="256,256", help="the MLP's hidden widths, comma-separated")
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--compare", action="store_true",
                   help="train the same seed on backend 'torch' too; print both loss curves and plot them")
    p.add_argument("--plot", default="loss_curves.png", help="the PNG --compare writes")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1 or args.image_size < 8:
        p.error("--epochs and --batch-size must be >= 1, --image-size >= 8")
    return args


def load_digits(args: argparse.Namespace):
    """(x_train, y_train, x_test, y_test): (N, 64) features in [0, 1] for the MLP, (N, 1, S, S)
    images for the conv models."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    data = sk_digits()
    x = torch.tensor(data.data, dtype=torch.float64) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(range(len(y)), test_size=args.test_fraction, random_state=args.seed,
                                           stratify=data.target)
    if args.model in CONV_MODELS:
        x = x.reshape(-1, 1, 8, 8)
        if args.image_size != 8:
            x = F.interpolate(x, size=(args.image_size, args.image_size), mode="bilinear", align_corners=False)
    x = x.to(DTYPES[args.dtype]).contiguous()
    idx_train, idx_test = torch.tensor(idx_train), torch.tensor(idx_test)
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    if args.model == "mlp":
        hidden = [int(h) for h in args.hidden.split(",") if h]
        return models.mlp(64, hidden, 10)
    if args.model == "mini_xception":
        return models.mini_xception(10, in_channels=1)
    return models.MODELS[args.model](10, in_channels=1)


def _progress(total: int, desc: str, disable: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # the bar is a nicety; training does not need it
        return contextlib.nullcontext(None)
    return tqdm(total=total, desc=desc, unit="batch", leave=False, disable=disable, dynamic_ncols=True)


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    model.eval()
    correct = sum(int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(y), batch_size))
    return correct / len(y)


def train(args: argparse.Namespace, backend: str, data, log=print) -> Run:
    """Trains a fresh model (seeded by --seed: the same weights, batches and dropout masks for every
    backend) with Adam and cross-entropy, and returns its curves."""
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(args.seed)
    model = build_model(args).to(DTYPES[args.dtype])
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    order = torch.Generator().manual_seed(args.seed)
    run = Run(backend)
    steps = -(-len(y_train) // args.batch_size)
    with dlkernels.use_backend(backend):
        for epoch in range(1, args.epochs + 1):
            model.train()
            perm = torch.randperm(len(y_train), generator=order)
            total = 0.0
            with _progress(steps, f"[{backend}] epoch {epoch}/{args.epochs}", args.no_progress) as bar:
                t0 = time.perf_counter()
                for i in range(0, len(y_train), args.batch_size):
                    idx = perm[i:i + args.batch_size]
                    loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    run.losses.append(loss.item())
                    total += run.losses[-1] * len(idx)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{run.losses[-1]:.4f}")
                run.epoch_time.append(time.perf_counter() - t0)
            run.epoch_loss.append(total / len(y_train))
            run.test_acc.append(accuracy(model, x_test, y_test, 256))
            log(f"[{backend}] epoch {epoch:3d}/{args.epochs}  train loss {run.epoch_loss[-1]:.4f}  "
                f"test acc {100 * run.test_acc[-1]:6.2f}%  {run.epoch_time[-1]:.2f} s/epoch")
    return run


def _summary(run: Run, n_test: int) -> str:
    steady = run.epoch_time[1:] or run.epoch_time  # the first epoch also pays JIT compiles and warm-up
    return (f"[{run.backend}] test accuracy {100 * run.test_acc[-1]:.2f}% ({n_test} held-out images); "
            f"time per epoch {sum(steady) / len(steady):.2f} s (first epoch {run.epoch_time[0]:.2f} s)")


def compare_report(a: Run, b: Run, epochs: int) -> str:
    diffs = [abs(p - q) for p, q in zip(a.losses, b.losses)]
    rel = [d / max(abs(q), 1e-12) for d, q in zip(diffs, b.losses)]
    lines = [f"{'epoch':>5}  {'loss ' + a.backend:>16}  {'loss ' + b.backend:>16}  {'|diff|':>10}"]
    for e in range(epochs):
        lines.append(f"{e + 1:5d}  {a.epoch_loss[e]:16.10f}  {b.epoch_loss[e]:16.10f}  "
                     f"{abs(a.epoch_loss[e] - b.epoch_loss[e]):10.3e}")
    lines.append(f"per-step losses: max |diff| {max(diffs):.3e}, max relative diff {max(rel):.3e} "
                 f"over {len(diffs)} steps")
    return "\n".join(lines)


def plot(a: Run, b: Run, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(a.losses, label=f"dlkernels ({a.backend})", lw=2)
    ax.plot(b.losses, label="PyTorch (torch)", lw=1, ls="--")
    ax.set(xlabel="training step", ylabel="cross-entropy loss", yscale="log", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(argv or []))
    if args.threads:
        torch.set_num_threads(args.threads)
    backend = args.backend
    data = load_digits(args)
    print(f"dlkernels train: {args.model} on digits ({len(data[1])} train / {len(data[3])} test images"
          f"{f', {args.image_size}x{args.image_size}' if args.model in CONV_MODELS else ''}), {args.dtype}, "
          f"backend {backend}, {args.epochs} epochs, batch {args.batch_size}, seed {args.seed}")
    run = train(args, backend, data)
    print(_summary(run, len(data[3])))
    if args.compare:
        ref = train(args, "torch", data)
        print(_summary(ref, len(data[3])))
        print(compare_report(run, ref, args.epochs))
        plot(run, ref, args.plot, f"{args.model} on digits, {args.dtype}, seed {args.seed}")
        print(f"loss curves written to {args.plot}")
    return 0
