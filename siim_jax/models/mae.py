"""MAE baseline (He et al.; SPEC section 3, loss_type="mae"): random masking, encoder with final LayerNorm,
LayerNorm decoder, per-patch pixel regression on the masked patches."""

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from siim_jax.models.pos_embed import sincos_2d
from siim_jax.models.variants import VIT_VARIANTS
from siim_jax.models.vit import TOKENS, Block, VisionTransformer, dense, layer_norm, token_init
from siim_jax.parallel.sharding import constrain


def patchify(images, patch: int):
    """(N, S, S, C) -> (N, (S/p)^2, p*p*C), each patch flattened as (row, column, channel)."""
    n, s, _, c = images.shape
    g = s // patch
    x = images.reshape(n, g, patch, g, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, g * g, patch * patch * c)


class MAE(nnx.Module):
    def __init__(self, mc: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        width, depth, heads, patch = VIT_VARIANTS[mc.variant]
        dtype, dd = jnp.dtype(mc.dtype), mc.mae_decoder_width
        self.patch, self.grid, self.decoder_width = patch, mc.image_size // patch, dd
        self.num_visible = int(round(self.grid ** 2 * (1 - mc.mae_mask_ratio)))
        self.norm_pix_loss = mc.norm_pix_loss
        self.encoder = VisionTransformer(width=width, depth=depth, heads=heads, patch=patch,
                                         image_size=mc.image_size, mlp_ratio=mc.mlp_ratio, final_norm=True,
                                         remat=mc.remat, dtype=dtype, rngs=rngs)
        self.decoder_embed = dense(width, dd, ("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.mask_token = nnx.Param(token_init(rngs.params(), (1, 1, dd)), logical_axes=(None, None, "embed"))
        self.decoder_blocks = nnx.List([Block(dd, mc.mae_decoder_heads, mc.mlp_ratio, remat=mc.remat, dtype=dtype,
                                              rngs=rngs) for _ in range(mc.mae_decoder_depth)])
        self.decoder_norm = layer_norm(dd, rngs=rngs)
        self.decoder_pred = dense(dd, patch * patch * 3, ("embed", "mlp"), dtype=dtype, rngs=rngs)

    def reconstruct(self, images, key):
        """Normalised images (N, S, S, 3), per-example random masks from `key` -> (predicted pixels
        (N, L, p*p*3) float32, masked (N, L) bool)."""
        n, num = images.shape[0], self.grid ** 2
        order = jnp.argsort(jax.random.uniform(key, (n, num)), axis=1)  # the first num_visible stay visible
        masked = jnp.argsort(order, axis=1) >= self.num_visible
        # visible positions ascending, then masked ones; `restore` undoes that order. Gathers along the token
        # axis, never scatters, so that every row stays on its device (a scatter gathers the global batch)
        shuffled = jnp.argsort(masked, axis=1, stable=True)
        restore = jnp.argsort(shuffled, axis=1)
        visible = shuffled[:, :self.num_visible]

        tokens = jnp.take_along_axis(self.encoder.patch_tokens(images), visible[..., None], axis=1)
        x = self.decoder_embed(self.encoder(tokens)).astype(jnp.float32)  # (N, 1 + V, Dd)
        # visible tokens back at their positions; masked positions take the mask token
        mask_tokens = jnp.broadcast_to(self.mask_token[...], (n, num - self.num_visible, self.decoder_width))
        full = jnp.take_along_axis(jnp.concatenate([x[:, 1:], mask_tokens], axis=1), restore[..., None], axis=1)
        full = constrain(full, TOKENS)
        dpos = jnp.asarray(sincos_2d(self.decoder_width, self.grid, class_token=True))
        x = jnp.concatenate([x[:, :1], full], axis=1) + dpos
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x)[:, 1:]).astype(jnp.float32), masked

    def __call__(self, images, key):
        """Mean squared error over the masked patches (of normalised pixels if norm_pix_loss): scalar."""
        pred, masked = self.reconstruct(images, key)
        target = patchify(images.astype(jnp.float32), self.patch)
        if self.norm_pix_loss:  # per-patch normalisation, unbiased variance as in the MAE code
            mean = target.mean(-1, keepdims=True)
            var = target.var(-1, keepdims=True, ddof=1)
            target = (target - mean) / jnp.sqrt(var + 1e-6)
        per_patch = jnp.mean(jnp.square(pred - target), axis=-1)
        return jnp.sum(per_patch * masked) / jnp.sum(masked)
