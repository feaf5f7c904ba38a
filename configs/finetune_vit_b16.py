"""ViT-B/16: official fine-tuning (SPEC section 5): blr 2.5e-4 at batch 1024, layer decay 0.65, drop path 0.1, 100
epochs.

    python -m siim_jax.finetune --config configs/finetune_vit_b16.py --pretrained /path/to/pretraining_workdir \
        --workdir /path/to/workdir --config.data.source=imagefolder:/path/to/imagenet
"""

from siim_jax.config import finetune_config, lock


def get_config():
    c = finetune_config("B")
    return lock(c)
