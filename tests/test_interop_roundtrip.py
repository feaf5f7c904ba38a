"""Export / import without PyTorch: bit-exact round trips, the export CLI on a workdir of another mesh, strict
key matching and the checks on file contents."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import safetensors.numpy

from conftest import tiny_config
from interop_helpers import fresh_state, randomized
from siim_jax import export as export_cli
from siim_jax import interop
from siim_jax.interop import CheckpointFileError, StateDictMismatchError
from siim_jax.methods import get_method
from siim_jax.parallel.sharding import create_mesh
from siim_jax.train.checkpoint import Checkpointer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assert_trees_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


@pytest.fixture(scope="module")
def states():
    """(method, a randomised source state, a fresh state to import into)."""
    config = tiny_config()
    _, fresh = fresh_state(config)
    return get_method(config), randomized(fresh, seed=1), fresh


def _exported_and_read_back(method, state, kind: str, path: str) -> dict:
    """export_state_dict -> .safetensors file -> read_state_dict, checking the kind is recognised."""
    interop.write_state_dict(interop.export_state_dict(method, state, kind), path, "safetensors")
    state_dict = interop.read_state_dict(path)
    assert interop.detect_kind(state_dict) == kind
    return state_dict


def test_full_round_trip_is_bit_exact(states, tmp_path):
    method, source, fresh = states
    state_dict = _exported_and_read_back(method, source, "full", str(tmp_path / "full.safetensors"))
    assert state_dict["projector_decoder_blocks.0.norm1.bn.num_batches_tracked"].shape == ()
    assert int(state_dict["projector_decoder_blocks.0.norm1.bn.num_batches_tracked"]) == 7  # the step
    imported = interop.import_state_dict(method, fresh, state_dict, log=lambda _: None)
    assert_trees_equal(imported.batch_stats, source.batch_stats)
    assert_trees_equal(imported.params, source.params)
    # the target branch comes back from mm_*; the position table is one for both branches, the online one
    expected_ema = dict(jax.device_get(source.ema_params))
    expected_ema["encoder"] = {**expected_ema["encoder"],
                               "pos_embed": jax.device_get(source.params["online"]["encoder"]["pos_embed"])}
    assert_trees_equal(imported.ema_params, expected_ema)
    assert_trees_equal(imported.opt_state, fresh.opt_state)  # fresh optimiser
    kernel = imported.params["online"]["encoder"]["blocks"][0]["mlp"]["fc1"]["kernel"]
    assert kernel.sharding == fresh.params["online"]["encoder"]["blocks"][0]["mlp"]["fc1"]["kernel"].sharding


def test_encoder_round_trip_fills_online_and_target_encoders(states, tmp_path):
    method, source, fresh = states
    state_dict = _exported_and_read_back(method, source, "encoder", str(tmp_path / "encoder.safetensors"))
    assert state_dict["pos_embed"].shape == (1, 17, 64)
    imported = interop.import_state_dict(method, fresh, state_dict, log=lambda _: None)
    source_encoder = source.params["online"]["encoder"]
    assert_trees_equal(imported.params["online"]["encoder"], source_encoder)
    assert_trees_equal(imported.ema_params["encoder"], source_encoder)  # target = exact copy
    for name in ("decoder_pred", "decoder_pos_mlp"):  # everything else keeps its fresh values
        assert_trees_equal(imported.params[name], fresh.params[name])
    assert_trees_equal(imported.ema_params["decoder_embed"], fresh.ema_params["decoder_embed"])
    assert_trees_equal(imported.batch_stats, fresh.batch_stats)

    target = interop.export_state_dict(method, source, "encoder", branch="target")
    np.testing.assert_array_equal(target["cls_token"], jax.device_get(source.ema_params["encoder"]["cls_token"]))


def test_layouts_follow_pytorch_conventions(states):
    """Shapes and orientation of each kind of array against SPEC section 6 (PyTorch (out, in), OIHW, q|k|v)."""
    method, source, _ = states
    sd = interop.export_state_dict(method, source, "full")
    online = jax.device_get(source.params["online"])
    qkv = online["encoder"]["blocks"][0]["attn"]["qkv"]["kernel"]  # (D, 3, heads, head_dim)
    # row 64 + 32 of PyTorch's (3D, D) weight is k of head 1, dimension 0
    np.testing.assert_array_equal(sd["blocks.0.attn.qkv.weight"][64 + 32], qkv[:, 1, 1, 0])
    conv = online["encoder"]["patch_embed"]["proj"]["kernel"]  # (p, p, 3, D)
    np.testing.assert_array_equal(sd["patch_embed.proj.weight"][5, 2, 1, 3], conv[1, 3, 2, 5])
    fc1 = online["encoder"]["blocks"][1]["mlp"]["fc1"]["kernel"]
    np.testing.assert_array_equal(sd["blocks.1.mlp.fc1.weight"], fc1.T)
    proj = online["encoder"]["blocks"][0]["attn"]["proj"]["kernel"]  # (heads, head_dim, D)
    np.testing.assert_array_equal(sd["blocks.0.attn.proj.weight"][3, 32 + 4], proj[1, 4, 3])
    stats = jax.device_get(source.batch_stats)
    np.testing.assert_array_equal(sd["mm_projector_decoder_blocks.0.norm2.bn.running_var"],
                                  stats["target"]["projector_decoder_blocks"][0]["norm2"]["var"])
    np.testing.assert_array_equal(sd["mm_mask_token"], jax.device_get(source.ema_params["mask_token"]))
    grid = np.arange(16)
    rows, cols = grid // 4, grid % 4
    omega = 1.0 / 10000 ** (np.arange(8) / 8)  # Dd = 32: w_k = 10000^(-k/(Dd/4))
    np.testing.assert_allclose(sd["decoder_pos_embed"][0, 1:, :8], np.sin(rows[:, None] * omega), atol=1e-6)
    np.testing.assert_allclose(sd["decoder_pos_embed"][0, 1:, 16:24], np.sin(cols[:, None] * omega), atol=1e-6)
    assert not sd["decoder_pos_embed"][0, 0].any()


def test_export_cli_from_a_workdir_trained_on_another_mesh(states, tmp_path):
    """A state saved sharded over 2x2x2 fake devices exports on one device, every step, both formats."""
    config = tiny_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
    _, fresh = fresh_state(config, create_mesh(config.mesh))
    source = randomized(fresh, seed=2)
    assert not source.params["decoder_pred"]["kernel"].sharding.is_fully_replicated
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(config.to_json_best_effort())
    checkpoints = Checkpointer(str(workdir), config)
    checkpoints.save(3, fresh)
    checkpoints.save(7, source)
    checkpoints.close()

    out = str(tmp_path / "full.safetensors")
    export_cli.main(["--workdir", str(workdir), "--out", out, "--full"])
    exported = safetensors.numpy.load_file(out)
    np.testing.assert_array_equal(exported["decoder_pred.weight"],
                                  jax.device_get(source.params["decoder_pred"]["kernel"]).T)
    export_cli.main(["--workdir", str(workdir), "--out", out, "--step", "3", "--branch", "target"])
    np.testing.assert_array_equal(safetensors.numpy.load_file(out)["cls_token"],
                                  jax.device_get(fresh.ema_params["encoder"]["cls_token"]))

    with pytest.raises(SystemExit) as exit_info:
        export_cli.main(["--workdir", str(workdir), "--out", out, "--step", "5"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        export_cli.main(["--workdir", str(tmp_path / "nowhere"), "--out", out])
    assert exit_info.value.code == 2


def test_export_to_pth_without_torch_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "torch", None)  # `import torch` raises ImportError
    with pytest.raises(SystemExit) as exit_info:
        export_cli.main(["--workdir", str(tmp_path), "--out", str(tmp_path / "x.pth")])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "needs PyTorch" in message and "safetensors" in message and message.count("\n") == 1


def test_strict_import_lists_missing_unexpected_and_misshaped_keys(states):
    method, source, fresh = states
    sd = interop.export_state_dict(method, source, "full")
    del sd["decoder_pred.bias"]
    sd["head.weight"] = np.zeros((10, 64), np.float32)
    sd["blocks.1.mlp.fc2.weight"] = np.zeros((64, 128), np.float32)
    with pytest.raises(StateDictMismatchError) as error:
        interop.import_state_dict(method, fresh, sd)
    message = str(error.value)
    assert "1 missing: decoder_pred.bias" in message
    assert "1 unexpected: head.weight" in message
    assert "blocks.1.mlp.fc2.weight: expected (64, 256), found (64, 128)" in message
    assert "allow_partial=True" in message and "--allow-partial" in message

    logged = []
    partial = interop.import_state_dict(method, fresh, sd, allow_partial=True, log=logged.append)
    assert "skipped" in logged[0] and "head.weight" in logged[0]
    # what fitted is loaded, what did not keeps the fresh value
    np.testing.assert_array_equal(jax.device_get(partial.params["decoder_pred"]["kernel"]),
                                  jax.device_get(source.params["decoder_pred"]["kernel"]))
    for name in ("bias",):
        np.testing.assert_array_equal(jax.device_get(partial.params["decoder_pred"][name]),
                                      jax.device_get(fresh.params["decoder_pred"][name]))
    np.testing.assert_array_equal(
        jax.device_get(partial.params["online"]["encoder"]["blocks"][1]["mlp"]["fc2"]["kernel"]),
        jax.device_get(fresh.params["online"]["encoder"]["blocks"][1]["mlp"]["fc2"]["kernel"]))


def test_full_import_requires_batchnorm_counters_and_the_standard_decoder_table(states):
    method, source, fresh = states
    sd = interop.export_state_dict(method, source, "full")
    del sd["predictor_decoder_blocks.0.norm2.bn.num_batches_tracked"]
    with pytest.raises(StateDictMismatchError, match="missing: predictor_decoder_blocks.0.norm2.bn.num_batches"):
        interop.import_state_dict(method, fresh, sd)
    sd = interop.export_state_dict(method, source, "full")
    table = sd["decoder_pos_embed"]  # MAE's original order (column half first) is another model
    sd["decoder_pos_embed"] = np.concatenate([table[..., 16:], table[..., :16]], axis=-1)
    with pytest.raises(StateDictMismatchError, match=r"decoder_pos_embed: max \|difference\| .*\(row half first\)"):
        interop.import_state_dict(method, fresh, sd)


def test_encoder_file_at_another_resolution_is_resized(states):
    method, source, fresh = states
    sd = interop.export_state_dict(method, source, "encoder")
    bigger = tiny_config(**{"model.image_size": 48, "data.num_masked": 20})
    _, big_state = fresh_state(bigger)
    logged = []
    imported = interop.import_state_dict(get_method(bigger), big_state, sd, log=logged.append)
    table = np.asarray(jax.device_get(imported.params["online"]["encoder"]["pos_embed"]))
    assert table.shape == (1, 37, 64) and any("resized the 4^2 grid to 6^2" in m for m in logged)
    np.testing.assert_array_equal(table[0, 0], sd["pos_embed"][0, 0])  # class row kept
    np.testing.assert_array_equal(jax.device_get(imported.ema_params["encoder"]["pos_embed"]), table)


def test_files_with_non_float_or_non_finite_arrays_are_refused(tmp_path):
    path = str(tmp_path / "bad.safetensors")
    safetensors.numpy.save_file({"cls_token": np.zeros((1, 1, 64), np.int32)}, path)
    with pytest.raises(CheckpointFileError, match="'cls_token' has dtype int32; weights must be floating"):
        interop.read_state_dict(path)
    safetensors.numpy.save_file({"cls_token": np.full((1, 1, 64), np.nan, np.float32)}, path)
    with pytest.raises(CheckpointFileError, match="non-finite"):
        interop.read_state_dict(path)
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointFileError, match="cannot read"):
        interop.read_state_dict(str(tmp_path / "garbage.safetensors"))
    with pytest.raises(CheckpointFileError, match="does not exist"):
        interop.read_state_dict(str(tmp_path / "missing.safetensors"))


def test_module_prefix_and_float16_are_accepted(states, tmp_path):
    method, source, fresh = states
    sd = interop.export_state_dict(method, source, "encoder")
    path = str(tmp_path / "ddp.safetensors")
    safetensors.numpy.save_file({f"module.{k}": v.astype(np.float16) for k, v in sd.items()}, path)
    read = interop.read_state_dict(path)
    assert set(read) == set(sd) and all(v.dtype == np.float32 for v in read.values())
    np.testing.assert_array_equal(read["cls_token"], sd["cls_token"].astype(np.float16).astype(np.float32))


def test_workdir_config_round_trips_the_recorded_config(tmp_path):
    config = tiny_config(**{"model.decoder_width": 48, "mesh.fsdp": 2})
    (tmp_path / "config.json").write_text(config.to_json_best_effort(indent=2))
    recorded = interop.workdir_config(str(tmp_path))
    assert json.loads(recorded.model.to_json()) == json.loads(config.model.to_json())
    assert recorded.mesh.logical_axis_rules == config.mesh.logical_axis_rules
    assert recorded.mesh.fsdp == 2


@pytest.mark.slow
def test_import_cli_writes_a_step_that_export_reads_back(states, tmp_path):
    method, source, _ = states
    weights = str(tmp_path / "encoder.safetensors")
    interop.write_state_dict(interop.export_state_dict(method, source, "encoder"), weights, "safetensors")
    recipe = tmp_path / "tiny_recipe.py"
    recipe.write_text(f"import sys\nsys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
                      "from conftest import tiny_config\n\ndef get_config():\n    return tiny_config()\n")
    workdir = str(tmp_path / "imported")
    command = [sys.executable, "-m", "siim_jax.import_weights", f"--config={recipe}", f"--checkpoint={weights}",
               f"--workdir={workdir}"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "imported 28 of 28 arrays" in done.stdout and "checkpoints/0" in done.stdout
    _, restored = interop.load_workdir_state(workdir)
    assert_trees_equal(restored.params["online"]["encoder"], source.params["online"]["encoder"])
    assert_trees_equal(restored.ema_params["encoder"], source.params["online"]["encoder"])
    assert int(restored.step) == 0

    again = subprocess.run(command, capture_output=True, text=True, cwd=REPO)  # refuses to overwrite
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "already holds checkpoints" in again.stderr


def test_bfloat16_safetensors_and_half_pth_are_read_as_float32_with_one_notice(tmp_path, caplog):
    torch = pytest.importorskip("torch")
    import safetensors.torch
    generator = torch.Generator().manual_seed(0)
    sd = {"a.weight": torch.randn(5, 3, generator=generator).to(torch.bfloat16),
          "b.bias": torch.randn(4, generator=generator).to(torch.bfloat16),
          "c.weight": torch.randn(2, 2, generator=generator).to(torch.float16)}
    path = str(tmp_path / "half.safetensors")
    safetensors.torch.save_file(sd, path)
    with caplog.at_level("INFO", logger="siim_jax.interop.files"):
        read = interop.read_state_dict(path)
    assert set(read) == set(sd)
    for key, tensor in sd.items():
        assert read[key].dtype == np.float32
        np.testing.assert_array_equal(read[key], tensor.float().numpy())
    notices = [r.getMessage() for r in caplog.records if "converted" in r.getMessage()]
    assert len(notices) == 1 and "2 bfloat16 arrays" in notices[0] and "1 float16 array" in notices[0]

    caplog.clear()
    pth = str(tmp_path / "half.pth")
    torch.save({"model": sd}, pth)
    with caplog.at_level("INFO", logger="siim_jax.interop.files"):
        read = interop.read_state_dict(pth)
    for key, tensor in sd.items():
        np.testing.assert_array_equal(read[key], tensor.float().numpy())
    notices = [r.getMessage() for r in caplog.records if "converted" in r.getMessage()]
    assert len(notices) == 1 and "2 bfloat16 arrays" in notices[0]


def test_export_cli_to_a_directory_is_a_one_line_error(tmp_path):
    out = tmp_path / "existing"
    out.mkdir()
    done = subprocess.run([sys.executable, "-m", "siim_jax.export", "--workdir", str(tmp_path / "nowhere"),
                           "--out", str(out), "--format", "safetensors"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 2, done.stderr
    assert "error:" in done.stderr and str(out) in done.stderr and "Traceback" not in done.stderr
    assert "restoring" not in done.stdout  # refused before restoring


def test_export_cli_write_failure_is_a_one_line_error(states, tmp_path, capsys):
    method, source, _ = states
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(method.config.to_json_best_effort())
    checkpoints = Checkpointer(str(workdir), method.config)
    checkpoints.save(7, source)
    checkpoints.close()
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit) as exit_info:  # the parent of --out is a file: makedirs fails (even as root)
        export_cli.main(["--workdir", str(workdir), "--out", str(blocker / "w.safetensors")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write") and len(err.strip().splitlines()) == 1
