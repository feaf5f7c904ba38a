"""Multi-process start-up for the entry points (train, export, evaluation commands): `initialize` once, first.

Where the processes come from, in order:
1. explicit values (command-line flags) or the environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
   JAX_PROCESS_ID: `jax.distributed.initialize(address, n, i)`;
2. SLURM with more than one task (SLURM_JOB_ID, SLURM_NTASKS > 1) or a Cloud TPU VM (/dev/accel* or /dev/vfio
   devices, TPU_WORKER_HOSTNAMES): `jax.distributed.initialize()`, which reads the cluster itself;
3. otherwise one process, and nothing is called.
On the CPU platform the cross-process collectives use gloo. Library code never calls this: only entry points
change process-wide settings.
"""

import atexit
import collections
import glob
import logging
import os
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"


class DistributedSetupError(RuntimeError):
    """Inconsistent or unusable process settings; the message names the flag or variable to fix."""


def _cluster_kind() -> str | None:
    """'slurm' or 'tpu' when this process runs where jax.distributed.initialize() can find its peers itself."""
    env = os.environ
    if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        return "slurm"
    if env.get("TPU_WORKER_HOSTNAMES") or glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"):
        return "tpu"
    return None


def on_cloud_tpu() -> bool:
    """This process runs on a Cloud TPU VM."""
    return _cluster_kind() == "tpu"


def resolve(coordinator_address: str | None = None, num_processes: int | None = None,
            process_id: int | None = None) -> dict | None:
    """The explicit settings (flags, then environment) as initialize() kwargs, or None when none are given."""
    env = os.environ
    address = coordinator_address or env.get(COORDINATOR_ENV) or None
    count = num_processes if num_processes is not None else env.get(NUM_PROCESSES_ENV)
    index = process_id if process_id is not None else env.get(PROCESS_ID_ENV)
    if address is None and count is None and index is None:
        return None
    try:
        count = int(count) if count is not None else None
        index = int(index) if index is not None else None
    except ValueError:
        raise DistributedSetupError(f"--num_processes={count!r} / --process_id={index!r} must be integers") from None
    if address is None or count is None or index is None:
        missing = [name for name, v in (("--coordinator_address", address), ("--num_processes", count),
                                        ("--process_id", index)) if v is None]
        raise DistributedSetupError(f"multi-process start needs all three of --coordinator_address, "
                                    f"--num_processes, --process_id (or {COORDINATOR_ENV}, {NUM_PROCESSES_ENV}, "
                                    f"{PROCESS_ID_ENV}); missing: {', '.join(missing)}")
    if count < 1 or not 0 <= index < count:
        raise DistributedSetupError(f"--process_id={index} must be in 0..{count - 1} (--num_processes={count})")
    if ":" not in address:
        raise DistributedSetupError(f"--coordinator_address={address!r} must be host:port, e.g. localhost:12355")
    return {"coordinator_address": address, "num_processes": count, "process_id": index}


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Joins this process to the others (see the module docstring); logs `process i/n, local devices, global
    devices` once. Call before anything touches a device."""
    global _prefix
    explicit = resolve(coordinator_address, num_processes, process_id)
    multi = explicit["num_processes"] > 1 if explicit is not None else _cluster_kind() is not None
    if multi:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices only; others keep theirs
        settings = timeouts()
        jax.distributed.initialize(**(explicit or {}), **settings)
        if jax.process_count() > 1:
            _prefix = f"[process {jax.process_index()}/{jax.process_count()}] "
            PeerWatch(settings["heartbeat_timeout_seconds"] / 2).start()
    log.info("process %d/%d, local devices %d, global devices %d", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())


_prefix = ""  # "[process i/n] " once initialize found several processes

HEARTBEAT_ENV, SHUTDOWN_ENV = "SIIM_HEARTBEAT_TIMEOUT_SECONDS", "SIIM_SHUTDOWN_TIMEOUT_SECONDS"
HEARTBEAT_SECONDS, SHUTDOWN_SECONDS = 30, 60  # JAX's own defaults: 100 and 300


def timeouts() -> dict:
    """jax.distributed's timeouts, set deliberately ($SIIM_HEARTBEAT_TIMEOUT_SECONDS, default 30;
    $SIIM_SHUTDOWN_TIMEOUT_SECONDS, default 60).

    heartbeat: a process that sent no heartbeat for this long is dead for the coordinator, which then ends every
    other process (JAX aborts them, its log naming the unhealthy process): the bound on a hang when a collective
    never notices its peer is gone (a host lost, accelerator collectives, a gloo read that saw no reset). A
    failed collective that does notice raises, and the trainer leaves at once with one line (PeerLostError).
    shutdown: how long a process that finished waits at exit for the others to finish too; a failing process
    skips that wait (see `exit_now`)."""
    values = {}
    for name, default, key in ((HEARTBEAT_ENV, HEARTBEAT_SECONDS, "heartbeat_timeout_seconds"),
                               (SHUTDOWN_ENV, SHUTDOWN_SECONDS, "shutdown_timeout_seconds")):
        text = os.environ.get(name, str(default))
        if not text.isdigit() or int(text) < 1:
            raise DistributedSetupError(f"${name}={text!r} must be a whole number of seconds >= 1 "
                                        f"(default {default})")
        values[key] = int(text)
    return values


# what a JAX runtime error says when it was raised because another process is gone: its connections reset
# (gloo on CPU, NCCL on GPU), its heartbeats stopped, a barrier with it failed
_LOST_CONTACT_MARKS = ("Gloo", "gloo", "NCCL", "Connection reset", "Connection closed", "Connection refused",
                       "heartbeat", "Barrier", "barrier", "UNAVAILABLE", "DEADLINE_EXCEEDED", "unhealthy",
                       "coordination service", "Socket closed")


class PeerLostError(RuntimeError):
    """A collective or barrier with the other processes failed: one of them failed or was killed.
    `saved_step`: the newest checkpoint known to be finished by all processes (None: none yet)."""

    def __init__(self, message: str, saved_step: int | None):
        super().__init__(message)
        self.saved_step = saved_step


def lost_contact(error: BaseException) -> bool:
    """`error` is JAX's answer to another process being gone (only in multi-process runs)."""
    return (jax.process_count() > 1 and isinstance(error, jax.errors.JaxRuntimeError)
            and any(mark in str(error) for mark in _LOST_CONTACT_MARKS))


