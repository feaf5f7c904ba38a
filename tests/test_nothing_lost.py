"""Nothing lost: no non-finite checkpoint, restore falls back past damaged ones, one run per workdir, counters
carried by the checkpoint, validated settings, one `error:` line and documented exit statuses for bad input, and
kill -9 at random points of a run."""

import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from state_compare import assert_same_state, checkpoints_before_relaunch, expected_resume_step, resumed_from
from siim_jax.config import ConfigError
from siim_jax.train.checkpoint import (Checkpointer, CheckpointMismatchError, CheckpointUnusableError,
                                       NonFiniteStateError)
from siim_jax.train.loop import train_and_evaluate
from siim_jax.train.workdir_lock import WorkdirBusyError, WorkdirLock, note_progress

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_state(value: float) -> dict:
    rng = np.random.default_rng(int(value * 10))
    return {"w": jnp.asarray(rng.normal(size=(64, 96)), jnp.float32) + value, "b": jnp.arange(5.0) * value}


def abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def saved_steps(workdir) -> list[int]:
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def test_a_non_finite_state_is_never_written(tmp_path):
    checkpoints = Checkpointer(str(tmp_path), tiny_config())
    checkpoints.save(1, small_state(1.0))
    bad = small_state(2.0)
    bad["w"] = bad["w"].at[3, 7].set(jnp.nan)
    with pytest.raises(NonFiniteStateError, match=r"step 2 .*newest intact checkpoint is .*checkpoints/1"):
        checkpoints.save(2, bad)
    checkpoints.close()
    assert saved_steps(tmp_path) == [1]


@pytest.mark.parametrize("damage", ["truncate the largest array file", "truncate the state metadata"])
def test_restore_falls_back_to_the_previous_intact_checkpoint(tmp_path, caplog, damage):
    config = tiny_config()
    checkpoints = Checkpointer(str(tmp_path), config)
    checkpoints.save(1, small_state(1.0), {"data_skipped_total": 3})
    checkpoints.save(2, small_state(2.0), {"data_skipped_total": 5})
    checkpoints.close()
    state_dir = tmp_path / "checkpoints" / "2" / "state"
    files = [os.path.join(r, f) for r, _, fs in os.walk(state_dir) for f in fs]
    victim = (max((f for f in files if f"{os.sep}d{os.sep}" in f), key=os.path.getsize)
              if damage.startswith("truncate the largest") else str(state_dir / "_METADATA"))
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)

    checkpoints = Checkpointer(str(tmp_path), config)
    with caplog.at_level(logging.WARNING, logger="siim_jax"):
        step, state, counters = checkpoints.restore_newest(abstract(small_state(0.0)))
    checkpoints.close()
    assert step == 1 and counters == {"data_skipped_total": 3}
    np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(small_state(1.0)["w"]))
    skips = [r.getMessage() for r in caplog.records if "skipping it" in r.getMessage()]
    assert len(skips) == 1 and "checkpoints/2" in skips[0]
    # kept, not deleted, and out of the way of the resumed run's own step 2
    moved = os.listdir(tmp_path / "checkpoints_unusable")
    assert [m.split("-")[0] for m in moved] == ["2"] and saved_steps(tmp_path) == [1]


def test_no_readable_checkpoint_is_one_error_and_nothing_is_moved(tmp_path):
    config = tiny_config()
    checkpoints = Checkpointer(str(tmp_path), config)
    checkpoints.save(1, small_state(1.0))
    checkpoints.close()
    os.truncate(tmp_path / "checkpoints" / "1" / "state" / "_METADATA", 10)
    with pytest.raises(CheckpointUnusableError, match=r"no checkpoint in .*checkpoints can be used"):
        Checkpointer(str(tmp_path), config).restore_newest(abstract(small_state(0.0)))
    assert saved_steps(tmp_path) == [1] and not (tmp_path / "checkpoints_unusable").exists()
    other = tiny_config(**{"model.decoder_width": 64})
    written = Checkpointer(str(tmp_path / "b"), config)
    written.save(1, small_state(1.0))
    written.close()
    with pytest.raises(CheckpointMismatchError, match="decoder_width"):
        Checkpointer(str(tmp_path / "b"), other).restore_newest(abstract(small_state(0.0)))


