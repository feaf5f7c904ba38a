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

    def __init__(self, features: int, *, momentum: float = 0.9, eps: float = 1e-5, affine: bool = True):
        self.momentum, self.eps = momentum, eps
        self.scale = nnx.Param(jnp.ones((features,)), logical_axes=(None,)) if affine else None
        self.bias = nnx.Param(jnp.zeros((features,)), logical_axes=(None,)) if affine else None
        self.mean = nnx.BatchStat(jnp.zeros((features,)), logical_axes=(None,))
        self.var = nnx.BatchStat(jnp.ones((features,)), logical_axes=(None,))

    def __call__(self, x, use_running_average: bool = False):
        x = x.astype(jnp.float32)
        if use_running_average:  # evaluation: the running statistics, nothing updated
            return self._affine((x - self.mean[...]) * jax.lax.rsqrt(self.var[...] + self.eps))
        axes = tuple(range(x.ndim - 1))
        mean = jnp.mean(x, axes)
        var = jnp.mean(jnp.square(x - mean), axes)
        count = x.size // x.shape[-1]
        m = self.momentum
        self.mean[...] = m * self.mean[...] + (1 - m) * jax.lax.stop_gradient(mean)
        unbiased = jax.lax.stop_gradient(var) * count / max(count - 1, 1)
        self.var[...] = m * self.var[...] + (1 - m) * unbiased
        return self._affine((x - mean) * jax.lax.rsqrt(var + self.eps))

    def _affine(self, x):
        return x * self.scale[...] + self.bias[...] if self.scale is not None else x


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


def drop_path(key: jax.Array, x: jax.Array, rate: float, deterministic: bool) -> jax.Array:
    """Stochastic depth on a residual branch x (N, ...): each sample is zeroed with probability `rate` (a static
    float), the kept ones scaled by 1 / (1 - rate); identity when `deterministic` or rate == 0."""
    if deterministic or rate == 0.0:
        return x
    if rate >= 1.0:
        return jnp.zeros_like(x)
    keep_prob = 1.0 - rate
    keep = jax.random.bernoulli(key, keep_prob, (x.shape[0],) + (1,) * (x.ndim - 1))
    return x * (keep.astype(x.dtype) / jnp.asarray(keep_prob, x.dtype))


def drop_path_rates(depth: int, max_rate: float) -> list[float]:
    """Per-block drop-path rates rising linearly from 0 (first block) to `max_rate` (last), as timm's
    linspace(0, max_rate, depth)."""
    if depth == 1:
        return [0.0]
    return [max_rate * i / (depth - 1) for i in range(depth)]


class Block(nnx.Module):
    """Pre-norm transformer block: x += DropPath(Attn(Norm(x))); x += DropPath(MLP(Norm(x))); optional layer
    scale. Drop path (stochastic depth, fine-tuning) only when called with a key."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, *, norm: Literal["ln", "bn"] = "ln",
                 init_values: float = 0.0, drop_path_rate: float = 0.0, remat: str = "none", dtype,
                 rngs: nnx.Rngs):
        self.remat, self.drop_path_rate = remat, drop_path_rate
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

    def __call__(self, x, key=None):  # (N, T, D) float32 -> (N, T, D) float32; key: drop path
        if self.remat == "none":
            return self.forward(x, key)
        return nnx.remat(type(self).forward, policy=REMAT_POLICIES[self.remat])(self, x, key)

    def forward(self, x, key=None):
        keys = (None, None) if key is None else jax.random.split(key)
        x = constrain(x.astype(jnp.float32), TOKENS)
        y = self.attn(self.norm1(x)).astype(jnp.float32)
        y = self._drop_path(keys[0], y * self.ls1[...] if self.ls1 is not None else y)
        x = constrain(x + y, TOKENS)
        y = self.mlp(self.norm2(x)).astype(jnp.float32)
        y = self._drop_path(keys[1], y * self.ls2[...] if self.ls2 is not None else y)
        return constrain(x + y, TOKENS)

    def _drop_path(self, key, y):
        return drop_path(key, y, self.drop_path_rate, deterministic=key is None)


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

    `pos_embed` (1, 1 + grid^2, D) starts as the fixed 2-D sin-cos table and is never trained, in pretraining or
    fine-tuning (the methods' trainable_labels mark it frozen: no update, no optimiser state); it is a parameter
    so that imported weights (e.g. a fine-tuned ViT with a learned table, or one interpolated to another
    resolution) can replace it.
    """

    def __init__(self, *, width: int, depth: int, heads: int, patch: int, image_size: int, mlp_ratio: float = 4.0,
                 init_values: float = 0.0, final_norm: bool = False, drop_path_rate: float = 0.0,
                 remat: str = "none", dtype=jnp.float32, rngs: nnx.Rngs):
        self.grid = image_size // patch
        self.width = width
        self.patch_embed = PatchEmbed(patch, width, dtype=dtype, rngs=rngs)
        self.cls_token = nnx.Param(token_init(rngs.params(), (1, 1, width)), logical_axes=(None, None, "embed"))
        self.pos_embed = nnx.Param(jnp.asarray(sincos_2d(width, self.grid, class_token=True))[None],
                                   logical_axes=(None, None, "embed"))
        self.blocks = nnx.List([Block(width, heads, mlp_ratio, init_values=init_values, drop_path_rate=rate,
                                      remat=remat, dtype=dtype, rngs=rngs)
                                for rate in drop_path_rates(depth, drop_path_rate)])
        self.norm = layer_norm(width, rngs=rngs) if final_norm else None

    def patch_tokens(self, images):
        """images (N, S, S, 3) -> patch tokens with positions (N, grid^2, D)."""
        return self.patch_embed(images) + self.pos_embed[...][:, 1:]

    def __call__(self, tokens, key=None, final_norm: bool = True):
        """tokens (N, T, D) (any subset of patch tokens, positions added) -> (N, 1 + T, D), class token first.
        key: drop path in every block (fine-tuning); final_norm=False skips the final norm, if any."""
        cls = jnp.broadcast_to(self.cls_token[...] + self.pos_embed[...][:, :1], (tokens.shape[0], 1, self.width))
        x = jnp.concatenate([cls, tokens], axis=1)
        for i, block in enumerate(self.blocks):
            x = block(x, None if key is None else jax.random.fold_in(key, i))
        return self.norm(x) if self.norm is not None and final_norm else x

    def features(self, images, key=None):
        """Mean of the patch tokens of full images: (N, S, S, 3) -> (N, D), the linear-probe / fine-tune / k-NN
        feature (timm global_pool='avg')."""
        return jnp.mean(self(self.patch_tokens(images), key)[:, 1:], axis=1)

    def class_token(self, images):
        """The class token of the last block, no norm: (N, S, S, 3) -> (N, D), the few-shot feature (MSN)."""
        return self(self.patch_tokens(images), final_norm=False)[:, 0]
