"""The classifiers of the evaluation protocols (SPEC section 5): a ViT encoder, the mean of its patch tokens,
and a head.

Linear probe: frozen encoder -> mean patch token -> fresh LayerNorm without affine parameters (eps 1e-6: timm's
fc_norm, frozen in the official probe) -> BatchNorm without affine (eps 1e-6) -> Linear (weights N(0, 0.01^2)).
Fine-tune: encoder with drop path rising to config.classifier.drop_path -> mean patch token -> fc_norm LayerNorm
(eps 1e-6, trained) -> Linear (weights N(0, (2e-5)^2)).
"""

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from siim_jax.models.variants import VIT_VARIANTS
from siim_jax.models.vit import BatchNorm, VisionTransformer, layer_norm


def _encoder(mc: ml_collections.ConfigDict, drop_path_rate: float, rngs: nnx.Rngs) -> VisionTransformer:
    width, depth, heads, patch = VIT_VARIANTS[mc.variant]
    return VisionTransformer(width=width, depth=depth, heads=heads, patch=patch, image_size=mc.image_size,
                             mlp_ratio=mc.mlp_ratio, drop_path_rate=drop_path_rate, remat=mc.remat,
                             dtype=jnp.dtype(mc.dtype), rngs=rngs)


def _head(width: int, num_classes: int, std: float, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(width, num_classes, param_dtype=jnp.float32, kernel_init=nnx.initializers.normal(std),
                      rngs=rngs, kernel_metadata={"logical_axes": ("embed", None)},
                      bias_metadata={"logical_axes": (None,)})


class LinearProbeClassifier(nnx.Module):
    def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        self.encoder = _encoder(config.model, 0.0, rngs)
        width = self.encoder.width
        self.head_norm = BatchNorm(width, eps=1e-6, affine=False)
        self.head = _head(width, config.classifier.num_classes, 0.01, rngs)

    def __call__(self, images, train: bool):
        """Normalised images (N, S, S, 3) -> logits (N, C) float32; no gradient reaches the encoder."""
        features = jax.lax.stop_gradient(self.encoder.features(images).astype(jnp.float32))
        mean = features.mean(-1, keepdims=True)  # the frozen fresh LayerNorm: weight 1, bias 0
        features = (features - mean) * jax.lax.rsqrt(features.var(-1, keepdims=True) + 1e-6)
        return self.head(self.head_norm(features, use_running_average=not train))


class FinetuneClassifier(nnx.Module):
    def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        self.encoder = _encoder(config.model, config.classifier.drop_path, rngs)
        width = self.encoder.width
        self.fc_norm = layer_norm(width, rngs=rngs)
        self.head = _head(width, config.classifier.num_classes, 2e-5, rngs)

    def __call__(self, images, key=None):
        """Normalised images (N, S, S, 3) -> logits (N, C) float32; `key` turns drop path on (training)."""
        return self.head(self.fc_norm(self.encoder.features(images, key).astype(jnp.float32)))
