"""MAE ViT-B/16 baseline (He et al.): 75% random masking, 8-block 512-wide decoder, normalised-pixel loss,
blr 1.5e-4 at global batch 4096, 1600 epochs, 40 warmup, crops with scale (0.2, 1) and flips only.

    python -m siim_jax.train --config configs/mae_vit_b16.py --workdir /path/to/workdir
"""

from siim_jax.config import base_config, lock


def get_config():
    c = base_config()
    c.model.loss_type = "mae"
    c.optim.blr = 1.5e-4
    c.data.crop_min = 0.2
    return lock(c)
