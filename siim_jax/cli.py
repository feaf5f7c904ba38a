"""Shared command-line plumbing: one-line errors with fixed exit statuses, no tracebacks for bad input.

Exit statuses of every command: 0 finished; 1 failed (bad config value, bad data source, checkpoint mismatch,
non-finite state, busy or unwritable workdir, ...); 2 bad command line (unknown flag, bad --config override,
recipe that does not load); 75 (EXIT_STOPPED, sysexits' EX_TEMPFAIL) stopped on request (SIGTERM, SIGINT) after
saving a checkpoint: resumable, rerun the same command (launchers requeue on it).
"""

import sys

EXIT_FINISHED, EXIT_FAILED, EXIT_USAGE, EXIT_STOPPED = 0, 1, 2, 75

from absl import flags


class RunError(Exception):
    """An expected failure of a run (bad data, a checkpoint that does not fit, a busy workdir, ...): the commands
    report it as one `error:` line with exit status 1. Each module defines its own subclasses."""


def fail(message: str, status: int, usage: str | None = None, at_once: bool = False):
    """Prints `error: <message>` on one line (and `usage` if given) to stderr, then exits with `status`.

    In a multi-process run the line starts with `[process i/n]` and the process leaves at once
    (distributed.exit_now: no exit-time wait for the others, which may be waiting for it); `at_once` does that
    in one process too (an object store that stopped answering: the clients' exit hooks would retry it)."""
    distributed = sys.modules.get("siim_jax.parallel.distributed")  # imported (with JAX) only by the commands
    several = distributed is not None and distributed.several_processes()
    prefix = f"[{distributed.process_label()}] " if several else ""
    print("error: " + prefix + " ".join(str(message).split()) + "\n", end="", file=sys.stderr, flush=True)  # one write
    if usage:
        print(usage, file=sys.stderr, flush=True)
    if distributed is not None and (several or at_once):
        distributed.exit_now(status)
    sys.exit(status)


def root_message(error: BaseException) -> str:
    """The innermost message of an exception that wraps others in its args (as ml_collections does)."""
    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    return str(error.args[0]) if error.args else str(error)


def flags_parser(usage: str):
    """An absl `flags_parser` for app.run that reports a bad recipe file or flag in one line, exit status 2."""

    def parse(argv):
        try:
            return flags.FLAGS(argv)
        except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as error:
            fail(root_message(error), EXIT_USAGE, usage)
        except Exception as error:  # noqa: BLE001 - a recipe file that raises (SyntaxError, its get_config, ...)
            fail(f"the recipe could not be loaded: {type(error).__name__}: {root_message(error)}", EXIT_USAGE,
                 usage)

    return parse
