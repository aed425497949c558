"""Drop-in modules on dlkernels' ops.

Each subclasses the torch module it replaces (``nn.Conv2d``, ``nn.BatchNorm2d``/``1d``,
``nn.Linear``), so parameters, buffers, state_dict keys (``num_batches_tracked`` included),
initialization, ``load_state_dict`` hooks and ``extra_repr`` are torch's own; only ``forward`` runs
on dlkernels. ``backend=`` fixes the backend of one module (None: the ``use_backend`` scope, the
``DLKERNELS_BACKEND`` variable, then the automatic choice; see dlkernels/_dispatch.py).

Dense convolutions that are neither depthwise nor 1x1 (``Conv2d``) have no dedicated op: they run
as im2col (``F.unfold``, or for channels_last input the rows straight from the NHWC tensor,
``dlkernels.im2col``) feeding one ``dlkernels.linear`` GEMM per group, so their FLOPs still run on
dlkernels' matmul kernels, with the bias fused into the GEMM's epilogue.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import dlkernels as _dk
from dlkernels import _dispatch
from dlkernels._registration import autocast_input, needs_torch_ops, records_autograd
from dlkernels import _validation as V
from dlkernels.im2col import nhwc_windows


def _backend_repr(backend: str | None) -> str:
    return "" if backend is None else f", backend={backend!r}"


class _ConvInput:
    """What ``nn.Conv2d`` handles inside ``F.conv2d``, and dlkernels' conv ops take explicitly.

    torch's ``padding="same"`` may pad one more row/column after the input than before it (even
    kernels), and the non-zero padding modes pad with copied values: both become an explicit
    ``F.pad`` of the input (a copy) for ``Conv2d``'s ``F.unfold``; the dlkernels conv ops take
    "same"/"valid" themselves.
    """

    def _conv_input(self, x: Tensor, *, same_ok: bool = False) -> tuple[Tensor, tuple[int, int] | str]:
        """(input, padding); ``same_ok``: the op takes "same"/"valid" itself (the dlkernels conv ops do)."""
        if self.padding_mode != "zeros":
            return F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode), (0, 0)
        if isinstance(self.padding, str) and same_ok:
            return x, self.padding
        if isinstance(self.padding, str):
            left, right, top, bottom = self._reversed_padding_repeated_twice
            if left == right and top == bottom:
                return x, (top, left)
            return F.pad(x, (left, right, top, bottom)), (0, 0)
        return x, tuple(self.padding)


# Conv2d's im2col rows in (kH, kW, C) order, an NCHW weight permuted (copied) to match, where the rows
# number at least this many times the output channels: (C, kH, kW) rows scatter each run of C values
# with a stride of kH*kW, 2-4x slower to write (and to gather back) than the runs (kH, kW, C) copies
# whole, which outweighs a copy of the weight and of its gradient once the rows outnumber its rows.
# C++, two threads, fwd+bwd at 8 images, channels_last input, NCHW weight, (C, kH, kW) / (kH, kW, C):
# 64ch 56x56 3x3 1.17x, 16x16 1.10x (rows/O 392, 32); 128ch 8x8 1.06x (4); 256ch 4x4 0.95x (0.5),
# 512ch 2x2 0.85x (0.1). ResNet-18 NCHW 8x3x64x64, interleaved: training 0.863x -> 0.882x of eager,
# evaluation 0.739x -> 0.783x.
TAPS_FIRST_ROWS = 8


class Conv2d(_ConvInput, nn.Conv2d):
    """``nn.Conv2d`` as im2col + ``dlkernels.linear`` (the dense convs of the reference models).

    The output of a GEMM over (N*Ho*Wo, C*kH*kW) rows is (N, Ho, Wo, O): it is returned as that
    channels_last tensor, viewed as (N, O, Ho, Wo), rather than copied to NCHW. With groups 1 the
    rows come straight from the input's NHWC tensor (``dlkernels.im2col``: each row written once, the
    backward a gather), an NCHW input copied channels_last first; grouped convs go through ``F.unfold``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, *,
                 backend: str | None = None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        self.backend = backend

    def forward(self, input: Tensor) -> Tensor:
        x, pad = self._conv_input(input)
        backend = _dispatch.resolve("matmul", self.backend, x.device)
        if backend == "torch":
            # PyTorch's own convolution, as the other modules' "torch" backend is torch's own op (the
            # models bench's eager contender), not im2col over F.linear
            return F.conv2d(x, self.weight, self.bias, self.stride, pad, self.dilation, self.groups)
        x = autocast_input(x, backend)  # the rows are computed here, before linear's own cast
        batched = x.dim() == 4
        if not batched:
            x = x.unsqueeze(0)
        n, _, h, w = x.shape
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        ho = (h + 2 * pad[0] - dh * (kh - 1) - 1) // sh + 1
        wo = (w + 2 * pad[1] - dw * (kw - 1) - 1) // sw + 1
        g, o = self.groups, self.out_channels
        # (F.unfold too under torch.func's transforms, whose batched tensors cannot be asked for a layout,
        # and in a forward-AD dual level, where the im2col kernel would drop a tangent)
        if g == 1 and not torch.compiler.is_compiling() and not needs_torch_ops(x):
            # An NCHW input is copied channels_last: one pass over the input, where F.unfold writes
            # kH*kW times its size, transposed for the GEMM, which copied those columns again in the
            # forward and the backward (ResNet's NCHW stem, 8x3x64x64 k7 s2: 6.9 -> 2.6 ms fwd+bwd;
            # eager's oneDNN conv 1.7 ms).
            x = x.contiguous(memory_format=torch.channels_last)
            # The GEMM's rows straight from the NHWC tensor (dlkernels.im2col), in (kH, kW, C)
            # order for a channels_last weight (model.to(memory_format=torch.channels_last) makes one;
            # the weight and its gradient are views) or where the rows far outnumber the weight's
            # (TAPS_FIRST_ROWS), else in an NCHW weight's (C, kH, kW) order. Eager only: torch 2.13's
            # Inductor fused the pad + unfold backward of an earlier version of it into a CPU kernel
            # that corrupted the heap ("free(): invalid next size" in the training step of the models
            # bench's compiled contender); compiled graphs keep F.unfold, which compiles correctly.
            wt = self.weight
            taps_first = ((not wt.is_contiguous() and wt.is_contiguous(memory_format=torch.channels_last))
                          or n * ho * wo >= TAPS_FIRST_ROWS * o)
            if taps_first:
                wt = wt.permute(0, 2, 3, 1)
            rows = nhwc_windows(x, (kh, kw), (sh, sw), pad, (dh, dw), taps_first, backend)
            out = _dk.linear(rows, wt.reshape(o, -1), self.bias, backend=self.backend)
            out = out.view(n, ho, wo, o).permute(0, 3, 1, 2)
            return out if batched else out.squeeze(0)
        cols = F.unfold(x, self.kernel_size, self.dilation, pad, self.stride)  # (N, C*kH*kW, Ho*Wo)
        og = o // g
        weight = self.weight.reshape(o, -1)
        if g == 1:
            out = _dk.linear(cols.transpose(1, 2), weight, self.bias, backend=self.backend)
        else:
            # unfold orders rows channel-major, so group i owns one contiguous block of rows
            cols = cols.unflatten(1, (g, -1))
            out = torch.cat([
                _dk.linear(cols[:, i].transpose(1, 2), weight[i * og:(i + 1) * og],
                           None if self.bias is None else self.bias[i * og:(i + 1) * og], backend=self.backend)
                for i in range(g)], dim=-1)
        out = out.reshape(n, ho, wo, o).permute(0, 3, 1, 2)
        return out if batched else out.squeeze(0)

    def extra_repr(self) -> str:
        return super().extra_repr() + _backend_repr(self.backend)


