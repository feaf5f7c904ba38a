"""Vision Transformer pieces shared by the encoder, the SiameseIM projector/predictor and the MAE decoder.

Every parameter carries logical axis names (`logical_axes` metadata) that siim_jax.parallel maps to mesh axes.
Parameters are float32; matrix products run in the compute dtype; norms, softmax and residuals stay float32.
"""

from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from siim_jax.models.pos_embed import sincos_2d
from siim_jax.parallel.sharding import constrain

TOKENS = ("batch", None, None)  # logical axes of (N, T, D) activations

# config.model.remat -> what a block's backward pass keeps from its forward pass (the rest is recomputed):
# "none" keeps everything; "dots" keeps the weight matmuls' outputs (recomputes attention scores, norms, GELU);
# "full" keeps only the block's input
REMAT_POLICIES = {"none": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                  "full": jax.checkpoint_policies.nothing_saveable}

xavier_uniform = nnx.initializers.xavier_uniform()
token_init = nnx.initializers.normal(stddev=0.02)


def dense(in_features: int, out_features: int, axes: tuple, *, dtype, rngs: nnx.Rngs) -> nnx.Linear:
    """Linear with xavier-uniform weights, zero bias and logical axes `axes` = (in, out)."""
    return nnx.Linear(in_features, out_features, dtype=dtype, param_dtype=jnp.float32,
                      kernel_init=xavier_uniform, rngs=rngs,
                      kernel_metadata={"logical_axes": axes}, bias_metadata={"logical_axes": axes[1:]})


def layer_norm(features: int, eps: float = 1e-6, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(features, epsilon=eps, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs,
                         scale_metadata={"logical_axes": (None,)}, bias_metadata={"logical_axes": (None,)})


class BatchNorm(nnx.Module):
    """BatchNorm over every position of the (global) batch: x (..., C) -> (..., C) float32.

    Training-mode statistics (what SiameseIM pretraining uses in both branches), computed in float32 over all
    leading axes; under a sharded jit the mean is over the global batch, like PyTorch SyncBatchNorm. Running
    statistics follow PyTorch (unbiased variance, PyTorch momentum 0.1 = `momentum` 0.9 here) so that they
    export faithfully; pretraining never reads them.
    """

    def __init__(self, features: int, *, momentum: float = 0.9, eps: float = 1e-5):
        self.momentum, self.eps = momentum, eps
        self.scale = nnx.Param(jnp.ones((features,)), logical_axes=(None,))
        self.bias = nnx.Param(jnp.zeros((features,)), logical_axes=(None,))
        self.mean = nnx.BatchStat(jnp.zeros((features,)), logical_axes=(None,))
        self.var = nnx.BatchStat(jnp.ones((features,)), logical_axes=(None,))

    def __call__(self, x):
        x = x.astype(jnp.float32)
        axes = tuple(range(x.ndim - 1))
        mean = jnp.mean(x, axes)
        var = jnp.mean(jnp.square(x - mean), axes)
        count = x.size // x.shape[-1]
        m = self.momentum
        self.mean[...] = m * self.mean[...] + (1 - m) * jax.lax.stop_gradient(mean)
        unbiased = jax.lax.stop_gradient(var) * count / max(count - 1, 1)
        self.var[...] = m * self.var[...] + (1 - m) * unbiased
        return (x - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]


class Attention(nnx.Module):
    """Multi-head self-attention with one fused qkv projection.

    qkv kernel (D, 3, heads, head_dim): as a (D, 3D) matrix it is PyTorch's fused qkv weight transposed (q, k, v
    stacked, heads contiguous in each). Keeping heads as their own axis lets `heads` shard cleanly.
    """

    def __init__(self, width: int, heads: int, *, dtype, rngs: nnx.Rngs):
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        hd = width // heads
        fan = lambda i, o: nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=i, out_axis=o)
        self.qkv = nnx.Einsum("ntd,dshk->ntshk", (width, 3, heads, hd), (3, heads, hd), dtype=dtype,
                              kernel_init=fan(0, (1, 2, 3)), rngs=rngs,
                              kernel_metadata={"logical_axes": ("embed", None, "heads", None)},
                              bias_metadata={"logical_axes": (None, "heads", None)})
        self.proj = nnx.Einsum("nthk,hkd->ntd", (heads, hd, width), (width,), dtype=dtype,
                               kernel_init=fan((0, 1), 2), rngs=rngs,
                               kernel_metadata={"logical_axes": ("heads", None, "embed")},
                               bias_metadata={"logical_axes": ("embed",)})

    def __call__(self, x):  # (N, T, D) -> (N, T, D)
        qkv = self.qkv(x)  # (N, T, 3, heads, head_dim)
        out = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
        return self.proj(out)


