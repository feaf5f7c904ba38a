"""launch/tpu_vm.sh for real (no --dry-run) against a simulated TPU slice: tests/fake_gcloud/gcloud makes each
worker a local host (its own home, the jax.distributed settings of a W-worker slice, background processes that
outlive the ssh call) and preempts the slice once (every process of every worker SIGKILLed, state PREEMPTED).

The fast tests drive the launcher with stand-in trainings (shell scripts, seconds); the slow one runs the real
training, 2 workers x 2 CPU devices, on a gs:// workdir (the GCS server of tests/gcs_server.py), preempted
between two checkpoints: the launcher re-creates the slice and the run ends where an uninterrupted one-process
run over 4 devices ends."""

import json
import base64
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TPU = ROOT / "launch" / "tpu_vm.sh"
FAKE_GCLOUD = Path(__file__).resolve().parent / "fake_gcloud"
FAKE_UV = Path(__file__).resolve().parent / "fake_uv"
NAME = "sim"


def cloud_env(state: Path, workers=2, devices=2, **extra) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{FAKE_GCLOUD}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
    env.update(FAKE_GCLOUD_STATE=str(state), FAKE_GCLOUD_WORKERS=str(workers),
               FAKE_GCLOUD_DEVICES_PER_WORKER=str(devices), **{k: str(v) for k, v in extra.items()})
    return env


def gcloud(env, *args, check=True):
    result = subprocess.run(["gcloud", *args], env=env, capture_output=True, text=True, timeout=60)
    assert not check or result.returncode == 0, result
    return result


def kill_leftovers(state: Path) -> None:
    """The slice's processes (trainings, log streams) and the preemption watcher are no children of the launcher:
    delete the slice (which kills its workers' processes), then SIGKILL whatever still names the state folder."""
    env = cloud_env(state)
    if (state / NAME).exists():
        gcloud(env, "compute", "tpus", "tpu-vm", "delete", NAME, "--quiet", check=False)
    marks = (f"FAKE_GCLOUD_STATE={state}".encode(), f"FAKE_GCLOUD_WORKER={state}/".encode())
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                entries = f.read().split(b"\0")
        except OSError:
            continue
        if int(pid) != os.getpid() and any(e == marks[0] or e.startswith(marks[1]) for e in entries):
            try:
                os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass


