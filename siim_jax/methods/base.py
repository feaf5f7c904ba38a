"""What a training method is: one object that the trainer, the train state, the checkpoint, export and the
evaluators ask, instead of branching on the method's name.

A method owns its model, the split of the model's parameters into online (optimised) and EMA-target ones, which
online parameters train or stay frozen, its optimiser, its loss, the batch stream it trains on, and the
per-image encoder feature that evaluators read.
"""

from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx

from siim_jax.config import ConfigError
from siim_jax.models.variants import VIT_VARIANTS

FIXED_POSITION_TABLE = "pos_embed"  # the encoder's position table: a parameter, never trained

# loss_fn(params, ema_params, batch_stats, batch, key) -> (scalar loss, new batch_stats); differentiable in params
LossFn = Callable[[Any, Any, Any, dict, jax.Array], tuple[jax.Array, Any]]


def path_names(path) -> list:
    """A jax key path (or a tuple of plain keys) -> its dict keys / list indices."""
    return [getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path]


def weight_decay_mask(params, exempt=("bias", FIXED_POSITION_TABLE)):
    """True where weight decay applies: arrays that are >= 2-D in PyTorch (weights, class and mask tokens),
    except leaves named in `exempt`. Biases are exempt by name (our qkv bias is (3, heads, head_dim), PyTorch's is
    1-D); the frozen position table too; fine-tuning also exempts the class token."""
    return jax.tree_util.tree_map_with_path(lambda path, p: p.ndim >= 2 and path_names(path)[-1] not in exempt,
                                            params)


class Method:
    """Base of every method; subclasses set `name` and override what differs.

    params: the online parameters (pure dict), everything the optimiser sees; ema_params: the parameters that
    follow them by EMA ({} when the method has no target branch).
    """

    name = ""
    online_encoder_path: tuple = ("encoder",)  # where the online encoder sits in params
    target_encoder_path: tuple = ()  # where the target encoder sits in ema_params (methods with a target)

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self.check_config()

    def check_config(self) -> None:
        """Raises ConfigError for an encoder variant, image size or mask count that this model cannot take
        (the generic checks are config.validate's)."""
        c, m = self.config, self.config.model
        if m.variant not in VIT_VARIANTS:
            raise ConfigError(f"config.model.variant={m.variant!r}: choose one of {sorted(VIT_VARIANTS)}")
        patch = VIT_VARIANTS[m.variant][3]
        if m.image_size % patch:
            raise ConfigError(f"config.model.image_size={m.image_size} is not a multiple of the patch size {patch}")
        num_patches = (m.image_size // patch) ** 2
        if not 0 < c.data.num_masked < num_patches:
            raise ConfigError(f"config.data.num_masked={c.data.num_masked} must lie in (0, {num_patches}) "
                              f"for {m.image_size}px images with {patch}px patches")

    # --- model and parameters -----------------------------------------------------------------------------
    def create_model(self, seed: int) -> nnx.Module:
        raise NotImplementedError

    @property
    def has_target(self) -> bool:
        """Whether an EMA target branch follows part of the online parameters."""
        return False

    def split_params(self, params: dict) -> tuple[dict, dict]:
        """Full model parameters -> (online params, EMA params)."""
        return params, {}

    def merge_params(self, params: dict, ema_params: dict) -> dict:
        """Inverse of split_params: the model's parameters with the target (if any) taking the EMA ones."""
        return params

    def ema_source(self, params: dict) -> dict:
        """The online parameters that the EMA parameters follow (same structure as ema_params)."""
        return {}

    def trainable_labels(self, params: dict) -> dict:
        """'train' or 'frozen' for every online parameter; frozen ones get no update and no optimiser state."""
        return jax.tree.map(lambda _: "train", params)

    def make_optimizer(self, params: dict, learning_rate) -> optax.GradientTransformation:
        raise NotImplementedError

    # --- training ----------------------------------------------------------------------------------------
    def batch_spec(self, batch_size: int) -> dict:
        """{name: (shape, dtype)} of one global train batch of `batch_size` rows."""
        raise NotImplementedError

    def make_batches(self, source, rows: np.ndarray, owned: np.ndarray):
        """The host batch stream of this process: `.iterate(start_step)` yields (batch of the global rows `rows`,
        descriptions of the skipped undecodable examples among the `owned` rows); a pure function of (seed,
        step)."""
        raise NotImplementedError

    def synthetic_batch(self, batch_size: int, rng: np.random.Generator) -> dict:
        """A valid random host train batch {name: array} of batch_spec's shapes (for benchmarks)."""
        raise NotImplementedError

    @property
    def batch_ndims(self) -> dict:
        """{name: ndim} of the train batch's arrays (their shardings split the leading axis)."""
        return {k: len(shape) for k, (shape, _) in self.batch_spec(1).items()}

    def make_loss_fn(self, graphdef) -> LossFn:
        raise NotImplementedError

    # --- what evaluators read ----------------------------------------------------------------------------
    def encoder(self, model: nnx.Module, branch: str = "online"):
        """The VisionTransformer of `branch` ("online" | "target") inside a merged model."""
        if branch != "online":
            raise ValueError(f"the {self.name} method has no {branch!r} encoder: use 'online'")
        for key in self.online_encoder_path:
            model = getattr(model, key)
        return model

    def forward_flops(self) -> dict:
        """Analytic forward FLOPs per image of the model's parts, {"online": ...[, "target": ...]}."""
        raise NotImplementedError


def frozen_patch_embed_labels(params: dict, config: ml_collections.ConfigDict) -> dict:
    """'frozen' for the patch embedding (unless config.model.train_patch_embed) and the position table, 'train'
    for the rest: what the pretraining methods train."""
    def label(path, _):
        names = path_names(path)
        frozen = ("patch_embed" in names and not config.model.train_patch_embed) or names[-1] == FIXED_POSITION_TABLE
        return "frozen" if frozen else "train"
    return jax.tree_util.tree_map_with_path(label, params)


def pretraining_optimizer(config: ml_collections.ConfigDict, labels: dict,
                          learning_rate) -> optax.GradientTransformation:
    """AdamW (betas config.optim.b1/b2, decoupled weight decay on >= 2-D weights), after global-norm clipping
    when config.optim.clip_norm > 0; frozen parameters get no update and no optimiser state."""
    o = config.optim
    trainable = [optax.adamw(learning_rate, b1=o.b1, b2=o.b2, eps=1e-8, weight_decay=o.weight_decay,
                             mask=weight_decay_mask)]
    if o.clip_norm > 0:
        trainable.insert(0, optax.clip_by_global_norm(o.clip_norm))
    return optax.multi_transform({"train": optax.chain(*trainable), "frozen": optax.set_to_zero()}, labels)
