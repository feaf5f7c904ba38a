"""Shared by the tests/test_interop_*.py files: train states with every array randomised (so that a swapped,
transposed or dropped array cannot go unnoticed) and our encoder's tokens."""

import jax
import numpy as np
from flax import nnx

from siim_jax.methods import get_method
from siim_jax.parallel.sharding import create_mesh, jit_in_mesh
from siim_jax.train.state import init_train_state


def one_device_mesh():
    return create_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])


def fresh_state(config, mesh=None):
    """(graphdef, state) of a newly initialised train state."""
    graphdef, _, state, _ = init_train_state(get_method(config), mesh or one_device_mesh(), lambda step: 0.0)
    return graphdef, state


def randomized(state, seed: int):
    """`state` with params, EMA params and batch statistics replaced by random arrays of realistic scale
    (weights ~0.05, biases ~0.1, norm scales ~1, variances in [0.5, ...)), placed like the originals; the step
    is set to 7."""
    rng = np.random.default_rng(seed)

    def draw(path, x):
        name, noise = getattr(path[-1], "key", None), rng.normal(size=x.shape).astype(np.float32)
        if name == "var":
            value = np.abs(noise) + 0.5
        elif name == "scale":
            value = 1 + 0.1 * noise
        elif name in ("bias", "mean") or x.ndim <= 1:
            value = 0.1 * noise
        else:
            value = 0.05 * noise
        return jax.device_put(value, x.sharding)

    return state.replace(step=jax.device_put(np.int32(7), state.step.sharding),
                         params=jax.tree_util.tree_map_with_path(draw, state.params),
                         ema_params=jax.tree_util.tree_map_with_path(draw, state.ema_params),
                         batch_stats=jax.tree_util.tree_map_with_path(draw, state.batch_stats))


def encoder_tokens(config, graphdef, state, images: np.ndarray) -> np.ndarray:
    """Our online encoder on full images (N, S, S, 3) -> tokens (N, 1 + grid^2, D), class token first."""
    method = get_method(config)

    def run(params, ema_params, batch_stats, images):
        encoder = method.encoder(nnx.merge(graphdef, method.merge_params(params, ema_params), batch_stats))
        return encoder(encoder.patch_tokens(images))

    mesh = one_device_mesh()
    host = jax.device_get((state.params, state.ema_params, state.batch_stats))
    return np.asarray(jit_in_mesh(run, mesh, config.mesh.logical_axis_rules)(*host, images))
