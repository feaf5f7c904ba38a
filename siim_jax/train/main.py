"""Command line: python -m siim_jax.train --config configs/<recipe>.py --workdir <dir> [--config.key=value ...]"""

import logging as py_logging
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from siim_jax.cli import EXIT_FAILED, EXIT_STOPPED, EXIT_USAGE, fail, flags_parser

USAGE = "usage: python -m siim_jax.train --config configs/<recipe>.py --workdir <dir> [--config.key=value ...]"

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file in configs/.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the resolved config.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments: {argv[1:]}", 2, USAGE)
    # imported after flag parsing so that --help is fast
    from siim_jax.config import ConfigError
    from siim_jax.data.pipeline import TooManyBadImagesError
    from siim_jax.data.sources import SourceError
    from siim_jax.train.checkpoint import CheckpointMismatchError, CheckpointUnusableError, NonFiniteStateError
    from siim_jax.train.loop import NonFiniteLossError, format_summary, train_and_evaluate
    from siim_jax.train.workdir_lock import WorkdirBusyError

    logging.set_verbosity(logging.WARNING)  # library chatter (Orbax) off; siim_jax's own progress on
    py_logging.getLogger("siim_jax").setLevel(py_logging.INFO)
    py_logging.getLogger("siim_jax").info("devices: %s", jax.devices())
    try:
        config = _CONFIG.value
        config.seed  # a recipe that failed to load raises here
    except OSError as error:
        fail(str(error), EXIT_USAGE, USAGE)
    try:
        summary = train_and_evaluate(config, _WORKDIR.value)
    except (ConfigError, SourceError, TooManyBadImagesError, CheckpointMismatchError, CheckpointUnusableError,
            NonFiniteLossError, NonFiniteStateError, WorkdirBusyError) as e:
        fail(str(e), EXIT_FAILED)
    except OSError as e:  # unwritable workdir, full disk (also raised by a checkpoint save that failed)
        fail(f"cannot write to {e.filename or _WORKDIR.value}: {e.strerror or e}; check the permissions and "
             "free space of --workdir (the newest finished checkpoint in it is intact)", EXIT_FAILED)
    print(format_summary(summary), flush=True)
    if summary["interrupted"]:
        sys.exit(EXIT_STOPPED)  # stopped on request after saving: resumable


def run():
    """Console-script entry point (`siim-jax-train`)."""
    app.run(main, flags_parser=flags_parser(USAGE))


if __name__ == "__main__":
    run()
