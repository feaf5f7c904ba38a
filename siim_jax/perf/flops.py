"""Analytic FLOPs of one training image (matrix products only, 2 FLOPs per multiply-add), the MFU numerator.

A train step costs 3x the forward FLOPs of every part that is differentiated (forward + backward for inputs and
weights) and 1x for the target branch, which is run without gradients. Norms, softmax, the loss and the
optimiser are left out (< 1%), as MFU conventionally does. ViT-B/16 SiameseIM at 224 px: 141.5 GFLOP/image;
L/16: 334; H/14: 816 (XLA's own count of the compiled step: 143, 337, 823).
"""

import ml_collections



def block_flops(tokens: int, width: int, mlp_ratio: float) -> float:
    """Forward FLOPs of one pre-norm transformer block on `tokens` tokens: qkv, attention scores and values,
    output projection, the two MLP layers."""
    hidden = int(width * mlp_ratio)
    matmuls = 2 * tokens * width * (3 * width + width) + 2 * 2 * tokens * width * hidden
    attention = 2 * 2 * tokens * tokens * width
    return matmuls + attention


def patch_embed_flops(patches: int, patch: int, width: int) -> float:
    return 2 * patches * 3 * patch * patch * width


def train_flops_per_image(config: ml_collections.ConfigDict) -> float:
    """Analytic FLOPs of one image of a train step: 3 x the forward of the differentiated parts (forward,
    backward for inputs and weights) + 1 x the forward-only parts (a target branch, a frozen encoder)."""
    from siim_jax.methods import get_method  # the methods build on block_flops
    parts = get_method(config).forward_flops()
    return 3 * parts["differentiated"] + parts.get("forward_only", 0.0)
