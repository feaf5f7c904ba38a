"""ViT-L/16: the official fine-tuning protocol (SPEC section 5) with MAE's published ViT-L/16 values (blr 1e-3,
layer decay 0.75, drop path 0.2, 50 epochs; the SiameseIM release gives only B/16).

    python -m siim_jax.finetune --config configs/finetune_vit_l16.py --pretrained /path/to/pretraining_workdir \
        --workdir /path/to/workdir --config.data.source=imagefolder:/path/to/imagenet
"""

from siim_jax.config import finetune_config, lock


def get_config():
    c = finetune_config("L")
    c.optim.blr = 0.001
    c.classifier.layer_decay = 0.75
    c.classifier.drop_path = 0.2
    c.epochs = 50
    return lock(c)
