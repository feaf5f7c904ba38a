"""Stop requests from the first line of a run: a SIGTERM that lands before training starts (imports, restore,
compilation, the step-0 evaluation) is a resumable stop, exit status 75, with the newest checkpoint kept as it was."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import recipe_config
from siim_jax.train.loop import train_and_evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"batch_size": 16, "data.num_train": 64, "data.raw_size": 40, "data.num_masked": 10, "model.image_size": 32,
        "model.decoder_width": 32, "model.predictor_depth": 1, "model.projector_depth": 1, "warmup_steps": 1,
        "log_every_steps": 1, "eval_every_steps": 0, "total_steps": 4, "checkpoint_every_steps": 2}


def wait_until_logged(metrics, lines: int, proc, timeout: float = 240) -> None:
    """Returns once `metrics` holds `lines` records, or `proc` ended, or `timeout` passed."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= lines:
            return
        time.sleep(0.1)


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


@pytest.mark.slow  # the fast tier keeps its lighter sibling tests of this file
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
        wait_until_logged(tmp_path / "metrics.jsonl", 3, proc)
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


@pytest.mark.slow  # fast-tier time; the fast tier keeps this file's lighter tests
def test_a_preemption_notice_from_the_metadata_server_saves_and_exits_75(tmp_path):
    """A local server answering as the GCE / Cloud TPU metadata server does (Metadata-Flavor header checked)
    turns `instance/preempted` to TRUE mid-run: the run stops after an agreed step, saves it, exits 75, and the
    rerun goes on from there. Caught: a notice that nothing reads (the run dies with the VM, losing everything
    since the last periodic checkpoint)."""
    import http.server
    import threading
    state = {"preempted": "FALSE", "asked": 0}

    class Metadata(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            if self.headers.get("Metadata-Flavor") != "Google":
                self.send_response(403)
                self.end_headers()
                return
            key = self.path.split("/computeMetadata/v1/instance/", 1)[-1].split("?")[0]
            value = {"preempted": state["preempted"], "maintenance-event": "NONE"}.get(key)
            state["asked"] += 1
            body = (value or "").encode()
            self.send_response(200 if value is not None else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Metadata)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    args = ["--config", "configs/demo.py", *[f"--config.{k}={v}" for k, v in TINY.items()],
            "--config.total_steps=100000", "--config.checkpoint_every_steps=100000", "--workdir", str(tmp_path)]
    env = {**os.environ, "GCE_METADATA_HOST": f"127.0.0.1:{server.server_address[1]}"}
    proc = subprocess.Popen([sys.executable, "-m", "siim_jax.train", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until_logged(tmp_path / "metrics.jsonl", 3, proc)
        assert proc.poll() is None and state["asked"] > 0, proc.communicate()[1][-3000:]
        state["preempted"] = "TRUE"
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        server.shutdown()
    assert proc.returncode == 75, err[-3000:]
    assert "the metadata server reports preempted TRUE" in err
    step = int(out.strip().splitlines()[-1].split("interrupted at step ")[1].split("/")[0])
    assert saved_steps(str(tmp_path)) == [step] and step >= 3