@pytest.fixture
def state(tmp_path):
    """The fake cloud's state folder; whatever runs on its slice is killed at the end of the test."""
    folder = tmp_path / "cloud"
    yield folder
    kill_leftovers(folder)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def launch(env, *args, timeout):
    """Runs the launcher to its end (killed, with everything it started, on a timeout); (exit status, output)."""
    proc = subprocess.Popen(["bash", str(TPU), "--name", NAME, "--type", "v4-8", "--poll-seconds", "1", *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the launcher did not finish within {timeout} s:\n{out[-5000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, out


def stand_in_install(trainer: str) -> str:
    """An --install-cmd that makes ~/siim-venv/bin/python the shell script `trainer` (a stand-in training)."""
    script = shlex.quote(trainer.replace("\n", "\\n"))  # one line: printf %b turns the \n back into newlines
    return (f"mkdir -p ~/siim_jax ~/siim-venv/bin && printf '%b' {script} > ~/siim-venv/bin/python"
            " && chmod +x ~/siim-venv/bin/python")


def test_fake_gcloud_workers_are_hosts_of_one_slice(tmp_path, state):
    env = cloud_env(state, workers=3, devices=2)
    tpu = ["compute", "tpus", "tpu-vm"]
    missing = gcloud(env, *tpu, "describe", NAME, "--zone=z", "--format=value(state)", check=False)
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr and missing.stdout == ""
    gcloud(env, *tpu, "create", NAME, "--zone=z", "--accelerator-type=v4-8", "--version=v")
    assert gcloud(env, *tpu, "create", NAME, "--zone=z", "--accelerator-type=v4-8", "--version=v",
                  check=False).returncode == 1  # ALREADY_EXISTS
    assert gcloud(env, *tpu, "describe", NAME, "--format=value(state)").stdout == "READY\n"
    # every worker at once, each with its own home and process id; a background process outlives the call
    out = gcloud(env, *tpu, "ssh", NAME, "--worker=all", "--command=echo $JAX_PROCESS_ID $JAX_NUM_PROCESSES $HOME "
                 "$JAX_COORDINATOR_ADDRESS $XLA_FLAGS; (trap '' HUP; sleep 600) > /dev/null 2>&1 < /dev/null & "
                 "echo $! > ~/pid").stdout.splitlines()
    assert len(out) == 3
    rows = sorted(line.split() for line in out)
    assert [r[:3] for r in rows] == [[str(i), "3", str(state / NAME / f"worker{i}" / "home")] for i in range(3)]
    assert len({r[3] for r in rows}) == 1 and re.fullmatch(r"127\.0\.0\.1:\d+", rows[0][3])
    assert all(r[-1] == "--xla_force_host_platform_device_count=2" for r in rows)
    pids = [int((state / NAME / f"worker{i}" / "home" / "pid").read_text()) for i in range(3)]
    for pid in pids:
        os.kill(pid, 0)  # alive
    # one worker: its exit status; a bad index is an error
    assert gcloud(env, *tpu, "ssh", NAME, "--worker=2", "--command=exit 7", check=False).returncode == 7
    assert gcloud(env, *tpu, "ssh", NAME, "--worker=3", "--command=true", check=False).returncode == 2
    # all workers: nonzero when one failed
    assert gcloud(env, *tpu, "ssh", NAME, "--worker=all", "--command=exit $JAX_PROCESS_ID",
                  check=False).returncode != 0
    # deleting the slice ends every process on it; ssh then finds no node
    gcloud(env, *tpu, "delete", NAME, "--quiet")
    deadline = time.time() + 10
    while any(alive(pid) for pid in pids) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in pids)
    gone = gcloud(env, *tpu, "ssh", NAME, "--command=true", check=False)
    assert gone.returncode == 1 and "NOT_FOUND" in gone.stderr


def test_fake_gcloud_queued_resource_waits_then_is_active(tmp_path, state):
    env = cloud_env(state, FAKE_GCLOUD_QR_WAIT_POLLS=2)
    qr = ["compute", "tpus", "queued-resources"]
    gcloud(env, *qr, "create", NAME, f"--node-id={NAME}", "--accelerator-type=v4-8", "--runtime-version=v", "--spot")
    answers = [gcloud(env, *qr, "describe", NAME, "--format=value(state.state)").stdout.strip() for _ in range(3)]
    assert answers == ["WAITING_FOR_RESOURCES", "WAITING_FOR_RESOURCES", "ACTIVE"]
    assert gcloud(env, "compute", "tpus", "tpu-vm", "describe", NAME, "--format=value(state)").stdout == "READY\n"
    assert gcloud(env, *qr, "delete", NAME, "--quiet", check=False).returncode == 1  # has a node: needs --force
    gcloud(env, *qr, "delete", NAME, "--force", "--quiet", "--async")
    assert "NOT_FOUND" in gcloud(env, *qr, "describe", NAME, check=False).stderr
    assert not (state / NAME).exists()


def test_launcher_reads_every_workers_exit_status(tmp_path, state):
    """Worker 0 finishes, worker 1 failed: the launcher stops with worker 1's status instead of reporting success."""
    trainer = '#!/bin/bash\necho "worker $JAX_PROCESS_ID"\nsleep 1\n[ "$JAX_PROCESS_ID" = 0 ] || exit 3\n'
    env = cloud_env(state)
    status, out = launch(env, "--workdir", "gs://bucket/x", "--install-cmd", stand_in_install(trainer), "--",
                         timeout=60)
    assert status == 3, out
    assert "training failed with exit status 3" in out


# a stand-in training: one "step N: ..." line a step, the step count kept in $WORKDIR_DIR (it outlives the
# slice, as a gs:// workdir does), exit 0 after step 8; each run's start step is appended to $WORKDIR_DIR/starts.
# The step file is replaced whole (a kill between truncating and writing it would leave it empty), as an object is
# on gs://. The first run stops stepping at step 5 and waits to be preempted (at step 3), however slowly the
# preemption comes on a loaded machine: only the preemption can end it.
STEPPER = """#!/bin/bash
step=$(cat "$WORKDIR_DIR/step.$JAX_PROCESS_ID" 2> /dev/null || echo 0)
start=$step
echo "$JAX_PROCESS_ID $step" >> "$WORKDIR_DIR/starts"
while [ "$step" -lt 8 ]; do
    step=$((step + 1)); sleep 0.2
    echo "$step" > "$WORKDIR_DIR/new.$JAX_PROCESS_ID"
    mv "$WORKDIR_DIR/new.$JAX_PROCESS_ID" "$WORKDIR_DIR/step.$JAX_PROCESS_ID"
    echo "step $step: loss 1.0"
    if [ "$start" = 0 ] && [ "$step" = 5 ]; then sleep 300; fi
done
"""


@pytest.mark.parametrize("mode", ["spot", "queued-spot"])
def test_launcher_recreates_a_preempted_slice_and_resumes(tmp_path, state, mode):
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    env = cloud_env(state, FAKE_GCLOUD_PREEMPT_AT_STEP=3, WORKDIR_DIR=workdir)
    status, out = launch(env, "--mode", mode, "--workdir", "gs://bucket/x", "--install-cmd",
                         stand_in_install(STEPPER), "--", timeout=90)
    calls = (state / "calls.log").read_text().splitlines()
    assert status == 0, out
    assert re.search(rf"slice {NAME} is PREEMPTED \(preempted\): re-creating it and resuming \(1/10\)", out), out
    api = "queued-resources" if mode == "queued-spot" else "tpu-vm"
    verbs = [line.split()[3] for line in calls if line.startswith(f"compute tpus {api} ")]
    assert verbs.count("create") == 2 and verbs.count("delete") == 1
    assert all("--spot" in line for line in calls if line.startswith(f"compute tpus {api} create "))
    assert sum(line.startswith("# preempted sim") for line in calls) == 1
    # both workers were killed mid-run (none reached step 8 before the preemption) and started again from where
    # they were; each ran to step 8 in the end
    starts = sorted(tuple(map(int, line.split())) for line in (workdir / "starts").read_text().splitlines())
    assert [s for s in starts if s[1] == 0] == [(0, 0), (1, 0)] and len(starts) == 4
    assert all(0 < s[1] < 8 for s in starts if s[1])
    assert all((workdir / f"step.{i}").read_text().strip() == "8" for i in range(2))
    # the re-created workers have fresh disks: only the second run's log is there
    log0 = (state / NAME / "worker0" / "home" / "siim_train.log").read_text()
    assert "step 1:" not in log0 and "step 8:" in log0


def test_launcher_restarts_the_training_when_a_worker_crashes_on_a_ready_slice(tmp_path, state):
    """Worker 1 kills itself (SIGKILL, as an OOM kill or a segfault would end it) at step 3 of its first run while
    worker 0 finishes: the slice stays READY, so the launcher restarts the training on it (no re-creation) and
    worker 1 resumes where it was."""
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    crashing = STEPPER.replace('    if [ "$start" = 0 ] && [ "$step" = 5 ]; then sleep 300; fi\n',
                               '    if [ "$start" = 0 ] && [ "$step" = 3 ] && [ "$JAX_PROCESS_ID" = 1 ]; then '
                               'kill -9 $$; fi\n')
    assert crashing != STEPPER
    env = cloud_env(state, WORKDIR_DIR=workdir)
    status, out = launch(env, "--workdir", "gs://bucket/x", "--install-cmd", stand_in_install(crashing), "--",
                         timeout=90)
    assert status == 0, out
    assert "a worker crashed (exit status 137, killed by signal 9) on a READY slice: restarting the training (1/10)" \
        in out, out
    calls = (state / "calls.log").read_text().splitlines()
    assert [line.split()[3] for line in calls if line.startswith("compute tpus tpu-vm ")].count("create") == 1
    starts = sorted(tuple(map(int, line.split())) for line in (workdir / "starts").read_text().splitlines())
    assert starts == [(0, 0), (0, 8), (1, 0), (1, 3)], starts
    assert all((workdir / f"step.{i}").read_text().strip() == "8" for i in range(2))


def test_a_re_created_slice_gets_the_commit_and_packages_of_the_first_install(tmp_path, state):
    """The default install (git clone of --repo at --ref, uv) on a slice preempted once: the branch moved to a new
    commit after the first install, yet the re-created workers get the first install's commit and its frozen
    package list (tests/fake_uv/uv stands in for uv: no network here). The pins are recorded in the workdir
    (siim_install.txt, through `gcloud storage cp -`), so a second launcher run on the same workdir, on a new
    slice, installs them again too."""
    git = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    src = tmp_path / "src"
    src.mkdir()
    (src / "version.txt").write_text("A\n")
    for command in (["init", "-q", "-b", "main"], ["add", "version.txt"], ["commit", "-qm", "A"]):
        subprocess.run(["git", *command], cwd=src, check=True, env={**os.environ, **git})
    first = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True).stdout.strip()
    stepper = tmp_path / "stepper"
    stepper.write_text(STEPPER)
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    freeze = "jax==0.10.2\nlibtpu==0.0.31\n"
    env = cloud_env(state, FAKE_GCLOUD_PREEMPT_AT_STEP=3, WORKDIR_DIR=workdir, FAKE_UV_LOG=tmp_path / "uv.log",
                    FAKE_UV_PYTHON=stepper, FAKE_UV_FREEZE=freeze, **git,
                    FAKE_UV_ON_FREEZE=f"cd {shlex.quote(str(src))} && echo B > version.txt && git commit -qam B")
    env["PATH"] = f"{FAKE_UV}{os.pathsep}{env['PATH']}"
    status, out = launch(env, "--workdir", "gs://bucket/x", "--repo", str(src), "--ref", "main", "--", timeout=120)
    assert status == 0, out
    moved = subprocess.run(["git", "rev-parse", "main"], cwd=src, capture_output=True, text=True).stdout.strip()
    assert moved != first  # the branch moved during the run
    assert f"installed siim_jax {first[:12]}; a re-created slice gets this commit" in out, out
    assert re.search(rf"siim_jax {first[:7]} installed, pinned to the first install", out), out
    for i in range(2):  # the re-created workers (fresh disks): the first commit, the frozen packages
        home = state / NAME / f"worker{i}" / "home"
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=home / "siim_jax", capture_output=True,
                              text=True).stdout.strip()
        assert head == first, (i, head, first)
        assert (home / "siim_pinned_requirements.txt").read_text() == "jax==0.10.2\nlibtpu==0.0.31\n"
    calls = (tmp_path / "uv.log").read_text().splitlines()
    assert sum("pip install" in c and "jax[tpu]" in c for c in calls) == 2  # the first install, one per worker
    assert sum("pip install" in c and "-r" in c.split() and c.endswith("/siim_pinned_requirements.txt")
               for c in calls) == 2  # after the re-creation, one per worker
    assert sum("--no-deps" in c for c in calls) == 2
    recorded = (state / "storage" / "bucket" / "x" / "siim_install.txt").read_text().splitlines()
    assert recorded == [f"siim_pin_commit={first}",
                        "siim_pin_packages=" + base64.b64encode(freeze.encode()).decode()], recorded

    # the launcher itself run again on the same workdir, on a new slice: the recorded commit, not --ref's
    gcloud(env, "compute", "tpus", "tpu-vm", "delete", NAME, "--zone=us-central2-b", "--quiet")
    status, out = launch(env, "--workdir", "gs://bucket/x", "--repo", str(src), "--ref", "main", "--", timeout=120)
    assert status == 0, out
    assert f"gs://bucket/x was started with siim_jax {first[:12]}: installing that commit" in out, out
    for i in range(2):
        home = state / NAME / f"worker{i}" / "home"
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=home / "siim_jax", capture_output=True,
                              text=True).stdout.strip()
        assert head == first, (i, head, first)
    calls = (tmp_path / "uv.log").read_text().splitlines()
    assert sum("pip install" in c and "jax[tpu]" in c for c in calls) == 2  # still only the very first install


