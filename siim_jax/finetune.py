"""Command line: official fine-tuning (SPEC section 5): layer-wise lr decay, drop path, mixup / cutmix,
RandAugment, label smoothing, fc_norm + head; the result is also exported as a timm ViT.

    python -m siim_jax.finetune --config configs/finetune_<recipe>.py --pretrained <workdir | .pth | .safetensors> \
        --workdir <dir> [--encoder online|target] [--config.key=value ...]

Resumes from the newest checkpoint in --workdir; metrics.jsonl / TensorBoard hold the loss and the validation
top-1 / top-5; the last line reads `done: ... top1: <fraction>, top5: <fraction> ...`. Exit statuses as
python -m siim_jax.train (75: stopped on request, resumable).
"""

from siim_jax.eval.command import run_classifier_command


def run():
    """Console-script entry point (`siim-jax-finetune`)."""
    run_classifier_command("finetune", "finetune")


if __name__ == "__main__":
    run()
