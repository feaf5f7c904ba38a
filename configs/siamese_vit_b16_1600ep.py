"""Official SiameseIM ViT-B/16 recipe: 1600 epochs, global batch 4096, blr 6.25e-5 (SPEC sections 1-4).

    python -m siim_jax.train --config configs/siamese_vit_b16_1600ep.py --workdir /path/to/workdir \
        --config.data.source=imagefolder:/path/to/imagenet

(The built-in source is the only one until the ImageNet pipeline lands; there `--config.data.num_train`
sets how many images are generated.)
"""

from siim_jax.config import base_config, lock


def get_config():
    return lock(base_config())
