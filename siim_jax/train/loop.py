"""train_and_evaluate(config, workdir): the training loop of every method (pretraining, linear probe,
fine-tune) with checkpoints, resume, monitoring and the evaluators of config.evals.

Data flows one way: source -> host decode and crops (the method's batches, a thread pool) -> global device
batches (prefetched) -> jitted step (augmentation on device) -> metrics, evaluators and checkpoints. The batch stream is
a pure function of (seed, step), so a resumed run sees exactly the batches an uninterrupted run would have seen
(siim_jax/data/pipeline.py says what exactly is guaranteed).
"""

import collections
import json
import logging
import math
import sys
import time

import jax
import ml_collections
import numpy as np
import tqdm

from siim_jax import config as config_lib
from siim_jax import storage
from siim_jax.cli import RunError
from siim_jax.data.sources import SourceError, listing_fingerprint, open_source
from siim_jax.methods import get_method
from siim_jax.parallel.distributed import (PeerLostError, StopVote, gather_over_processes, lost_contact,
                                          process_label, sum_over_processes)
from siim_jax.parallel.sharding import batch_shards, create_mesh, global_batch, local_rows, owned_rows_mask
from siim_jax.train.checkpoint import Checkpointer
from siim_jax.train.evaluators import build_evaluators, with_best_top1
from siim_jax.train.schedules import ema_momentum_fn, learning_rate_fn, training_length
from siim_jax.train.state import abstract_train_state, init_train_state
from siim_jax.train.step import jit_train_step
from siim_jax.train.stop import StopRequest
from siim_jax.train.workdir_lock import WorkdirLock, note_progress

log = logging.getLogger(__name__)


class NonFiniteLossError(RunError, RuntimeError):
    pass


def summary_writer_class():
    """tensorboardX.SummaryWriter, imported without PyTorch: tensorboardX imports torch when it is installed
    (~1.5 s), only to accept torch tensors, which this writer never passes."""
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # `import torch` raises ImportError meanwhile: tensorboardX goes on without it
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide:
            del sys.modules["torch"]
    return SummaryWriter


