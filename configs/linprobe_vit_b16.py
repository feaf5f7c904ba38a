"""ViT-B/16: the official linear probe (SPEC section 5): LARS, blr 0.1 at batch 16384, 90 epochs, 10 warmup.

    python -m siim_jax.linear_probe --config configs/linprobe_vit_b16.py --pretrained /path/to/pretraining_workdir \
        --workdir /path/to/workdir --config.data.source=imagefolder:/path/to/imagenet
"""

from siim_jax.config import linear_probe_config, lock


def get_config():
    c = linear_probe_config("B")
    return lock(c)
