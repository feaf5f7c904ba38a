"""Several local processes as one JAX run (launch/local.sh, gloo collectives over localhost), as on a pod.

References run in this test process (1 process x 8 fake devices) with the same recipe; the multi-process runs
must log the same losses, end in the same train state (every leaf of the final checkpoint, within float rounding:
RTOL), resume each other's checkpoints from the step asserted, and stop together.
"""

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import typing

import pytest

from conftest import recipe_config
from state_compare import (RESUME_LOGGER, assert_same_state, checkpoints_before_relaunch, expected_resume_step,
                           resumed_from)
from siim_jax.train.loop import train_and_evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.multiprocess

# a test-sized SiameseIM on the built-in images (the demo recipe, shrunk)
TINY = {"batch_size": 16, "data.num_train": 128, "data.raw_size": 40, "data.num_masked": 10, "model.image_size": 32,
        "model.decoder_width": 32, "model.predictor_depth": 1, "model.projector_depth": 1, "warmup_steps": 1,
        "log_every_steps": 1, "eval_every_steps": 0, "total_steps": 6, "checkpoint_every_steps": 3,
        "keep_checkpoints": 5, "data.threads": 1, "stop_vote_every_steps": 2}
MESHES = {"data": {"mesh.data": -1},
          "fsdp": {"mesh.data": 1, "mesh.fsdp": -1},
          "fsdp_x_tensor": {"mesh.data": 1, "mesh.fsdp": 2, "mesh.tensor": 4}}


def recipe(**overrides):
    """configs/demo.py with TINY and `overrides` applied (keys as in --config.<key>=<value>)."""
    return recipe_config("demo", **{**TINY, **overrides})


def flags(**overrides):
    return ["--config", os.path.join(REPO, "configs", "demo.py")] + [
        f"--config.{k}={v}" for k, v in {**TINY, **overrides}.items()]


def local_sh(processes: int, devices: int, workdir, **overrides):
    return subprocess.run(["bash", os.path.join(REPO, "launch", "local.sh"), str(processes), "--devices-per-process",
                           str(devices), *flags(**overrides), "--workdir", str(workdir)],
                          cwd=REPO, capture_output=True, text=True, timeout=900)


RTOL, ATOL = 1e-5, 1e-6  # another mesh / another process count sums in another order: float rounding only


def losses(workdir) -> dict:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def assert_same_losses(got: dict, expected: dict, steps):
    for step in steps:
        assert abs(got[step] - expected[step]) <= 1e-5 * abs(expected[step]), (step, got[step], expected[step])


def keep_only_step(workdir, step: int):
    """Drops every checkpoint after `step` (as if the run had stopped there)."""
    for name in os.listdir(os.path.join(workdir, "checkpoints")):
        if name.isdigit() and int(name) > step:
            shutil.rmtree(os.path.join(workdir, "checkpoints", name))


def test_two_processes_of_two_devices_log_the_losses_of_one_process(tmp_path):
    """The fast tier's multi-process run: 2 processes x 2 devices (4 global, data parallel) log the losses of
    1 process x 8 devices for the same global batch; each process reports its share of the devices."""
    short = {"total_steps": 3, "checkpoint_every_steps": 1000}
    reference = tmp_path / "one"
    train_and_evaluate(recipe(**MESHES["data"], **short), str(reference))
    done = local_sh(2, 2, tmp_path / "two", **MESHES["data"], **short)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("done: step 3/3") == 2
    assert "process 1/2, local devices 2, global devices 4" in done.stderr
    assert_same_losses(losses(tmp_path / "two"), losses(reference), range(1, 4))
    assert_same_state(tmp_path / "two", reference, rtol=RTOL, atol=ATOL, other_mesh=True)


