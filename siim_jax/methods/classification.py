"""The supervised evaluation methods on a pretrained encoder (SPEC section 5): the linear probe and
fine-tuning. Both train on LabelledBatches (random-resized crop + flip) of the training split and are judged by
the "validation" evaluator (top-1 / top-5 on the validation split, eval crop).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from siim_jax.data.classification import LabelledBatches
from siim_jax.data.finetune_augment import (batch_mesh_axes, mixup_cutmix, random_erasing, smooth_one_hot,
                                            soft_target_cross_entropy)
from siim_jax.data.photometric import normalize
from siim_jax.data.randaugment import rand_augment
from siim_jax.methods.base import Method, path_names
from siim_jax.methods.optimizers import finetune_optimizer, finetune_trainable_labels, lars
from siim_jax.models.classifier import FinetuneClassifier, LinearProbeClassifier
from siim_jax.models.flops import block_flops, patch_embed_flops
from siim_jax.models.variants import VIT_VARIANTS


class ClassificationMethod(Method):
    """An encoder under a classification head, trained on labelled single views."""

    def batch_spec(self, batch_size):
        s = self.config.model.image_size
        return {"images": ((batch_size, s, s, 3), jnp.uint8), "labels": ((batch_size,), jnp.int32),
                "valid": ((batch_size,), jnp.bool_)}

    def synthetic_batch(self, batch_size, rng):
        s = self.config.model.image_size
        return {"images": rng.integers(0, 256, (batch_size, s, s, 3), dtype=np.uint8),
                "labels": rng.integers(0, self.config.classifier.num_classes, (batch_size,), dtype=np.int32),
                "valid": np.ones((batch_size,), bool)}

    def make_batches(self, source, rows, owned):
        c = self.config
        return LabelledBatches(source, c.batch_size, c.model.image_size, c.seed, train=True, rows=rows, owned=owned,
                               num_threads=c.data.threads, augment=self.host_augment(),
                               crop_scale=(c.data.crop_min, 1.0), train_crop=c.classifier.train_crop)

    def host_augment(self):
        """Per-image host augmentation after the crop and flip, or None."""
        return None

    def logits(self, model, images):
        """Evaluation: normalised images (N, S, S, 3) -> logits (N, C)."""
        raise NotImplementedError

    def _encoder_flops(self) -> float:
        mc = self.config.model
        width, depth, _, patch = VIT_VARIANTS[mc.variant]
        patches = (mc.image_size // patch) ** 2
        head = 2 * width * self.config.classifier.num_classes
        return patch_embed_flops(patches, patch, width) + depth * block_flops(1 + patches, width, mc.mlp_ratio) + head


class LinearProbeMethod(ClassificationMethod):
    """Frozen encoder; only the Linear head trains, with LARS (no weight decay, no adaptation on its bias)."""

    name = "linear_probe"

    def create_model(self, seed):
        return LinearProbeClassifier(self.config, rngs=nnx.Rngs(seed))

    def trainable_labels(self, params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "train" if path_names(path)[0] == "head" else "frozen", params)

    def make_optimizer(self, params, learning_rate):
        c = self.config.classifier
        probe = lars(learning_rate, momentum=c.lars_momentum, trust_coefficient=c.trust_coefficient,
                     weight_decay=self.config.optim.weight_decay)
        return optax.multi_transform({"train": probe, "frozen": optax.set_to_zero()}, self.trainable_labels(params))

    def make_loss_fn(self, graphdef):
        def loss_fn(params, ema_params, batch_stats, batch, key):
            model = nnx.merge(graphdef, params, batch_stats)
            logits = model(normalize(batch["images"]), train=True)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
            return loss, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))

        return loss_fn

    def logits(self, model, images):
        return model(images, train=False)

    def forward_flops(self):
        head = 2 * VIT_VARIANTS[self.config.model.variant][0] * self.config.classifier.num_classes
        return {"differentiated": head, "forward_only": self._encoder_flops() - head}


class FinetuneMethod(ClassificationMethod):
    """Everything but the position table trains (official: requires_grad=False): AdamW with layer-wise lr decay,
    drop path, RandAugment (host), random erasing, mixup / cutmix with label smoothing (device, in timm's
    order)."""

    name = "finetune"

    def create_model(self, seed):
        return FinetuneClassifier(self.config, rngs=nnx.Rngs(seed))

    def trainable_labels(self, params):
        return finetune_trainable_labels(params)

    def make_optimizer(self, params, learning_rate):
        o = self.config.optim
        depth = VIT_VARIANTS[self.config.model.variant][1]
        return finetune_optimizer(learning_rate, params, depth, layer_decay=self.config.classifier.layer_decay,
                                  weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, clip_norm=o.clip_norm)

    def host_augment(self):
        c = self.config.classifier
        if c.randaugment_ops <= 0:
            return None
        return functools.partial(rand_augment, num_ops=c.randaugment_ops, magnitude=c.randaugment_magnitude,
                                 magnitude_std=c.randaugment_magnitude_std)

    def make_loss_fn(self, graphdef):
        c, rules = self.config.classifier, self.config.mesh.logical_axis_rules

        def loss_fn(params, ema_params, batch_stats, batch, key):
            mix_key, drop_key = jax.random.split(key)
            model = nnx.merge(graphdef, params, batch_stats)
            erase_key, mix_key = jax.random.split(mix_key)
            images = normalize(batch["images"])
            if c.erase_prob > 0:
                images = random_erasing(erase_key, images, prob=c.erase_prob)
            if c.mixup > 0 or c.cutmix > 0:
                # per device shard of the batch, one draw each (timm's per-GPU mixing): no image crosses devices
                images, targets = mixup_cutmix(mix_key, images, batch["labels"], c.num_classes, mixup_alpha=c.mixup,
                                               cutmix_alpha=c.cutmix, switch_prob=c.mixup_switch_prob,
                                               label_smoothing=c.label_smoothing,
                                               batch_axes=batch_mesh_axes(images.shape[0], rules))
            else:
                targets = smooth_one_hot(batch["labels"], c.num_classes, c.label_smoothing)
            loss = soft_target_cross_entropy(model(images, drop_key), targets)
            return loss, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))

        return loss_fn

    def logits(self, model, images):
        return model(images)

    def forward_flops(self):
        return {"differentiated": self._encoder_flops()}
