"""Argument checks that every op runs before any kernel.

The checks that run on every call are written without generator expressions and comprehensions
(each a frame of its own on Python 3.11): an op call runs after a layer-sized pass has been through
the caches, where every distinct piece of interpreter work costs microseconds.

Errors say what was expected and what came. The C++ kernels trust these checks (and repeat the
cheap ones), so nothing reaches them that could make them read or write outside their buffers.
Type problems raise TypeError, bad values or shapes ValueError, device problems RuntimeError.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ._dispatch import available_backends

# dtypes each backend computes in. Other dtypes are rejected, never silently converted.
BACKEND_DTYPES = {
    "cpp": (torch.float32, torch.float64),
    "numba": (torch.float32, torch.float64),
    "triton": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
    "torch": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
}

ACTIVATIONS = {
    "linear": (None, "relu"),
    "batchnorm": (None, "relu", "silu"),
}


def _fmt_dtypes(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def tensor(t, name: str, op: str, ndim: int | Sequence[int] | None = None) -> torch.Tensor:
    """``t`` is a dense floating-point tensor (of one of the ranks ``ndim``)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.layout != torch.strided:  # sparse, nested or mkldnn: no strided memory for a kernel to read
        raise TypeError(f"{op}: {name} must be a dense (strided) tensor, got layout {t.layout}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(filter(None, [", ".join(str(d) for d in allowed[:-1]), str(allowed[-1])]))
            raise ValueError(f"{op}: {name} must have {want} dimensions, got {t.dim()} (shape {tuple(t.shape)})")
    return t


def optional_tensor(t, name: str, op: str, ndim=None) -> torch.Tensor | None:
    return None if t is None else tensor(t, name, op, ndim)


def same_device_dtype(op: str, ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    """All of ``others`` (None skipped) live on ``ref``'s device and have its dtype."""
    for name, t in others.items():
        if t is None:
            continue
        if t.device != ref.device:
            raise RuntimeError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}; "
                               "all tensors must be on one device")
        if t.dtype != ref.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; "
                            "all tensors must have one dtype")


def backend_dtype(op: str, backend: str, t: torch.Tensor) -> None:
    allowed = BACKEND_DTYPES[backend]
    if t.dtype not in allowed:
        others = [b for b in available_backends(t.device) if b != backend and t.dtype in BACKEND_DTYPES[b]]
        hint = f" (backend {' or '.join(map(repr, others))} takes it)" if t.dtype.is_floating_point and others else ""
        raise TypeError(f"{op}: backend {backend!r} computes in {_fmt_dtypes(allowed)}; got {t.dtype}{hint}")


def activation(op: str, family: str, act) -> str:
    """The activation as the op schema carries it: '' for none."""
    allowed = ACTIVATIONS[family]
    if act not in allowed:
        raise ValueError(f"{op}: activation must be one of {list(allowed)}, got {act!r}")
    return act or ""


def number(op: str, name: str, v) -> float:
    """A real number (not a bool or None) as a float."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{op}: {name} must be a float, got {type(v).__name__}")
    return float(v)


def shape(op: str, name: str, t: torch.Tensor, expected: Sequence[int], what: str = "") -> None:
    if tuple(t.shape) != tuple(expected):
        extra = f" ({what})" if what else ""
        raise ValueError(f"{op}: {name} must have shape {tuple(expected)}{extra}, got {tuple(t.shape)}")


def pair(op: str, name: str, v, *, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints, each at least ``minimum``, as a pair."""
    if isinstance(v, bool):
        raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {v!r}")
    if isinstance(v, int):
        v = (v, v)
    if not (isinstance(v, (tuple, list)) and len(v) == 2 and _is_int(v[0]) and _is_int(v[1])):
        raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {v!r}")
    if v[0] < minimum or v[1] < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {tuple(v)}")
    return int(v[0]), int(v[1])


def _is_int(i) -> bool:
    return isinstance(i, int) and not isinstance(i, bool)


_is_batched = torch._C._functorch.is_batchedtensor


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout an op keeps: channels_last when x is channels_last-contiguous (and not also
    NCHW-contiguous, as tensors with size-1 dims can be), else NCHW (non-contiguous input is copied).
    A vmap's batched tensor (met in a backward formula that a generated vmap rule runs, where the layout
    only picks between equal computations) is NCHW: it cannot tell its layout (torch raises NYI)."""
    if (x.dim() == 4 and not x.is_contiguous() and not _is_batched(x)
            and x.is_contiguous(memory_format=torch.channels_last)):
        return torch.channels_last
    return torch.contiguous_format


def conv2d_geometry(op: str, x: torch.Tensor, kernel_hw: Sequence[int], stride, padding, dilation):
    """Checks stride/padding/dilation as F.conv2d does and returns
    ``(stride, pad_begin, dilation, out_hw)``, each a pair. ``padding`` is an int, a pair, or
    "same"/"valid"; "same" pads as torch does (the odd extra row/column goes after)."""
    stride = pair(op, "stride", stride, minimum=1)
    dilation = pair(op, "dilation", dilation, minimum=1)
    span = (dilation[0] * (kernel_hw[0] - 1) + 1, dilation[1] * (kernel_hw[1] - 1) + 1)
    if isinstance(padding, str):
        if padding == "valid":
            before = after = (0, 0)
        elif padding == "same":
            if stride != (1, 1):
                raise ValueError(f"{op}: padding='same' is not supported for strided convolutions "
                                 f"(stride {stride}), as in torch")
            before = ((span[0] - 1) // 2, (span[1] - 1) // 2)
            after = (span[0] - 1 - before[0], span[1] - 1 - before[1])
        else:
            raise ValueError(f"{op}: padding must be 'same', 'valid', an int or a pair of ints, got {padding!r}")
    else:
        before = after = pair(op, "padding", padding, minimum=0)
    padded = (x.shape[-2] + before[0] + after[0], x.shape[-1] + before[1] + after[1])
    if padded[0] < span[0] or padded[1] < span[1]:
        raise ValueError(f"{op}: calculated padded input size per channel: ({padded[0]} x {padded[1]}); "
                         f"kernel size (with dilation): ({span[0]} x {span[1]}); the kernel can't be "
                         "greater than the padded input")
    out_hw = ((padded[0] - span[0]) // stride[0] + 1, (padded[1] - span[1]) // stride[1] + 1)
    return stride, before, dilation, out_hw
