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

    def request(self, why: str) -> None:
        """A stop request that is not a signal (a preemption notice): the same vote, save and exit 75."""
        if self.signal is None:
            self.signal = signal.SIGTERM
            log.warning("%s: all processes stop within a few steps, save that step, then exit", why)

    def watch_preemption_notice(self, host: str | None = None, poll_seconds: float = 5.0) -> threading.Thread:
        """Polls the GCE / Cloud TPU metadata server (`host`, default $GCE_METADATA_HOST or
        metadata.google.internal) for a preemption (`instance/preempted` TRUE) or a host maintenance event
        (`instance/maintenance-event` other than NONE) and turns it into a stop request: the run saves before the
        VM is taken away, although that SIGTERM may come only seconds before. A daemon thread; an unreachable
        server is retried quietly."""
        import urllib.request
        host = host or os.environ.get("GCE_METADATA_HOST") or "metadata.google.internal"

        def read(key):
            request = urllib.request.Request(f"http://{host}/computeMetadata/v1/instance/{key}",
                                             headers={"Metadata-Flavor": "Google"})
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.read().decode().strip()

        def watch():
            while self.signal is None:
                for key, calm in (("preempted", "FALSE"), ("maintenance-event", "NONE")):
                    try:
                        value = read(key)
                    except Exception:  # noqa: BLE001 - no metadata server (yet): look again later
                        continue
                    if value and value.upper() != calm:
                        self.request(f"the metadata server reports {key} {value}")
                        return
                threading.Event().wait(poll_seconds)

        thread = threading.Thread(target=watch, daemon=True, name="preemption-notice")
        thread.start()
        return thread

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
