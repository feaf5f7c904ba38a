"""One run per workdir: `<workdir>/LOCK`, held by process 0 of the run for as long as it runs.

The file holds the owner's host, process id, start time and a heartbeat (rewritten every HEARTBEAT_SECONDS); on a
POSIX file system the owner also holds an `fcntl.flock` on it, which the kernel drops when the process dies.

- Same host: a live owner's flock refuses the second run; a dead owner's lock (kill -9, crash) is taken over with
  a warning.
- Shared file systems (NFS, Lustre, GPFS): flock is honoured across hosts where the file system supports it; a
  lock written by another host whose heartbeat is older than STALE_SECONDS is taken over with a warning, a fresher
  one refuses the run.
- Object stores (`gs://...` workdirs, not supported by the trainer yet): there is no flock, so only the
  heartbeat rule could apply, and two runs started within seconds of each other could both pass.
"""

import json
import logging
import os
import socket
import threading
import time

from siim_jax.cli import RunError

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 300.0


class WorkdirBusyError(RunError, RuntimeError):
    """Another live run holds the workdir; the message names its host and process id."""


def _describe(owner: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
    return f"host {owner.get('host')} pid {owner.get('pid')} (started {started})"


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError, TypeError):
        return False
    return True


class WorkdirLock:
    """Context manager: `with WorkdirLock(workdir): ...` (a no-op on every process but process 0)."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.path = os.path.join(os.path.abspath(workdir), "LOCK")
        self.enabled = enabled
        self.fd = None
        self.stop = threading.Event()
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}

    def __enter__(self):
        if self.enabled:
            self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                previous = self._read(fd)
                os.close(fd)
                raise WorkdirBusyError(
                    f"workdir {os.path.dirname(self.path)} is in use by the run of {_describe(previous)}; wait "
                    "for it to finish, stop it, or use another --workdir") from None
        previous = self._read(fd)
        if previous:
            same_host = previous.get("host") == self.owner["host"]
            age = time.time() - float(previous.get("heartbeat", 0))
            if not same_host and age < STALE_SECONDS:
                os.close(fd)
                raise WorkdirBusyError(
                    f"workdir {os.path.dirname(self.path)} is in use by the run of {_describe(previous)} "
                    f"(heartbeat {age:.0f} s ago); if that run is dead, delete {self.path}")
            if same_host and _pid_alive(previous.get("pid")) and previous.get("pid") != os.getpid() \
                    and fcntl is None:
                os.close(fd)
                raise WorkdirBusyError(f"workdir {os.path.dirname(self.path)} is in use by the run of "
                                       f"{_describe(previous)}; wait for it to finish or use another --workdir")
            log.warning("taking over the lock of %s, which ended without releasing it", _describe(previous))
        self.fd = fd
        self._write()
        threading.Thread(target=self._heartbeat, daemon=True, name="workdir-lock-heartbeat").start()

    def _read(self, fd) -> dict:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            text = os.read(fd, 65536).decode()
            return json.loads(text) if text.strip() else {}
        except (OSError, ValueError):
            return {"host": "?", "pid": "?"}

    def _write(self) -> None:
        data = json.dumps({**self.owner, "heartbeat": time.time()}).encode()
        os.lseek(self.fd, 0, os.SEEK_SET)
        os.ftruncate(self.fd, 0)
        os.write(self.fd, data)
        os.fsync(self.fd)

    def _heartbeat(self) -> None:
        while not self.stop.wait(HEARTBEAT_SECONDS):
            try:
                self._write()
            except OSError as error:  # a full disk must not kill the run; the lock itself is still held
                log.warning("could not refresh %s: %s", self.path, error)

    def release(self) -> None:
        """Empties the file (an empty LOCK is a released one) and drops the flock."""
        self.stop.set()
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)
        except OSError:
            pass
        os.close(self.fd)  # drops the flock
        self.fd = None
