"""UniGrad loss against a direct float64 NumPy computation (SPEC section 3)."""

import jax
import jax.numpy as jnp
import numpy as np

from siim_jax.losses import unigrad_loss


def numpy_unigrad(p, t, neg_weight):
    p, t = p.astype(np.float64), t.astype(np.float64)
    t = (t - t.mean(1, keepdims=True)) / np.sqrt(t.var(1, keepdims=True) + 1e-5)
    rows, width = p.shape
    pos = np.mean([np.sum((p[i] - t[i]) ** 2) for i in range(rows)])
    corr = sum(np.outer(t[i], t[i]) for i in range(rows)) / rows
    neg = np.mean([p[i] @ corr @ p[i] for i in range(rows)])
    return (pos + neg_weight * neg) / width, t, corr


def test_loss_matches_numpy():
    rng = np.random.default_rng(0)
    p = rng.normal(size=(48, 16)).astype(np.float32)
    t = (rng.normal(size=(48, 16)) * 3 + 1).astype(np.float32)
    expected, _, _ = numpy_unigrad(p, t, 0.02)
    np.testing.assert_allclose(float(unigrad_loss(jnp.asarray(p), jnp.asarray(t), 0.02)), expected, rtol=1e-5)
    expected_heavy, _, _ = numpy_unigrad(p, t, 0.5)
    np.testing.assert_allclose(float(unigrad_loss(jnp.asarray(p), jnp.asarray(t), 0.5)), expected_heavy, rtol=1e-5)


def test_gradient_flows_to_predictions_only():
    rng = np.random.default_rng(1)
    p = rng.normal(size=(20, 8)).astype(np.float32)
    t = rng.normal(size=(20, 8)).astype(np.float32)
    grad_p, grad_t = jax.grad(unigrad_loss, argnums=(0, 1))(jnp.asarray(p), jnp.asarray(t), 0.02)
    np.testing.assert_array_equal(np.asarray(grad_t), 0)
    _, tn, corr = numpy_unigrad(p, t, 0.02)
    rows, width = p.shape
    analytic = (2 * (p - tn) / rows + 0.02 * 2 * p @ corr / rows) / width  # C is symmetric
    np.testing.assert_allclose(np.asarray(grad_p), analytic, rtol=1e-4, atol=1e-7)


def test_loss_is_minimised_near_normalised_target():
    rng = np.random.default_rng(2)
    t = rng.normal(size=(32, 8)).astype(np.float32)
    _, tn, _ = numpy_unigrad(t, t, 0.0)
    assert float(unigrad_loss(jnp.asarray(tn, jnp.float32), jnp.asarray(t), 0.0)) < 1e-9
    assert float(unigrad_loss(jnp.asarray(-tn, jnp.float32), jnp.asarray(t), 0.0)) > 3.9  # ||2t||^2/D ~ 4
