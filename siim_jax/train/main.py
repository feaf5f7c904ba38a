"""Command line: python -m siim_jax.train --config configs/<recipe>.py --workdir <dir> [--config.key=value ...]"""

import logging as py_logging
import os
import sys
import traceback

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from siim_jax.cli import EXIT_FAILED, EXIT_STOPPED, EXIT_USAGE, RunError, fail, flags_parser
from siim_jax.train.stop import StopRequest

USAGE = "usage: python -m siim_jax.train --config configs/<recipe>.py --workdir <dir> [--config.key=value ...]"

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file in configs/.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the resolved config.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "Multi-process runs: host:port of process 0's "
                                   "coordinator (default: $JAX_COORDINATOR_ADDRESS, or found on TPU VMs / SLURM).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process runs: how many processes in all.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process runs: this process's index, 0..n-1.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments: {argv[1:]}", 2, USAGE)
    config = start_command(USAGE)
    from siim_jax.train.loop import train_and_evaluate
    finish_training(lambda: train_and_evaluate(config, _WORKDIR.value))


def start_command(usage: str):
    """What every training / evaluation entry point does first: logging, joining the other processes (one line
    and exit 2 / 1 when that fails), the stop handler (again: joining replaces it), and the recipe from --config
    (exit 2 when it does not load)."""
    from siim_jax.parallel import distributed

    logging.set_verbosity(logging.WARNING)  # library chatter (Orbax) off; siim_jax's own progress on
    own = py_logging.getLogger("siim_jax")
    own.setLevel(py_logging.INFO)
    for handler in py_logging.getLogger().handlers:  # every record, whichever logger: "[process i/n] ..."
        handler.addFilter(distributed.ProcessPrefix())
    try:
        distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    except distributed.DistributedSetupError as e:
        fail(str(e), EXIT_USAGE, usage)
    except Exception as e:  # noqa: BLE001 - the coordinator did not answer, a peer never joined, ...
        fail(f"could not join the other processes ({type(e).__name__}: {str(e).strip()[:300]}); check "
             "--coordinator_address (reachable from every process, port free) and that all --num_processes "
             "processes were started", EXIT_FAILED)
    stop = StopRequest.install()  # after joining: JAX's preemption notifier installs its own SIGTERM handler there
    if distributed.on_cloud_tpu() or os.environ.get("GCE_METADATA_HOST"):
        stop.watch_preemption_notice()  # the maintenance / preemption notice becomes a stop request
    own.info("devices: %s", jax.devices() if jax.device_count() <= 16 else f"{jax.device_count()} devices")
    try:
        config = _CONFIG.value
        config.seed  # a recipe that failed to load raises here
    except OSError as error:
        fail(str(error), EXIT_USAGE, usage)
    _quiet_failed_checkpoint_writers()
    return config


def finish_training(run, summary_line=None) -> None:
    """Runs `run()` (-> a summary dict: train_and_evaluate's, or any with "interrupted"), turns every expected
    failure into one error line and its exit status, prints the summary line (`summary_line(summary)`, default
    the trainer's), and exits 75 when the run stopped on request (resumable)."""
    from siim_jax.config import ConfigError
    from siim_jax.train.checkpoint import CheckpointWriteError
    from siim_jax.train.loop import format_summary

    from siim_jax import storage
    from siim_jax.parallel import distributed

    try:
        summary = run()
    except (ConfigError, RunError) as e:
        fail(str(e), EXIT_FAILED, at_once=storage.classify_error(e) == "unreachable")
    except distributed.PeerLostError as e:
        distributed.leave_for_lost_peer(str(e), e.saved_step)
    except CheckpointWriteError as e:  # at once: Orbax's abandoned writer tasks would print tracebacks at exit
        fail(str(e), EXIT_FAILED, at_once=True)
    except OSError as e:  # unwritable workdir, full disk (also raised by a checkpoint save that failed)
        fail(f"cannot write to {e.filename or _WORKDIR.value}: {e.strerror or e}; check the permissions and "
             "free space of --workdir (the newest finished checkpoint in it is intact)", EXIT_FAILED)
    except Exception as e:  # a bug: its traceback; with several processes, this one leaves at once (see fail)
        if not distributed.several_processes():
            raise
        traceback.print_exc()
        fail(f"failed with {type(e).__name__} (traceback above)", EXIT_FAILED)
    # one write, newline included: the processes of a run share one stdout, and with PYTHONUNBUFFERED print's
    # two writes (text, then newline) of two processes can interleave into one line
    print((summary_line or format_summary)(summary) + "\n", end="", flush=True)
    if summary["interrupted"]:
        sys.exit(EXIT_STOPPED)  # stopped on request after saving: resumable


def _quiet_failed_checkpoint_writers() -> None:
    """A failed checkpoint write (full disk) is reported once, as CheckpointWriteError's error line: Orbax's
    writer threads log it with a traceback, and TensorStore callbacks that outlive their event loop print
    `RuntimeError: Event loop is closed`; both keep their one-line message here, without the traceback."""

    class DropOrbaxTracebacks(py_logging.Filter):
        def filter(self, record):
            if record.exc_info and "orbax" in record.pathname:
                record.exc_info, record.exc_text = None, None
            return True

    for handler in py_logging.getLogger().handlers:
        handler.addFilter(DropOrbaxTracebacks())
    default_hook = sys.unraisablehook

    def unraisable(info):
        if isinstance(info.exc_value, RuntimeError) and "Event loop is closed" in str(info.exc_value):
            return
        default_hook(info)

    sys.unraisablehook = unraisable


def run():
    """Console-script entry point (`siim-jax-train`)."""
    app.run(main, flags_parser=flags_parser(USAGE))


if __name__ == "__main__":
    run()
