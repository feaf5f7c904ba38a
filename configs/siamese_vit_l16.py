"""SiameseIM ViT-L/16: the ViT-B/16 recipe with the L encoder (1024 wide, 24 deep, 16 heads).

    python -m siim_jax.train --config configs/siamese_vit_l16.py --workdir /path/to/workdir \
        --config.mesh.fsdp=-1 --config.mesh.data=1

The official release gives no L schedule; epochs, lr and decoder are the B/16 values (override as needed).
"""

from siim_jax.config import base_config, lock


def get_config():
    c = base_config()
    c.model.variant = "L"
    return lock(c)
