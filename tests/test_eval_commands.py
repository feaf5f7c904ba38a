"""The evaluation commands: linear probe, fine-tune and few-shot on a pretrained encoder, through the trainer
(resume exact, the encoder really comes from --pretrained, frozen where the protocol freezes it), the timm export
of a fine-tuned model, and their command lines (one-line errors, the `top1:` summary)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import override, tiny_config
from siim_jax import config as config_lib
from siim_jax.eval.pretrained import pretrained_encoder, with_pretrained_encoder
from siim_jax.interop import load_workdir_state, read_state_dict
from siim_jax.train.loop import train_and_evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MODEL = {"model.variant": "mu", "model.image_size": 32, "model.dtype": "float32", "data.num_train": 64,
              "data.raw_size": 40, "data.num_masked": 10, "data.num_val": 24, "classifier.num_classes": 10,
              "classifier.eval_batch_size": 16, "mesh.data": -1}
TINY_RUN = {"batch_size": 16, "total_steps": 4, "warmup_steps": 1, "log_every_steps": 1,
            "checkpoint_every_steps": 2, "eval_every_steps": 2}


def eval_config(kind: str, **overrides):
    base = {"linear_probe": config_lib.linear_probe_config, "finetune": config_lib.finetune_config}[kind]("mu")
    return override(base, {**TINY_MODEL, **TINY_RUN, **overrides})


def flags(overrides: dict) -> list[str]:
    return [f"--config.{k}={v}" for k, v in overrides.items()]


def records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def run_module(module, *args):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A pretraining workdir (tiny SiameseIM, 4 steps) and its online encoder as PyTorch-named arrays."""
    workdir = str(tmp_path_factory.mktemp("pretrained"))
    train_and_evaluate(tiny_config(total_steps=4), workdir)
    return workdir, pretrained_encoder(workdir)[0]


def encoder_of(state):
    return jax.device_get(state.params["encoder"])


def test_linear_probe_loads_the_encoder_keeps_it_frozen_and_resumes_exactly(pretrained, tmp_path):
    workdir, state_dict = pretrained
    config = eval_config("linear_probe")
    load = with_pretrained_encoder(state_dict)
    full = train_and_evaluate(config, str(tmp_path / "full"), initial_weights=load)
    assert full["step"] == 4 and 0.0 <= full["top1"] <= 1.0 and 0.0 <= full["top5"] <= 1.0

    split = str(tmp_path / "split")
    assert train_and_evaluate(config, split, stop_at_step=2, initial_weights=load)["interrupted"]
    resumed = train_and_evaluate(config, split, initial_weights=load)
    assert resumed["top1"] == full["top1"] and resumed["top5"] == full["top5"]
    expected = {r["step"]: r["loss"] for r in records(tmp_path / "full") if "loss" in r}
    got = {r["step"]: r["loss"] for r in records(split) if "loss" in r}
    assert sorted(got) == [1, 2, 3, 4] and len(set(expected.values())) == 4
    np.testing.assert_allclose([got[s] for s in range(1, 5)], [expected[s] for s in range(1, 5)], rtol=1e-6)
    assert {r["step"] for r in records(split) if "val_top1" in r} == {0, 2, 4}

    # the encoder is the pretrained online encoder, unchanged by training; the head did train
    _, pretraining_state = load_workdir_state(workdir)
    _, probed = load_workdir_state(str(tmp_path / "full"))
    jax.tree.map(np.testing.assert_array_equal, encoder_of(probed), jax.device_get(
        pretraining_state.params["online"]["encoder"]))
    _, fresh = load_workdir_state(split, step=2)
    assert not np.allclose(probed.params["head"]["kernel"], fresh.params["head"]["kernel"])


@pytest.mark.slow
def test_linear_probe_is_the_same_on_another_mesh(pretrained, tmp_path):
    _, state_dict = pretrained
    runs = {}
    for name, mesh in {"data8": {"mesh.data": 8}, "data2_fsdp4": {"mesh.data": 2, "mesh.fsdp": 4}}.items():
        config = eval_config("linear_probe", **mesh)
        train_and_evaluate(config, str(tmp_path / name), initial_weights=with_pretrained_encoder(state_dict))
        runs[name] = [r.get("loss", r.get("val_top1")) for r in records(tmp_path / name)]
    np.testing.assert_allclose(runs["data8"], runs["data2_fsdp4"], rtol=2e-5)


