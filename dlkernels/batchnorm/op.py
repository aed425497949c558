"""batch_norm_residual: act(batch_norm(x) + residual), training and evaluation, fused.

Kernel contract: every backend module ``dlkernels/batchnorm/<backend>_impl.py`` provides the
kernels below. Tensors "x3" are 3-D strided views (N, C, S) of the input (S = H*W, L or 1) in one
of two layouts: NCS-contiguous (strides (C*S, S, 1)) or channels-last (strides (S*C, 1, C), i.e.
contiguous (N, S, C)). residual3, grad_y3 and y3 always share x3's layout. Per-channel vectors
(mean, invstd, scale, ...) are contiguous (C,) in the statistics dtype: float32 for
float16/bfloat16/float32 inputs, float64 for float64. activation is "", "relu" or "silu".

    bn_stats(x3) -> (mean, var)
        per-channel mean and biased variance over N and S, in one read of x, accurate for large
        means and large N*S (Welford / shifted sums merged in a two-level reduction).

    bn_apply(x3, residual3, scale, shift, activation) -> y3
        y = act(x * scale[c] + shift[c] + residual) (residual3 may be None); a new tensor in x3's
        layout. Training and evaluation both run it (the op folds weight, bias and the statistics
        into scale and shift).

    bn_backward_reduce(grad_y3, y3, x3, residual3, mean, invstd, scale, shift, activation)
            -> (sum_dz, sum_dz_xhat)
        dz = grad_y * act'(z) with z = x*scale[c] + shift[c] + residual (relu: the mask y > 0,
        read from the output; silu: recomputed z; none: grad_y). xhat = (x - mean[c]) * invstd[c].
        Per-channel sums over N and S, in the statistics dtype.

    bn_backward_apply(grad_y3, y3, x3, residual3, mean, invstd, scale, shift, c_dz, c_xhat,
                      activation, need_grad_residual) -> (grad_x3, grad_residual3)
        grad_x = scale[c] * (dz - c_dz[c] - xhat * c_xhat[c]) (scale = weight * invstd; training
        passes c_dz = sum_dz / count, c_xhat = sum_dz_xhat / count; evaluation passes zeros),
        grad_residual = dz (None unless need_grad_residual); new tensors in x3's layout.

The op itself updates running_mean/running_var (a small per-channel step, once per call).
"""
