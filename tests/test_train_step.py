"""Train state and step: EMA, schedules, frozen parameters, weight-decay mask, 1 vs 8 devices."""

import math

import jax
import numpy as np
import pytest

from conftest import tiny_config
from siim_jax.data.pipeline import TwoViewBatches
from siim_jax.data.sources.builtin import make_builtin_images
from siim_jax.methods import get_method
from siim_jax.methods.base import weight_decay_mask
from siim_jax.parallel.sharding import create_mesh, global_batch
from siim_jax.train.schedules import ema_momentum_fn, learning_rate_fn, training_length
from siim_jax.train.state import init_train_state
from siim_jax.train.step import jit_train_step

def run_steps(config, devices, num_steps):
    """Returns host copies of the state before each step and after the last, plus the metrics."""
    mesh = create_mesh(config.mesh, devices=devices)
    length = training_length(config, config.data.num_train)
    lr_fn, momentum_fn = learning_rate_fn(config, length), ema_momentum_fn(config, length)
    method = get_method(config)
    graphdef, tx, state, shardings = init_train_state(method, mesh, lr_fn)
    rules = config.mesh.logical_axis_rules
    step_fn = jit_train_step(method, graphdef, tx, lr_fn, momentum_fn, mesh, shardings)
    images, _ = make_builtin_images(config.seed, config.data.num_train, config.data.raw_size)
    batches = TwoViewBatches(images, config.batch_size, config.model.image_size, 8, config.data.num_masked,
                             config.data.crop_min, config.seed)
    states, metrics = [jax.device_get(state)], []
    for s in range(num_steps):
        state, m = step_fn(state, global_batch(batches.batch_at(s), mesh, rules, config.batch_size))
        states.append(jax.device_get(state))
        metrics.append(jax.device_get(m))
    return states, metrics, state


@pytest.fixture(scope="module")
def one_device():
    return run_steps(tiny_config(), jax.devices()[:1], 3)


def momentum_formula(step, total, base=0.995):
    return 1 - (1 - base) * (1 + math.cos(math.pi * step / total)) / 2


def test_target_starts_as_exact_copy(one_device):
    states, _, _ = one_device
    jax.tree.map(np.testing.assert_array_equal, states[0].ema_params, states[0].params["online"])


def test_ema_update_uses_online_weights_before_the_step(one_device):
    states, metrics, _ = one_device
    for s in (1, 2):
        m = momentum_formula(s, 6)
        assert metrics[s]["momentum"] == pytest.approx(m, abs=1e-7)
        expected = jax.tree.map(lambda t, o: m * t + (1 - m) * o, states[s].ema_params, states[s].params["online"])
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                     states[s + 1].ema_params, expected)
    # the online weights moved, so the target is not simply a copy any more
    assert not np.allclose(states[3].ema_params["decoder_embed"]["kernel"],
                           states[3].params["online"]["decoder_embed"]["kernel"])


def test_learning_rate_schedule(one_device):
    _, metrics, _ = one_device
    peak = 6.25e-5 * 8 / 256
    assert metrics[0]["lr"] == 0.0
    assert metrics[1]["lr"] == pytest.approx(peak / 2, rel=1e-6)  # warmup of 2 steps
    assert metrics[2]["lr"] == pytest.approx(peak, rel=1e-6)  # cosine start
    config = tiny_config()
    lr = learning_rate_fn(config, training_length(config, 64))
    assert float(lr(4)) == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * 2 / 4)), rel=1e-6)
    assert float(lr(6)) == pytest.approx(0.0, abs=1e-12)


def test_frozen_patch_embedding_is_bit_identical(one_device):
    states, metrics, _ = one_device
    before, after = states[0].params["online"], states[-1].params["online"]
    for name in ("kernel", "bias"):
        np.testing.assert_array_equal(before["encoder"]["patch_embed"]["proj"][name],
                                      after["encoder"]["patch_embed"]["proj"][name])
    assert not np.array_equal(before["encoder"]["cls_token"], after["encoder"]["cls_token"])
    # the position table is a parameter (so that imports can replace it) but never trained
    np.testing.assert_array_equal(before["encoder"]["pos_embed"], after["encoder"]["pos_embed"])
    np.testing.assert_array_equal(after["encoder"]["pos_embed"][0, 0], 0.0)
    # the target's table is the online one, copied rather than averaged (no rounding drift)
    np.testing.assert_array_equal(states[-1].ema_params["encoder"]["pos_embed"], after["encoder"]["pos_embed"])
    assert all(np.isfinite(m["loss"]) and m["grad_norm"] > 0 for m in metrics)


def paths(tree):
    return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_weight_decay_mask_and_trainable_labels(one_device):
    states, _, _ = one_device
    params = states[0].params
    decay = paths(weight_decay_mask(params))
    for path, flag in decay.items():
        is_weight = path.endswith("['kernel']") or path.endswith("_token']")
        assert flag == is_weight, path
    assert any("mask_token" in p for p in decay) and any("decoder_pos_mlp" in p for p in decay)
    labels = paths(get_method(tiny_config()).trainable_labels(params))
    assert {p for p, lab in labels.items() if lab == "frozen"} == {
        "['online']['encoder']['patch_embed']['proj']['kernel']",
        "['online']['encoder']['patch_embed']['proj']['bias']",
        "['online']['encoder']['pos_embed']"}


def test_eight_fake_devices_match_one_device(one_device):
    states, metrics, _ = one_device
    config = tiny_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
    states8, metrics8, final8 = run_steps(config, jax.devices()[:8], 3)
    kernel = final8.params["online"]["encoder"]["blocks"][0]["mlp"]["fc1"]["kernel"]
    assert len(kernel.sharding.device_set) == 8 and not kernel.sharding.is_fully_replicated
    ema_kernel = final8.ema_params["encoder"]["blocks"][0]["mlp"]["fc1"]["kernel"]
    assert ema_kernel.sharding == kernel.sharding  # the EMA follows the weights' sharding exactly
    for m1, m8 in zip(metrics, metrics8):
        np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
        np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), states8[-1], states[-1])


def test_gradient_accumulation_makes_one_ema_update_per_step():
    config = tiny_config(grad_accum_steps=2)
    states, metrics, _ = run_steps(config, jax.devices()[:1], 2)
    m = momentum_formula(1, 6)
    expected = jax.tree.map(lambda t, o: m * t + (1 - m) * o, states[1].ema_params, states[1].params["online"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), states[2].ema_params,
                 expected)
    assert int(states[2].step) == 2 and all(np.isfinite(x["loss"]) for x in metrics)


@pytest.mark.parametrize("remat", ["dots", "full"])
def test_rematerialised_blocks_give_the_same_losses_and_updates(one_device, remat):
    states, metrics, _ = one_device  # model.remat = "none"
    remat_states, remat_metrics, _ = run_steps(tiny_config(**{"model.remat": remat}), jax.devices()[:1], 3)
    for a, b in zip(metrics, remat_metrics):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"],
                                                                                                    rel=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), states[-1], remat_states[-1])