class DepthwiseConv2d(_ConvInput, nn.Conv2d):
    """``nn.Conv2d(in_channels, in_channels * depth_multiplier, kernel_size, groups=in_channels)``
    on ``dlkernels.depthwise_conv2d``."""

    def __init__(self, in_channels: int, kernel_size, stride=1, padding=0, dilation=1, bias: bool = True,
                 depth_multiplier: int = 1, *, padding_mode: str = "zeros", backend: str | None = None,
                 device=None, dtype=None) -> None:
        if depth_multiplier < 1:
            raise ValueError(f"DepthwiseConv2d: depth_multiplier must be >= 1, got {depth_multiplier}")
        super().__init__(in_channels, in_channels * depth_multiplier, kernel_size, stride, padding, dilation,
                         groups=in_channels, bias=bias, padding_mode=padding_mode, device=device, dtype=dtype)
        self.depth_multiplier = depth_multiplier
        self.backend = backend

    def forward(self, input: Tensor) -> Tensor:
        x, pad = self._conv_input(input, same_ok=True)
        return _dk.depthwise_conv2d(x, self.weight, self.bias, self.stride, pad, self.dilation, backend=self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + _backend_repr(self.backend)


def _subsample_channels_last(x: Tensor, sh: int, sw: int) -> Tensor:
    return x[..., ::sh, ::sw].contiguous(memory_format=torch.channels_last)


class _SubsampleChannelsLast(torch.autograd.Function):
    """``x[..., ::sh, ::sw]`` of a channels_last x, copied channels_last, with a channels_last gradient.
    Autograd's own slice backward scatters into NCHW zeros: the input's gradient then reaches the
    layers before in the other layout, and every one of them copies it back (mini-Xception's shortcut
    in each block, 8x1x48x48 channels_last: ~1.5 ms of copies in a 21 ms training step)."""

    @staticmethod
    def forward(ctx, x: Tensor, sh: int, sw: int) -> Tensor:
        ctx.shape, ctx.steps = x.shape, (sh, sw)
        return _subsample_channels_last(x, sh, sw)

    @staticmethod
    def backward(ctx, grad: Tensor):
        sh, sw = ctx.steps
        n, c, h, w = ctx.shape
        grad_x = grad.new_zeros((n, h, w, c)).permute(0, 3, 1, 2)
        grad_x[..., ::sh, ::sw] = grad
        return grad_x, None, None


class PointwiseConv2d(nn.Conv2d):
    """``nn.Conv2d(in_channels, out_channels, 1)`` on ``dlkernels.pointwise_conv2d``.

    ``stride`` (keyword, an extension) subsamples the input first: a strided 1x1 conv is a 1x1
    conv of every stride-th pixel, as in ResNet's downsampling shortcut.
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True, *, stride=1,
                 backend: str | None = None, device=None, dtype=None) -> None:
        super().__init__(in_channels, out_channels, 1, stride, 0, 1, 1, bias, device=device, dtype=dtype)
        self.backend = backend

    def forward(self, input: Tensor) -> Tensor:
        sh, sw = self.stride
        x = input
        if sh != 1 or sw != 1:
            if input.dim() == 4 and not needs_torch_ops(input) and V.memory_format(input) == torch.channels_last:
                # one (N*H*W, C) GEMM on a channels_last copy of the subsample, where the op would copy
                # the non-contiguous view to NCHW, N batched GEMMs of H*W columns (ResNet's shortcut
                # 8x256x4x4 -> 512: 0.75 -> 0.06 ms)
                if records_autograd(input):
                    x = _SubsampleChannelsLast.apply(input, sh, sw)
                else:
                    x = _subsample_channels_last(input, sh, sw)
            else:
                x = input[..., ::sh, ::sw]
        return _dk.pointwise_conv2d(x, self.weight, self.bias, backend=self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + _backend_repr(self.backend)


class SeparableConv2d(nn.Module):
    """Keras' SeparableConv2D: a depthwise k x k conv (no bias) then a 1x1 conv, as one fused
    ``dlkernels.separable_conv2d``.

    The weights live in two children, ``depthwise`` (``DepthwiseConv2d``, bias=False) and
    ``pointwise`` (``PointwiseConv2d``), so the state_dict keys are those of
    ``nn.Sequential(OrderedDict(depthwise=nn.Conv2d(..., groups=in_channels, bias=False),
    pointwise=nn.Conv2d(..., 1)))``, the same layer on PyTorch's ops.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 bias: bool = True, depth_multiplier: int = 1, *, padding_mode: str = "zeros",
                 backend: str | None = None, device=None, dtype=None) -> None:
        super().__init__()
        self.depthwise = DepthwiseConv2d(in_channels, kernel_size, stride, padding, dilation, False,
                                         depth_multiplier, padding_mode=padding_mode, backend=backend,
                                         device=device, dtype=dtype)
        self.pointwise = PointwiseConv2d(in_channels * depth_multiplier, out_channels, bias, backend=backend,
                                         device=device, dtype=dtype)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.depth_multiplier = depth_multiplier
        self.backend = backend

    def forward(self, input: Tensor) -> Tensor:
        dw, pw = self.depthwise, self.pointwise
        x, pad = dw._conv_input(input, same_ok=True)
        return _dk.separable_conv2d(x, dw.weight, pw.weight, pw.bias, dw.stride, pad, dw.dilation,
                                    backend=self.backend)

    def extra_repr(self) -> str:
        dw = self.depthwise
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={dw.kernel_size}, stride={dw.stride}"
        if dw.padding != (0, 0):
            s += f", padding={dw.padding}"
        if dw.dilation != (1, 1):
            s += f", dilation={dw.dilation}"
        if self.depth_multiplier != 1:
            s += f", depth_multiplier={self.depth_multiplier}"
        if self.pointwise.bias is None:
            s += ", bias=False"
        return s + _backend_repr(self.backend)


