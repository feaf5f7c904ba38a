"""ViT-H/14: MSN's 1% few-shot protocol (SPEC section 5): logistic regression on the class token, lambda 0.1 /
n_train (no official ViT-H figure; ViT-B's value).

    python -m siim_jax.fewshot --config configs/fewshot_vit_h14.py --pretrained /path/to/pretraining_workdir \
        --workdir /path/to/workdir --config.data.source=imagefolder:/path/to/imagenet \
        --config.fewshot.subset_file=/path/to/1percent.txt
"""

from siim_jax.config import fewshot_config, lock


def get_config():
    c = fewshot_config("H")
    return lock(c)
