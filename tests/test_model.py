"""Model pieces against NumPy references, and the online branch's use of masks."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from siim_jax.models.siamese import SiameseIM
from siim_jax.models.vit import Attention, BatchNorm, Mlp, PatchEmbed, VisionTransformer

erf = np.vectorize(math.erf)


def test_mlp_uses_exact_gelu():
    mlp = Mlp(4, 8, dtype=jnp.float32, rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32) * 3
    w1, b1 = np.asarray(mlp.fc1.kernel[...]), np.asarray(mlp.fc1.bias[...])
    w2, b2 = np.asarray(mlp.fc2.kernel[...]), np.asarray(mlp.fc2.bias[...])
    h = x @ w1 + b1
    expected = (0.5 * h * (1 + erf(h / math.sqrt(2)))) @ w2 + b2
    np.testing.assert_allclose(np.asarray(mlp(jnp.asarray(x))), expected, rtol=1e-5, atol=1e-6)


def test_attention_matches_numpy_with_fused_qkv_layout():
    d, heads = 8, 2
    attn = Attention(d, heads, dtype=jnp.float32, rngs=nnx.Rngs(1))
    x = np.random.default_rng(1).normal(size=(2, 5, d)).astype(np.float32)
    wqkv = np.asarray(attn.qkv.kernel[...]).reshape(d, 3 * d)  # PyTorch's (3D, D) weight, transposed
    bqkv = np.asarray(attn.qkv.bias[...]).reshape(3 * d)
    qkv = x @ wqkv + bqkv  # (N, T, 3D): q | k | v, each with heads contiguous
    hd = d // heads
    out = np.zeros_like(x)
    for h in range(heads):
        q = qkv[..., h * hd:(h + 1) * hd]
        k = qkv[..., d + h * hd:d + (h + 1) * hd]
        v = qkv[..., 2 * d + h * hd:2 * d + (h + 1) * hd]
        logits = q @ np.swapaxes(k, 1, 2) / math.sqrt(hd)
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        out[..., h * hd:(h + 1) * hd] = weights @ v
    expected = out @ np.asarray(attn.proj.kernel[...]).reshape(d, d) + np.asarray(attn.proj.bias[...])
    np.testing.assert_allclose(np.asarray(attn(jnp.asarray(x))), expected, rtol=1e-5, atol=1e-5)


def test_batchnorm_uses_all_positions_and_pytorch_running_stats():
    bn = BatchNorm(3)
    x = np.random.default_rng(2).normal(size=(4, 6, 3)).astype(np.float32) * 2 + 1
    y = np.asarray(bn(jnp.asarray(x)))
    flat = x.reshape(-1, 3).astype(np.float64)
    expected = (x - flat.mean(0)) / np.sqrt(flat.var(0) + 1e-5)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(bn.mean[...]), 0.1 * flat.mean(0), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(bn.var[...]), 0.9 + 0.1 * flat.var(0, ddof=1), rtol=1e-5)


def test_patch_embed_xavier_bound_on_flattened_kernel():
    pe = PatchEmbed(4, 32, dtype=jnp.float32, rngs=nnx.Rngs(3))
    kernel = np.asarray(pe.proj.kernel[...])  # (p, p, 3, D)
    bound = math.sqrt(6 / (3 * 16 + 32))
    assert np.abs(kernel).max() <= bound
    assert np.abs(kernel).max() > 0.9 * bound
    # Patches are raster-ordered: a bright pixel in patch (row 1, col 0) moves only token 2 (grid 2).
    image = np.zeros((1, 8, 8, 3), np.float32)
    base = np.asarray(pe(jnp.asarray(image)))
    image[0, 5, 1] = 1.0
    changed = np.abs(np.asarray(pe(jnp.asarray(image))) - base).sum(-1)[0]
    assert np.flatnonzero(changed).tolist() == [2]


@pytest.fixture(scope="module")
def siamese(request):
    from conftest import tiny_config
    return SiameseIM(tiny_config().model, 10, rngs=nnx.Rngs(0))


def test_online_branch_sees_visible_patches_only(siamese):
    rng = np.random.default_rng(4)
    view1 = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
    mask = np.zeros((2, 16), bool)
    mask[:, rng.permutation(16)[:10]] = True
    geometry = np.array([[0.1, 0.0, 0.8, 0.9, 0.0, 1.1]] * 2, np.float32)
    pred = np.asarray(siamese.predict(jnp.asarray(view1), jnp.asarray(mask), jnp.asarray(geometry)))
    assert pred.shape == (2, 16, 32)
    masked_patch, visible_patch = np.flatnonzero(mask[0])[0], np.flatnonzero(~mask[0])[0]

    def perturb(patch):
        v = view1.copy()
        r, c = divmod(patch, 4)
        v[0, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] += 5.0
        return np.asarray(siamese.predict(jnp.asarray(v), jnp.asarray(mask), jnp.asarray(geometry)))

    # BatchNorm couples examples, so compare example 0 only through the whole output.
    assert np.allclose(perturb(masked_patch), pred, atol=1e-5)
    assert not np.allclose(perturb(visible_patch), pred, atol=1e-3)
    moved = geometry.copy()
    moved[:, 0] += 0.3
    other = np.asarray(siamese.predict(jnp.asarray(view1), jnp.asarray(mask), jnp.asarray(moved)))
    assert not np.allclose(other, pred, atol=1e-3)  # the queries depend on where view 2 lies


def test_target_branch_shape(siamese):
    out = siamese.target_tokens(jnp.zeros((2, 32, 32, 3)) + jnp.arange(3.0))
    assert out.shape == (2, 16, 32) and out.dtype == jnp.float32


def test_bf16_compute_keeps_float32_parameters_and_residual_stream():
    from siim_jax.models.vit import Block
    block = Block(16, 2, 4.0, dtype=jnp.bfloat16, rngs=nnx.Rngs(5))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(block, nnx.Param)))
    x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 5, 16)), jnp.float32)
    out = block(x)
    assert out.dtype == jnp.float32
    _, state = nnx.split(block)
    reference = nnx.merge(*nnx.split(Block(16, 2, 4.0, dtype=jnp.float32, rngs=nnx.Rngs(5))))
    nnx.update(reference, state)
    full = np.asarray(reference(x))
    error = np.abs(np.asarray(out) - full).max()
    assert 0 < error < 0.1  # bf16 matmuls: close to, but not bit-equal with, float32


def test_layer_scale_multiplies_each_residual_branch():
    from siim_jax.models.vit import Block
    block = Block(8, 2, 4.0, init_values=0.1, dtype=jnp.float32, rngs=nnx.Rngs(6))
    x = jnp.asarray(np.random.default_rng(6).normal(size=(2, 3, 8)), jnp.float32)
    h = x + 0.1 * block.attn(block.norm1(x))
    expected = h + 0.1 * block.mlp(block.norm2(h))
    np.testing.assert_allclose(np.asarray(block(x)), np.asarray(expected), rtol=1e-6, atol=1e-6)
    assert np.asarray(block.ls1[...]).shape == (8,)


SHAPE = re.compile(r"\b(f32|bf16|f16|s32|u32|bool)\[([0-9,]*)\]")  # a residual in print_saved_residuals' lines
BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "bool": 1}


def saved_residual_bytes(remat: str) -> int:
    """Bytes the backward pass of a 4-block ViT keeps from its forward pass (jax.ad_checkpoint's own listing),
    under config.model.remat = `remat`."""
    import contextlib
    import io

    from jax.ad_checkpoint import print_saved_residuals
    model = VisionTransformer(width=64, depth=4, heads=4, patch=8, image_size=64, remat=remat, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tokens = jnp.ones((8, 64, 64), jnp.float32)

    def loss(params, tokens):
        return jnp.sum(nnx.merge(graphdef, params)(tokens) ** 2)

    listing = io.StringIO()
    with contextlib.redirect_stdout(listing):
        print_saved_residuals(loss, params, tokens)
    total = 0
    for line in listing.getvalue().splitlines():
        if "from the argument" in line:  # the parameters and the input: kept whatever the policy
            continue
        for dtype, dims in SHAPE.findall(line):
            total += BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def test_remat_policies_keep_less_for_the_backward_pass():
    """What each config.model.remat keeps between the passes, from JAX's listing of the saved residuals (the
    compiled memory on a TPU is `python -m siim_jax.aot --config.model.remat=...`'s figure): full keeps each
    block's input only, dots the weight matmuls' outputs too, none everything (attention scores, GELU inputs).
    Measured: none 19.5 MB, dots 4.9 MB, full 0.67 MB. On a v5e:2x2 compile of the demo model at batch 256,
    the temporaries were 58.0 MB (none) vs 39.2 MB (full)."""
    kept = {remat: saved_residual_bytes(remat) for remat in ("none", "dots", "full")}
    tokens_bytes = 8 * 65 * 64 * 4  # one block input: (N, 1 + T, D) float32
    # full: the 4 blocks' inputs, and the encoder's output that the squared loss differentiates
    assert kept["full"] == (4 + 1) * tokens_bytes, kept
    assert kept["full"] < kept["dots"] < kept["none"], kept
