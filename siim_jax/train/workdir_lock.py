"""One run per workdir: `<workdir>/LOCK`, held by process 0 of the run for as long as it runs.

The lock holds the owner's host, process id, job, start time and a heartbeat (rewritten every heartbeat period).
The job is $SIIM_LAUNCH_ID (set by launch/tpu_vm.sh for every start of one launch) or the SLURM job id: a relaunch
of the same job (a requeue, a re-created TPU slice, whose hosts have new names) takes the lock over at once.

- POSIX file systems: the owner also holds an `fcntl.flock`, which the kernel drops when the process dies. Same
  host: a live owner refuses the second run; a dead owner's lock (kill -9, crash) is taken over with a warning.
  Shared file systems (NFS, Lustre, GPFS): flock is honoured across hosts where the file system supports it; a
  lock of another host whose heartbeat is older than the stale time is taken over with a warning, a fresher one
  refuses the run.
- Object stores (`gs://` workdirs): no flock; the lock object is created only if absent (a generation
  precondition, `ifGenerationMatch=0`, so of two runs started together exactly one gets it), each heartbeat is
  written only over the owner's own generation, and a takeover is written only over the generation it read (two
  runs taking over a stale lock together: one wins). The same rules decide a takeover: same job, or same host
  and a dead pid, at once; another host once its heartbeat is older than the stale time.

A hung run does not hold the workdir for ever: the heartbeat is written only while the run makes progress
(`note_progress`: every train step and evaluation batch; the lock's start). After SIIM_LOCK_HUNG_SECONDS
(default 1800: longer than any compile or evaluation pass between two marks) without one, the heartbeat stops
with one warning, so a relaunch on another host takes over once the stale time has passed; it resumes if the
run moves again.

Settings (environment, so that every command shares them): SIIM_LOCK_STALE_SECONDS (default 300), the heartbeat
period is a tenth of it, at most 30 s; SIIM_LOCK_HUNG_SECONDS (default 1800).
"""

import json
import logging
import os
import socket
import threading
import time

from siim_jax import storage
from siim_jax.cli import RunError

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None

log = logging.getLogger(__name__)

STALE_ENV, HUNG_ENV = "SIIM_LOCK_STALE_SECONDS", "SIIM_LOCK_HUNG_SECONDS"


def _seconds(name: str, default: float) -> float:
    """A duration setting from the environment; WorkdirBusyError naming it when it is not a number > 0."""
    try:
        value = float(os.environ.get(name, str(default)))
    except ValueError:
        value = -1.0
    if not value > 0:
        raise WorkdirBusyError(f"{name}={os.environ.get(name)!r} must be a number of seconds > 0")
    return value


def stale_seconds() -> float:
    return _seconds(STALE_ENV, 300)


def heartbeat_seconds() -> float:
    return min(30.0, stale_seconds() / 10)


def hung_seconds() -> float:
    return _seconds(HUNG_ENV, 1800)


_last_progress = time.monotonic()


def note_progress() -> None:
    """The run moved (a train step, an evaluation batch): the lock's heartbeat goes on."""
    global _last_progress
    _last_progress = time.monotonic()


def current_job() -> str | None:
    """The launch this process belongs to: $SIIM_LAUNCH_ID, else the SLURM job id, else None."""
    if os.environ.get("SIIM_LAUNCH_ID"):
        return os.environ["SIIM_LAUNCH_ID"]
    if os.environ.get("SLURM_JOB_ID"):
        return "slurm-" + os.environ["SLURM_JOB_ID"]
    return None


class WorkdirBusyError(RunError, RuntimeError):
    """Another live run holds the workdir; the message names its host and process id."""


def _describe(owner: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
    job = f", job {owner['job']}" if owner.get("job") else ""
    return f"host {owner.get('host')} pid {owner.get('pid')} (started {started}{job})"


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError, TypeError):
        return False
    return True


