"""Command line: import PyTorch weights into a fresh train state and save it as step 0 of a workdir, from which
training resumes and which export / evaluation read like any other.

    python -m siim_jax.import_weights --config configs/<recipe>.py --checkpoint <file> --workdir <dir>
        [--kind auto|full|encoder] [--allow-partial] [--config.key=value ...]
    python -m siim_jax.train --config configs/<recipe>.py --workdir <dir>      # continues from the import

--checkpoint: an official SiameseIM pretraining file (full state, target branch under mm_*) or a timm / MAE
encoder (e.g. a fine-tuned ViT), .pth (read with torch.load(weights_only=True)) or .safetensors. An encoder goes
into the online and the target encoder; its position table is resized (bicubic) to the recipe's resolution.
Strict: missing, unexpected or mis-shaped keys are an error listing them; --allow-partial loads what fits and
prints what it skipped. The optimiser state is fresh. --checkpoint and --workdir may be on gs://
(siim_jax.storage); an object-store failure is one error line, exit 1.
"""

from absl import app, flags
from ml_collections import config_flags

from siim_jax import storage
from siim_jax.cli import RunError, fail, flags_parser

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file in configs/.", lock_config=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "PyTorch weights: .pth / .pt / .bin or .safetensors.")
_WORKDIR = flags.DEFINE_string("workdir", None, "New (empty) workdir to write step 0 to.")
_KIND = flags.DEFINE_enum("kind", "auto", ["auto", "full", "encoder"],
                          "full pretraining state or encoder only; auto decides from the keys.")
_ALLOW_PARTIAL = flags.DEFINE_bool("allow-partial", False,
                                   "Load the arrays that fit, keep the others fresh, print what was skipped.")
flags.mark_flags_as_required(["config", "checkpoint", "workdir"])
USAGE = ("usage: python -m siim_jax.import_weights --config configs/<recipe>.py --checkpoint <file> "
         "--workdir <dir> [--kind auto|full|encoder] [--allow-partial] [--config.key=value ...]")


def main(argv):
    try:
        _import(argv)
    except RunError as error:  # e.g. storage.ObjectStoreError: a missing bucket, no permission, no answer
        fail(str(error), 1)


def _import(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments: {argv[1:]}", 2, USAGE)
    import jax
    from absl import logging

    from siim_jax import config as config_lib
    from siim_jax.interop import CheckpointFileError, StateDictMismatchError, import_state_dict, read_state_dict
    from siim_jax.methods import get_method
    from siim_jax.parallel.sharding import create_mesh
    from siim_jax.train.checkpoint import Checkpointer, CheckpointWriteError
    from siim_jax.train.schedules import learning_rate_fn, training_length
    from siim_jax.train.state import init_train_state
    from siim_jax.train.workdir_lock import WorkdirLock

    logging.set_verbosity(logging.WARNING)  # library chatter (Orbax) off
    try:
        config = _CONFIG.value
        config.seed  # a recipe that failed to load raises here
    except OSError as error:
        fail(str(error), 2, USAGE)
    workdir = _WORKDIR.value
    if storage.listdir(storage.join(workdir, "checkpoints")):
        fail(f"{workdir} already holds checkpoints; import into a new --workdir", 2)
    try:
        config_lib.validate(config)
        method = get_method(config)
        print(f"reading {_CHECKPOINT.value}", flush=True)
        state_dict = read_state_dict(_CHECKPOINT.value)
    except (config_lib.ConfigError, CheckpointFileError) as error:
        fail(str(error), 2)
    try:
        print("creating the train state", flush=True)
        mesh = create_mesh(config.mesh)
        lr_fn = learning_rate_fn(config, training_length(config, config.data.num_train))
        _, _, state, _ = init_train_state(method, mesh, lr_fn)
        state = import_state_dict(method, state, state_dict, kind=_KIND.value,
                                  allow_partial=_ALLOW_PARTIAL.value, log=lambda m: print(m, flush=True))
    except (config_lib.ConfigError, StateDictMismatchError) as error:
        fail(str(error), 1)
    try:
        storage.makedirs(workdir)
        with storage.object_store_errors(workdir), WorkdirLock(workdir, enabled=jax.process_index() == 0):
            if jax.process_index() == 0:
                storage.write_text(storage.join(workdir, "config.json"), config.to_json_best_effort(indent=2))
            checkpoints = Checkpointer(workdir, config)
            checkpoints.save(int(state.step), state)
            checkpoints.close()
    except (RunError, CheckpointWriteError) as error:  # a busy workdir, an object store that refused
        fail(str(error), 1)
    except OSError as error:
        fail(f"cannot write to {error.filename or workdir}: {error.strerror or error}", 1)
    print(f"saved the imported state to {checkpoints.path(int(state.step))}; continue with: python -m "
          f"siim_jax.train --config <the same recipe> --workdir {workdir}", flush=True)


def run():
    """Console-script entry point (`siim-jax-import`)."""
    app.run(main, flags_parser=flags_parser(USAGE))


if __name__ == "__main__":
    run()
