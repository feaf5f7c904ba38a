"""Official SiameseIM ViT-B/16 recipe: 1600 epochs, global batch 4096, blr 6.25e-5 (SPEC sections 1-4).

    python -m siim_jax.train --config configs/siamese_vit_b16_1600ep.py --workdir /path/to/workdir \
        --config.data.source=imagefolder:/path/to/imagenet

ImageNet from TFDS instead (prepared in the array_record format, see README.md):
`--config.data.source=tfds:imagenet2012 --config.data.tfds_data_dir=/path/to/tensorflow_datasets`.
"""

from siim_jax.config import base_config, lock


def get_config():
    return lock(base_config())