# ------------------------------------------------------------------------------------------ the real training

# checkpoints at 4, 8, 12; preempted once the progress bar shows step 7 (the async save of 4 has had three steps
# to finish, the save of 8 has not begun), resumed from 4
TOTAL, EVERY, PREEMPT_AT = 12, 4, 7
OVERRIDES = ["--config.batch_size=16", "--config.data.num_train=256", "--config.log_every_steps=1",
             "--config.warmup_steps=2", f"--config.total_steps={TOTAL}", f"--config.checkpoint_every_steps={EVERY}",
             "--config.keep_checkpoints=10", "--config.eval_every_steps=0", "--config.model.image_size=32",
             "--config.data.raw_size=40", "--config.data.num_masked=10", "--config.model.decoder_width=32",
             "--config.model.predictor_depth=1", "--config.model.projector_depth=1"]


def losses(records) -> dict:
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_preempted_slice_of_two_workers_ends_where_one_uninterrupted_process_does(gcs, tmp_path, state):
    # the reference: one process over the same 4 devices, a local workdir
    reference_env = dict(os.environ, JAX_PLATFORMS="cpu",
                         XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4")
    reference = subprocess.run([sys.executable, "-m", "siim_jax.train", "--config", "configs/demo.py", *OVERRIDES,
                                "--workdir", str(tmp_path / "local")],
                               cwd=ROOT, env=reference_env, capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr[-3000:]
    with open(tmp_path / "local" / "metrics.jsonl") as f:
        expected = losses(map(json.loads, f))
    assert sorted(expected) == list(range(1, TOTAL + 1))

    # the workers use this checkout and this virtual environment (no network): ~/siim_jax, ~/siim-venv
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    (venv / "bin" / "python").chmod(0o755)
    install = f"ln -sfn {shlex.quote(str(ROOT))} ~/siim_jax && ln -sfn {shlex.quote(str(venv))} ~/siim-venv"
    env = cloud_env(state, workers=2, devices=2, FAKE_GCLOUD_PREEMPT_AT_STEP=PREEMPT_AT)
    started = time.time()
    status, out = launch(env, "--workdir", "gs://bucket/slice", "--config", "configs/demo.py", "--install-cmd",
                         install, "--", *OVERRIDES, timeout=300)
    took = time.time() - started
    assert status == 0, out[-6000:]

    # preempted once, re-created, resumed from the checkpoint before the preemption
    calls = (state / "calls.log").read_text()
    assert calls.count("# preempted sim") == 1, out[-6000:]
    assert f"slice {NAME} is PREEMPTED (preempted): re-creating it and resuming (1/10)" in out
    worker0 = (state / NAME / "worker0" / "home" / "siim_train.log").read_text()
    worker1 = (state / NAME / "worker1" / "home" / "siim_train.log").read_text()
    resumed = re.findall(r"resumed from \S*/checkpoints/(\d+)", worker0)
    assert resumed and 0 < int(resumed[0]) < PREEMPT_AT, worker0[-3000:]
    # the relaunch took the killed run's workdir lock over at once, as the same launch (SIIM_LAUNCH_ID)
    assert re.search(rf"taking over the lock of .*job {NAME}-\d{{8}}T\d{{6}}Z\): a relaunch of the same job",
                     worker0), worker0[-3000:]
    assert "global devices 4" in worker1 and "process 1/2" in worker1  # two processes of one 4-device run

    # every step logged once, with the losses of the uninterrupted run; one checkpoint per saved step
    records = [json.loads(line) for line in gcs.read("bucket", "slice/metrics.jsonl").decode().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, TOTAL + 1)), steps
    got = losses(records)
    for step in steps:
        assert abs(got[step] - expected[step]) <= 1e-5 * abs(expected[step]), (step, got[step], expected[step])
    names = gcs.objects("bucket", "slice/checkpoints/")
    saved = sorted({int(n.split("/")[2]) for n in names if n.endswith("/commit_success.txt") and n.count("/") == 3})
    assert saved == list(range(EVERY, TOTAL + 1, EVERY)), names
    print(f"slice run (launcher to exit): {took:.0f} s, resumed from step {resumed[0]}")

    # one machine reads what the two workers wrote: the whole state, and an export to the bucket
    from state_compare import assert_same_state
    assert_same_state("gs://bucket/slice", tmp_path / "local", rtol=1e-5, atol=1e-6, other_mesh=True)
    export = subprocess.run([sys.executable, "-m", "siim_jax.export", "--workdir", "gs://bucket/slice", "--out",
                             "gs://bucket/slice/vit.safetensors"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert export.returncode == 0, export.stderr[-3000:]
    import safetensors.numpy
    tensors = safetensors.numpy.load(gcs.read("bucket", "slice/vit.safetensors"))
    assert "cls_token" in tensors and "blocks.0.attn.qkv.weight" in tensors, sorted(tensors)[:10]
