"""Stop requests: SIGTERM / SIGINT set a flag that the training loop votes on (every process stops after the
same step, saves it and exits with the resumable status 75). Installed from the first line of a command
(`python -m siim_jax.train` and the evaluation commands), so a signal during start-up, restore, compilation or the
step-0 evaluation is a stop request too, not a kill. Imports nothing heavy: it runs before JAX is imported."""

import logging
import os
import signal
import sys
import threading

EXIT_SECOND_INTERRUPT = 130  # the shell's status for a process ended by SIGINT

log = logging.getLogger(__name__)


class StopRequest:
    """The process's stop flag. `StopRequest.active` is the one installed by the command (if any); the loop
    uses it, or installs its own for the length of the run (in-process callers, tests)."""

    active: "StopRequest | None" = None

    def __init__(self):
        self.signal = None
        self.previous = {}
        self._set_handlers()

    def _set_handlers(self):
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
            self.previous = self.previous or previous

    @classmethod
    def install(cls) -> "StopRequest":
        """The command's stop flag for the whole process; a second call sets the handlers again (after
        jax.distributed.initialize, whose preemption notifier takes SIGTERM for itself), keeping the flag."""
        if cls.active is None:
            cls.active = cls()
        else:
            cls.active._set_handlers()
        return cls.active

    def _handle(self, signum, _frame):
        if self.signal is not None and signum == signal.SIGINT:
            if self is StopRequest.active:
                # a second Ctrl-C leaves at once, whatever the process is doing: an exception could land inside a
                # collective or jax.distributed.shutdown and wait there for peers that are leaving too
                print("error: second Ctrl-C: stopped at once, without saving this step; rerun the same command "
                      "to resume from the newest checkpoint", file=sys.stderr, flush=True)
                os._exit(EXIT_SECOND_INTERRUPT)
            raise KeyboardInterrupt  # in-process callers (tests, notebooks): an ordinary interrupt
        self.signal = signum
        log.warning("received %s: all processes stop within a few steps (before the first one if training has "
                    "not started), save that step, then exit", signal.Signals(signum).name)

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
