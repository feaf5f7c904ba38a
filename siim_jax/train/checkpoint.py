"""Orbax checkpoints in <workdir>/checkpoints: async saves, keep the newest N, restore into given shardings.

Each step directory holds the train state, a small JSON record of the model config (checked on restore, so that
a checkpoint of another model is a readable error, not a shape mismatch deep inside Orbax) and the run's
cumulative counters (`data_skipped_total`, ...), which continue after a resume.

Nothing non-finite is ever written: `save` checks the state first. `restore_newest` falls back: a newest step that
cannot be read, was written by another model config or holds non-finite values is reported in one warning line
and the next older one is tried; a step passed over that way is moved to `<workdir>/checkpoints_unusable/` (never
deleted) so that the resumed run can save that step again.
"""

import json
import logging
import time

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from siim_jax import storage
from siim_jax.cli import RunError
from siim_jax.parallel import distributed
from siim_jax.parallel.distributed import lost_contact
from siim_jax.train.state import all_finite

log = logging.getLogger(__name__)


MAX_LISTED = 64  # restore considers at most this many newest steps (keep_checkpoints is far below)

# Orbax saves an array held by several devices "replica-parallel" by default: each replica writes a slice, cut
# by one eager device slice per replica and array (each new shape compiled once per process). For small arrays
# that costs far more than it saves: on 8 CPU devices it took 4.8 s of a 13 s test run that saved twice. Only
# slices of at least this many bytes are written that way; smaller arrays are written whole by one replica (as
# Orbax does on GPU). The files are read back the same either way.
MIN_REPLICA_PARALLEL_SLICE_BYTES = 1 << 20


def _limit_replica_parallel_saving() -> None:
    """Sets the limit on Orbax's default jax.Array handler itself (a new handler registered over it would lose
    its array-metadata store, and Orbax warns on every re-registration). Its constructor argument
    `min_slice_bytes_for_replica_parallel` is kept in this attribute; were it renamed, saves are only slower."""
    handler = ocp.type_handlers.get_type_handler(jax.Array)
    if hasattr(handler, "_min_slice_bytes_for_replica_parallel"):
        handler._min_slice_bytes_for_replica_parallel = MIN_REPLICA_PARALLEL_SLICE_BYTES


_limit_replica_parallel_saving()


class CheckpointMismatchError(RunError, ValueError):
    pass


class CheckpointUnusableError(RunError, RuntimeError):
    """No checkpoint of the workdir can be restored; the message names the directory and what to do."""


