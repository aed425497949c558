"""separable_conv2d: depthwise k x k then pointwise 1 x 1 (Keras SeparableConv2D), fused.

Kernel contract: every backend module ``dlkernels/separable/<backend>_impl.py`` provides

    separable_fwd(x, dw_weight, pw_weight, bias, stride, pad, dilation, out_hw) -> y
        x, dw_weight, stride, pad, dilation, out_hw: as depthwise_fwd (dlkernels/depthwise/op.py).
        pw_weight: (O, C*m) contiguous (the (O, C*m, 1, 1) conv weight, reshaped); bias: None or (O,).
        y[n, o] = bias[o] + sum_c pw_weight[o, c] * depthwise(x)[n, c], a new (N, O, Ho, Wo) tensor
        in x's memory format. ONE fused kernel: the depthwise intermediate is never written to
        memory in full (Triton: a tile of it lives in registers and feeds tl.dot; CPU: a block of it
        stays in cache and feeds the GEMM micro-kernel).

Its backward recomputes the depthwise output and runs on the depthwise and matmul kernels of the
same backend.
"""