class MetricsWriter:
    """metrics.jsonl (one JSON object per record) and TensorBoard scalars in the workdir, written by process 0;
    every process keeps the records in memory.

    A resumed run keeps the records up to its checkpoint's step and drops the rest (they are logged again), so
    the file is always one record per logged step. On a file system each record is appended as it is logged. An
    object (gs://) cannot be appended to: the whole file is rewritten at most every FLUSH_SECONDS, at every
    checkpoint save and at the end, and TensorBoard's events object at the same times. So a kill -9 or a
    preemption loses only records logged after the newest checkpoint (and at most FLUSH_SECONDS of them), which
    the resumed run logs again anyway.
    """

    FLUSH_SECONDS = 30.0

    def __init__(self, workdir: str, resume_step: int | None):
        self.path = storage.join(workdir, "metrics.jsonl")
        self.remote = storage.is_remote(self.path)
        self.enabled = jax.process_index() == 0
        self.kept = []
        self.flushed_at = time.monotonic()
        if self.enabled and resume_step is not None and storage.exists(self.path):
            # keep what the checkpoint covers; a line cut short by a crash is dropped
            for line in storage.read_text(self.path).splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if record["step"] <= resume_step:
                    self.kept.append(record)
        if self.enabled:
            self._rewrite()
            self.tb = summary_writer_class()(storage.join(workdir, "tensorboard"))

    def _rewrite(self) -> None:
        storage.write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.kept))

    def write(self, step: int, values: dict) -> None:
        record = {"step": int(step), **{k: float(v) for k, v in values.items()}}
        self.kept.append(record)
        if not self.enabled:
            return
        for k, v in values.items():
            self.tb.add_scalar(k, float(v), int(step))
        if not self.remote:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            self.tb.flush()
        elif time.monotonic() - self.flushed_at >= self.FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Makes every record so far durable (on a file system they already are)."""
        if self.enabled and self.remote:
            self._rewrite()
            self.tb.flush()
            self.flushed_at = time.monotonic()

    def records(self) -> list[dict]:
        return list(self.kept)

    def close(self, failure: BaseException | None = None) -> None:
        """Flushes and closes; never raises (it runs while `failure` may be on its way out): a record or event
        that cannot be written is one warning line, and TensorBoard's exit hook has nothing left to do. A store
        that did not answer (`failure`, or the metrics write) is not asked again: the clients would retry it for
        minutes on the way out."""
        if not self.enabled:
            return
        if failure is not None and storage.classify_error(failure) == "unreachable":
            return self._abandon()
        for what, action in (("metrics.jsonl", self.flush), ("the TensorBoard events", self.tb.close)):
            try:
                action()
            except Exception as error:  # noqa: BLE001 - a store that went away, a full disk
                log.warning("could not write %s to %s: %s", what, storage.parent(self.path),
                            storage.describe_error(error) or error)
                if storage.classify_error(error) == "unreachable":
                    return self._abandon()

    def _abandon(self) -> None:
        """Leaves the records since the last flush unwritten; tensorboardX's exit hook, which would retry the
        store and print a traceback, finds its writer closed."""
        log.warning("the store of %s does not answer: the records since its last flush are not written (the "
                    "resumed run logs those steps again)", storage.parent(self.path))
        writer = getattr(getattr(self.tb, "file_writer", None), "event_writer", None)
        if writer is not None and hasattr(writer, "_closed"):
            writer._closed = True  # tensorboardX's own flag: close() and flush() are then no-ops


def device_prefetch(host_batches, mesh, rules, global_rows: int, size: int = 2):
    """(host rows of a batch, skipped) pairs -> (global device batch of `global_rows` rows, skipped), with the
    next `size` batches already on their way to the devices while the current step runs."""
    queue = collections.deque()
    for batch, skipped in host_batches:
        queue.append((global_batch(batch, mesh, rules, global_rows), skipped))
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, stop_at_step: int | None = None,
                       initial_weights=None) -> dict:
    """Trains the method of `config` (pretraining, linear probe, fine-tune) in `workdir`, resuming from its newest
    checkpoint. Returns a summary dict.

    stop_at_step: behave as if interrupted once that many steps are done (save, return), for resumable jobs
    with a step budget per allocation. initial_weights: (method, fresh TrainState) -> TrainState, applied when
    the run starts from step 0 (a resume restores the checkpoint instead), e.g. to put a pretrained encoder in.
    """
    config_lib.validate(config)
    method = get_method(config)  # the one method object of the run; everything below receives it
    workdir = storage.absolute(workdir)
    storage.makedirs(workdir)
    with storage.object_store_errors(workdir), WorkdirLock(workdir, enabled=jax.process_index() == 0):
        return _train_in_locked_workdir(method, workdir, stop_at_step, initial_weights)


def use_compilation_cache(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Points JAX's persistent compilation cache at config.compilation_cache_dir ("workdir": <workdir>/jax_cache)
    unless one is set already ($JAX_COMPILATION_CACHE_DIR): a restarted run loads its compiled step and
    evaluators instead of compiling them again. Takes effect when called before the process's first compile."""
    where = config.get("compilation_cache_dir", "")
    if jax.config.jax_compilation_cache_dir or not where:
        return
    jax.config.update("jax_compilation_cache_dir", storage.join(workdir, "jax_cache") if where == "workdir" else where)


def _train_in_locked_workdir(method, workdir: str, stop_at_step: int | None, initial_weights) -> dict:
    """The run, with stop requests counted from its first line (the command's own StopRequest if it installed
    one at start-up, else one for the length of the run)."""
    stop = StopRequest.active or StopRequest()
    use_compilation_cache(method.config, workdir)
    try:
        return _train(method, workdir, stop_at_step, initial_weights, stop)
    except Exception as error:
        if isinstance(error, PeerLostError) or not lost_contact(error):
            raise
        raise _peer_lost(error, "while starting the run", None) from None
    finally:
        if stop is not StopRequest.active:
            stop.restore()


def check_same_listing(source, name: str) -> None:
    """Raises SourceError (on every process) unless every process lists the same examples: a difference would
    silently mix different images into one global batch."""
    seen = gather_over_processes([len(source), listing_fingerprint(source)])
    if (seen != seen[0]).any():
        raise SourceError(
            f"the processes list different data for config.data.source={name!r}: "
            + ", ".join(f"process {i} {n} examples (listing {h:016x})" for i, (n, h) in enumerate(seen))
            + "; every process must see the same files (one shared folder or bucket, the same path)")


def _peer_lost(error: Exception, when: str, saved_step: int | None) -> PeerLostError:
    return PeerLostError(f"{process_label()} lost contact with the other processes {when} "
                         f"({' '.join(str(error).split())[:200]}): one of them failed or was killed (its own log, "
                         "or the launcher's line, says which and why)", saved_step)


