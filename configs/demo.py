"""Demo: a small SiameseIM pretraining on the built-in dataset that runs on 2 CPU cores in about 5 minutes and
ends with the k-NN accuracy of the encoder well above its step-0 value.

    python -m siim_jax.train --config configs/demo.py --workdir /tmp/siim_demo

64x64 views, 8x8 patches (38 of 64 masked, the official 60%), a 4-block 128-wide ViT, float32 on CPU.
"""

from siim_jax.config import base_config, lock


def get_config():
    c = base_config()
    c.batch_size = 64
    c.total_steps = 400
    c.warmup_epochs = 40  # 40 of 1600 epochs: 2.5% of total_steps
    c.warmup_steps = 20
    c.log_every_steps = 10
    c.checkpoint_every_steps = 100
    c.eval_every_steps = 100
    c.keep_checkpoints = 2

    c.model.variant = "demo"
    c.model.image_size = 64
    c.model.decoder_width = 128
    c.model.decoder_heads = 4
    c.model.predictor_depth = 2
    c.model.dtype = "float32"  # bfloat16 matmuls are slow on CPU

    c.optim.blr = 1.5e-4 * 256 / 64 * 4  # small batch, short run: a larger rate than the pod recipe
    c.data.num_train = 4096
    c.data.raw_size = 96
    c.data.num_masked = 38
    c.data.crop_min = 0.2
    c.knn.num_bank = 2048
    c.knn.num_query = 512
    return lock(c)