HOLD_LOCK = ("import sys, time; from siim_jax.train.workdir_lock import WorkdirLock; "
             "lock = WorkdirLock(sys.argv[1]); lock.acquire(); print('held', flush=True); time.sleep(600)")


def test_a_busy_workdir_is_refused_and_a_dead_runs_lock_taken_over(tmp_path, caplog):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(WorkdirBusyError, match=rf"in use by the run of host \S+ pid {holder.pid} "):
            WorkdirLock(str(tmp_path)).acquire()
        with pytest.raises(WorkdirBusyError):  # the trainer takes the lock before it reads anything
            train_and_evaluate(tiny_config(), str(tmp_path))
    finally:
        holder.kill()
        holder.wait()
    with caplog.at_level(logging.WARNING, logger="siim_jax"):
        with WorkdirLock(str(tmp_path)):
            pass
    assert any(f"pid {holder.pid}" in r.getMessage() and "taking over" in r.getMessage() for r in caplog.records)
    with WorkdirLock(str(tmp_path)):  # released cleanly last time: no warning, no refusal
        pass


def test_a_hung_runs_lock_stops_its_heartbeat_until_the_run_moves_again(tmp_path, monkeypatch, caplog):
    """No progress mark for SIIM_LOCK_HUNG_SECONDS: the heartbeat stops (a relaunch elsewhere may take the
    workdir once it is stale), and goes on when the run moves again."""
    monkeypatch.setenv("SIIM_LOCK_STALE_SECONDS", "1")  # a heartbeat every 0.1 s
    monkeypatch.setenv("SIIM_LOCK_HUNG_SECONDS", "0.6")

    def lock_contents() -> dict:
        for _ in range(50):  # the heartbeat rewrites the file in place: read again if caught mid-write
            try:
                return json.loads((tmp_path / "LOCK").read_text())
            except ValueError:
                time.sleep(0.01)
        raise AssertionError("LOCK never readable")

    elsewhere = WorkdirLock(str(tmp_path), enabled=False)
    elsewhere.owner["host"] = "another-host"
    with caplog.at_level(logging.WARNING, logger="siim_jax"), WorkdirLock(str(tmp_path)):
        first = lock_contents()["heartbeat"]
        for _ in range(10):  # moving: the heartbeat goes on
            note_progress()
            time.sleep(0.1)
        moving = lock_contents()["heartbeat"]
        assert moving > first + 0.5
        with pytest.raises(WorkdirBusyError, match="in use by the run of"):  # fresh: another host is refused
            elsewhere._check_takeover(lock_contents(), flock_held=False)
        time.sleep(1.6)  # hung: after 0.6 s without progress no heartbeat is written
        hung = lock_contents()["heartbeat"]
        assert hung < time.time() - 1.0
        time.sleep(0.3)
        assert lock_contents()["heartbeat"] == hung
        elsewhere._check_takeover(lock_contents(), flock_held=False)  # stale now: another host may take it
        note_progress()  # it moves again
        time.sleep(0.4)
        assert lock_contents()["heartbeat"] > hung + 1.5
    messages = [r.getMessage() for r in caplog.records]
    assert any("no progress for" in m and "SIIM_LOCK_HUNG_SECONDS" in m for m in messages), messages
    assert any("progress again" in m for m in messages), messages


