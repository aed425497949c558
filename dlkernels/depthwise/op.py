"""depthwise_conv2d: public function, torch.library ops, autograd and fake implementations.

Kernel contract: every backend module ``dlkernels/depthwise/<backend>_impl.py`` provides

    depthwise_fwd(x, weight, bias, stride, pad, dilation, out_hw) -> y
        x: (N, C, H, W), either NCHW-contiguous or channels_last-contiguous.
        weight: (C*m, 1, kH, kW) contiguous, channel multiplier m >= 1; bias: None or contiguous (C*m,).
        stride (sH, sW) >= 1; pad (pT, pL) >= 0: zero rows/cols before the first input row/col (the
        padding after the last is implied by out_hw, so asymmetric "same" padding needs nothing
        more); dilation (dH, dW) >= 1; out_hw (Ho, Wo) >= 1.
        y[n, o, i, j] = bias[o] + sum_{p<kH, q<kW} weight[o, 0, p, q] * x[n, o // m, i*sH - pT + p*dH, j*sW - pL + q*dW]
        (taps outside the input read zero). Returns a new (N, C*m, Ho, Wo) tensor in x's memory format.

    depthwise_bwd_input(grad_y, weight, in_hw, stride, pad, dilation) -> grad_x
        grad_y: (N, C*m, Ho, Wo) NCHW- or channels_last-contiguous; returns (N, C, H, W), in grad_y's format.

    depthwise_bwd_weight(grad_y, x, kernel_hw, stride, pad, dilation, need_bias) -> (grad_weight, grad_bias)
        grad_y and x in the same memory format; grad_weight (C*m, 1, kH, kW) contiguous,
        grad_bias (C*m,) or None (unless need_bias).

Inputs arrive validated (_validation), in one dtype the backend computes in, on one device.
Reductions accumulate in at least float32 (float64 for float64 inputs).
"""
