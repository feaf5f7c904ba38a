"""Demo: a small SiameseIM pretraining on the built-in dataset that runs on 2 CPU cores in about 5 minutes and
ends with the k-NN accuracy of the encoder well above its step-0 value.

    python -m siim_jax.train --config configs/demo.py --workdir /tmp/siim_demo

64x64 views of 96x96 grey-level images, 8x8 patches (38 of 64 masked, the official 60%), the 2-block 64-wide
"mu" ViT with a 64-wide decoder, float32 on CPU (about 0.13 s a step at batch 64). A small model at a high
learning rate learns far faster per second than the 4-block 128-wide one; blr 0.03 diverges (k-NN falls),
blr 0.006 learns half as fast.
"""

from siim_jax.config import base_config, demo_model, lock


def get_config():
    c = base_config()
    c.batch_size = 64
    c.total_steps = 1500
    c.warmup_steps = 50
    c.log_every_steps = 25
    c.checkpoint_every_steps = 500
    c.eval_every_steps = 250
    c.keep_checkpoints = 2

    demo_model(c)

    c.optim.blr = 0.012  # lr 3e-3 at batch 64: small model, short run, far above the pod recipe
    c.ema.base_momentum = 0.99  # short run: a faster target than the pod's 0.995
    c.data.crop_min = 0.2
    c.knn.num_bank = 2048
    c.knn.num_query = 512
    return lock(c)