@pytest.mark.parametrize("overrides, key", [
    ({"keep_checkpoints": 0}, "keep_checkpoints=0"), ({"keep_checkpoints": -1}, "keep_checkpoints=-1"),
    ({"knn.k": 0}, "knn.k=0"),
    ({"mesh.fsdp": 3}, "mesh.data/fsdp/tensor"), ({"mesh.data": 2, "mesh.fsdp": 2}, "needs 4 devices, found 8"),
    ({"mesh.tensor": 0}, "mesh.tensor=0"), ({"batch_size": 128}, "larger than the 64 images"),
    ({"log_every_steps": 0}, "log_every_steps=0"), ({"knn.temperature": 0.0}, "knn.temperature=0.0"),
])
def test_out_of_range_settings_name_the_key_and_the_range(tmp_path, overrides, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        train_and_evaluate(tiny_config(**overrides), str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()  # refused before anything is built


def run_train(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "siim_jax.train", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, **kwargs)


def test_recipes_that_do_not_load_and_unwritable_workdirs_are_one_error_line(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(:\n")
    raising = tmp_path / "raising.py"
    raising.write_text("def get_config():\n    raise RuntimeError('recipe needs an argument')\n")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cases = [(["--config", str(broken), "--workdir", str(tmp_path / "w")], 2, "SyntaxError"),
             (["--config", str(raising), "--workdir", str(tmp_path / "w")], 2, "recipe needs an argument"),
             (["--config", "configs/demo.py", "--workdir", str(blocker / "sub")], 1, "a_file")]
    for args, status, text in cases:
        done = run_train(*args)
        assert done.returncode == status, done.stderr[-2000:]
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and text in errors[0], done.stderr[-2000:]
        assert "Traceback" not in done.stderr


DEMO_RUN = ["--config", "configs/demo.py", "--config.batch_size=16", "--config.data.num_train=256",
            "--config.log_every_steps=1", "--config.warmup_steps=2", "--config.total_steps=24",
            "--config.checkpoint_every_steps=3", "--config.eval_every_steps=0",
            # 32 px views (4x4 patches): what is tested does not depend on the size, the compile time does
            "--config.model.image_size=32", "--config.data.raw_size=40", "--config.data.num_masked=10"]


@pytest.mark.slow
def test_kill_9_at_random_points_then_relaunches_end_where_an_uninterrupted_run_does(tmp_path):
    reference = run_train(*DEMO_RUN, "--workdir", str(tmp_path / "reference"))
    assert reference.returncode == 0, reference.stderr[-2000:]
    workdir = tmp_path / "killed"
    rng = random.Random(0)
    kills = 0
    for attempt in range(8):
        before = checkpoints_before_relaunch(workdir)
        proc = subprocess.Popen([sys.executable, "-m", "siim_jax.train", *DEMO_RUN, "--workdir", str(workdir)],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if kills < 2:
            # kill somewhere between start-up and a few steps past the newest checkpoint
            metrics = workdir / "metrics.jsonl"
            target = rng.randint(1, 6)
            start = len(metrics.read_text().splitlines()) if metrics.exists() else 0
            deadline = time.time() + 240
            while time.time() < deadline and proc.poll() is None:
                lines = len(metrics.read_text().splitlines()) if metrics.exists() else 0
                if lines >= start + target:
                    break
                time.sleep(0.05)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.communicate(timeout=60)
            continue
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        assert out.strip().splitlines()[-1].startswith("done: step 24/24")
        # it went on from the newest checkpoint the kills left (or, had that one been unreadable, the previous)
        assert resumed_from(err) == expected_resume_step(before, workdir), (before, err[-3000:])
        break
    assert kills == 2
    # the whole final state (step 24, params, EMA, optimiser state, BatchNorm statistics, counters)
    assert_same_state(workdir, tmp_path / "reference", rtol=1e-6, atol=1e-7)
    logged = [json.loads(line)["step"] for line in open(workdir / "metrics.jsonl")]
    assert logged == list(range(1, 25))  # every step logged once, no gap, no duplicate


@pytest.mark.slow
def test_a_full_disk_while_saving_is_one_error_line_and_the_rerun_finishes(tmp_path):
    import resource

    def small_file_limit():  # every file past 150 kB fails to grow, as on a full disk (metrics stay writable)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, 150_000))

    run = [*DEMO_RUN, "--config.total_steps=3", "--config.checkpoint_every_steps=1", "--workdir", str(tmp_path)]
    full = run_train(*run, preexec_fn=small_file_limit)
    assert full.returncode == 1, full.stderr[-3000:]
    errors = [line for line in full.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "writing a checkpoint" in errors[0], full.stderr[-3000:]
    assert "Traceback" not in full.stderr, full.stderr[-3000:]
    assert saved_steps(tmp_path) == []  # the half-written step is never a step folder that restore would take
    rerun = run_train(*run)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert resumed_from(rerun.stderr) is None  # nothing finished was saved: it started afresh
    assert rerun.stdout.strip().splitlines()[-1].startswith("done: step 3/3")
    assert saved_steps(tmp_path) == [2, 3]
