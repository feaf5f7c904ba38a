"""Analytic FLOPs of one training image (matrix products only, 2 FLOPs per multiply-add), the MFU numerator.

A train step costs 3x the forward FLOPs of every part that is differentiated (forward + backward for inputs and
weights) and 1x for the target branch, which is run without gradients. Norms, softmax, the loss and the
optimiser are left out (< 1%), as MFU conventionally does. ViT-B/16 SiameseIM at 224 px: 141.5 GFLOP/image;
L/16: 334; H/14: 816 (XLA's own count of the compiled step: 143, 337, 823).
"""

import ml_collections

from siim_jax.config import VIT_VARIANTS


def block_flops(tokens: int, width: int, mlp_ratio: float) -> float:
    """Forward FLOPs of one pre-norm transformer block on `tokens` tokens: qkv, attention scores and values,
    output projection, the two MLP layers."""
    hidden = int(width * mlp_ratio)
    matmuls = 2 * tokens * width * (3 * width + width) + 2 * 2 * tokens * width * hidden
    attention = 2 * 2 * tokens * tokens * width
    return matmuls + attention


def _patch_embed_flops(patches: int, patch: int, width: int) -> float:
    return 2 * patches * 3 * patch * patch * width


def forward_flops(mc: ml_collections.ConfigDict, num_masked: int) -> dict:
    """Forward FLOPs per image of the parts of the model: {"online": ..., "target": ...} (SiameseIM) or
    {"online": ...} (MAE). The patch embedding runs on every patch of view 1 (the visible ones are picked
    after it), as the model code does."""
    width, depth, _, patch = VIT_VARIANTS[mc.variant]
    patches = (mc.image_size // patch) ** 2
    r = mc.mlp_ratio
    if mc.loss_type == "mae":
        visible = int(round(patches * (1 - mc.mae_mask_ratio)))
        dd = mc.mae_decoder_width
        online = (_patch_embed_flops(patches, patch, width) + depth * block_flops(1 + visible, width, r)
                  + 2 * (1 + visible) * width * dd + mc.mae_decoder_depth * block_flops(1 + patches, dd, r)
                  + 2 * patches * dd * patch * patch * 3)
        return {"online": online}
    visible = patches - num_masked
    dd = mc.decoder_width

    def branch(tokens):  # encoder + decoder_embed + projector blocks on `tokens` patch tokens
        return (depth * block_flops(1 + tokens, width, r) + 2 * (1 + tokens) * width * dd
                + mc.projector_depth * block_flops(1 + tokens, dd, r))

    online = (_patch_embed_flops(patches, patch, width) + branch(visible)
              + 2 * patches * 2 * dd * dd  # decoder_pos_mlp on the relative position of every query
              + mc.predictor_depth * block_flops(1 + visible + patches, dd, r)
              + 2 * patches * dd * dd)  # decoder_pred
    target = _patch_embed_flops(patches, patch, width) + branch(patches)
    return {"online": online, "target": target}


def train_flops_per_image(config: ml_collections.ConfigDict) -> float:
    """Analytic FLOPs of one image of a train step: 3 x online forward + 1 x target forward."""
    parts = forward_flops(config.model, config.data.num_masked)
    return 3 * parts["online"] + parts.get("target", 0.0)
