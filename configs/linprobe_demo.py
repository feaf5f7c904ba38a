"""Linear probe of the demo encoder on the built-in data (CPU, a few minutes): the official protocol (frozen
encoder, mean patch token, frozen LayerNorm, BatchNorm without affine, Linear head, LARS), shorter.

    python -m siim_jax.train --config configs/demo.py --workdir /tmp/siim_demo
    python -m siim_jax.linear_probe --config configs/linprobe_demo.py --pretrained /tmp/siim_demo \
        --workdir /tmp/siim_demo_linprobe

`--pretrained none` probes a randomly initialised encoder: the baseline that pretraining must beat.
"""

from siim_jax.config import demo_model, linear_probe_config, lock


def get_config():
    c = demo_model(linear_probe_config("mu"))
    c.batch_size = 256
    c.epochs, c.warmup_epochs = 30, 3
    c.optim.blr = 6.4  # the official peak lr (0.1 x 16384 / 256 = 6.4) at the demo's batch of 256
    c.log_every_steps = 20
    c.checkpoint_every_steps = 200
    c.eval_every_steps = 160  # 10 epochs
    c.keep_checkpoints = 2
    return lock(c)
