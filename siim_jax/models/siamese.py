"""SiameseIM (SPEC section 2): an online branch that predicts, from the visible patches of view 1 and where view
2's patches lie in view 1, the target branch's dense representation of view 2.

`SiameseIM.online` and `SiameseIM.target` are two `SiameseBranch` modules of identical structure; the train state
keeps the target's parameters as the EMA parameters and everything else as the online parameters.
"""

import jax.numpy as jnp
import ml_collections
from flax import nnx

from siim_jax.models.pos_embed import relative_position_embedding, sincos_2d
from siim_jax.models.variants import VIT_VARIANTS
from siim_jax.models.vit import TOKENS, Block, VisionTransformer, dense, token_init
from siim_jax.parallel.sharding import constrain


def compute_dtype(model_config: ml_collections.ConfigDict):
    return jnp.dtype(model_config.dtype)


class SiameseBranch(nnx.Module):
    """The part that has an EMA twin: encoder, decoder_embed, mask_token, projector blocks."""

    def __init__(self, mc: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        width, depth, heads, patch = VIT_VARIANTS[mc.variant]
        dtype, dd = compute_dtype(mc), mc.decoder_width
        self.encoder = VisionTransformer(width=width, depth=depth, heads=heads, patch=patch,
                                         image_size=mc.image_size, mlp_ratio=mc.mlp_ratio,
                                         init_values=mc.init_values, remat=mc.remat, dtype=dtype, rngs=rngs)
        self.decoder_embed = dense(width, dd, ("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.mask_token = nnx.Param(token_init(rngs.params(), (1, 1, dd)), logical_axes=(None, None, "embed"))
        norm = "ln" if mc.use_proj_ln else "bn"
        self.projector_decoder_blocks = nnx.List(
            [Block(dd, mc.decoder_heads, mc.mlp_ratio, norm=norm, remat=mc.remat, dtype=dtype, rngs=rngs)
             for _ in range(mc.projector_depth)])

    def project(self, tokens):
        """Encoder + decoder_embed + projector: tokens (N, T, D) -> (N, 1 + T, Dd) float32."""
        x = self.decoder_embed(self.encoder(tokens)).astype(jnp.float32)
        for block in self.projector_decoder_blocks:
            x = block(x)
        return x


class SiameseIM(nnx.Module):
    def __init__(self, mc: ml_collections.ConfigDict, num_masked: int, *, rngs: nnx.Rngs):
        dtype, dd = compute_dtype(mc), mc.decoder_width
        self.grid = mc.image_size // VIT_VARIANTS[mc.variant][3]
        self.num_visible = self.grid ** 2 - num_masked
        self.decoder_width = dd
        self.online = SiameseBranch(mc, rngs=rngs)
        self.target = SiameseBranch(mc, rngs=rngs)  # overwritten by a copy of `online` in the train state
        self.decoder_pos_mlp = dense(2 * dd, dd, ("mlp", "embed"), dtype=dtype, rngs=rngs)
        norm = "ln" if mc.use_pred_ln else "bn"
        self.predictor_decoder_blocks = nnx.List(
            [Block(dd, mc.decoder_heads, mc.mlp_ratio, norm=norm, remat=mc.remat, dtype=dtype, rngs=rngs)
             for _ in range(mc.predictor_depth)])
        self.decoder_pred = dense(dd, dd, ("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.online_ln = mc.online_ln

    def predict(self, view1, mask, geometry):
        """Online branch. view1 (N, S, S, 3) normalised; mask (N, g*g) bool, True = masked (exactly
        g*g - num_visible per row); geometry (N, 6). Returns predictions for view 2's patches (N, g*g, Dd) f32."""
        n = view1.shape[0]
        tokens = self.online.encoder.patch_tokens(view1)
        visible = jnp.argsort(mask, axis=1, stable=True)[:, :self.num_visible]  # raster order kept
        tokens = jnp.take_along_axis(tokens, visible[..., None], axis=1)
        x = self.online.project(tokens)  # (N, 1 + V, Dd)

        dpos = jnp.asarray(sincos_2d(self.decoder_width, self.grid, class_token=True))
        cls = x[:, :1] + dpos[0]
        vis = x[:, 1:] + dpos[1:][visible]
        # pinned to the batch sharding: left free, XLA gathers these (N, g*g, 2*Dd) activations over the whole
        # global batch (bytes growing with it)
        rel = constrain(relative_position_embedding(geometry, self.decoder_width, self.grid), TOKENS)
        queries = constrain(self.online.mask_token[...] + self.decoder_pos_mlp(rel).astype(jnp.float32), TOKENS)
        x = jnp.concatenate([cls, vis, queries], axis=1)
        for block in self.predictor_decoder_blocks:
            x = block(x)
        pred = constrain(self.decoder_pred(x[:, -self.grid ** 2:]).astype(jnp.float32), TOKENS)
        if self.online_ln:
            mean = pred.mean(-1, keepdims=True)
            pred = (pred - mean) * jnp.reciprocal(jnp.sqrt(pred.var(-1, keepdims=True) + 1e-5))
        assert pred.shape == (n, self.grid ** 2, self.decoder_width)
        return constrain(pred, TOKENS)

    def target_tokens(self, view2):
        """Target branch on the full view 2: (N, S, S, 3) -> (N, g*g, Dd) float32 (class token dropped)."""
        return constrain(self.target.project(self.target.encoder.patch_tokens(view2))[:, 1:], TOKENS)