@pytest.mark.slow
# fsdp x tensor within each process; 2 x 4 from the start equals 1 x 8 in the fast tier (2 x 2, data) and, with
# a tensor axis across processes, in the 4 x 2 kill test; a 2-process checkpoint resumed in 1 process is the
# SIGTERM test's
@pytest.mark.parametrize("mesh", ["fsdp_x_tensor"])
def test_a_one_process_checkpoint_resumes_in_two_processes_to_the_one_process_state(mesh, tmp_path):
    """The checkpoint of step 3 of a 1 x 8 run goes on in 2 x 4 from step 3 (asserted) and ends with the losses
    and the train state of the uninterrupted 1-process run."""
    reference = tmp_path / "one"
    summary = train_and_evaluate(recipe(**MESHES[mesh]), str(reference))
    assert summary["step"] == 6
    shutil.copytree(reference, tmp_path / "one_then_many")
    keep_only_step(tmp_path / "one_then_many", 3)
    done = local_sh(2, 4, tmp_path / "one_then_many", **MESHES[mesh])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "process 1/2, local devices 4, global devices 8" in done.stderr
    assert resumed_from(done.stderr) == 3, done.stderr[-3000:]
    assert_same_losses(losses(tmp_path / "one_then_many"), losses(reference), range(1, 7))
    assert_same_state(tmp_path / "one_then_many", reference, rtol=RTOL, atol=ATOL, other_mesh=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start_processes(workdir, count=2, devices=4, **overrides):
    """`count` training processes as launch/local.sh starts them, returned as Popen objects (PIDs known)."""
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu",  # the test run's XLA flags, this many devices (the last flag wins)
           "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"}
    return [subprocess.Popen([sys.executable, "-m", "siim_jax.train", *flags(**overrides), "--workdir", str(workdir),
                              "--coordinator_address", f"localhost:{port}", "--num_processes", str(count),
                              "--process_id", str(i)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for i in range(count)]


def wait_for_step(workdir, step: int, procs, timeout=600):
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(metrics) and max(losses(workdir), default=0) >= step:
            return
        assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs]
        time.sleep(0.05)
    raise AssertionError(f"step {step} never logged")


LONG_STEPS = 16
LONG = {"total_steps": LONG_STEPS, "checkpoint_every_steps": 1000, "warmup_steps": 2}


class Reference(typing.NamedTuple):
    losses: dict
    workdir: str  # its final checkpoint (step LONG_STEPS) is the state a resumed run must end in


@pytest.fixture(scope="module")
def long_reference(tmp_path_factory):
    """Losses and workdir of an uninterrupted 1-process run of the LONG recipe."""
    workdir = tmp_path_factory.mktemp("long_reference")
    train_and_evaluate(recipe(**LONG), str(workdir))
    return Reference(losses(workdir), str(workdir))


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_after_the_same_step_and_resumes_exactly(tmp_path, long_reference,
                                                                                    caplog):
    workdir = tmp_path / "run"
    procs = start_processes(workdir, **LONG)
    wait_for_step(workdir, 2, procs)
    procs[1].send_signal(signal.SIGTERM)
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [75, 75], [err[-2000:] for _, err in outputs]
    last = [out.strip().splitlines()[-1] for out, _ in outputs]
    assert last[0] == last[1] and last[0].startswith("interrupted at step"), last
    stopped = int(last[0].split()[3].split("/")[0])
    assert 2 <= stopped < LONG_STEPS
    assert stopped % TINY["stop_vote_every_steps"] == 0  # the agreed answer arrives at a vote's step only
    assert sorted(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit()) == [stopped]
    # the resumed run (here in one process) ends as the uninterrupted one
    with caplog.at_level(logging.INFO, logger=RESUME_LOGGER):
        summary = train_and_evaluate(recipe(**LONG), str(workdir))
    assert resumed_from(caplog.text) == stopped
    assert summary["step"] == LONG_STEPS and not summary["interrupted"]
    assert sorted(losses(workdir)) == list(range(1, LONG_STEPS + 1))
    assert_same_losses(losses(workdir), long_reference.losses, range(1, LONG_STEPS + 1))
    assert_same_state(workdir, long_reference.workdir, rtol=RTOL, atol=ATOL, other_mesh=True)


@pytest.mark.slow
def test_a_frozen_process_ends_the_other_with_one_line_before_the_heartbeat_timeout(tmp_path):
    """SIGSTOP of process 1 (no launcher): its connections stay open, so no collective of process 0 fails; only
    the peer watch (half the heartbeat timeout) can end process 0, which leaves by itself with one line naming
    process 1 and status 75 (a checkpoint both finished exists), before JAX's own heartbeat abort."""
    workdir = tmp_path / "run"
    heartbeat = 12
    os.environ["SIIM_HEARTBEAT_TIMEOUT_SECONDS"], saved = str(heartbeat), os.environ.get("SIIM_HEARTBEAT_TIMEOUT_SECONDS")
    try:
        procs = start_processes(workdir, devices=2, **{**LONG, "total_steps": 1000, "checkpoint_every_steps": 2})
    finally:
        os.environ.pop("SIIM_HEARTBEAT_TIMEOUT_SECONDS") if saved is None else os.environ.update(
            SIIM_HEARTBEAT_TIMEOUT_SECONDS=saved)
    try:
        wait_for_step(workdir, 5, procs)  # the save of step 4 waited for step 2's: step 2 is finished
        procs[1].send_signal(signal.SIGSTOP)
        frozen = time.time()
        _, err = procs[0].communicate(timeout=120)
        took = time.time() - frozen
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    assert procs[0].returncode == 75, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(
        f"error: [process 0/2] process 1/2 is gone (no sign of life for {heartbeat // 2} s"), err[-3000:]
    assert "is finished: rerunning the same command resumes from it" in lines[0]
    assert took < heartbeat, took
    assert "Terminating process" not in err


def test_processes_that_list_different_images_stop_with_one_line_each(tmp_path):
    """`imagefolder:~/data` with another HOME per process: the two listings differ by one file name, and every
    process ends with the same one-line error naming both listings, exit 1, before anything is built."""
    from PIL import Image
    homes = [tmp_path / "home0", tmp_path / "home1"]
    for h, home in enumerate(homes):
        for c in range(2):
            folder = home / "data" / "train" / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(8):
                name = f"img{i}.jpg" if not (h == 1 and c == 1 and i == 7) else "other.jpg"
                Image.new("RGB", (40, 40), (30 * i, 100 * c, 50)).save(folder / name)
    port = _free_port()
    procs = []
    for i, home in enumerate(homes):
        env = {**os.environ, "HOME": str(home), "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=1"}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "siim_jax.train", *flags(**{"data.source": "imagefolder:~/data"}), "--workdir",
             str(tmp_path / "run"), "--coordinator_address", f"localhost:{port}", "--num_processes", "2",
             "--process_id", str(i)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    errors = []
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 1, err[-3000:]
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
        errors.append(lines[0])
    for i, line in enumerate(errors):
        assert line.startswith(f"error: [process {i}/2] the processes list different data for "
                               "config.data.source='imagefolder:~/data': process 0 16 examples (listing "), line
        assert "process 1 16 examples" in line and "every process must see the same files" in line
    assert not (tmp_path / "run" / "checkpoints").exists()


def launcher_children(launcher: subprocess.Popen) -> dict:
    """{process_id: pid} of the training processes launch/local.sh started."""
    found = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
    children = {}
    for pid in map(int, found):
        try:
            argv = open(f"/proc/{pid}/cmdline").read().split("\0")
        except OSError:
            continue
        if "--process_id" in argv:
            children[int(argv[argv.index("--process_id") + 1])] = pid
    return children


@pytest.mark.slow
def test_kill_9_of_process_0_while_saving_ends_the_launch_and_the_survivor_leaves_by_itself(tmp_path):
    """kill -9 of process 0 (JAX's coordinator) of 2, aimed at a save, under launch/local.sh as a pod runs it:
    the survivor leaves by itself with its own line within a bound (before local.sh's SIGKILL 10 s after the
    failure) and the launcher names the killed process. The relaunch after kills while saving and restoring is
    the 4-process test below. The test's own processes are killed whatever happens (their session)."""
    workdir = tmp_path / "run"
    every_step = {**LONG, "checkpoint_every_steps": 1, "keep_checkpoints": 2}
    launcher = subprocess.Popen(["bash", os.path.join(REPO, "launch", "local.sh"), "2", "--devices-per-process", "4",
                                 *flags(**every_step), "--workdir", str(workdir)], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for_step(workdir, 3, [launcher])
        children = launcher_children(launcher)
        assert sorted(children) == [0, 1], children
        # aim at a save: kill as soon as Orbax's temporary folder of a step appears
        checkpoints_dir, deadline = workdir / "checkpoints", time.time() + 120
        while time.time() < deadline and not any(".orbax-checkpoint-tmp" in n for n in os.listdir(checkpoints_dir)):
            time.sleep(0.002)
        os.kill(children[0], signal.SIGKILL)
        killed = time.time()
        _, err = launcher.communicate(timeout=120)
        took = time.time() - killed
    finally:
        if launcher.poll() is None or launcher_children(launcher):
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.communicate()
    assert launcher.returncode == 128 + signal.SIGKILL, err[-3000:]  # the first failure's status: the kill
    assert took < 30, took  # the survivor leaves by itself (local.sh would SIGKILL it 10 s after the failure)
    assert f"launch/local.sh: error: process 0/2 (pid {children[0]}) was killed by KILL (status 137)" in err, err
    # the survivor's own line: its collective failed (gloo saw the connection go), or the coordinator's
    # heartbeat timeout ended it (JAX's abort line); never a wait until local.sh's SIGKILL
    assert ("error: process 1/2 lost contact with the other processes" in err
            or "Terminating process because the JAX distributed service detected fatal errors" in err), err[-3000:]
    assert not any(os.path.exists(f"/proc/{pid}") for pid in children.values())


def test_hybrid_meshes_put_slices_on_the_outer_axes():
    """Fake multi-slice device lists: 2 slices x 4 devices, the data or fsdp axis across slices (DCN)."""
    from siim_jax.config import ConfigError
    from siim_jax.parallel.sharding import create_mesh

    class FakeDevice:
        platform, device_kind = "cpu", "fake"

        def __init__(self, i):
            self.id, self.slice_index, self.process_index = i, i // 4, i // 2

        def __repr__(self):
            return f"D{self.id}"

    devices = [FakeDevice(i) for i in range(8)]
    mesh = create_mesh({"data": 1, "fsdp": 4, "tensor": 1, "dcn_data": 2, "dcn_fsdp": 1}, devices)
    assert mesh.devices.shape == (2, 4, 1)
    assert [{d.slice_index for d in row.flat} for row in mesh.devices] == [{0}, {1}]  # data goes over DCN
    mesh = create_mesh({"data": 2, "fsdp": 1, "tensor": 2, "dcn_data": 1, "dcn_fsdp": 2}, devices)
    assert mesh.devices.shape == (2, 2, 2)
    for f in range(2):  # each fsdp index is one slice; tensor pairs stay within a slice
        assert {d.slice_index for d in mesh.devices[:, f, :].flat} == {f}
    with pytest.raises(ConfigError, match="dcn_data \\* dcn_fsdp = 4 slices, but the devices form 2"):
        create_mesh({"data": 1, "fsdp": 2, "tensor": 1, "dcn_data": 4, "dcn_fsdp": 1}, devices)
    with pytest.raises(ConfigError, match="config.mesh.data/fsdp/tensor.*4 devices per slice"):
        create_mesh({"data": 1, "fsdp": 8, "tensor": 1, "dcn_data": 2, "dcn_fsdp": 1}, devices)


def test_distributed_settings_name_what_is_missing_or_wrong(monkeypatch):
    from siim_jax.parallel import distributed
    for name in (distributed.COORDINATOR_ENV, distributed.NUM_PROCESSES_ENV, distributed.PROCESS_ID_ENV):
        monkeypatch.delenv(name, raising=False)
    assert distributed.resolve() is None  # one process, nothing to join
    assert distributed.resolve("localhost:1234", 2, 1) == {"coordinator_address": "localhost:1234",
                                                            "num_processes": 2, "process_id": 1}
    with pytest.raises(distributed.DistributedSetupError, match="missing: --process_id"):
        distributed.resolve("localhost:1234", 2)
    with pytest.raises(distributed.DistributedSetupError, match="--process_id=2 must be in 0..1"):
        distributed.resolve("localhost:1234", 2, 2)
    with pytest.raises(distributed.DistributedSetupError, match="host:port"):
        distributed.resolve("localhost", 2, 0)
    monkeypatch.setenv(distributed.COORDINATOR_ENV, "10.0.0.1:9999")
    monkeypatch.setenv(distributed.NUM_PROCESSES_ENV, "4")
    monkeypatch.setenv(distributed.PROCESS_ID_ENV, "3")
    assert distributed.resolve() == {"coordinator_address": "10.0.0.1:9999", "num_processes": 4, "process_id": 3}
    # JAX's timeouts: ours by default (not JAX's 100 / 300 s), set by the environment, a bad value named
    monkeypatch.delenv(distributed.HEARTBEAT_ENV, raising=False)
    assert distributed.timeouts() == {"heartbeat_timeout_seconds": 30, "shutdown_timeout_seconds": 60}
    monkeypatch.setenv(distributed.HEARTBEAT_ENV, "90")
    monkeypatch.setenv(distributed.SHUTDOWN_ENV, "5")
    assert distributed.timeouts() == {"heartbeat_timeout_seconds": 90, "shutdown_timeout_seconds": 5}
    monkeypatch.setenv(distributed.HEARTBEAT_ENV, "0.5")
    with pytest.raises(distributed.DistributedSetupError, match=r"\$SIIM_HEARTBEAT_TIMEOUT_SECONDS='0.5' must be"):
        distributed.timeouts()


def test_a_bad_process_id_is_one_error_line(tmp_path):
    common = [sys.executable, "-m", "siim_jax.train", *flags()]
    bad_id = subprocess.run([*common, "--workdir", str(tmp_path / "w"), "--coordinator_address", "localhost:1",
                             "--num_processes", "2", "--process_id", "5"], cwd=REPO, capture_output=True, text=True)
    assert bad_id.returncode == 2 and "error: --process_id=5 must be in 0..1" in bad_id.stderr
    assert "Traceback" not in bad_id.stderr



def launch_and_kill(command, workdir, victim: int, moment, timeout: float = 300):
    """Runs `command` (launch/local.sh ...) and kill -9s its training process `victim` at the first poll (every
    2 ms) where moment(workdir, stderr lines so far) holds. Returns (launcher, stderr, seconds from the kill to
    the launcher's end, {process_id: pid}). The launcher's session is killed whatever happens."""
    launcher = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    lines = []

    def read():
        for line in launcher.stderr:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.time() + timeout
        while not moment(workdir, lines):
            assert launcher.poll() is None and time.time() < deadline, "".join(lines)[-3000:]
            time.sleep(0.002)
        children = launcher_children(launcher)
        os.kill(children[victim], signal.SIGKILL)
        killed = time.time()
        try:
            launcher.wait(timeout=120)
        except subprocess.TimeoutExpired:
            left = subprocess.run(["ps", "-o", "pid,stat,args", "--ppid", str(launcher.pid)], capture_output=True,
                                  text=True).stdout
            raise AssertionError(f"local.sh still running 120 s after the kill of process {victim}; its children:\n"
                                 f"{left}\n{''.join(lines)[-4000:]}") from None
        took = time.time() - killed
        reader.join(timeout=30)
    finally:
        if launcher.poll() is None or launcher_children(launcher):
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    assert not any(os.path.exists(f"/proc/{pid}") for pid in children.values())
    return launcher, "".join(lines), took, children


def saving_after_step_3(workdir, lines) -> bool:
    """A step after the third is being saved: Orbax's temporary folder of it exists."""
    checkpoints = workdir / "checkpoints"
    return (os.path.exists(workdir / "metrics.jsonl") and max(losses(workdir), default=0) >= 3
            and checkpoints.is_dir() and any(".orbax-checkpoint-tmp" in n for n in os.listdir(checkpoints)))


def restoring(workdir, lines) -> bool:
    return any("restoring " in line for line in lines)


@pytest.mark.slow
def test_kill_9_of_any_one_of_four_processes_while_saving_then_while_restoring_and_the_relaunch_resumes(
        tmp_path, long_reference):
    """4 processes x 2 devices under launch/local.sh, on the fsdp=2 x tensor=4 mesh (its tensor axis spans
    process pairs that feed the same rows), saving every step: a randomly drawn process is kill -9ed while a step
    is being saved, then another draw while the relaunch restores (at its 'restoring' line). Each time local.sh
    ends within a bound with that kill's status, names the process, and leaves no child; the third launch resumes
    from the newest intact step (asserted) and ends with the losses and the train state of the uninterrupted
    1-process run. The draw is printed; SIIM_TEST_SEED=<seed> repeats it."""
    import random
    seed = int(os.environ.get("SIIM_TEST_SEED", time.time_ns() % 100_000))
    draw = random.Random(seed)
    victims = (draw.randrange(4), draw.randrange(4))
    print(f"SIIM_TEST_SEED={seed}: kill -9 of process {victims[0]} while saving, of {victims[1]} while restoring")
    workdir = tmp_path / "run"
    every_step = {**LONG, **MESHES["fsdp_x_tensor"], "checkpoint_every_steps": 1, "keep_checkpoints": 2}
    command = ["bash", os.path.join(REPO, "launch", "local.sh"), "4", "--devices-per-process", "2",
               *flags(**every_step), "--workdir", str(workdir)]
    for victim, moment in zip(victims, (saving_after_step_3, restoring)):
        launcher, err, took, children = launch_and_kill(command, workdir, victim, moment)
        assert launcher.returncode == 128 + signal.SIGKILL, (seed, err[-3000:])
        assert took < 30, (seed, took)  # local.sh SIGKILLs the others 10 s after the first failure at the latest
        assert (f"launch/local.sh: error: process {victim}/4 (pid {children[victim]}) was killed by KILL "
                "(status 137)") in err, (seed, err[-3000:])
        assert "Traceback" not in err, (seed, err[-3000:])
    before = checkpoints_before_relaunch(workdir)
    done = local_sh(4, 2, workdir, **every_step)
    assert done.returncode == 0, (seed, done.stderr[-3000:])
    resumed = resumed_from(done.stderr)
    assert resumed is not None and resumed == expected_resume_step(before, workdir), (seed, before, resumed)
    assert sorted(losses(workdir)) == list(range(1, LONG_STEPS + 1))
    assert_same_losses(losses(workdir), long_reference.losses, range(1, LONG_STEPS + 1))
    assert_same_state(workdir, long_reference.workdir, rtol=RTOL, atol=ATOL, other_mesh=True)


@pytest.mark.slow
def test_a_checkpoint_only_one_process_cannot_read_is_passed_over_by_every_process(tmp_path):
    """2 processes x 4 devices on an FSDP mesh (each process reads only the shards it wrote): the data files of
    process 1's shards of the newest step cut short. Process 1's read fails, process 0's succeeds; every process
    learns it from the vote, all resume from the step before (asserted), the damaged step is moved aside whole,
    and the run ends in the state of the undamaged one. Before restore read per process, Orbax's restore
    barrier on process 0 met process 1's vote: 'sync_global_devices name mismatch', and no checkpoint usable."""
    fsdp = {**MESHES["fsdp"], "total_steps": 4, "checkpoint_every_steps": 2}
    workdir = tmp_path / "run"
    done = local_sh(2, 4, workdir, **fsdp)
    assert done.returncode == 0, done.stderr[-3000:]
    shutil.copytree(workdir, tmp_path / "undamaged")
    damaged = list((workdir / "checkpoints" / "4" / "state" / "ocdbt.process_1" / "d").iterdir())
    assert damaged
    for path in damaged:
        path.write_bytes(path.read_bytes()[:50])
    again = local_sh(2, 4, workdir, **fsdp)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[process 1/2] checkpoint" in again.stderr and "/checkpoints/4 cannot be read (" in again.stderr
    assert "[process 0/2] checkpoint" in again.stderr and "/checkpoints/4 cannot be read on process(es) 1" in \
        again.stderr, again.stderr[-3000:]
    assert resumed_from(again.stderr) == 2
    moved = [n for n in os.listdir(workdir / "checkpoints_unusable") if n.startswith("4-")]
    assert len(moved) == 1
    assert {p.name for p in (workdir / "checkpoints_unusable" / moved[0] / "state" / "ocdbt.process_1" / "d")
            .iterdir()} == {p.name for p in damaged}
    assert_same_state(workdir, tmp_path / "undamaged", rtol=RTOL, atol=ATOL)
