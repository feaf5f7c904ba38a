"""One SiameseIM optimiser step (SPEC sections 3-4), a pure function for `jax.jit`.

EMA update of the target (cosine momentum) -> device-side photometric augmentation -> online predictions and
target representations -> UniGrad loss -> gradients (accumulated over micro-batches if asked) -> AdamW.
"""

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from siim_jax.data.photometric import augment_view1, augment_view2, normalize
from siim_jax.losses import unigrad_loss
from siim_jax.parallel.sharding import batch_sharding, replicated, sharding_context
from siim_jax.train.state import FIXED_POSITION_TABLE, TrainState, all_finite, merge_params, trainable_labels


def ema_update(ema_params, online_params, momentum):
    """target <- m * target + (1 - m) * online, leaf by leaf; the fixed position table is copied, not averaged
    (the official target shares the online table, and averaging would let rounding drift it)."""
    def update(path, t, o):
        if getattr(path[-1], "key", None) == FIXED_POSITION_TABLE:
            return o
        return momentum * t + (1.0 - momentum) * o
    return jax.tree_util.tree_map_with_path(update, ema_params, online_params)


def make_siamese_loss_fn(config: ml_collections.ConfigDict, graphdef):
    """(params, ema_params, batch_stats, inputs) -> (loss, new batch_stats), differentiable in params, with no
    randomness: the views are already augmented.

    inputs: view1, view2 (N, S, S, 3) float32, normalised; mask (N, g*g) bool, True = masked; geometry (N, 6).
    The target branch uses `ema_params` as given (the EMA update is the train step's business).
    """
    def loss_fn(params, ema_params, batch_stats, inputs):
        model = nnx.merge(graphdef, merge_params(params, ema_params), batch_stats)
        pred = model.predict(inputs["view1"], inputs["mask"], inputs["geometry"])
        target = model.target_tokens(inputs["view2"])
        loss = unigrad_loss(pred.reshape(-1, pred.shape[-1]), target.reshape(-1, target.shape[-1]),
                            config.loss.neg_weight)
        return loss, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))

    return loss_fn


def make_loss_fn(config: ml_collections.ConfigDict, graphdef):
    """(params, ema_params, batch_stats, batch, key) -> (loss, new batch_stats); differentiable in params.

    batch holds uint8 crops; the photometric augmentation (SiameseIM) or the masks (MAE) come from `key`.
    """
    siamese_loss = make_siamese_loss_fn(config, graphdef)

    def loss_fn(params, ema_params, batch_stats, batch, key):
        key1, key2 = jax.random.split(key)
        if config.model.loss_type == "siamese":
            inputs = {**batch, "view1": augment_view1(key1, batch["view1"]),
                      "view2": augment_view2(key2, batch["view2"])}
            return siamese_loss(params, ema_params, batch_stats, inputs)
        # MAE: crops and flips only, random masks drawn on device
        model = nnx.merge(graphdef, merge_params(params, ema_params), batch_stats)
        loss = model(normalize(batch["view1"]), key1)
        return loss, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))

    return loss_fn


def make_train_step(config: ml_collections.ConfigDict, graphdef, tx: optax.GradientTransformation,
                    learning_rate, ema_momentum):
    """Returns train_step(state, batch) -> (state, metrics) for jax.jit with the state donated.

    batch: dict of global arrays with leading dim config.batch_size (siim_jax.data.pipeline). With
    config.grad_accum_steps = A, it is split into A micro-batches (example i goes to micro-batch i % A, so each
    device keeps its own examples); gradients and losses are averaged, BatchNorm statistics are per micro-batch,
    and there is one EMA update and one optimiser step.
    """
    grad_fn = jax.value_and_grad(make_loss_fn(config, graphdef), has_aux=True)
    accum = config.grad_accum_steps
    base_key = jax.random.key(config.seed)

    def train_step(state: TrainState, batch):
        momentum = ema_momentum(state.step)
        ema = ema_update(state.ema_params, state.params["online"], momentum) if state.ema_params else {}
        key = jax.random.fold_in(base_key, state.step)
        if accum == 1:
            (loss, stats), grads = grad_fn(state.params, ema, state.batch_stats, batch, key)
        else:
            micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(-1, accum, *x.shape[1:]), 0, 1), batch)

            def accumulate(carry, inputs):
                grads, loss, stats = carry
                (micro_loss, stats), micro_grads = grad_fn(state.params, ema, stats, *inputs)
                grads = jax.tree.map(lambda g, m: g + m / accum, grads, micro_grads)
                return (grads, loss + micro_loss / accum, stats), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            carry = (zeros, jnp.zeros((), jnp.float32), state.batch_stats)
            (grads, loss, stats), _ = jax.lax.scan(accumulate, carry, (micro, jax.random.split(key, accum)))

        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        labels = trainable_labels(grads, config)
        trainable = jax.tree.map(lambda g, lab: g if lab == "train" else jnp.zeros(()), grads, labels)
        metrics = {"loss": loss, "lr": learning_rate(state.step), "momentum": momentum,
                   "grad_norm": optax.tree.norm(trainable)}
        new_state = TrainState(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state,
                               batch_stats=stats)
        metrics["state_finite"] = all_finite(new_state).astype(jnp.float32)  # 1.0 unless the update blew up
        return new_state, metrics

    return train_step


BATCH_NDIMS = {"view1": 4, "view2": 4, "geometry": 2, "mask": 2}


def jit_in_mesh(fn, mesh, rules, **jit_kwargs):
    """jax.jit(fn, **jit_kwargs), traced and run inside sharding_context(mesh, rules); `.lower(*args)` lowers it
    there too (arguments may be ShapeDtypeStructs with shardings, for ahead-of-time compiles)."""
    jitted = jax.jit(fn, **jit_kwargs)

    def call(*args):
        with sharding_context(mesh, rules):
            return jitted(*args)

    def lower(*args):
        with sharding_context(mesh, rules):
            return jitted.lower(*args)

    call.lower = lower
    return call


def jit_train_step(config: ml_collections.ConfigDict, graphdef, tx, learning_rate, ema_momentum, mesh,
                   state_shardings):
    """The train step under jit with explicit shardings (state donated): (state, batch) -> (state, metrics)."""
    rules = config.mesh.logical_axis_rules
    batch_sh = {k: batch_sharding(mesh, rules, n) for k, n in BATCH_NDIMS.items()}
    return jit_in_mesh(make_train_step(config, graphdef, tx, learning_rate, ema_momentum), mesh, rules,
                       in_shardings=(state_shardings, batch_sh), out_shardings=(state_shardings, replicated(mesh)),
                       donate_argnums=(0,))
