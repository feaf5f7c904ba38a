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