class Mlp(nnx.Module):
    def __init__(self, width: int, hidden: int, *, dtype, rngs: nnx.Rngs):
        self.fc1 = dense(width, hidden, ("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.fc2 = dense(hidden, width, ("mlp", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))  # exact (erf) GELU


class Block(nnx.Module):
    """Pre-norm transformer block: x += Attn(Norm(x)); x += MLP(Norm(x)); optional layer scale."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, *, norm: Literal["ln", "bn"] = "ln",
                 init_values: float = 0.0, remat: str = "none", dtype, rngs: nnx.Rngs):
        self.remat = remat
        make_norm = (lambda: layer_norm(width, rngs=rngs)) if norm == "ln" else (lambda: BatchNorm(width))
        self.norm1 = make_norm()
        self.attn = Attention(width, heads, dtype=dtype, rngs=rngs)
        self.norm2 = make_norm()
        self.mlp = Mlp(width, int(width * mlp_ratio), dtype=dtype, rngs=rngs)
        if init_values > 0:
            self.ls1 = nnx.Param(jnp.full((width,), init_values), logical_axes=(None,))
            self.ls2 = nnx.Param(jnp.full((width,), init_values), logical_axes=(None,))
        else:
            self.ls1 = self.ls2 = None

    def __call__(self, x):  # (N, T, D) float32 -> (N, T, D) float32
        if self.remat == "none":
            return self.forward(x)
        return nnx.remat(type(self).forward, policy=REMAT_POLICIES[self.remat])(self, x)

    def forward(self, x):
        x = constrain(x.astype(jnp.float32), TOKENS)
        y = self.attn(self.norm1(x)).astype(jnp.float32)
        x = constrain(x + (y * self.ls1[...] if self.ls1 is not None else y), TOKENS)
        y = self.mlp(self.norm2(x)).astype(jnp.float32)
        return constrain(x + (y * self.ls2[...] if self.ls2 is not None else y), TOKENS)


class PatchEmbed(nnx.Module):
    """p x p convolution with stride p: images (N, S, S, 3) -> tokens (N, (S/p)^2, D) in raster order."""

    def __init__(self, patch: int, width: int, *, dtype, rngs: nnx.Rngs):
        # xavier-uniform on the flattened (D, 3*p*p) view of the kernel, as the official code does.
        init = nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=3)
        self.proj = nnx.Conv(3, width, (patch, patch), strides=(patch, patch), padding="VALID", dtype=dtype,
                             param_dtype=jnp.float32, kernel_init=init, rngs=rngs,
                             kernel_metadata={"logical_axes": (None, None, None, "embed")},
                             bias_metadata={"logical_axes": ("embed",)})

    def __call__(self, images):
        x = self.proj(images)
        return x.reshape(x.shape[0], -1, x.shape[-1]).astype(jnp.float32)


class VisionTransformer(nnx.Module):
    """ViT encoder with a frozen position table (zero class row) and a learnable class token.

    `pos_embed` (1, 1 + grid^2, D) starts as the fixed 2-D sin-cos table and is never trained (train/state.py
    labels it frozen); it is a parameter so that imported weights (e.g. a fine-tuned ViT with a learned table,
    or one interpolated to another resolution) can replace it.
    """

    def __init__(self, *, width: int, depth: int, heads: int, patch: int, image_size: int, mlp_ratio: float = 4.0,
                 init_values: float = 0.0, final_norm: bool = False, remat: str = "none", dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.grid = image_size // patch
        self.width = width
        self.patch_embed = PatchEmbed(patch, width, dtype=dtype, rngs=rngs)
        self.cls_token = nnx.Param(token_init(rngs.params(), (1, 1, width)), logical_axes=(None, None, "embed"))
        self.pos_embed = nnx.Param(jnp.asarray(sincos_2d(width, self.grid, class_token=True))[None],
                                   logical_axes=(None, None, "embed"))
        self.blocks = nnx.List([Block(width, heads, mlp_ratio, init_values=init_values, remat=remat, dtype=dtype,
                                      rngs=rngs) for _ in range(depth)])
        self.norm = layer_norm(width, rngs=rngs) if final_norm else None

    def patch_tokens(self, images):
        """images (N, S, S, 3) -> patch tokens with positions (N, grid^2, D)."""
        return self.patch_embed(images) + self.pos_embed[...][:, 1:]

    def __call__(self, tokens):
        """tokens (N, T, D) (any subset of patch tokens, positions added) -> (N, 1 + T, D), class token first."""
        cls = jnp.broadcast_to(self.cls_token[...] + self.pos_embed[...][:, :1], (tokens.shape[0], 1, self.width))
        x = jnp.concatenate([cls, tokens], axis=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x) if self.norm is not None else x

    def features(self, images):
        """Mean of the patch tokens of full images: (N, S, S, 3) -> (N, D), the linear-probe / k-NN feature."""
        return jnp.mean(self(self.patch_tokens(images))[:, 1:], axis=1)
