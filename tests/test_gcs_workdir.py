"""Training workdirs on gs://, against a real GCS JSON-API server on 127.0.0.1 (tests/gcs_server.py; the `gcs`
fixture gives each test a fresh server and an empty bucket gs://bucket): checkpoints, config.json,
metrics.jsonl, TensorBoard events and the workdir lock, found by the clients through their standard variables
only; faults of the store (stopped server, damaged or missing objects, no bucket)."""

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from state_compare import assert_same_state, resumed_from
from test_nothing_lost import DEMO_RUN, REPO, run_train

from siim_jax.train.workdir_lock import WorkdirBusyError, WorkdirLock

SHORT = [*DEMO_RUN, "--config.total_steps=6", "--config.checkpoint_every_steps=2"]


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory):
    """The workdir of an uninterrupted SHORT run on a local disk."""
    workdir = tmp_path_factory.mktemp("local_reference")
    done = run_train(*SHORT, "--workdir", str(workdir))
    assert done.returncode == 0, done.stderr[-2000:]
    return workdir


def metrics(gcs, prefix: str) -> list[dict]:
    return [json.loads(line) for line in gcs.read("bucket", f"{prefix}/metrics.jsonl").decode().splitlines()]


def steps_saved(gcs, prefix: str) -> list[int]:
    """Finished checkpoint steps on the server (Orbax marks a finished step with commit_success.txt)."""
    names = gcs.objects("bucket", f"{prefix}/checkpoints/")
    return sorted({int(n.split("/")[2]) for n in names if n.endswith("/commit_success.txt")
                   and n.split("/")[2].isdigit() and n.count("/") == 3})


def wait_for(condition, timeout: float, proc=None) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.1)
    return False