_ACTIVATIONS = {None: lambda t: t, "relu": torch.relu, "silu": F.silu}


class _BatchNormResidual:
    """``act(batch_norm(x) + residual)`` with ``_BatchNorm``'s running-statistics bookkeeping
    (``num_batches_tracked``, ``momentum=None`` cumulative averaging, ``track_running_stats``).
    ``residual`` is whatever ``+`` takes there: of the input's shape and dtype it goes into the fused
    kernel; one that broadcasts (an SE or FiLM term (N, C, 1, 1)) or of another dtype is added after
    the batch norm as torch's ``+`` would, then the activation (correct, not fused). So the module stays
    a drop-in for the expression, as ``dlkernels.convert`` needs: its fusions see no shapes."""

    def _init_fused(self, activation: str | None, backend: str | None) -> None:
        if activation not in (None, "relu", "silu"):
            raise ValueError(f"{type(self).__name__}: activation must be None, 'relu' or 'silu', got {activation!r}")
        self.activation = activation
        self.backend = backend

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        self._check_input_dim(input)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                momentum = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        keep_stats = not self.training or self.track_running_stats
        fused = residual is None or (isinstance(residual, Tensor) and residual.shape == input.shape
                                     and residual.dtype == input.dtype)
        out = _dk.batch_norm_residual(
            input, residual if fused else None,
            self.running_mean if keep_stats else None, self.running_var if keep_stats else None,
            self.weight, self.bias, use_batch_stats, momentum, self.eps,
            activation=self.activation if fused else None, backend=self.backend)
        return out if fused else _ACTIVATIONS[self.activation](out + residual)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.activation is not None:
            s += f", activation={self.activation!r}"
        return s + _backend_repr(self.backend)