class PeerWatch(threading.Thread):
    """Ends this process with one line when another one is gone, before JAX's own heartbeat timeout would abort
    it with a C++ trace (a collective that saw its peer's connections close has raised long before: this covers
    the ones that wait). Every process bumps a counter in the coordinator's key-value store every
    `timeout / 8` s; a peer whose counter stood still for `timeout` s (half the heartbeat timeout) is gone, and
    so is the coordinator (process 0) when the store stops answering. A process that ends normally says so
    first (atexit), so the others never mistake an end for a death. Exit status: 75 when every process finished
    a checkpoint (`finished_checkpoint_step`, kept by the trainer), else 1."""

    PREFIX = "siim_jax/alive/"

    def __init__(self, timeout: float):
        super().__init__(name="siim-peer-watch", daemon=True)
        from jax._src import distributed as jax_distributed
        self.client = jax_distributed.global_state.client
        self.timeout, self.ended = timeout, threading.Event()
        atexit.register(self.end)

    def end(self) -> None:
        """This process ends normally: its peers stop watching it."""
        if not self.ended.is_set():
            self.ended.set()
            try:
                self.client.key_value_set(f"{self.PREFIX}{jax.process_index()}", "done", allow_overwrite=True)
            except Exception:  # noqa: BLE001 - the coordinator already ended with the run
                pass

    def run(self) -> None:
        me, count = jax.process_index(), jax.process_count()
        seen = {i: (None, time.monotonic()) for i in range(count) if i != me}  # last value, when it changed
        beat = 0
        while not self.ended.wait(self.timeout / 8):
            beat += 1
            try:
                self.client.key_value_set(f"{self.PREFIX}{me}", str(beat), allow_overwrite=True)
                values = dict(self.client.key_value_dir_get(self.PREFIX))
            except Exception as error:  # noqa: BLE001 - the store is process 0's
                if self.ended.is_set() or seen.get(0, (None,))[0] == "done":
                    return
                self._leave(f"the coordinator (process 0/{count}) stopped answering "
                            f"({' '.join(str(error).split())[:150]})")
                return
            now = time.monotonic()
            for i, (last, since) in seen.items():
                value = values.get(f"{self.PREFIX}{i}")
                if value != last:
                    seen[i] = (value, now)
                elif value != "done" and now - since > self.timeout:
                    self._leave(f"process {i}/{count} is gone (no sign of life for {self.timeout:.0f} s: killed, "
                                "crashed or its host lost; its own log or the launcher says why)")
                    return

    def _leave(self, why: str) -> None:
        if self.ended.is_set():
            return
        lead = "\n" if jax.process_index() == 0 else ""  # off process 0's progress bar line
        leave_for_lost_peer(f"[{process_label()}] {why}", finished_checkpoint_step, lead)


