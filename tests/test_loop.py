"""The training loop and the command line: resume, interruption, bad input, the demo recipe."""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import tiny_config
from state_compare import RESUME_LOGGER, assert_same_state, resumed_from
from siim_jax.config import ConfigError
from siim_jax.train.checkpoint import CheckpointMismatchError
from siim_jax.train.loop import NonFiniteLossError, train_and_evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def test_interrupt_and_resume_gives_the_same_losses(tmp_path, caplog):
    """Losses, and the whole train state of the final checkpoint (step, params, EMA params, optimiser state,
    BatchNorm statistics, counters), equal the uninterrupted run's; the relaunch resumed from step 3."""
    config = tiny_config()  # both runs save their final step 6 (keep_checkpoints=3, checkpoint_every_steps=2)
    full = train_and_evaluate(config, str(tmp_path / "full"))
    assert full["step"] == 6 and not full["interrupted"]

    split = str(tmp_path / "split")
    first = train_and_evaluate(config, split, stop_at_step=3)
    assert first["interrupted"] and first["step"] == 3
    assert os.path.isdir(os.path.join(split, "checkpoints", "3"))
    with open(os.path.join(split, "metrics.jsonl"), "a") as f:
        f.write('{"step": 4, "loss": 1.0}\n{"step": 5, "lo')  # logged past the checkpoint, then a crash
    with caplog.at_level(logging.INFO, logger=RESUME_LOGGER):
        second = train_and_evaluate(config, split)
    assert second["step"] == 6 and not second["interrupted"]
    assert resumed_from(caplog.text) == 3
    # same mesh, same process: the resumed run computes exactly what the uninterrupted one does
    compared = assert_same_state(split, tmp_path / "full", rtol=1e-6, atol=1e-7)
    assert all(compared[k] for k in ("step", "params", "ema_params", "opt_state", "batch_stats")), compared

    expected, resumed = losses(tmp_path / "full"), losses(split)
    assert sorted(resumed) == sorted(expected) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([resumed[s] for s in range(1, 7)], [expected[s] for s in range(1, 7)], rtol=1e-6)
    # the losses actually change from step to step, so equality above is not vacuous
    assert len({round(v, 6) for v in expected.values()}) == 6


@pytest.mark.slow
def test_a_checkpoint_written_on_one_mesh_resumes_on_another(tmp_path, caplog):
    """8-way data parallel -> 2x2x2 data x fsdp x tensor: resumed from step 3, the losses and whole final train
    state of an uninterrupted run."""
    config = tiny_config()
    train_and_evaluate(config, str(tmp_path / "full"))
    expected = losses(tmp_path / "full")
    other_mesh = str(tmp_path / "other_mesh")
    train_and_evaluate(config, other_mesh, stop_at_step=3)
    remeshed = tiny_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
    with caplog.at_level(logging.INFO, logger=RESUME_LOGGER):
        assert train_and_evaluate(remeshed, other_mesh)["step"] == 6
    assert resumed_from(caplog.text) == 3
    moved = losses(other_mesh)
    np.testing.assert_allclose([moved[s] for s in range(1, 7)], [expected[s] for s in range(1, 7)], rtol=1e-4)
    # another mesh sums in another order: equal up to float rounding
    assert_same_state(other_mesh, tmp_path / "full", rtol=1e-5, atol=1e-6, other_mesh=True)


def test_checkpoint_of_another_model_is_a_readable_error(tmp_path):
    train_and_evaluate(tiny_config(total_steps=2, warmup_steps=1), str(tmp_path))
    with pytest.raises(CheckpointMismatchError, match="decoder_width"):
        train_and_evaluate(tiny_config(**{"total_steps": 4, "model.decoder_width": 64}), str(tmp_path))


@pytest.mark.slow
def test_poisoned_update_is_never_checkpointed_and_a_sane_rerun_finishes(tmp_path, caplog):
    # the issue's reproduction: step 1's loss and gradient norm are finite, but its update blows the weights up
    # (finite, ~1e28), so step 2's loss is NaN; the checkpoint of step 1 must not be what a rerun resumes from
    config = tiny_config(**{"optim.blr": 1e30, "warmup_steps": 0, "checkpoint_every_steps": 1,
                            "log_every_steps": 100, "total_steps": 4})
    with pytest.raises(NonFiniteLossError, match=r"non-finite train state at step 2 .*no intact checkpoint"):
        train_and_evaluate(config, str(tmp_path))
    assert not [d for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()], "a diverging state is kept"
    assert [d.split("-")[0] for d in os.listdir(tmp_path / "checkpoints_unusable")] == ["1"]  # moved, not deleted
    sane = tiny_config(**{"warmup_steps": 0, "checkpoint_every_steps": 1, "total_steps": 4})
    with caplog.at_level(logging.INFO, logger=RESUME_LOGGER):
        summary = train_and_evaluate(sane, str(tmp_path))
    assert resumed_from(caplog.text) is None  # started afresh, not from the diverging step 1
    assert summary["step"] == 4 and np.isfinite(summary["final_loss"])


def test_bad_config_values_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="num_masked"):
        train_and_evaluate(tiny_config(**{"data.num_masked": 16}), str(tmp_path))
    with pytest.raises(ConfigError, match="batch_size"):
        train_and_evaluate(tiny_config(batch_size=12), str(tmp_path))  # 8 devices


def run_cli(workdir, *overrides, **popen_kwargs):
    cmd = [sys.executable, "-m", "siim_jax.train", "--config", os.path.join(REPO, "configs", "demo.py"),
           "--workdir", str(workdir), "--config.batch_size=16", "--config.data.num_train=256",
           "--config.knn.num_bank=64", "--config.knn.num_query=32", "--config.log_every_steps=1",
           "--config.warmup_steps=1", *overrides]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **popen_kwargs)


def test_demo_recipe_runs_through_the_entry_point(tmp_path):
    proc = run_cli(tmp_path, "--config.total_steps=3", "--config.eval_every_steps=3")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith("done: step 3/3, final loss ") and "knn_top1" in last
    assert last.endswith(os.path.join(str(tmp_path), "checkpoints", "3"))
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for key in ("loss", "lr", "momentum", "grad_norm", "images_per_sec"):
        assert key in steps[-1]
    assert [r["step"] for r in records if "knn_top1" in r] == [0, 3]
    saved = json.load(open(tmp_path / "config.json"))
    assert saved["batch_size"] == 16 and saved["total_steps"] == 3  # the resolved config, overrides included
    assert os.listdir(tmp_path / "tensorboard")


def test_misspelt_override_is_an_error_naming_the_key(tmp_path):
    proc = run_cli(tmp_path, "--config.model.varaint=B")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "varaint" in err and 'Did you mean "variant"' in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_exits_resumable(tmp_path):
    proc = run_cli(tmp_path, "--config.total_steps=100000", "--config.eval_every_steps=0")
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]  # stopped on request, resumable: not 0 (finished)
    last = out.strip().splitlines()[-1]
    assert last.startswith("interrupted at step ")
    step = int(last.split()[3].split("/")[0].rstrip(","))
    assert step >= 2 and os.path.isdir(tmp_path / "checkpoints" / str(step))
