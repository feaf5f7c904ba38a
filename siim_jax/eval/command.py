"""The evaluation commands. Linear probe and fine-tune: the trainer (siim_jax/train/loop.py) running a
classification method on an encoder from --pretrained, with the pretraining command's flags, resume, stop and exit
statuses. Few-shot: siim_jax/eval/fewshot.py's protocol, one summary line. Importing this module defines the
flags; the protocols' own modules define none."""

from absl import app, flags

from siim_jax import storage
from siim_jax.cli import EXIT_USAGE, fail, flags_parser
from siim_jax.eval.pretrained import NO_PRETRAINING, record_pretrained
from siim_jax.train import main as train_main  # defines --config, --workdir and the multi-process flags

_PRETRAINED = flags.DEFINE_string("pretrained", None, "Pretraining workdir (its newest checkpoint), a PyTorch "
                                  "encoder / official pretraining state (.pth, .safetensors), or 'none' (random "
                                  "initialisation, a baseline).")
_ENCODER = flags.DEFINE_enum("encoder", None, ["online", "target"], "Which pretrained encoder: online (default, "
                             "as the official code) or target (the EMA one). Default: config.classifier.encoder.")


def _start(argv, usage: str, module: str, loss_type: str, recipe: str):
    """What each evaluation command does first: refuse stray arguments, start (train_main.start_command), check
    that --config is a `loss_type` recipe (else one line naming `recipe`, exit 2). Returns (config, encoder
    branch)."""
    if len(argv) > 1:
        fail(f"unexpected arguments: {argv[1:]}", EXIT_USAGE, usage)
    config = train_main.start_command(usage)
    if config.model.loss_type != loss_type:
        fail(f"--config sets config.model.loss_type={config.model.loss_type!r}; python -m siim_jax.{module} needs "
             f"{recipe}", EXIT_USAGE, usage)
    return config, _ENCODER.value or config.classifier.encoder


def run_classifier_command(method: str, module: str) -> None:
    """`python -m siim_jax.<module>`: train `method` ("linear_probe" | "finetune") on the pretrained encoder."""
    usage = (f"usage: python -m siim_jax.{module} --config configs/<recipe>.py --pretrained <workdir | .pth | "
             ".safetensors> --workdir <dir> [--encoder online|target] [--config.key=value ...]")
    flags.mark_flag_as_required("pretrained")

    def main(argv):
        recipes = "linprobe" if method == "linear_probe" else method
        config, branch = _start(argv, usage, module, method, f"a {method} recipe (configs/{recipes}_*.py)")
        workdir = train_main._WORKDIR.value

        def run():
            from siim_jax.eval.pretrained import pretrained_encoder, with_pretrained_encoder
            from siim_jax.train.loop import train_and_evaluate

            initial = None
            if _PRETRAINED.value == NO_PRETRAINING:
                print("pretrained encoder: none (random initialisation, a baseline)", flush=True)
            else:
                state_dict, origin = pretrained_encoder(_PRETRAINED.value, branch)
                print(f"pretrained encoder: {origin}, {len(state_dict)} arrays", flush=True)
                initial = with_pretrained_encoder(state_dict)
            record_pretrained(workdir, _PRETRAINED.value, branch)
            summary = train_and_evaluate(config, workdir, initial_weights=initial)
            if method == "finetune" and not summary["interrupted"]:
                summary["export"] = export_finetuned(workdir)
            return summary

        train_main.finish_training(run)

    app.run(main, flags_parser=flags_parser(usage))


def run_fewshot_command() -> None:
    """`python -m siim_jax.fewshot`: the few-shot protocol on the encoder from --pretrained, one summary line."""
    usage = ("usage: python -m siim_jax.fewshot --config configs/fewshot_<recipe>.py --pretrained <workdir | .pth | "
             ".safetensors | none> --workdir <dir> [--encoder online|target] [--config.key=value ...]")
    flags.mark_flag_as_required("pretrained")

    def main(argv):
        from siim_jax.eval.fewshot import evaluate_few_shot, summary_line

        config, branch = _start(argv, usage, "fewshot", "linear_probe", "a few-shot recipe (configs/fewshot_*.py)")
        train_main.finish_training(
            lambda: evaluate_few_shot(config, train_main._WORKDIR.value, _PRETRAINED.value, branch), summary_line)

    app.run(main, flags_parser=flags_parser(usage))


def export_finetuned(workdir: str) -> str:
    """The newest checkpoint of a fine-tune workdir as a timm ViT in <workdir>/finetuned.safetensors; returns
    its path. Several processes: every one reads the checkpoint, process 0 alone writes the file, and none
    returns (prints its summary line) before the file is written."""
    import jax

    from siim_jax.interop import classifier_state_dict, load_workdir_state, write_state_dict

    method, state = load_workdir_state(workdir)
    path = storage.join(workdir, "finetuned.safetensors")
    if jax.process_index() == 0:
        write_state_dict(classifier_state_dict(method, state), path, "safetensors")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("finetuned.safetensors written")
    return path