@pytest.mark.slow  # the fast tier keeps its lighter sibling tests of this file
def test_a_gs_workdir_is_killed_mid_run_and_resumes_to_the_uninterrupted_state(gcs, local_reference):
    """kill -9 (a preemption) once a checkpoint is on the server; the relaunch resumes from it, metrics.jsonl ends
    with every step once, and the final train state equals an uninterrupted run on a local disk."""
    proc = subprocess.Popen([sys.executable, "-m", "siim_jax.train", *SHORT, "--workdir", "gs://bucket/run"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert wait_for(lambda: steps_saved(gcs, "run"), 240, proc), proc.communicate()[1][-3000:]
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    before = max(steps_saved(gcs, "run"))
    assert "run/LOCK" in gcs.objects("bucket", "run/")  # the killed run never released it
    again = run_train(*SHORT, "--workdir", "gs://bucket/run")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.strip().splitlines()[-1].startswith("done: step 6/6")
    assert resumed_from(again.stderr) == before
    assert "taking over the lock" in again.stderr
    logged = metrics(gcs, "run")
    assert [r["step"] for r in logged] == list(range(1, 7))  # nothing lost, nothing twice
    local = [json.loads(line) for line in open(local_reference / "metrics.jsonl")]
    assert [r["loss"] for r in logged] == pytest.approx([r["loss"] for r in local], rel=1e-6)
    assert steps_saved(gcs, "run") == [4, 6]  # the demo keeps the newest 2: one per saved step
    assert "run/LOCK" not in gcs.objects("bucket", "run/")  # released at the end
    assert json.loads(gcs.read("bucket", "run/config.json"))["total_steps"] == 6
    assert_same_state("gs://bucket/run", local_reference, rtol=1e-6, atol=1e-7)


READ_BOARD = """
import json, sys
sys.modules["tensorflow"] = None  # TensorBoard without TensorFlow (a laptop, a TPU VM): its gfile goes to fsspec
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
board = EventAccumulator(sys.argv[1])
board.Reload()
print(json.dumps([[e.step, e.value] for e in board.Scalars("loss")]))
"""


@pytest.mark.slow  # fast-tier time; the fast tier keeps this file's lighter tests
def test_tensorboard_reads_the_events_straight_from_gs(gcs):
    """TensorBoard's own loader on the gs:// folder (what `tensorboard --logdir gs://...` runs): one events object,
    the losses of metrics.jsonl."""
    done = run_train(*SHORT, "--config.total_steps=3", "--config.warmup_steps=1", "--workdir", "gs://bucket/tb")
    assert done.returncode == 0, done.stderr[-2000:]
    assert len([n for n in gcs.objects("bucket", "tb/tensorboard/") if "tfevents" in n]) == 1
    read = subprocess.run([sys.executable, "-c", READ_BOARD, "gs://bucket/tb/tensorboard"], capture_output=True,
                          text=True, timeout=120)
    assert read.returncode == 0, read.stderr[-2000:]
    scalars = json.loads(read.stdout.strip().splitlines()[-1])
    logged = metrics(gcs, "tb")
    assert [step for step, _ in scalars] == [r["step"] for r in logged] == [1, 2, 3]
    assert [value for _, value in scalars] == pytest.approx([r["loss"] for r in logged], rel=1e-6)


def lock_owner(gcs, prefix: str) -> dict:
    return json.loads(gcs.read("bucket", f"{prefix}/LOCK"))


def write_lock(gcs, prefix: str, owner: dict) -> None:
    from google.cloud import storage
    storage.Client().bucket("bucket").blob(f"{prefix}/LOCK").upload_from_string(json.dumps(owner))


def test_a_gs_lock_refuses_a_second_run_and_is_released(gcs):
    with WorkdirLock("gs://bucket/w") as lock:
        assert lock_owner(gcs, "w")["pid"] == os.getpid()
        with pytest.raises(WorkdirBusyError, match=r"workdir gs://bucket/w is in use by the run of host \S+ pid "):
            other = WorkdirLock("gs://bucket/w")
            other.owner = {**other.owner, "pid": 1}  # a live process of this host that is not this one
            other.acquire()
    assert "w/LOCK" not in gcs.objects("bucket", "w/")
    with WorkdirLock("gs://bucket/w"):  # released: taken again without a word
        pass


def test_a_gs_lock_of_another_host_is_taken_over_only_once_stale(gcs, monkeypatch, caplog):
    monkeypatch.setenv("SIIM_LOCK_STALE_SECONDS", "2")
    write_lock(gcs, "w", {"host": "elsewhere", "pid": 12, "job": None, "started": time.time(),
                          "heartbeat": time.time()})
    with pytest.raises(WorkdirBusyError, match=r"host elsewhere pid 12 .*heartbeat \d+ s ago.*gcloud storage rm"):
        WorkdirLock("gs://bucket/w").acquire()
    time.sleep(2.2)
    with caplog.at_level(logging.WARNING, logger="siim_jax"):
        with WorkdirLock("gs://bucket/w"):
            assert lock_owner(gcs, "w")["pid"] == os.getpid()
    assert "taking over the lock of host elsewhere pid 12" in caplog.text


def test_a_relaunch_of_the_same_job_takes_the_gs_lock_at_once(gcs, monkeypatch, caplog):
    """A re-created TPU slice has new host names: its run (same SIIM_LAUNCH_ID) must not wait for the stale
    time; another job with a fresh heartbeat is still refused."""
    write_lock(gcs, "w", {"host": "old-worker-0", "pid": 12, "job": "sim-1", "started": time.time(),
                          "heartbeat": time.time()})
    monkeypatch.setenv("SIIM_LAUNCH_ID", "other-job")
    with pytest.raises(WorkdirBusyError, match="job sim-1"):
        WorkdirLock("gs://bucket/w").acquire()
    monkeypatch.setenv("SIIM_LAUNCH_ID", "sim-1")
    with caplog.at_level(logging.WARNING, logger="siim_jax"):
        with WorkdirLock("gs://bucket/w"):
            assert lock_owner(gcs, "w")["job"] == "sim-1" and lock_owner(gcs, "w")["pid"] == os.getpid()
    assert "a relaunch of the same job" in caplog.text


def test_runs_racing_for_a_gs_lock_get_it_exactly_once(gcs):
    """Eight acquisitions at the same moment (each as another host's run): the create-if-absent precondition
    lets exactly one through; the others are refused with the winner's name."""
    barrier = threading.Barrier(8)
    won, refused = [], []

    def contender(i):
        lock = WorkdirLock("gs://bucket/race")
        lock.owner = {**lock.owner, "host": f"host-{i}"}
        barrier.wait()
        try:
            lock.acquire()
            won.append(i)
        except WorkdirBusyError as error:
            refused.append(str(error))

    threads = [threading.Thread(target=contender, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(won) == 1 and len(refused) == 7
    assert all(f"host host-{won[0]} " in message for message in refused)
    assert lock_owner(gcs, "race")["host"] == f"host-{won[0]}"


@pytest.mark.parametrize("case", ["no bucket", "no credentials"])
def test_a_missing_bucket_or_missing_credentials_is_one_error_line(gcs, case):
    env = dict(os.environ)
    workdir, expected = "gs://no-such-bucket/run", "the bucket gs://no-such-bucket does not exist"
    if case == "no credentials":  # no emulator: the real clients look for Application Default Credentials
        for key in gcs.env():
            env.pop(key, None)
        env["GOOGLE_APPLICATION_CREDENTIALS"] = "/nonexistent/credentials.json"
        workdir, expected = "gs://bucket/run", "credentials"
    done = run_train(*SHORT, "--workdir", workdir, env=env)
    assert done.returncode == 1, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and workdir in errors[0] and expected in errors[0], done.stderr
    assert "Traceback" not in done.stderr


def test_a_read_only_bucket_is_one_error_line_and_is_left_as_it_was(gcs):
    """Training into a bucket the account may only read (every write answered 403, as GCS does without
    storage.objects.create): one `error:` line naming the permission, exit 1, no object written."""
    from gcs_server import ReadOnlyFront
    front = ReadOnlyFront(gcs).start()
    try:
        done = run_train(*SHORT, "--workdir", "gs://bucket/run", env={**os.environ, **front.env()})
    finally:
        front.stop()
    assert done.returncode == 1, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "gs://bucket/run" in errors[0] and "permission denied" in errors[0], done.stderr
    assert "Traceback" not in done.stderr
    assert gcs.objects("bucket") == []


@pytest.mark.slow
def test_the_server_stopping_during_a_save_is_one_line_and_the_relaunch_resumes(gcs, local_reference):
    """The store goes away right after the first checkpoint: the run ends with one error line (status 1, after
    the clients' retries, bounded by config.checkpoint_timeout_seconds for the checkpoint's write, which
    TensorStore would otherwise retry for tens of minutes), nothing half-written is ever restored, and once the
    store is back the relaunch resumes from the newest intact checkpoint and ends with the uninterrupted
    losses."""
    proc = subprocess.Popen([sys.executable, "-m", "siim_jax.train", *SHORT, "--workdir", "gs://bucket/run",
                             "--config.checkpoint_timeout_seconds=20"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert wait_for(lambda: steps_saved(gcs, "run"), 240, proc), proc.communicate()[1][-3000:]
        gcs.stop()
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=60)
    assert proc.returncode == 1, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "did not answer" in errors[0], err[-3000:]
    assert "Traceback" not in err
    gcs.start()
    before = max(steps_saved(gcs, "run"))
    again = run_train(*SHORT, "--workdir", "gs://bucket/run")
    assert again.returncode == 0, again.stderr[-3000:]
    assert resumed_from(again.stderr) == before
    assert [r["step"] for r in metrics(gcs, "run")] == list(range(1, 7))
    assert_same_state("gs://bucket/run", local_reference, rtol=1e-6, atol=1e-7)


@pytest.mark.slow  # the fast tier keeps its lighter sibling tests of this file
def test_damaged_newest_gs_checkpoints_are_passed_over_and_moved_aside(gcs):
    """An array object of the newest step cut short, one of the step before missing: the relaunch warns about
    each, resumes from the step before them, and both damaged steps are moved to checkpoints_unusable/ on the
    bucket with every object they had."""
    from google.cloud import storage
    every_step = [*SHORT, "--config.total_steps=3", "--config.checkpoint_every_steps=1", "--config.keep_checkpoints=3"]
    first = run_train(*every_step, "--workdir", "gs://bucket/run")
    assert first.returncode == 0, first.stderr[-2000:]
    assert steps_saved(gcs, "run") == [1, 2, 3]
    kept = {}
    for step, damage in ((3, "truncate"), (2, "delete")):
        data = [n for n in gcs.objects("bucket", f"run/checkpoints/{step}/state/") if "/d/" in n]
        victim = max(data, key=lambda n: len(gcs.read("bucket", n)))
        kept[step] = {n.split(f"/checkpoints/{step}/", 1)[1] for n in gcs.objects("bucket", f"run/checkpoints/{step}/")}
        blob = storage.Client().bucket("bucket").blob(victim)
        if damage == "truncate":
            blob.upload_from_string(gcs.read("bucket", victim)[:100])
        else:
            blob.delete()
            kept[step].discard(victim.split(f"/checkpoints/{step}/", 1)[1])
    again = run_train(*every_step, "--workdir", "gs://bucket/run")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "checkpoints/3 cannot be read" in again.stderr and "checkpoints/2 cannot be read" in again.stderr
    assert resumed_from(again.stderr) == 1
    moved = gcs.objects("bucket", "run/checkpoints_unusable/")
    for step in (2, 3):  # every object of each damaged step, moved, none lost
        assert {n.split("/", 3)[3] for n in moved if n.split("/")[2].startswith(f"{step}-")} == kept[step]
    assert steps_saved(gcs, "run") == [1, 2, 3]
