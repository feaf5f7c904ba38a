"""The train state (one pytree: step, online params, EMA params, optimiser state, batch statistics), the
optimiser, and creation of the state already sharded on the mesh."""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh

from siim_jax.models.mae import MAE
from siim_jax.models.siamese import SiameseIM
from siim_jax.parallel.sharding import replicated, state_shardings


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimiser steps taken
    params: Any  # online parameters (pure dict): everything but the target branch
    ema_params: Any  # target branch (pure dict with the structure of params["online"]); {} for MAE
    opt_state: Any
    batch_stats: Any  # BatchNorm running statistics of both branches (pure dict)


def all_finite(tree) -> jax.Array:
    """bool scalar: every floating leaf of `tree` (params, EMA, optimiser state, statistics) is finite."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def create_model(config: ml_collections.ConfigDict, seed: int):
    rngs = nnx.Rngs(seed)
    if config.model.loss_type == "mae":
        return MAE(config.model, rngs=rngs)
    return SiameseIM(config.model, config.data.num_masked, rngs=rngs)


def split_params(params: dict, loss_type: str) -> tuple[dict, dict]:
    """Full model parameters -> (online params, EMA params)."""
    if loss_type == "mae":
        return params, {}
    params = dict(params)
    params.pop("target")
    return params, params["online"]


def merge_params(params: dict, ema_params: dict) -> dict:
    """Inverse of split_params: the target branch takes the EMA parameters."""
    return {**params, "target": ema_params} if ema_params else params


FIXED_POSITION_TABLE = "pos_embed"  # the encoder's position table: a parameter, never trained


def trainable_labels(params: dict, config: ml_collections.ConfigDict) -> dict:
    """'frozen' for the patch embedding (unless config.model.train_patch_embed) and the position table,
    'train' for the rest."""
    def label(path, _):
        names = [getattr(k, "key", None) for k in path]
        frozen = ("patch_embed" in names and not config.model.train_patch_embed) or names[-1] == FIXED_POSITION_TABLE
        return "frozen" if frozen else "train"
    return jax.tree_util.tree_map_with_path(label, params)


def weight_decay_mask(params):
    """Weight decay on arrays that are >= 2-D in PyTorch (weights, class and mask tokens); none on biases and
    norms. (Our qkv bias is (3, heads, head_dim), but PyTorch's is 1-D, so biases are excluded by name; the
    frozen position table is excluded too.)"""
    return jax.tree_util.tree_map_with_path(
        lambda path, p: p.ndim >= 2 and getattr(path[-1], "key", None) not in ("bias", FIXED_POSITION_TABLE),
        params)


def make_optimizer(config: ml_collections.ConfigDict, params: dict, learning_rate) -> optax.GradientTransformation:
    o = config.optim
    trainable = [optax.adamw(learning_rate, b1=o.b1, b2=o.b2, eps=1e-8, weight_decay=o.weight_decay,
                             mask=weight_decay_mask)]
    if o.clip_norm > 0:
        trainable.insert(0, optax.clip_by_global_norm(o.clip_norm))
    return optax.multi_transform({"train": optax.chain(*trainable), "frozen": optax.set_to_zero()},
                                 trainable_labels(params, config))


def abstract_model(config: ml_collections.ConfigDict):
    """(graphdef, abstract nnx Param state, abstract nnx BatchStat state), no arrays allocated."""
    return nnx.split(nnx.eval_shape(lambda: create_model(config, 0)), nnx.Param, nnx.BatchStat)


def init_train_state(config: ml_collections.ConfigDict, mesh: Mesh, learning_rate):
    """Creates the train state directly in its shardings. Returns (graphdef, optimiser, state, shardings)."""
    graphdef, tx, init, shardings = _plan_train_state(config, mesh, learning_rate)
    state = jax.jit(init, out_shardings=shardings)()
    return graphdef, tx, state, shardings


def abstract_train_state(config: ml_collections.ConfigDict, mesh: Mesh, learning_rate):
    """Like init_train_state, but allocates nothing: the state is ShapeDtypeStructs carrying their shardings
    (a restore target). Returns (graphdef, optimiser, abstract state, shardings)."""
    graphdef, tx, init, shardings = _plan_train_state(config, mesh, learning_rate)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            jax.eval_shape(init), shardings)
    return graphdef, tx, abstract, shardings


def _plan_train_state(config: ml_collections.ConfigDict, mesh: Mesh, learning_rate):
    """(graphdef, optimiser, init function returning the TrainState, the state's shardings)."""
    graphdef, abstract_params, abstract_stats = abstract_model(config)
    param_sh, ema_sh = split_params(state_shardings(abstract_params, mesh, config.mesh.logical_axis_rules),
                                    config.model.loss_type)
    stats_sh = state_shardings(abstract_stats, mesh, config.mesh.logical_axis_rules)
    tx = make_optimizer(config, split_params(nnx.to_pure_dict(abstract_params), config.model.loss_type)[0],
                        learning_rate)

    def init():
        _, params, stats = nnx.split(create_model(config, config.seed), nnx.Param, nnx.BatchStat)
        params, ema = split_params(nnx.to_pure_dict(params), config.model.loss_type)
        ema = jax.tree.map(jnp.copy, ema)  # at step 0 the target is an exact copy of the online weights
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=ema,
                          opt_state=tx.init(params), batch_stats=nnx.to_pure_dict(stats))

    abstract_state = jax.eval_shape(init)
    masked = lambda x: isinstance(x, optax.MaskedNode)  # frozen leaves have no optimiser state
    opt_sh = optax.tree_map_params(tx, lambda p, s: p if masked(p) else s, abstract_state.opt_state, param_sh,
                                   transform_non_params=lambda _: replicated(mesh), is_leaf=masked)
    shardings = TrainState(step=replicated(mesh), params=param_sh, ema_params=ema_sh, opt_state=opt_sh,
                           batch_stats=stats_sh)
    return graphdef, tx, init, shardings
