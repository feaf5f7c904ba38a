"""One optimiser step of any method (siim_jax/methods), a pure function for `jax.jit`.

EMA update of the target (cosine momentum; SiameseIM) -> the method's loss (for SiameseIM: device-side
photometric augmentation, online predictions and target representations, UniGrad loss) -> gradients
(accumulated over micro-batches if asked) -> the method's optimiser (AdamW for pretraining).
"""

import jax
import jax.numpy as jnp
import optax

from siim_jax.methods.base import FIXED_POSITION_TABLE, Method
from siim_jax.parallel.sharding import batch_sharding, jit_in_mesh, replicated
from siim_jax.train.state import TrainState, all_finite


def ema_update(ema_params, online_params, momentum):
    """target <- m * target + (1 - m) * online, leaf by leaf; the fixed position table is copied, not averaged
    (the official target shares the online table, and averaging would let rounding drift it)."""
    def update(path, t, o):
        if getattr(path[-1], "key", None) == FIXED_POSITION_TABLE:
            return o
        return momentum * t + (1.0 - momentum) * o
    return jax.tree_util.tree_map_with_path(update, ema_params, online_params)


def make_train_step(method: Method, graphdef, tx: optax.GradientTransformation, learning_rate, ema_momentum):
    """Returns train_step(state, batch) -> (state, metrics) of `method` for jax.jit with the state donated.

    batch: dict of global arrays with leading dim config.batch_size (siim_jax.data.pipeline). With
    config.grad_accum_steps = A, it is split into A micro-batches (example i goes to micro-batch i % A, so each
    device keeps its own examples); gradients and losses are averaged, BatchNorm statistics are per micro-batch,
    and there is one EMA update and one optimiser step.
    """
    config = method.config
    grad_fn = jax.value_and_grad(method.make_loss_fn(graphdef), has_aux=True)
    accum = config.grad_accum_steps
    base_key = jax.random.key(config.seed)

    def train_step(state: TrainState, batch):
        momentum = ema_momentum(state.step)
        ema = ema_update(state.ema_params, method.ema_source(state.params), momentum) if method.has_target else {}
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
        labels = method.trainable_labels(grads)
        trainable = jax.tree.map(lambda g, lab: g if lab == "train" else jnp.zeros(()), grads, labels)
        metrics = {"loss": loss, "lr": learning_rate(state.step), "momentum": momentum,
                   "grad_norm": optax.tree.norm(trainable)}
        new_state = TrainState(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state,
                               batch_stats=stats)
        metrics["state_finite"] = all_finite(new_state).astype(jnp.float32)  # 1.0 unless the update blew up
        return new_state, metrics

    return train_step


def jit_train_step(method: Method, graphdef, tx, learning_rate, ema_momentum, mesh, state_shardings):
    """The train step under jit with explicit shardings (state donated): (state, batch) -> (state, metrics)."""
    rules = method.config.mesh.logical_axis_rules
    batch_sh = {k: batch_sharding(mesh, rules, n) for k, n in method.batch_ndims.items()}
    return jit_in_mesh(make_train_step(method, graphdef, tx, learning_rate, ema_momentum), mesh, rules,
                       in_shardings=(state_shardings, batch_sh), out_shardings=(state_shardings, replicated(mesh)),
                       donate_argnums=(0,))
