"""Optimisers of the evaluation protocols (SPEC section 5): LARS for the linear probe, AdamW with layer-wise
learning-rate decay for fine-tuning. Both act on pure-dict parameter trees."""

from collections.abc import Callable, Collection
from typing import Any

import jax
import optax

from siim_jax.methods.base import FIXED_POSITION_TABLE, path_names, weight_decay_mask

CLASS_TOKEN = "cls_token"
PATCH_EMBEDDING = "patch_embed"
BLOCKS = "blocks"
# Leaves never weight-decayed in fine-tuning whatever their stored rank (MAE's no_weight_decay list plus biases,
# which are 1-D in PyTorch but e.g. (3, heads, head_dim) for our fused qkv).
NO_DECAY_NAMES = ("bias", CLASS_TOKEN, FIXED_POSITION_TABLE)


def _ndim_at_most_one(params):
    return jax.tree.map(lambda p: p.ndim <= 1, params)


# ----------------------------------------------------------------------------------------------- LARS


def lars(learning_rate: optax.ScalarOrSchedule, momentum: float = 0.9, trust_coefficient: float = 0.001,
         weight_decay: float = 0.0, exclude_mask: Any = None) -> optax.GradientTransformation:
    """The LARS of the official MAE / SiameseIM linear probe (util/lars.py), per parameter p with gradient g:

        if not excluded:  dp = g + weight_decay * p
                          dp *= trust_coefficient * |p| / |dp|   (1 where |p| == 0 or |dp| == 0)
        else:             dp = g
        mu = momentum * mu + dp   (mu starts at 0);   p <- p - lr(step) * mu

    `exclude_mask`: pytree of bools, or params -> such a pytree; True = a 1-D parameter in PyTorch (bias, norm),
    which gets neither weight decay nor trust ratio. Default: p.ndim <= 1. `learning_rate` is a float or a
    schedule of the step count (0 on the first update). Unlike optax.lars, the learning rate multiplies the
    momentum buffer rather than being accumulated into it, as in PyTorch, which matters under a schedule.
    """
    exclude = _ndim_at_most_one if exclude_mask is None else exclude_mask
    if callable(exclude):
        adapt = lambda tree: jax.tree.map(lambda e: not e, exclude(tree))
    else:
        adapt = jax.tree.map(lambda e: not e, exclude)
    return optax.chain(
        optax.masked(optax.add_decayed_weights(weight_decay), adapt),
        optax.masked(optax.scale_by_trust_ratio(trust_coefficient=trust_coefficient), adapt),
        optax.trace(decay=momentum),
        optax.scale_by_learning_rate(learning_rate),
    )


# ------------------------------------------------------------------------ layer-wise lr decay (fine-tune)


def layer_id(path: tuple, depth: int) -> int:
    """Layer of a parameter for layer-wise lr decay: 0 for the patch embedding, class token and position table,
    i + 1 for block i (a `blocks`/i path), depth + 1 for everything else (fc_norm, head, a final norm).

    `path`: the parameter's keys, e.g. ("encoder", "blocks", 3, "mlp", "fc1", "kernel"), or a jax key path."""
    names = path_names(path)
    if BLOCKS in names:
        i = int(names[names.index(BLOCKS) + 1])
        if not 0 <= i < depth:
            raise ValueError(f"{'/'.join(map(str, names))}: block {i} does not exist in a depth-{depth} encoder")
        return i + 1
    if PATCH_EMBEDDING in names or names[-1] in (CLASS_TOKEN, FIXED_POSITION_TABLE):
        return 0
    return depth + 1


def layer_decay_scales(params: dict, depth: int, decay: float) -> dict:
    """Pytree of the structure of `params`, each leaf the Python float decay ** (depth + 1 - layer_id)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: float(decay ** (depth + 1 - layer_id(path, depth))),
                                            params)


def scale_by_tree(scales) -> optax.GradientTransformation:
    """Multiplies each update leaf by the matching leaf of `scales` (a pytree of floats with the structure of
    the params); masked-out leaves (optax.MaskedNode) pass through."""
    def update(updates, state, params=None):
        del params
        scaled = jax.tree.map(lambda s, u: u if isinstance(u, optax.MaskedNode) else u * s, scales, updates)
        return scaled, state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def finetune_trainable_labels(params: dict) -> dict:
    """'frozen' for the position table (official: requires_grad=False, in no parameter group), 'train' for every
    other leaf of the fine-tune model's params."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "frozen" if path_names(path)[-1] == FIXED_POSITION_TABLE else "train", params)


def finetune_optimizer(learning_rate: optax.ScalarOrSchedule, params: dict, depth: int, layer_decay: float = 0.65,
                       weight_decay: float = 0.05, b1: float = 0.9, b2: float = 0.999,
                       no_decay: Collection[str] | Callable = NO_DECAY_NAMES,
                       clip_norm: float = 0.0) -> optax.GradientTransformation:
    """AdamW (eps 1e-8) with layer-wise lr decay, as MAE's fine-tune (param_groups_lrd + torch AdamW):

        p <- p - lr(step) * scale * (adam(g) + weight_decay * decay_mask * p),
        scale = layer_decay ** (depth + 1 - layer_id(path))

    i.e. the layer scale multiplies the whole step, the decoupled weight decay included. The position table
    (finetune_trainable_labels) is in no group: no update and no optimiser state. `params` is the fine-tune
    model's pure dict ({"encoder": ..., "fc_norm": ..., "head": ...}; only its paths and ranks are read);
    updates must have its structure. `no_decay`: names of leaves (last key) exempt from weight decay on top of
    all arrays of rank <= 1; or a callable params -> bool pytree, True = no weight decay on that leaf.
    `clip_norm` > 0: first clip the global norm of the trained leaves' gradients.
    """
    if callable(no_decay):
        mask = jax.tree.map(lambda exempt: not exempt, no_decay(params))
    else:
        mask = weight_decay_mask(params, exempt=no_decay)
    train = [optax.adamw(learning_rate, b1=b1, b2=b2, eps=1e-8, weight_decay=weight_decay, mask=mask),
             scale_by_tree(layer_decay_scales(params, depth, layer_decay))]
    if clip_norm > 0:
        train.insert(0, optax.clip_by_global_norm(clip_norm))
    return optax.multi_transform({"train": optax.chain(*train), "frozen": optax.set_to_zero()},
                                 finetune_trainable_labels(params))