class BatchNormResidual2d(_BatchNormResidual, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose ``forward(x, residual=None)`` returns ``act(bn(x) + residual)`` in
    one fused ``dlkernels.batch_norm_residual`` (activation None, "relu" or "silu")."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, activation: str | None = None, *, backend: str | None = None,
                 device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self._init_fused(activation, backend)


class BatchNormResidual1d(_BatchNormResidual, nn.BatchNorm1d):
    """The 1-D twin of ``BatchNormResidual2d`` for (N, C) and (N, C, L) inputs (``nn.BatchNorm1d``)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, activation: str | None = None, *, backend: str | None = None,
                 device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self._init_fused(activation, backend)


class Linear(nn.Linear):
    """``nn.Linear`` on ``dlkernels.linear``, with an optional ReLU fused into the GEMM epilogue."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str | None = None, *,
                 backend: str | None = None, device=None, dtype=None) -> None:
        if activation not in (None, "relu"):
            raise ValueError(f"Linear: activation must be None or 'relu', got {activation!r}")
        super().__init__(in_features, out_features, bias, device, dtype)
        self.activation = activation
        self.backend = backend

    def forward(self, input: Tensor) -> Tensor:
        return _dk.linear(input, self.weight, self.bias, activation=self.activation, backend=self.backend)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.activation is not None:
            s += f", activation={self.activation!r}"
        return s + _backend_repr(self.backend)


def set_backend(module: nn.Module, backend: str | None) -> nn.Module:
    """Fix ``backend`` on every dlkernels module inside ``module`` (None: back to the scoped/automatic
    choice). Returns ``module``."""
    for m in module.modules():
        if isinstance(m, _DLKERNELS_MODULES):
            m.backend = backend
    return module


_DLKERNELS_MODULES = (Conv2d, DepthwiseConv2d, PointwiseConv2d, SeparableConv2d, BatchNormResidual2d,
                      BatchNormResidual1d, Linear)

__all__ = ["Conv2d", "DepthwiseConv2d", "PointwiseConv2d", "SeparableConv2d", "BatchNormResidual2d",
           "BatchNormResidual1d", "Linear", "set_backend"]