def _train(method, workdir: str, stop_at_step: int | None, initial_weights, stop: StopRequest) -> dict:
    config = method.config
    if jax.process_index() == 0:
        storage.write_text(storage.join(workdir, "config.json"), config.to_json_best_effort(indent=2))

    rules = config.mesh.logical_axis_rules
    mesh = create_mesh(config.mesh)
    data_shards = batch_shards(mesh, rules)
    if config.batch_size % (data_shards * config.grad_accum_steps):
        raise config_lib.ConfigError(
            f"config.batch_size={config.batch_size} must be divisible by the {data_shards} data shards times "
            f"config.grad_accum_steps={config.grad_accum_steps}")
    source = open_source(config.data, config.seed)
    if jax.process_count() > 1:
        check_same_listing(source, config.data.source)
    if len(source) < config.batch_size:
        raise config_lib.ConfigError(
            f"config.batch_size={config.batch_size} is larger than the {len(source)} images of "
            f"config.data.source={config.data.source!r}; valid range: 1..{len(source)}")
    # each process builds exactly the rows of the global batch its devices hold (shared rows: built by every
    # holder, counted by the lowest-index one)
    batches = method.make_batches(source, rows=local_rows(mesh, rules, config.batch_size),
                                  owned=owned_rows_mask(mesh, rules, config.batch_size))

    length = training_length(config, len(source))
    lr_fn, momentum_fn = learning_rate_fn(config, length), ema_momentum_fn(config, length)
    checkpoints = Checkpointer(workdir, config)
    graphdef, tx, abstract_state, shardings = abstract_train_state(method, mesh, lr_fn)
    restored = checkpoints.restore_newest(abstract_state)  # straight into the shardings, nothing allocated first
    if restored is None:
        resume_step, counters = None, {}
        _, _, state, _ = init_train_state(method, mesh, lr_fn)
        if initial_weights is not None:
            state = initial_weights(method, state)
    else:
        resume_step, state, counters = restored
        log.info("resumed from %s", checkpoints.path(resume_step))
    start = int(state.step)
    metrics_writer = MetricsWriter(workdir, resume_step)
    # undecodable examples replaced so far (all processes), carried over a resume by the checkpoint
    skipped_before = int(counters.get("data_skipped_total", 0))
    skipped_here = 0  # this process's share since this run started; summed over processes when logged or saved

    train_step = jit_train_step(method, graphdef, tx, lr_fn, momentum_fn, mesh, shardings)

    evaluators = build_evaluators(config, method, graphdef, mesh, shardings, source)

    def evaluate(step):
        for evaluator in evaluators:
            figures = with_best_top1(evaluator.run(state), metrics_writer.records())
            metrics_writer.write(step, figures)
            log.info("step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in figures.items()))

    if start == 0:
        evaluate(0)

    vote = StopVote(mesh, config.stop_vote_every_steps if jax.process_count() > 1 else 1)
    # a stop requested during start-up, restore or the step-0 evaluation: every process stops here, before the
    # first step; the newest checkpoint stays the run's last word (nothing trained since)
    stopped_before_training = vote.now(stop.signal is not None)
    pending = []  # (step, device metrics) not yet checked for finiteness
    last_good = {}

    def check_pending():
        """Raises NonFiniteLossError at the first logged step whose metrics or new state are not finite."""
        nonlocal pending
        for step, values in jax.device_get(pending):
            values = dict(values)
            state_finite = values.pop("state_finite", 1.0) == 1.0
            if not (state_finite and all(np.isfinite(v) for v in values.values())):
                # the loss of `step` is computed from the state of step - 1: a checkpoint of it (finite, but
                # blown up) would fail the same way on every resume
                checkpoints.set_aside([step - 1], f"diverging (step {step} computed from it is non-finite)")
                what = {k: round(float(v), 6) for k, v in values.items()}
                raise NonFiniteLossError(
                    f"non-finite {'train state' if not state_finite else 'value'} at step {step} ({what}); "
                    f"{checkpoints.describe_intact()}; lower config.optim.blr or check the data, then rerun")
            last_good.update(values)
        pending = []

    def run_counters(step) -> dict:
        """Counts over all processes and the whole run (resumes included); a collective when multi-process."""
        return {"data_skipped_total": skipped_before + sum_over_processes(skipped_here),
                "images_seen": step * config.batch_size}

    progress = tqdm.tqdm(total=length.total_steps, initial=start, desc=method.name, unit="step",
                         dynamic_ncols=True, mininterval=1.0, disable=jax.process_index() != 0)
    interrupted = stopped_before_training
    peer_lost, dispatched = False, start
    try:
        if stopped_before_training:
            log.warning("stopped before the first step: step %d is where a rerun starts", start)
        timer, timed_steps = None, 0  # throughput over training steps only: no compilation, k-NN or saving
        device_batches = device_prefetch(batches.iterate(start), mesh, rules, config.batch_size)
        end = start if stopped_before_training else length.total_steps
        for step_index, (batch, skipped) in zip(range(start, end), device_batches):
            state, metrics = train_step(state, batch)
            stop_agreed = vote.step(stop.signal is not None)  # the same answer on every process
            skipped_here += len(skipped)
            step = dispatched = step_index + 1
            note_progress()
            pending.append((step, metrics))
            progress.update(1)
            if timer is None:  # the first step compiles
                jax.block_until_ready(metrics)
                reset_timer = True
            else:
                timed_steps += 1
                reset_timer = False
            is_last = step == length.total_steps
            if step % config.log_every_steps == 0 or is_last:
                jax.block_until_ready(metrics)
                # no rate until a step has run without compiling (never a NaN in metrics.jsonl / TensorBoard)
                rate = {"images_per_sec": timed_steps * config.batch_size / (time.perf_counter() - timer)
                        } if timed_steps else {}
                check_pending()
                counts = run_counters(step)
                metrics_writer.write(step, {**last_good, **rate, **counts})
                progress.set_postfix(loss=f"{last_good['loss']:.4f}",
                                     **({"img_s": f"{rate['images_per_sec']:.1f}"} if rate else {}))
                reset_timer = True
            if evaluators and (step % config.eval_every_steps == 0 or is_last):
                evaluate(step)
                reset_timer = True
            interrupted = stop_agreed or step == stop_at_step
            if step % config.checkpoint_every_steps == 0 or is_last or interrupted:
                check_pending()
                metrics_writer.flush()  # the records the checkpoint covers are durable before it is
                checkpoints.save(step, state, run_counters(step))
                reset_timer = True
            if interrupted:
                break
            if reset_timer:
                timer, timed_steps = time.perf_counter(), 0
    except Exception as error:
        if not lost_contact(error):
            raise
        peer_lost = True
        raise _peer_lost(error, f"near step {dispatched}", checkpoints.finished_step) from None
    finally:
        progress.close()
        try:
            if not peer_lost:  # else a pending save cannot finish without the others: waiting for it would hang
                checkpoints.close()
        finally:
            metrics_writer.close(failure=sys.exc_info()[1])

    records = metrics_writer.records()
    knn = [r["knn_top1"] for r in records if "knn_top1" in r]
    logged_losses = [r["loss"] for r in records if "loss" in r]
    final_step = int(state.step)
    validation = [r for r in records if "val_top1" in r]
    summary = {"step": final_step, "total_steps": length.total_steps, "interrupted": interrupted,
               "final_loss": logged_losses[-1] if logged_losses else math.nan,
               "knn_top1_start": knn[0] if knn else None, "knn_top1_end": knn[-1] if knn else None,
               "top1": validation[-1]["val_top1"] if validation else None,
               "top1_best": max(r["val_top1"] for r in validation) if validation else None,
               "top5": validation[-1]["val_top5"] if validation else None,
               "data_skipped_total": skipped_before + sum_over_processes(skipped_here),
               "checkpoint": checkpoints.path(final_step), "workdir": workdir}
    return summary


def format_summary(s: dict) -> str:
    knn = (f"knn_top1 {s['knn_top1_start']:.3f} (step 0) -> {s['knn_top1_end']:.3f} (step {s['step']})"
           if s["knn_top1_start"] is not None else "knn off")
    if s.get("top1") is not None:  # a classifier: its validation figures
        knn = (f"top1: {s['top1']:.4f}, top1_best: {s['top1_best']:.4f}, top5: {s['top5']:.4f} "
               f"(validation at step {s['step']}; top1_best over all evaluations)")
    status = "interrupted at" if s["interrupted"] else "done:"
    skipped = f", {s['data_skipped_total']} undecodable images skipped" if s.get("data_skipped_total") else ""
    return (f"{status} step {s['step']}/{s['total_steps']}, final loss {s['final_loss']:.4f}, {knn}{skipped}, "
            f"checkpoint {s['checkpoint']}")
