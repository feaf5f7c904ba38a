"""Fine-tuning of the demo encoder on the built-in data (CPU, a few minutes): the official protocol (layer
decay, drop path, mixup / cutmix, label smoothing, RandAugment, fc_norm + head), shorter.

    python -m siim_jax.train --config configs/demo.py --workdir /tmp/siim_demo
    python -m siim_jax.finetune --config configs/finetune_demo.py --pretrained /tmp/siim_demo \
        --workdir /tmp/siim_demo_finetune

Ends with the fine-tuned model as a timm ViT in <workdir>/finetuned.safetensors.
"""

from siim_jax.config import demo_model, finetune_config, lock


def get_config():
    c = demo_model(finetune_config("mu"))
    c.batch_size = 128
    c.epochs, c.warmup_epochs = 20, 2
    c.optim.blr = 2e-3  # a 2-block model, a short run: far above the ViT-B value
    c.log_every_steps = 20
    c.checkpoint_every_steps = 200
    c.eval_every_steps = 320  # 10 epochs
    c.keep_checkpoints = 2
    return lock(c)