@pytest.mark.slow
def test_finetune_resumes_exactly_and_exports_a_timm_model_with_the_same_logits(pretrained, tmp_path):
    _, state_dict = pretrained
    config = eval_config("finetune")
    load = with_pretrained_encoder(state_dict)
    full = train_and_evaluate(config, str(tmp_path / "full"), initial_weights=load)
    split = str(tmp_path / "split")
    train_and_evaluate(config, split, stop_at_step=2, initial_weights=load)
    resumed = train_and_evaluate(config, split, initial_weights=load)
    assert resumed["top1"] == full["top1"]
    np.testing.assert_allclose([r["loss"] for r in records(split) if "loss" in r],
                               [r["loss"] for r in records(tmp_path / "full") if "loss" in r], rtol=1e-6)
    _, tuned = load_workdir_state(str(tmp_path / "full"))
    assert not np.allclose(tuned.params["encoder"]["blocks"][0]["mlp"]["fc1"]["kernel"],
                           state_dict["blocks.0.mlp.fc1.weight"].T)  # the encoder trains too

    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    from flax import nnx

    from siim_jax.interop import classifier_state_dict
    from siim_jax.methods import get_method
    from siim_jax.train.state import abstract_model

    method = get_method(config)
    exported = classifier_state_dict(method, tuned)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10, global_pool="avg")
    model.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
    model.eval()
    images = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        theirs = model(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    graphdef, _, _ = abstract_model(method)
    ours = np.asarray(method.logits(nnx.merge(graphdef, tuned.params, tuned.batch_stats), images))
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


def test_fewshot_command_ends_with_top1_and_reruns_to_the_same_figures(pretrained, tmp_path):
    workdir, _ = pretrained
    tiny = flags({**TINY_MODEL, "batch_size": 16})
    # few-shot on the pretrained workdir: a `top1:` summary, and the same figures when rerun
    fewshot = ["--config", "configs/fewshot_demo.py", "--pretrained", workdir, "--workdir", str(tmp_path / "fs"),
               *tiny, "--config.fewshot.per_class=2"]
    first, second = run_module("siim_jax.fewshot", *fewshot), run_module("siim_jax.fewshot", *fewshot)
    assert first.returncode == 0, first.stderr[-3000:]
    line = first.stdout.strip().splitlines()[-1]
    assert "top1: " in line and "mean_patch features of 20 training images" in line and "24 validation images" in line
    assert second.stdout.strip().splitlines()[-1] == line
    assert os.listdir(tmp_path / "fs" / "tensorboard") and records(tmp_path / "fs")[-1]["step"] == 0
    top1 = float(line.split("top1: ")[1].split(",")[0])
    assert 0.0 <= top1 <= 1.0


def test_finetune_command_ends_with_top1_and_exports_for_timm(pretrained, tmp_path):
    workdir, _ = pretrained
    tiny = flags({**TINY_MODEL, "batch_size": 16})
    finetune = run_module("siim_jax.finetune", "--config", "configs/finetune_demo.py", "--pretrained", workdir,
                          "--workdir", str(tmp_path / "ft"), *tiny, *flags(TINY_RUN), "--config.total_steps=2")
    assert finetune.returncode == 0, finetune.stderr[-3000:]
    assert "top1: " in finetune.stdout.strip().splitlines()[-1]
    exported = read_state_dict(str(tmp_path / "ft" / "finetuned.safetensors"))
    assert exported["head.weight"].shape == (10, 64)
    assert {"fc_norm.bias", "blocks.1.mlp.fc2.weight", "pos_embed"} <= set(exported)


def test_commands_refuse_bad_input_in_one_line(pretrained, tmp_path):
    workdir, _ = pretrained
    tiny = flags({**TINY_MODEL, "batch_size": 16})
    probe = ["--config", "configs/linprobe_demo.py", "--workdir", str(tmp_path / "lp"), *tiny]
    cases = [  # (arguments, exit status, what the error line names)
        (["--config", "configs/demo.py", "--pretrained", workdir, "--workdir", str(tmp_path / "x")], 2,
         "loss_type='siamese'"),
        ([*probe, "--pretrained", str(tmp_path / "missing.safetensors")], 1, "missing.safetensors"),
        ([*probe, "--pretrained", workdir, "--config.model.variant=Ti", "--config.model.image_size=64"], 1,
         "does not fit"),
    ]
    for arguments, status, named in cases:
        done = run_module("siim_jax.linear_probe", *arguments)
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert done.returncode == status and len(errors) == 1 and named in errors[0], done.stderr[-3000:]
        assert "Traceback" not in done.stderr


def run_processes(module, args, count=2, devices=4):
    """`module` on `count` local processes joined over localhost, `devices` fake CPU devices each (as
    launch/local.sh starts the trainer); returns the CompletedProcess-like results, process 0 first."""
    import socket
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"}
    procs = [subprocess.Popen([sys.executable, "-m", module, *args, "--coordinator_address", f"localhost:{port}",
                               "--num_processes", str(count), "--process_id", str(i)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
             for i in range(count)]
    try:
        outputs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.communicate()
    return [subprocess.CompletedProcess(p.args, p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_fewshot_on_two_processes_gives_the_one_process_figures(pretrained, tmp_path):
    """2 processes x 4 devices against 1 x 8: the same top-1, solver iterations and gradient norm. Caught:
    jax.device_get on features that span the other process's devices (a RuntimeError traceback)."""
    workdir, _ = pretrained
    common = ["--config", "configs/fewshot_demo.py", "--pretrained", workdir, *flags({**TINY_MODEL, "batch_size": 16}),
              "--config.fewshot.per_class=2"]
    one = run_module("siim_jax.fewshot", *common, "--workdir", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_processes("siim_jax.fewshot", [*common, "--workdir", str(tmp_path / "two")])
    assert [r.returncode for r in two] == [0, 0], [r.stderr[-3000:] for r in two]
    expected, got = records(tmp_path / "one")[-1], records(tmp_path / "two")[-1]
    assert got["fewshot_top1"] == expected["fewshot_top1"] and got["n_val"] == expected["n_val"] == 24
    assert got["iterations"] == expected["iterations"]
    assert two[0].stdout.strip().splitlines()[-1].split("top1: ")[1] == \
        one.stdout.strip().splitlines()[-1].split("top1: ")[1].replace(str(tmp_path / "one"), str(tmp_path / "two"))
    assert "Traceback" not in two[0].stderr + two[1].stderr


@pytest.mark.slow  # the fast tier's multi-process evaluation is few-shot's; these two run through the trainer
@pytest.mark.multiprocess
def test_linear_probe_and_finetune_on_two_processes_give_the_one_process_figures(pretrained, tmp_path):
    """launch/local.sh 2 x 2 devices (the batch axis across both processes) against 1 process x 4, for both
    trainer-driven commands: the same summary line (top-1, top-5, best top-1), validation figures at every
    evaluation, per-step losses and gradient norms (float rounding), and for fine-tuning the same timm export.
    22 validation images in batches of 16: the second batch is 6 images, all on process 0's first device and a
    half, so process 0 feeds padding after them and process 1 feeds padding only. Caught: every process wrote
    finetuned.safetensors (process 0 alone does now, and the others wait for it before their summary line)."""
    workdir, _ = pretrained
    run = {**TINY_MODEL, "data.num_val": 22, "batch_size": 16, "total_steps": 3, "warmup_steps": 1,
           "log_every_steps": 1, "checkpoint_every_steps": 3, "eval_every_steps": 3}
    one_device_env = {**os.environ, "JAX_PLATFORMS": "cpu",
                      "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4"}
    for module, recipe in [("linear_probe", "linprobe_demo"), ("finetune", "finetune_demo")]:
        common = ["--config", f"configs/{recipe}.py", "--pretrained", workdir, *flags(run)]
        one_dir, two_dir = tmp_path / f"{module}_one", tmp_path / f"{module}_two"
        one = subprocess.run([sys.executable, "-m", f"siim_jax.{module}", *common, "--workdir", str(one_dir)],
                             cwd=REPO, env=one_device_env, capture_output=True, text=True, timeout=600)
        assert one.returncode == 0, one.stderr[-3000:]
        two = subprocess.run(["bash", os.path.join(REPO, "launch", "local.sh"), "2", "--devices-per-process", "2",
                              "--module", f"siim_jax.{module}", *common, "--workdir", str(two_dir)],
                             cwd=REPO, capture_output=True, text=True, timeout=600)
        assert two.returncode == 0, two.stderr[-3000:]
        assert "process 1/2, local devices 2, global devices 4" in two.stderr and "Traceback" not in two.stderr

        # the summary line: each of the two processes prints the one process's, top-1 included
        expected = one.stdout.strip().splitlines()[-1].replace(str(one_dir), str(two_dir))
        assert expected.startswith("done: step 3/3") and "top1: " in expected
        assert [line for line in two.stdout.splitlines() if line.startswith("done:")] == [expected, expected]

        # metrics.jsonl: the same records; validation figures equal, losses and gradient norms to float rounding
        want, got = records(one_dir), records(two_dir)
        assert [(r["step"], "loss" in r) for r in got] == [(r["step"], "loss" in r) for r in want]
        assert [r["step"] for r in got if "val_top1" in r] == [0, 3]
        for w, g in zip(want, got):
            if "val_top1" in w:
                assert {k: g[k] for k in w} == w
            else:
                np.testing.assert_allclose([g["loss"], g["grad_norm"]], [w["loss"], w["grad_norm"]], rtol=1e-5)
        if module == "finetune":
            exported = read_state_dict(str(two_dir / "finetuned.safetensors"))
            reference = read_state_dict(str(one_dir / "finetuned.safetensors"))
            assert sorted(exported) == sorted(reference)
            for name, value in reference.items():
                np.testing.assert_allclose(exported[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
