"""SiameseIM ViT-H/14: H encoder (1280 wide, 32 deep, 16 heads, 14px patches: a 16x16 grid at 224px).

    python -m siim_jax.train --config configs/siamese_vit_h14.py --workdir /path/to/workdir \
        --config.mesh.fsdp=-1 --config.mesh.data=1

The mask keeps the B/16 fraction (118/196): 154 of 256 patches masked. Schedule as B/16.
"""

from siim_jax.config import base_config, lock


def get_config():
    c = base_config()
    c.model.variant = "H"
    c.data.num_masked = 154
    return lock(c)
