"""Command line: MSN's 1% few-shot protocol (SPEC section 5) on a pretrained encoder: logistic regression on the
frozen class-token features of a 1% training subset, judged on the validation split (siim_jax/eval/fewshot.py).

    python -m siim_jax.fewshot --config configs/fewshot_<recipe>.py --pretrained <workdir | .pth | .safetensors |
        none> --workdir <dir> [--encoder online|target] [--config.key=value ...]

The subset: config.fewshot.subset_file (the ImageNet 1% list) or config.fewshot.per_class images of every class
(seeded). Deterministic; writes <workdir>/metrics.jsonl and TensorBoard and ends with `done: few-shot ..., top1: ...`.
"""

from siim_jax.eval.command import run_fewshot_command


def run():
    """Console-script entry point (`siim-jax-fewshot`)."""
    run_fewshot_command()


if __name__ == "__main__":
    run()
