"""Command line: python -m siim_jax.train --config configs/<recipe>.py --workdir <dir> [--config.key=value ...]"""

import logging as py_logging
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file in configs/.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the resolved config.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # imported after flag parsing so that --help is fast
    from siim_jax.config import ConfigError
    from siim_jax.train.checkpoint import CheckpointMismatchError
    from siim_jax.train.loop import NonFiniteLossError, format_summary, train_and_evaluate

    logging.set_verbosity(logging.WARNING)  # library chatter (Orbax) off; siim_jax's own progress on
    py_logging.getLogger("siim_jax").setLevel(py_logging.INFO)
    py_logging.getLogger("siim_jax").info("devices: %s", jax.devices())
    try:
        config = _CONFIG.value
        config.seed  # a recipe that failed to load raises here
    except OSError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    try:
        summary = train_and_evaluate(config, _WORKDIR.value)
    except (ConfigError, CheckpointMismatchError, NonFiniteLossError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    print(format_summary(summary), flush=True)


def _root_message(error: BaseException) -> str:
    """The innermost message of an exception that wraps others in its args (as ml_collections does)."""
    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    return str(error.args[0]) if error.args else str(error)


def _parse_flags(argv):
    """absl flag parsing that reports a bad recipe file or --config override in one line, with no traceback."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as error:
        print(f"error: {_root_message(error)}\nusage: python -m siim_jax.train --config configs/<recipe>.py "
              "--workdir <dir> [--config.key=value ...]", file=sys.stderr, flush=True)
        sys.exit(2)


def run():
    """Console-script entry point (`siim-jax-train`)."""
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
