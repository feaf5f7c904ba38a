"""Stop requests from the first line of a run: a SIGTERM that lands before training starts (imports, restore,
compilation, the step-0 evaluation) is a resumable stop, exit status 75, with the newest checkpoint kept as it was."""

import json
import os
import signal
import subprocess
import sys
import time

from conftest import recipe_config
from siim_jax.train.loop import train_and_evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"batch_size": 16, "data.num_train": 64, "data.raw_size": 40, "data.num_masked": 10, "model.image_size": 32,
        "model.decoder_width": 32, "model.predictor_depth": 1, "model.projector_depth": 1, "warmup_steps": 1,
        "log_every_steps": 1, "eval_every_steps": 0, "total_steps": 4, "checkpoint_every_steps": 2}


def saved_steps(workdir) -> list[int]:
    return sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())


def test_sigterm_before_the_first_step_exits_75_and_keeps_the_newest_checkpoint(tmp_path):
    """Caught: the handler installed only once the loop starts (the SIGTERM then kills the run, status 143)."""
    workdir = str(tmp_path)
    train_and_evaluate(recipe_config("demo", **TINY), workdir, stop_at_step=2)
    logged = open(os.path.join(workdir, "metrics.jsonl")).read()
    proc = subprocess.Popen([sys.executable, "-m", "siim_jax.train", "--config", "configs/demo.py",
                             *[f"--config.{k}={v}" for k, v in TINY.items()], "--workdir", workdir],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)  # the interpreter is up, JAX is still importing: restore and compilation are seconds away
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    assert out.strip().splitlines()[-1].startswith("interrupted at step 2/4"), out[-2000:]
    assert "stopped before the first step" in err
    assert saved_steps(workdir) == [2]
    assert open(os.path.join(workdir, "metrics.jsonl")).read() == logged  # nothing trained, nothing logged
    assert train_and_evaluate(recipe_config("demo", **TINY), workdir)["step"] == 4  # the rerun goes on
    assert [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))] == [1, 2, 3, 4]


def test_a_second_ctrl_c_leaves_at_once_with_one_line_on_every_process(tmp_path):
    """Two Ctrl-C's to launch/local.sh (2 processes, each gets both): every process exits 130 within seconds
    with one error line, mid-training, instead of finishing the step, saving and leaving through a collective.
    Caught: the KeyboardInterrupt of a second SIGINT landing inside a collective or jax.distributed.shutdown, where
    a process waited for its peer (found alive after 180 s)."""
    args = ["--config", "configs/demo.py", *[f"--config.{k}={v}" for k, v in TINY.items()],
            "--config.total_steps=100000", "--config.checkpoint_every_steps=100000", "--workdir", str(tmp_path)]
    proc = subprocess.Popen(["bash", "launch/local.sh", "2", "--devices-per-process", "2", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        metrics = tmp_path / "metrics.jsonl"
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        sent = time.time()
        out, err = proc.communicate(timeout=60)
        took = time.time() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 130, err[-3000:]
    assert took < 15, took
    assert err.count("error: second Ctrl-C: stopped at once") == 2, err[-3000:]
    assert "Traceback" not in err
