"""ViT-L/16: MSN's 1% few-shot protocol (SPEC section 5): logistic regression on the class token, lambda 0.01 /
n_train (official configs/semisup_sim_large_1600ep.sh).

    python -m siim_jax.fewshot --config configs/fewshot_vit_l16.py --pretrained /path/to/pretraining_workdir \
        --workdir /path/to/workdir --config.data.source=imagefolder:/path/to/imagenet \
        --config.fewshot.subset_file=/path/to/1percent.txt
"""

from siim_jax.config import fewshot_config, lock


def get_config():
    c = fewshot_config("L")
    c.fewshot.l2 = 0.01  # official configs/semisup_sim_large_1600ep.sh: --lambd 0.01
    return lock(c)
