"""MAE baseline: patch layout, masking ratio, masked-only normalised-pixel loss, and a train step."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from conftest import tiny_config
from siim_jax.models.mae import MAE, patchify


def test_patchify_layout_is_row_column_channel():
    images = np.arange(2 * 8 * 8 * 3, dtype=np.float32).reshape(2, 8, 8, 3)
    patches = np.asarray(patchify(jnp.asarray(images), 4))
    assert patches.shape == (2, 4, 48)
    # patch 1 = top-right 4x4 block, flattened as (row, column, channel)
    np.testing.assert_array_equal(patches[1, 1], images[1, 0:4, 4:8].reshape(-1))
    np.testing.assert_array_equal(patches[0, 2], images[0, 4:8, 0:4].reshape(-1))


def test_loss_counts_masked_patches_only_with_normalised_targets():
    config = tiny_config(**{"model.loss_type": "mae"})
    model = MAE(config.model, rngs=nnx.Rngs(0))
    assert model.num_visible == 4  # 25% of 16 patches
    images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
    key = jax.random.key(3)

    pred, masked = (np.asarray(a) for a in model.reconstruct(images, key))
    loss = float(model(images, key))
    # the mask: 75% of patches, from argsort of uniform noise drawn with `key`
    order = np.argsort(np.asarray(jax.random.uniform(key, (2, 16))), axis=1)
    expected_masked = np.ones((2, 16), bool)
    np.put_along_axis(expected_masked, order[:, :4], False, axis=1)
    np.testing.assert_array_equal(masked, expected_masked)
    target = np.asarray(patchify(images, 8)).astype(np.float64)
    target = (target - target.mean(-1, keepdims=True)) / np.sqrt(target.var(-1, ddof=1, keepdims=True) + 1e-6)
    per_patch = ((pred - target) ** 2).mean(-1)
    assert masked.sum() == 24
    np.testing.assert_allclose(loss, per_patch[masked].mean(), rtol=1e-5)


def test_mae_train_steps_without_a_target_branch():
    from test_train_step import run_steps
    states, metrics, _ = run_steps(tiny_config(**{"model.loss_type": "mae"}), jax.devices()[:2], 2)
    assert states[-1].ema_params == {} and states[-1].batch_stats == {}
    assert all(np.isfinite(m["loss"]) for m in metrics)
    assert not np.allclose(states[0].params["decoder_pred"]["kernel"], states[-1].params["decoder_pred"]["kernel"])
