"""UniGrad dense loss (SPEC section 3)."""

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST  # full fp32 matmuls on TPU too


def unigrad_loss(pred, target, neg_weight: float = 0.02):
    """pred, target (R, Dd) -> scalar float32; the gradient flows through `pred` only.

    T = non-affine LayerNorm(target, eps 1e-5); pos = mean_i ||p_i - t_i||^2; C = T^T T / R over every row given
    (the whole global batch under a sharded jit); neg = mean_i p_i C p_i^T; loss = (pos + neg_weight*neg) / Dd.
    """
    pred = pred.astype(jnp.float32)
    target = jax.lax.stop_gradient(target.astype(jnp.float32))
    mean = target.mean(-1, keepdims=True)
    target = (target - mean) * jax.lax.rsqrt(jnp.mean(jnp.square(target - mean), -1, keepdims=True) + 1e-5)
    rows, width = pred.shape
    pos = jnp.sum(jnp.square(pred - target)) / rows
    corr = jnp.matmul(target.T, target, precision=HIGHEST) / rows
    neg = jnp.sum(jnp.matmul(pred, corr, precision=HIGHEST) * pred) / rows
    return (pos + neg_weight * neg) / width
