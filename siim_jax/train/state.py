"""The train state (one pytree: step, online params, EMA params, optimiser state, batch statistics) and its
creation already sharded on the mesh; what goes where is the method's (siim_jax/methods)."""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from siim_jax.methods.base import Method
from siim_jax.parallel.sharding import replicated, state_shardings


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimiser steps taken
    params: Any  # online parameters (pure dict): everything the optimiser sees
    ema_params: Any  # the EMA target (method.ema_source(params)'s structure); {} for methods without one
    opt_state: Any
    batch_stats: Any  # BatchNorm running statistics of both branches (pure dict)


def all_finite(tree) -> jax.Array:
    """bool scalar: every floating leaf of `tree` (params, EMA, optimiser state, statistics) is finite."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def abstract_model(method: Method):
    """(graphdef, abstract nnx Param state, abstract nnx BatchStat state) of the method's model, no arrays
    allocated."""
    return nnx.split(nnx.eval_shape(lambda: method.create_model(0)), nnx.Param, nnx.BatchStat)


def init_train_state(method: Method, mesh: Mesh, learning_rate):
    """Creates the method's train state directly in its shardings. Returns (graphdef, optimiser, state,
    shardings)."""
    graphdef, tx, init, shardings = _plan_train_state(method, mesh, learning_rate)
    state = jax.jit(init, out_shardings=shardings)()
    return graphdef, tx, state, shardings


def abstract_train_state(method: Method, mesh: Mesh, learning_rate):
    """Like init_train_state, but allocates nothing: the state is ShapeDtypeStructs carrying their shardings
    (a restore target). Returns (graphdef, optimiser, abstract state, shardings)."""
    graphdef, tx, init, shardings = _plan_train_state(method, mesh, learning_rate)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            jax.eval_shape(init), shardings)
    return graphdef, tx, abstract, shardings


def _plan_train_state(method: Method, mesh: Mesh, learning_rate):
    """(graphdef, optimiser, init function returning the TrainState, the state's shardings)."""
    config = method.config
    graphdef, abstract_params, abstract_stats = abstract_model(method)
    param_sh, ema_sh = method.split_params(state_shardings(abstract_params, mesh, config.mesh.logical_axis_rules))
    stats_sh = state_shardings(abstract_stats, mesh, config.mesh.logical_axis_rules)
    tx = method.make_optimizer(method.split_params(nnx.to_pure_dict(abstract_params))[0], learning_rate)

    def init():
        _, params, stats = nnx.split(method.create_model(config.seed), nnx.Param, nnx.BatchStat)
        params, ema = method.split_params(nnx.to_pure_dict(params))
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
