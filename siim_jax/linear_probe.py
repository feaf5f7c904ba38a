"""Command line: the official linear probe (SPEC section 5): frozen encoder, mean patch token,
frozen LayerNorm, BatchNorm without affine, a Linear head trained with LARS.

    python -m siim_jax.linear_probe --config configs/linprobe_<recipe>.py --pretrained <workdir | .pth | .safetensors> \
        --workdir <dir> [--encoder online|target] [--config.key=value ...]

Resumes from the newest checkpoint in --workdir; metrics.jsonl / TensorBoard hold the loss and the validation
top-1 / top-5; the last line reads `done: ... top1: <fraction>, top5: <fraction> ...`. Exit statuses as
python -m siim_jax.train (75: stopped on request, resumable).
"""

from siim_jax.eval.command import run_classifier_command


def run():
    """Console-script entry point (`siim-jax-linear-probe`)."""
    run_classifier_command("linear_probe", "linear_probe")


if __name__ == "__main__":
    run()