class NonFiniteStateError(RunError, RuntimeError):
    """A train state with NaN / Inf values, refused before it is written."""


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed (full disk, file size limit, permissions, a store that stopped answering); the
    step is left unfinished, which restore never takes for intact. `store_kind` as storage.classify_error."""

    def __init__(self, message: str, store_kind: str | None = None):
        super().__init__(message)
        self.store_kind = store_kind


HOW_TO_RUN_KEYS = ("remat",)  # config.model keys that change how the step runs, never the state: free on resume


def model_signature(config: ml_collections.ConfigDict) -> dict:
    """The config values that fix the shapes of the train state."""
    model = {k: v for k, v in json.loads(config.model.to_json()).items() if k not in HOW_TO_RUN_KEYS}
    return {"model": model, "num_masked": config.data.num_masked}


_all_finite = jax.jit(all_finite)


def state_is_finite(state) -> bool:
    """One jitted reduction over every floating array of the state (sharded or not), on every process."""
    return bool(_all_finite(state))


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"[:300]


class Checkpointer:
    def __init__(self, workdir: str, config: ml_collections.ConfigDict):
        self.workdir = storage.absolute(workdir)
        self.directory = storage.join(self.workdir, "checkpoints")
        self.signature = model_signature(config)
        self.timeout_seconds = config.checkpoint_timeout_seconds
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.keep_checkpoints, create=True, enable_async_checkpointing=True,
            async_options=ocp.options.AsyncOptions(timeout_secs=self.timeout_seconds))
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "signature", "counters"))
        self.reader = self.manager
        if jax.process_count() > 1:
            # each process reads its own shards with no barrier of Orbax's: a read that fails on one process only
            # would otherwise leave the others in a restore barrier while it votes (restore_newest), and the two
            # sequences of collectives would no longer pair up
            me = jax.process_index()
            self.reader = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
                read_only=True, multiprocessing_options=ocp.options.MultiprocessingOptions(
                    primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"read{me}")),
                item_names=("state", "signature", "counters"))
        self._finished(None)

    def _finish(self) -> None:
        """Waits for pending saves; a failed one (raised by Orbax / TensorStore as one of many types) becomes
        CheckpointWriteError."""
        try:
            self.manager.wait_until_finished()
            self._finished(self.manager.latest_step())
        except Exception as error:  # noqa: BLE001
            if lost_contact(error):  # a peer is gone, not the store: the trainer says so
                raise
            remote = storage.is_remote(self.directory)
            if isinstance(error, TimeoutError):  # Orbax's commit deadline (AsyncOptions.timeout_secs)
                raise CheckpointWriteError(
                    f"writing a checkpoint into {self.directory} did not finish within "
                    f"config.checkpoint_timeout_seconds={self.timeout_seconds} s ({_first_line(error)}); "
                    + ("the object store did not answer: check the network (and STORAGE_EMULATOR_HOST / "
                       "TENSORSTORE_GCS_HTTP_URL if you use an emulator)" if remote else "check the disk")
                    + ", or raise the limit for very large states; unfinished steps are never restored, so rerunning "
                    "the same command resumes from the newest finished one", "unreachable" if remote else None) from None
            store = storage.describe_error(error) if remote else None
            if store:  # it already says what to do and that the run resumes
                raise CheckpointWriteError(f"writing a checkpoint into {self.directory} failed: {store}",
                                           storage.classify_error(error)) from None
            raise CheckpointWriteError(
                f"writing a checkpoint into {self.directory} failed ({_first_line(error)}); check the free space, "
                "file size limits and permissions there; unfinished steps are never restored, so rerunning the "
                "same command resumes from the newest finished one") from None

    def _finished(self, step: int | None) -> None:
        """Records the newest step known to be written whole by every process (restored, or a save waited for):
        the exit status (75 or 1) of a process that leaves because another one is gone."""
        self.finished_step = distributed.finished_checkpoint_step = step

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def intact_step(self) -> int | None:
        """The newest saved step once pending saves end: every save is checked finite first, and the steps of
        an earlier run that restore_newest passed over are moved away."""
        self._finish()
        return self.manager.latest_step()

    def describe_intact(self) -> str:
        step = self.intact_step()
        return (f"the newest intact checkpoint is {self.path(step)}" if step is not None
                else f"no intact checkpoint exists yet in {self.directory}")

    def save(self, step: int, state, counters: dict | None = None) -> None:
        """Starts an async save of `state` at `step` (no-op if that step is already saved).

        Raises NonFiniteStateError, writing nothing, if any array of `state` is not finite.
        """
        if step in self.manager.all_steps():
            return
        if not state_is_finite(state):
            raise NonFiniteStateError(
                f"the train state of step {step} holds NaN or Inf values and was not saved; "
                f"{self.describe_intact()}; lower config.optim.blr (or check the data) and rerun")
        self._finish()  # the previous async save's failure surfaces here, as one error
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        signature=ocp.args.JsonSave(self.signature),
                                                        counters=ocp.args.JsonSave(dict(counters or {}))))

    def _read(self, step: int, abstract_state):
        """(state, counters) of `step`; raises CheckpointMismatchError or whatever reading fails with."""
        saved = self.reader.restore(step, args=ocp.args.Composite(signature=ocp.args.JsonRestore()))["signature"]
        if saved != self.signature:
            diff = {k: (saved.get(k), v) for k, v in self.signature.items() if saved.get(k) != v}
            raise CheckpointMismatchError(
                f"checkpoint {self.path(step)} was written by another model config "
                f"(saved vs current: {diff}); use another --workdir or the matching recipe")
        state = self.reader.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))["state"]
        try:
            counters = self.reader.restore(step, args=ocp.args.Composite(counters=ocp.args.JsonRestore()))
            counters = dict(counters["counters"] or {})
        except Exception:  # written before counters were saved
            counters = {}
        return state, counters

    def restore(self, step: int, abstract_state):
        """Restores the state saved at `step` into the shardings of `abstract_state` (ShapeDtypeStructs)."""
        return self._read(step, abstract_state)[0]

    def restore_newest(self, abstract_state):
        """(step, state, counters) of the newest usable checkpoint, or None when the workdir has none.

        Unreadable, mismatched or non-finite steps are skipped with one warning line each; when an older one is
        used, the skipped ones are moved to <workdir>/checkpoints_unusable/. Raises CheckpointMismatchError when
        every step belongs to another model, CheckpointUnusableError when none can be used for other reasons.
        """
        # one decision for the whole job: process 0's listing, and a step is used only when every process read
        # it (a transient read error on one host sends every process to the same older step, never only that one)
        steps = sorted(self._agreed_steps(), reverse=True)
        skipped, mismatches = [], []
        for step in steps:
            state = why = None
            log.info("restoring %s", self.path(step))
            try:
                state, counters = self._read(step, abstract_state)
            except CheckpointMismatchError as error:
                mismatches.append(error)
                why = "was written by another model config"
            except Exception as error:  # Orbax / TensorStore raise many kinds for damaged files
                if storage.is_remote(self.directory) and storage.classify_error(error) in (
                        "unreachable", "permission", "credentials"):
                    # the store, not the checkpoint: nothing is skipped or moved aside
                    raise storage.ObjectStoreError(f"{self.path(step)}: {storage.describe_error(error)}") from None
                why = f"cannot be read ({_first_line(error)})"
            failed = distributed.gather_over_processes([why is not None])[:, 0]
            if why is None and failed.any():
                why = f"cannot be read on process(es) {', '.join(map(str, np.flatnonzero(failed)))}"
            if why is None:
                if state_is_finite(state):
                    if skipped:
                        self.set_aside(skipped, "unusable")
                    self._finished(step)
                    return step, state, counters
                why = "holds NaN or Inf values"
            older = "trying the previous one" if step != steps[-1] else "no older one is left"
            log.warning("checkpoint %s %s; skipping it, %s", self.path(step), why, older)
            skipped.append(step)
        if not steps:
            return None
        if len(mismatches) == len(steps):
            raise mismatches[0]
        raise CheckpointUnusableError(
            f"no checkpoint in {self.directory} can be used (steps {sorted(skipped)}: see the warnings above); "
            "nothing was changed there: to start afresh use another --workdir, or move those step folders away")

    def _agreed_steps(self) -> list[int]:
        """The saved steps as process 0 lists them (every process gets the same list)."""
        steps = list(self.manager.all_steps())
        if jax.process_count() == 1:
            return steps
        from jax.experimental import multihost_utils
        padded = np.full((MAX_LISTED,), -1, np.int64)
        newest = sorted(steps, reverse=True)[:MAX_LISTED]
        padded[:len(newest)] = newest
        agreed = np.asarray(multihost_utils.broadcast_one_to_all(padded))
        return [int(s) for s in agreed if s >= 0]

    def set_aside(self, steps, why: str) -> None:
        """Moves step folders to <workdir>/checkpoints_unusable/<step>-<time> (process 0 moves, every process
        calls this at the same point), never deleting."""
        self._finish()
        steps = [s for s in steps if s in self.manager.all_steps()]
        if steps and jax.process_index() == 0:
            target = storage.join(self.workdir, "checkpoints_unusable")
            storage.makedirs(target)
            for step in steps:
                destination = storage.join(target, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
                storage.move(self.path(step), destination)
                log.warning("moved the %s checkpoint %s to %s (kept, not deleted)", why, self.path(step),
                            destination)
        if steps and jax.process_count() > 1:  # the others list the directory only after process 0 moved
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("siim_jax checkpoints set aside")
        self.manager.reload()
        if self.reader is not self.manager:
            self.reader.reload()

    def path(self, step: int | None) -> str:
        return storage.join(self.directory, str(step))

    def wait(self) -> None:
        self._finish()

    def close(self) -> None:
        try:
            self._finish()
        finally:
            for manager in (self.manager,) if self.reader is self.manager else (self.manager, self.reader):
                try:
                    manager.close()
                except Exception:  # noqa: BLE001 - already reported by _finish
                    pass


def abstract_like(state, shardings):
    """ShapeDtypeStructs with the given shardings, the restore target for `state`'s structure."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
