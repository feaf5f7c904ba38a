"""Analytic forward FLOPs of the encoder's parts (matrix products only, 2 FLOPs per multiply-add); the methods
add them up per image (Method.forward_flops), siim_jax/perf/flops.py turns that into a train step's."""


def block_flops(tokens: int, width: int, mlp_ratio: float) -> float:
    """Forward FLOPs of one pre-norm transformer block on `tokens` tokens: qkv, attention scores and values,
    output projection, the two MLP layers."""
    hidden = int(width * mlp_ratio)
    matmuls = 2 * tokens * width * (3 * width + width) + 2 * 2 * tokens * width * hidden
    attention = 2 * 2 * tokens * tokens * width
    return matmuls + attention


def patch_embed_flops(patches: int, patch: int, width: int) -> float:
    """Forward FLOPs of the patch embedding: `patches` patches of patch x patch x 3 pixels -> width."""
    return 2 * patches * 3 * patch * patch * width
