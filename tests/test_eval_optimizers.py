"""The evaluation optimisers against direct NumPy formulas: the official MAE LARS (linear probe) and AdamW with
layer-wise lr decay (fine-tune)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from siim_jax.models.vit import VisionTransformer
from siim_jax.methods.optimizers import finetune_optimizer, lars, layer_decay_scales, layer_id


def run_optimizer(tx, params, grads_per_step):
    """Applies tx for len(grads_per_step) steps (one jit compile) -> final params as NumPy."""
    params = jax.tree.map(jnp.asarray, params)
    state = tx.init(params)

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for grads in grads_per_step:
        params, state = step(params, state, jax.tree.map(jnp.asarray, grads))
    return jax.tree.map(np.asarray, params)


def schedule(step):
    """A warmup-like lr schedule of the step count, usable on jnp and Python numbers."""
    return 0.05 * (1.0 + step)


# ----------------------------------------------------------------------------------------------- LARS


def numpy_lars(params, grads_per_step, lr_fn, momentum, trust, weight_decay, one_d):
    """The official util/lars.py step, written out per parameter in float64 from its PyTorch formula."""
    params = {k: v.astype(np.float64) for k, v in params.items()}
    mu = {k: np.zeros_like(v) for k, v in params.items()}
    for t, grads in enumerate(grads_per_step):
        for k, p in params.items():
            dp = grads[k].astype(np.float64)
            if not one_d[k]:
                dp = dp + weight_decay * p
                param_norm, update_norm = np.sqrt(np.sum(p * p)), np.sqrt(np.sum(dp * dp))
                q = trust * param_norm / update_norm if param_norm > 0 and update_norm > 0 else 1.0
                dp = dp * q
            mu[k] = momentum * mu[k] + dp
            params[k] = p - lr_fn(t) * mu[k]
    return params


@pytest.mark.parametrize("zero_kernel_init, trust, weight_decay, zero_grad_step", [
    (True, 0.001, 0.0, 2),  # the probe's setting; |p| = 0 on step 0, |dp| = 0 on step 2: trust ratio 1
    (False, 0.3, 0.1, 1),  # weight decay > 0 and a zero kernel gradient on step 1 (dp = wd * p)
])
def test_lars_matches_official_formula(zero_kernel_init, trust, weight_decay, zero_grad_step):
    rng = np.random.default_rng(0)
    d, c, steps = 8, 5, 4
    kernel = np.zeros((d, c), np.float32) if zero_kernel_init else rng.normal(size=(d, c)).astype(np.float32)
    params = {"kernel": kernel, "bias": rng.normal(size=(c,)).astype(np.float32)}
    grads = [{"kernel": rng.normal(size=(d, c)).astype(np.float32),
              "bias": rng.normal(size=(c,)).astype(np.float32)} for _ in range(steps)]
    grads[zero_grad_step]["kernel"][:] = 0
    grads[steps - 1]["bias"][:] = 0

    got = run_optimizer(lars(schedule, trust_coefficient=trust, weight_decay=weight_decay), params, grads)
    want = numpy_lars(params, grads, schedule, 0.9, trust, weight_decay, {"kernel": False, "bias": True})
    for k in params:
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-6, err_msg=k)
        assert not np.allclose(got[k], params[k])  # every parameter moved


def test_lars_exclude_mask_treats_stored_multi_dim_bias_as_1d():
    rng = np.random.default_rng(1)
    params = {"kernel": rng.normal(size=(4, 2, 3)).astype(np.float32),
              "qkv_bias": rng.normal(size=(3, 2, 3)).astype(np.float32)}
    grads = [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params) for _ in range(3)]
    one_d = {"kernel": False, "qkv_bias": True}
    tx = lars(0.2, momentum=0.8, trust_coefficient=0.2, weight_decay=0.3, exclude_mask=one_d)
    got = run_optimizer(tx, params, grads)
    want = numpy_lars(params, grads, lambda t: 0.2, 0.8, 0.2, 0.3, one_d)
    for k in params:
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-6, err_msg=k)


# ------------------------------------------------------------------------ layer-wise lr decay (fine-tune)


def finetune_param_shapes(depth):
    """A fine-tune model's param tree as ShapeDtypeStructs: the real encoder's plus fc_norm and a 3-class head."""
    encoder = nnx.eval_shape(
        lambda: VisionTransformer(width=16, depth=depth, heads=2, patch=8, image_size=16, rngs=nnx.Rngs(0)))
    shape = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    return {"encoder": nnx.to_pure_dict(nnx.state(encoder, nnx.Param)),
            "fc_norm": {"scale": shape(16), "bias": shape(16)}, "head": {"kernel": shape(16, 3), "bias": shape(3)}}


# decay 0.65, depth 12: patch embedding / class token / position table 0.65^13, block i 0.65^(12 - i), rest 1
SCALES_DEPTH_12 = {"embedding": 0.003697205891018715, "head": 1.0,
                   "blocks": [0.005688009063105715, 0.008750783174008792, 0.013462743344628911, 0.02071191283789063,
                              0.03186448128906251, 0.049022278906250015, 0.07541889062500001, 0.11602906250000002,
                              0.17850625000000003, 0.2746250, 0.42250000000000004, 0.65]}


def expected_scale_depth_12(names):
    if names[0] == "encoder" and names[1] == "blocks":
        return SCALES_DEPTH_12["blocks"][names[2]]
    if names[0] == "encoder" and names[1] in ("patch_embed", "cls_token", "pos_embed"):
        return SCALES_DEPTH_12["embedding"]
    return SCALES_DEPTH_12["head"]


def test_layer_decay_scales_depth_12():
    params = finetune_param_shapes(12)
    scales = layer_decay_scales(params, depth=12, decay=0.65)
    assert jax.tree.structure(scales) == jax.tree.structure(params)
    leaves = jax.tree_util.tree_flatten_with_path(scales)[0]
    seen = set()
    for path, scale in leaves:
        names = tuple(k.key for k in path)
        np.testing.assert_allclose(scale, expected_scale_depth_12(names), rtol=1e-12, err_msg=str(names))
        seen.add(names[:3] if names[1] == "blocks" else names[1] if names[0] == "encoder" else names[:1])
    assert {"patch_embed", "cls_token", "pos_embed", ("fc_norm",), ("head",)} <= seen
    assert {("encoder", "blocks", i) for i in range(12)} <= seen


def test_layer_id_paths():
    assert layer_id(("encoder", "patch_embed", "proj", "kernel"), 12) == 0
    assert layer_id(("encoder", "pos_embed"), 12) == 0
    assert layer_id(("encoder", "blocks", 0, "attn", "qkv", "bias"), 12) == 1
    assert layer_id(("encoder", "blocks", 11, "norm2", "scale"), 12) == 12
    assert layer_id(("encoder", "norm", "scale"), 12) == 13
    assert layer_id(("head", "kernel"), 12) == 13
    with pytest.raises(ValueError, match="block 12"):
        layer_id(("encoder", "blocks", 12, "mlp", "fc1", "kernel"), 12)


def optimiser_state_paths(opt_state) -> set:
    """The key paths (strings) of every array in an optimiser state."""
    return {jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(opt_state)}


def small_schedule(step):
    """Fine-tune sized lrs: float32 AdamW's bias correction 1 - 0.999^t is only good to ~1e-5 relative, so the
    absolute error of a step is ~1e-5 lr."""
    return 0.005 * (1.0 + step)


def test_finetune_adamw_with_layer_decay_matches_numpy():
    depth, decay, wd, b1, b2, eps = 2, 0.65, 0.3, 0.9, 0.999, 1e-8
    rng = np.random.default_rng(3)  # random values everywhere, so that a wrong weight decay on any leaf shows
    params = jax.tree.map(lambda p: (0.1 * rng.normal(size=p.shape)).astype(np.float32),
                          finetune_param_shapes(depth))
    grads = [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params) for _ in range(2)]
    tx = finetune_optimizer(small_schedule, params, depth, layer_decay=decay, weight_decay=wd, b1=b1, b2=b2)
    got = run_optimizer(tx, params, grads)
    state_paths = optimiser_state_paths(tx.init(params))
    assert any("cls_token" in p for p in state_paths) and not any("pos_embed" in p for p in state_paths)

    def scale(names):  # layer ids: embedding 0, block i -> i + 1, rest depth + 1
        if names[0] == "encoder" and names[1] == "blocks":
            return decay ** (depth - names[2])
        if names[0] == "encoder" and names[1] in ("patch_embed", "cls_token", "pos_embed"):
            return decay ** (depth + 1)
        return 1.0

    flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_grads = [jax.tree.leaves(g) for g in grads]
    flat_got = jax.tree.leaves(got)
    decayed_names = set()
    for i, (path, p0) in enumerate(flat_params):
        names = tuple(k.key for k in path)
        if names[-1] == "pos_embed":  # official: requires_grad=False, in no parameter group
            np.testing.assert_array_equal(flat_got[i], p0)
            continue
        decays = names[-1] == "kernel"  # PyTorch >= 2-D weights; not biases, norms, class token
        p, m, v = p0.astype(np.float64), 0.0, 0.0
        for t in range(1, len(grads) + 1):
            g = flat_grads[t - 1][i].astype(np.float64)
            m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
            adam = (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
            p = p - small_schedule(t - 1) * scale(names) * (adam + (wd * p if decays else 0.0))
        np.testing.assert_allclose(flat_got[i], p, rtol=0, atol=1e-6, err_msg=str(names))
        if decays:
            decayed_names.add(names[-2])
    assert {"qkv", "proj", "fc1", "fc2", "head"} <= decayed_names


def test_finetune_method_keeps_the_position_table_frozen():
    """Through the method and the train step: after two steps the table is bit-identical, it has no optimiser
    state (official: requires_grad=False, in no parameter group), and everything else moved."""
    import importlib.util
    import os

    from siim_jax.methods import get_method
    from siim_jax.parallel.sharding import create_mesh, global_batch
    from siim_jax.train.state import init_train_state
    from siim_jax.train.step import jit_train_step

    configs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    spec = importlib.util.spec_from_file_location("finetune_demo", os.path.join(configs, "finetune_demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.model.image_size, config.batch_size, config.data.num_masked = 32, 8, 4
    config.classifier.randaugment_ops = 0
    config.mesh.data = 1
    mesh = create_mesh(config.mesh, devices=jax.devices()[:1])
    method = get_method(config)
    lr_fn = lambda step: 1e-3
    graphdef, tx, state, shardings = init_train_state(method, mesh, lr_fn)
    assert method.trainable_labels(state.params)["encoder"]["pos_embed"] == "frozen"
    state_paths = optimiser_state_paths(state.opt_state)
    assert any("cls_token" in p for p in state_paths) and not any("pos_embed" in p for p in state_paths)

    step_fn = jit_train_step(method, graphdef, tx, lr_fn, lambda step: 0.0, mesh, shardings)
    rng = np.random.default_rng(0)
    before = jax.device_get(state.params)
    for _ in range(2):
        state, metrics = step_fn(state, global_batch(method.synthetic_batch(8, rng), mesh,
                                                     config.mesh.logical_axis_rules, 8))
    after = jax.device_get(state.params)
    np.testing.assert_array_equal(after["encoder"]["pos_embed"], before["encoder"]["pos_embed"])
    assert not np.allclose(after["encoder"]["cls_token"], before["encoder"]["cls_token"])
    assert not np.allclose(after["encoder"]["blocks"][0]["attn"]["qkv"]["kernel"],
                           before["encoder"]["blocks"][0]["attn"]["qkv"]["kernel"])