class WorkdirLock:
    """Context manager: `with WorkdirLock(workdir): ...` (a no-op on every process but process 0)."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.workdir = storage.absolute(workdir)
        self.path = storage.join(self.workdir, "LOCK")
        self.enabled = enabled
        self.fd = None
        self.generation = None  # object stores: the generation of the lock object this run wrote last
        self.stop = threading.Event()
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "job": current_job(), "started": time.time()}

    def __enter__(self):
        if self.enabled:
            self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    def _payload(self) -> bytes:
        return json.dumps({**self.owner, "heartbeat": time.time()}).encode()

    def _check_takeover(self, previous: dict, flock_held: bool) -> None:
        """Raises WorkdirBusyError unless `previous` (the lock's contents, {} when released) may be taken over;
        logs the takeover."""
        if not previous:
            return
        same_host = previous.get("host") == self.owner["host"]
        same_job = previous.get("job") is not None and previous.get("job") == self.owner["job"]
        age = time.time() - float(previous.get("heartbeat", 0) or 0)
        live_here = same_host and _pid_alive(previous.get("pid")) and previous.get("pid") != self.owner["pid"]
        if same_job and not live_here:
            log.warning("taking over the lock of %s: a relaunch of the same job", _describe(previous))
            return
        if not same_host and age < stale_seconds():
            where = f"delete {self.path}" if not storage.is_remote(self.path) else f"`gcloud storage rm {self.path}`"
            raise WorkdirBusyError(
                f"workdir {self.workdir} is in use by the run of {_describe(previous)} (heartbeat {age:.0f} s ago); "
                f"if that run is dead, {where}, or wait until its heartbeat is {stale_seconds():.0f} s old "
                f"({STALE_ENV})")
        if live_here and not flock_held:
            raise WorkdirBusyError(f"workdir {self.workdir} is in use by the run of {_describe(previous)}; wait for "
                                   "it to finish or use another --workdir")
        log.warning("taking over the lock of %s, which ended without releasing it", _describe(previous))

    def acquire(self) -> None:
        stale_seconds(), hung_seconds()  # a bad setting is one line now, not a failing heartbeat later
        note_progress()
        if storage.is_remote(self.path):
            storage.require_bucket(self.workdir)  # else a missing bucket reads as a 404 on the lock object
            with storage.object_store_errors(self.path):
                self._acquire_object()
        else:
            self._acquire_file()
        threading.Thread(target=self._heartbeat, daemon=True, name="workdir-lock-heartbeat").start()

    # ------------------------------------------------------------------------------------------- file system
    def _acquire_file(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                previous = self._read_fd(fd)
                os.close(fd)
                raise WorkdirBusyError(
                    f"workdir {self.workdir} is in use by the run of {_describe(previous)}; wait "
                    "for it to finish, stop it, or use another --workdir") from None
        try:
            self._check_takeover(self._read_fd(fd), flock_held=fcntl is not None)
        except WorkdirBusyError:
            os.close(fd)
            raise
        self.fd = fd
        self._write_file()

    def _read_fd(self, fd) -> dict:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            text = os.read(fd, 65536).decode()
            return json.loads(text) if text.strip() else {}
        except (OSError, ValueError):
            return {"host": "?", "pid": "?"}

    def _write_file(self) -> None:
        os.lseek(self.fd, 0, os.SEEK_SET)
        os.ftruncate(self.fd, 0)
        os.write(self.fd, self._payload())
        os.fsync(self.fd)

    # ------------------------------------------------------------------------------------------ object store
    def _blob(self):
        from google.cloud import storage as gcs
        if not self.path.startswith("gs://"):
            raise storage.ObjectStoreError(f"{self.path}: the workdir lock supports gs:// object stores only")
        bucket, name = self.path[len("gs://"):].split("/", 1)
        return gcs.Client().bucket(bucket).blob(name)

    def _acquire_object(self) -> None:
        from google.api_core import exceptions
        for _ in range(5):
            blob = self._blob()
            try:
                blob.upload_from_string(self._payload(), if_generation_match=0)
                self.generation = blob.generation
                return
            except exceptions.PreconditionFailed:  # it exists: read it, then maybe take it over
                pass
            try:
                blob.reload()
                seen = blob.generation
                text = blob.download_as_bytes(if_generation_match=seen).decode()
            except (exceptions.NotFound, exceptions.PreconditionFailed):
                continue  # released or rewritten meanwhile: look again
            try:
                previous = json.loads(text) if text.strip() else {}
            except ValueError:
                previous = {"host": "?", "pid": "?"}
            self._check_takeover(previous, flock_held=False)
            try:
                blob.upload_from_string(self._payload(), if_generation_match=seen)
                self.generation = blob.generation
                return
            except exceptions.PreconditionFailed:
                continue  # another run wrote it first: look again
        raise WorkdirBusyError(f"workdir {self.workdir}: the lock {self.path} kept changing while this run tried "
                               "to take it; another run is starting there")

    def _write_object(self) -> None:
        from google.api_core import exceptions
        blob = self._blob()
        try:
            blob.upload_from_string(self._payload(), if_generation_match=self.generation)
            self.generation = blob.generation
        except exceptions.PreconditionFailed:
            log.error("the lock %s was taken over by another run; this run goes on, but two runs now write into "
                      "%s: stop one of them", self.path, self.workdir)
            self.generation = None

    # ---------------------------------------------------------------------------------------------- both
    def _heartbeat(self) -> None:
        hung = False
        while not self.stop.wait(heartbeat_seconds()):
            idle = time.monotonic() - _last_progress
            if idle > hung_seconds():
                if not hung:
                    log.warning("no progress for %.0f s (%s): %s is no longer refreshed, so a relaunch can take "
                                "the workdir over once its heartbeat is %.0f s old (%s)", idle, HUNG_ENV, self.path,
                                stale_seconds(), STALE_ENV)
                hung = True
                continue
            if hung:
                log.warning("progress again: %s is refreshed again", self.path)
                hung = False
            try:
                if self.fd is not None:
                    self._write_file()
                elif self.generation is not None:
                    self._write_object()
            except Exception as error:  # noqa: BLE001 - a full disk or a store hiccup must not kill the run
                log.warning("could not refresh %s: %s", self.path, storage.describe_error(error) or error)

    def release(self) -> None:
        """Removes the lock (file systems: empties the file, an empty LOCK is a released one, and drops the
        flock; object stores: deletes the object if it is still this run's)."""
        self.stop.set()
        if self.generation is not None:
            try:
                from google.api_core.retry import Retry
                # a short retry: an unreachable store must not hold the exit for the default 120 s
                self._blob().delete(if_generation_match=self.generation, retry=Retry(timeout=10))
            except Exception as error:  # noqa: BLE001 - released or not, the run's result stands
                log.warning("could not release %s: %s", self.path, storage.describe_error(error) or error)
            self.generation = None
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)
        except OSError:
            pass
        os.close(self.fd)  # drops the flock
        self.fd = None