finished_checkpoint_step: int | None = None  # the newest checkpoint every process finished (the trainer keeps it)


def several_processes() -> bool:
    """initialize() joined this process to others."""
    return bool(_prefix)


def process_label() -> str:
    """'process i/n' (the same words as the log prefix)."""
    return f"process {jax.process_index()}/{jax.process_count()}"


def leave_for_lost_peer(message: str, saved_step: int | None, lead: str = "") -> None:
    """Ends this process because another one is gone: `error: <message>; <what a rerun does>`, then exit 75 when
    every process finished the checkpoint of `saved_step` (a requeue / restart resumes from it), else 1."""
    then = (f"the checkpoint of step {saved_step} is finished: rerunning the same command resumes from it"
            if saved_step is not None else "no checkpoint was finished by this run")
    print(f"{lead}error: {' '.join(message.split())}; {then}", file=sys.stderr, flush=True)
    exit_now(75 if saved_step is not None else 1)


def exit_now(status: int) -> None:
    """Ends a failing process of a multi-process run at once: streams flushed, then os._exit, skipping JAX's
    exit-time shutdown barrier (which would wait up to its timeout for peers that may themselves be waiting in a
    collective for this process, then abort with a C++ trace). The others' next collective fails within
    seconds, or the coordinator's heartbeat timeout ends them."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    logging.shutdown()
    os._exit(status)


class ProcessPrefix(logging.Filter):
    """Prefixes log records with `[process i/n]` when the run has more than one process (set by initialize)."""

    def filter(self, record):
        if _prefix and not getattr(record, "siim_prefixed", False):
            record.msg = _prefix + str(record.msg)
            record.siim_prefixed = True
        return True


def sum_over_processes(value: int) -> int:
    """The sum of an integer over all processes (a small collective; call it on every process at the same
    point). One process: the value itself."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils
    return int(np.sum(multihost_utils.process_allgather(np.asarray(value, np.int64))))


def gather_over_processes(values) -> np.ndarray:
    """int64 (processes, k): every process's `values` (k ints), on every process (a small collective; call it on
    every process at the same point)."""
    values = np.asarray(values, np.int64).reshape(-1)
    if jax.process_count() == 1:
        return values[None]
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(values)).reshape(jax.process_count(), -1)


def to_host(x: jax.Array) -> np.ndarray:
    """The whole value of a global array as host NumPy, on every process (call it on every process at the same
    point when the array spans several). Replicated arrays are read locally; sharded ones are gathered."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class StopVote:
    """One stop decision for all processes, without stalling the device queue.

    Every `every`-th step each process puts its own flag (a stop signal received) into a one-entry-per-device
    array, and a tiny jitted max over the whole mesh runs behind the train step. The answer of a vote is read
    LAG votes later, when the device has long finished it, so every process gets the same answer at the same
    step and they all stop (and save) after that step.
    """

    LAG = 2

    def __init__(self, mesh, every: int = 1):
        self.mesh, self.every, self.calls = mesh, every, 0
        self.sharding = NamedSharding(mesh, PartitionSpec(mesh.axis_names))
        self.any = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, PartitionSpec()))
        self.pending = collections.deque()

    def step(self, stop_here: bool) -> bool:
        """Adds this process's flag for the current step (every `every`-th step: a vote; else nothing) and
        returns the agreed answer of LAG votes ago (False between votes)."""
        self.calls += 1
        if self.calls % self.every:
            return False
        local = np.full((len(self.mesh.local_devices),), int(stop_here), np.int32)
        flags = jax.make_array_from_process_local_data(self.sharding, local, (self.mesh.size,))
        self.pending.append(self.any(flags))
        return bool(self.pending.popleft()) if len(self.pending) > self.LAG else False

    def now(self, stop_here: bool) -> bool:
        """The agreed answer at once: blocks until every process has reached this call (outside the loop)."""
        local = np.full((len(self.mesh.local_devices),), int(stop_here), np.int32)
        return bool(self.any(jax.make_array_from_process_local_data(self.sharding, local, (self.mesh.size,))))
