"""The two pretraining methods: SiameseIM (SPEC sections 2-4) and the MAE baseline (SPEC section 3).

Both train on TwoViewBatches (MAE reads view 1 only), freeze the patch embedding and position table, and
optimise with AdamW after global-norm clipping.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from siim_jax.data.photometric import augment_view1, augment_view2, normalize
from siim_jax.data.pipeline import TwoViewBatches
from siim_jax.losses import unigrad_loss
from siim_jax.methods.base import Method, frozen_patch_embed_labels, pretraining_optimizer
from siim_jax.models.flops import block_flops, patch_embed_flops
from siim_jax.models.mae import MAE
from siim_jax.models.siamese import SiameseIM
from siim_jax.models.variants import VIT_VARIANTS

class PretrainingMethod(Method):
    def batch_spec(self, batch_size):
        """TwoViewBatches (siim_jax/data/pipeline.py): uint8 crops, view 2's geometry in view 1, view 1's mask."""
        s = self.config.model.image_size
        cells = (s // VIT_VARIANTS[self.config.model.variant][3]) ** 2
        return {"view1": ((batch_size, s, s, 3), jnp.uint8), "view2": ((batch_size, s, s, 3), jnp.uint8),
                "geometry": ((batch_size, 6), jnp.float32), "mask": ((batch_size, cells), jnp.bool_)}

    def make_batches(self, source, rows, owned):
        c = self.config
        patch = VIT_VARIANTS[c.model.variant][3]
        return TwoViewBatches(source, c.batch_size, c.model.image_size, patch, c.data.num_masked, c.data.crop_min,
                              c.seed, rows=rows, owned=owned, num_threads=c.data.threads)

    def synthetic_batch(self, batch_size, rng):
        """Random views, two equal crops (geometry [di, dj, dh, dw, rflip, dj_flip] = identity), exact masks."""
        arrays = {}
        for name, (shape, dtype) in self.batch_spec(batch_size).items():
            if name == "geometry":
                arrays[name] = np.tile(np.array([0, 0, 1, 1, 0, 1], np.float32), (shape[0], 1))
            elif name == "mask":
                arrays[name] = np.argsort(rng.random(shape), axis=1) < self.config.data.num_masked
            else:
                arrays[name] = rng.integers(0, 256, shape, dtype=np.uint8)
        return arrays

    def trainable_labels(self, params):
        return frozen_patch_embed_labels(params, self.config)

    def make_optimizer(self, params, learning_rate):
        return pretraining_optimizer(self.config, self.trainable_labels(params), learning_rate)


class SiameseMethod(PretrainingMethod):
    """SiameseIM: the online branch predicts the EMA target branch's dense representation of view 2."""

    name = "siamese"
    online_encoder_path = ("online", "encoder")
    target_encoder_path = ("encoder",)  # in ema_params, which mirror params["online"]

    @property
    def decoder_width(self):
        return self.config.model.decoder_width

    def create_model(self, seed):
        return SiameseIM(self.config.model, self.config.data.num_masked, rngs=nnx.Rngs(seed))

    @property
    def has_target(self):
        return True

    def split_params(self, params):
        params = dict(params)
        params.pop("target")
        return params, params["online"]

    def merge_params(self, params, ema_params):
        return {**params, "target": ema_params}

    def ema_source(self, params):
        return params["online"]

    def encoder(self, model, branch="online"):
        if branch not in ("online", "target"):
            raise ValueError(f"unknown branch {branch!r}: choose 'online' or 'target'")
        return getattr(model, branch).encoder

    def make_augmented_loss_fn(self, graphdef):
        """(params, ema_params, batch_stats, inputs) -> (loss, new batch_stats), with no randomness: the views
        are already augmented. inputs: view1, view2 (N, S, S, 3) float32, normalised; mask (N, g*g) bool,
        True = masked; geometry (N, 6). The target uses `ema_params` as given (the EMA update is the step's)."""
        neg_weight = self.config.loss.neg_weight

        def loss_fn(params, ema_params, batch_stats, inputs):
            model = nnx.merge(graphdef, self.merge_params(params, ema_params), batch_stats)
            pred = model.predict(inputs["view1"], inputs["mask"], inputs["geometry"])
            target = model.target_tokens(inputs["view2"])
            loss = unigrad_loss(pred.reshape(-1, pred.shape[-1]), target.reshape(-1, target.shape[-1]), neg_weight)
            return loss, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))

        return loss_fn

    def make_loss_fn(self, graphdef):
        """Device-side photometric augmentation of the uint8 crops (from `key`), then the SiameseIM loss."""
        augmented_loss = self.make_augmented_loss_fn(graphdef)

        def loss_fn(params, ema_params, batch_stats, batch, key):
            key1, key2 = jax.random.split(key)
            inputs = {**batch, "view1": augment_view1(key1, batch["view1"]),
                      "view2": augment_view2(key2, batch["view2"])}
            return augmented_loss(params, ema_params, batch_stats, inputs)

        return loss_fn

    def forward_flops(self):
        """The online branch is differentiated; the target branch (full view 2) runs forward only. The patch
        embedding runs on every patch of view 1 (the visible ones are picked after it), as the model does."""
        mc = self.config.model
        width, depth, _, patch = VIT_VARIANTS[mc.variant]
        patches, r, dd = (mc.image_size // patch) ** 2, mc.mlp_ratio, mc.decoder_width
        visible = patches - self.config.data.num_masked

        def branch(tokens):  # encoder + decoder_embed + projector blocks on `tokens` patch tokens
            return (depth * block_flops(1 + tokens, width, r) + 2 * (1 + tokens) * width * dd
                    + mc.projector_depth * block_flops(1 + tokens, dd, r))

        online = (patch_embed_flops(patches, patch, width) + branch(visible)
                  + 2 * patches * 2 * dd * dd  # decoder_pos_mlp on the relative position of every query
                  + mc.predictor_depth * block_flops(1 + visible + patches, dd, r)
                  + 2 * patches * dd * dd)  # decoder_pred
        return {"differentiated": online, "forward_only": patch_embed_flops(patches, patch, width) + branch(patches)}


class MAEMethod(PretrainingMethod):
    """MAE baseline: random masking drawn on device, pixel reconstruction loss; no target branch."""

    name = "mae"

    @property
    def decoder_width(self):
        return self.config.model.mae_decoder_width

    def create_model(self, seed):
        return MAE(self.config.model, rngs=nnx.Rngs(seed))

    def make_loss_fn(self, graphdef):
        """Crops and flips only (no colour augmentation); the masks come from `key`."""
        def loss_fn(params, ema_params, batch_stats, batch, key):
            model = nnx.merge(graphdef, params, batch_stats)
            loss = model(normalize(batch["view1"]), jax.random.split(key)[0])
            return loss, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))

        return loss_fn

    def forward_flops(self):
        mc = self.config.model
        width, depth, _, patch = VIT_VARIANTS[mc.variant]
        patches, r, dd = (mc.image_size // patch) ** 2, mc.mlp_ratio, mc.mae_decoder_width
        visible = int(round(patches * (1 - mc.mae_mask_ratio)))
        online = (patch_embed_flops(patches, patch, width) + depth * block_flops(1 + visible, width, r)
                  + 2 * (1 + visible) * width * dd + mc.mae_decoder_depth * block_flops(1 + patches, dd, r)
                  + 2 * patches * dd * patch * patch * 3)
        return {"differentiated": online}
