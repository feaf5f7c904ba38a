"""The evaluation, interop and tool commands on gs:// paths, against a real GCS JSON-API server on 127.0.0.1 (the
`gcs` fixture: a fresh server and an empty bucket gs://bucket per test): each command run for real (subprocess)
on gs:// and compared with the same command, or the same library call, on a local path; a TFDS array_record
dataset read in place from the bucket; and a missing bucket is one `error:` line with exit 1 in every command
family."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import safetensors.numpy

from conftest import tiny_config
from siim_jax import interop
from siim_jax.train.loop import train_and_evaluate
from test_eval_commands import TINY_MODEL, TINY_RUN, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))


def run_module(module, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def upload(local: str, url: str) -> None:
    """Copies the folder `local` to `url` (gs://bucket/...) object by object, with gcsfs."""
    import gcsfs
    fs = gcsfs.GCSFileSystem()
    for folder, _, files in os.walk(local):
        for name in files:
            path = os.path.join(folder, name)
            fs.put_file(path, url[len("gs://"):] + "/" + os.path.relpath(path, local))


def one_error_line(done) -> str:
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A local pretraining workdir (tiny SiameseIM, 4 steps), uploaded to each test's bucket by the tests."""
    workdir = str(tmp_path_factory.mktemp("pretrained"))
    train_and_evaluate(tiny_config(total_steps=4), workdir)
    return workdir


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """A recipe file of the tiny pretraining config (what import_weights needs)."""
    path = tmp_path_factory.mktemp("recipe") / "tiny_recipe.py"
    path.write_text(f"import sys\nsys.path.insert(0, {TESTS!r})\n"
                    "from conftest import tiny_config\n\ndef get_config():\n    return tiny_config()\n")
    return str(path)


@pytest.mark.slow  # the fast tier keeps its lighter sibling tests of this file
def test_export_from_a_gs_workdir_to_gs_and_import_from_gs_into_a_gs_workdir(gcs, pretrained, recipe, tmp_path):
    """export --workdir gs:// --out gs:// writes the same bytes as an export of the local workdir; import_weights
    --checkpoint gs:// --workdir gs:// saves a step 0 whose encoders are those arrays."""
    upload(pretrained, "gs://bucket/pre")
    done = run_module("siim_jax.export", "--workdir", "gs://bucket/pre", "--out", "gs://bucket/out/enc.safetensors")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "exported the online encoder of step 4" in done.stdout
    local = str(tmp_path / "enc.safetensors")
    method, state = interop.load_workdir_state(pretrained)
    interop.write_state_dict(interop.export_state_dict(method, state, "encoder"), local, "safetensors")
    exported = gcs.read("bucket", "out/enc.safetensors")
    assert exported == open(local, "rb").read()

    done = run_module("siim_jax.import_weights", f"--config={recipe}", "--checkpoint=gs://bucket/out/enc.safetensors",
                      "--workdir=gs://bucket/imported")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "imported 28 of 28 arrays" in done.stdout
    assert json.loads(gcs.read("bucket", "imported/config.json"))["model"]["variant"] == "mu"
    _, restored = interop.load_workdir_state("gs://bucket/imported")
    assert int(restored.step) == 0
    expected = jax.device_get(state.params["online"]["encoder"])
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.params["online"]["encoder"]), expected)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.ema_params["encoder"]), expected)
    # the .pth path too: written locally then uploaded, read back from a downloaded copy
    interop.write_state_dict(interop.export_state_dict(method, state, "encoder"), "gs://bucket/enc.pth", "pth")
    back = interop.read_state_dict("gs://bucket/enc.pth")
    reference = safetensors.numpy.load_file(local)
    assert sorted(back) == sorted(reference)
    for key in reference:
        np.testing.assert_array_equal(back[key], reference[key])


def test_visualize_writes_the_same_png_to_gs(gcs, tmp_path):
    args = ["--config", "configs/demo.py", "--config.data.num_train=64", "--num=2", "--step=1"]
    remote = run_module("siim_jax.tools.visualize", *args, "--out=gs://bucket/viz/pairs.png")
    local = run_module("siim_jax.tools.visualize", *args, f"--out={tmp_path / 'pairs.png'}")
    assert remote.returncode == 0 and local.returncode == 0, remote.stderr[-2000:] + local.stderr[-2000:]
    assert remote.stdout.strip() == "gs://bucket/viz/pairs.png"
    png = gcs.read("bucket", "viz/pairs.png")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png == (tmp_path / "pairs.png").read_bytes()


def run_side_by_side(commands: dict) -> dict:
    """{what: CompletedProcess} of `python -m <command>` for each command, all started at once."""
    running = {what: subprocess.Popen([sys.executable, "-m", *command], cwd=REPO, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True) for what, command in commands.items()}
    done = {}
    for what, proc in running.items():
        stdout, stderr = proc.communicate(timeout=300)
        done[what] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return done


def assert_missing_bucket_errors(done: dict) -> None:
    for what, result in done.items():
        line = one_error_line(result)
        assert result.returncode == 1 and "gs://nobucket" in line and "gcloud storage buckets create" in line, (
            what, result.stderr[-3000:])


def test_a_missing_bucket_is_one_error_line_with_exit_1_in_every_command_family(gcs, recipe, tmp_path):
    """export (--workdir), import_weights (--checkpoint), visualize (--out), the evaluation commands
    (--pretrained): one `error:` line naming the bucket, exit 1, no traceback. Run side by side."""
    tiny = flags({**TINY_MODEL, "batch_size": 16})
    assert_missing_bucket_errors(run_side_by_side({
        "export --workdir": ["siim_jax.export", "--workdir", "gs://nobucket/pre", "--out", str(tmp_path / "e.pth")],
        "import_weights --checkpoint": ["siim_jax.import_weights", f"--config={recipe}",
                                        "--checkpoint=gs://nobucket/e.safetensors", f"--workdir={tmp_path / 'imp'}"],
        "visualize --out": ["siim_jax.tools.visualize", "--config", "configs/demo.py", "--config.data.num_train=64",
                            "--num=2", "--out=gs://nobucket/p.png"],
        "linear_probe --pretrained": ["siim_jax.linear_probe", "--config", "configs/linprobe_demo.py", *tiny,
                                      "--pretrained", "gs://nobucket/pre", "--workdir", str(tmp_path / "lp")],
    }))
    assert gcs.objects("bucket", "") == []  # nothing was written anywhere else
    assert not os.path.exists(tmp_path / "e.pth") and not os.path.exists(tmp_path / "imp")


@pytest.mark.slow
def test_a_missing_bucket_to_write_to_is_one_error_line_with_exit_1(gcs, pretrained, recipe, tmp_path):
    """The write side: export --out, import_weights --workdir, fewshot --workdir into a missing bucket."""
    upload(pretrained, "gs://bucket/pre")
    gcs_file = "gs://bucket/enc.safetensors"
    method, state = interop.load_workdir_state(pretrained)
    interop.write_state_dict(interop.export_state_dict(method, state, "encoder"), gcs_file, "safetensors")
    tiny = flags({**TINY_MODEL, "batch_size": 16})
    done = run_side_by_side({
        "export --out": ["siim_jax.export", "--workdir", "gs://bucket/pre", "--out", "gs://nobucket/e.safetensors"],
        "import_weights --workdir": ["siim_jax.import_weights", f"--config={recipe}", f"--checkpoint={gcs_file}",
                                     "--workdir=gs://nobucket/imp"],
        "fewshot --workdir": ["siim_jax.fewshot", "--config", "configs/fewshot_demo.py", *tiny,
                              "--pretrained", "none", "--workdir", "gs://nobucket/fs"],
    })
    for what, result in done.items():
        line = one_error_line(result)
        assert result.returncode == 1 and "gs://nobucket" in line, (what, result.stderr[-3000:])


def test_tfds_array_record_is_read_in_place_from_gs(gcs, tmp_path, monkeypatch):
    """A TFDS array_record dataset uploaded to the bucket reads the same examples as its local copy, through
    ArrayRecord's own GCS reader (pointed at the server by CLOUD_STORAGE_EMULATOR_ENDPOINT, set from
    STORAGE_EMULATOR_HOST). An array-record release without that reader (its error simulated) is one SourceError
    line telling to upgrade or to copy the dataset to a local disk."""
    import test_tfds_source
    from array_record.python import array_record_data_source
    from siim_jax.data.sources import SourceError
    from siim_jax.data.sources.tfds import TfdsSource

    os.environ.pop("CLOUD_STORAGE_EMULATOR_ENDPOINT", None)  # an earlier test's server; set again from the fixture's
    local = tmp_path / "tfds"
    test_tfds_source._prepare(local)
    upload(str(local), "gs://bucket/tfds")
    try:
        remote = TfdsSource(f"{test_tfds_source.NAME}/labelled", "train", "gs://bucket/tfds")
        assert os.environ["CLOUD_STORAGE_EMULATOR_ENDPOINT"] == gcs.url
        reference = TfdsSource(f"{test_tfds_source.NAME}/labelled", "train", str(local))
        assert len(remote) == len(reference) == len(test_tfds_source.TRAIN)
        assert [remote.read(i) for i in range(len(remote))] == [reference.read(i) for i in range(len(reference))]
        assert [remote.label(i) for i in range(len(remote))] == [reference.label(i) for i in range(len(reference))]
        assert sorted(remote.read(i) for i in range(len(remote))) == sorted(e["image"] for e in test_tfds_source.TRAIN)

        def old_reader(filename, *args, **kwargs):  # array-record before its GCS reader: a local open()
            raise RuntimeError(f"open() failed: No such file or directory; opening {filename}")
        monkeypatch.setattr(array_record_data_source, "_create_reader", old_reader)
        with pytest.raises(SourceError, match=r"cannot read the records under 'gs://bucket/tfds' \(open\(\) failed.*"
                           r"pip install -U array-record.*gcloud storage cp -r gs://bucket/tfds/siim_tiny_images ") as e:
            TfdsSource(f"{test_tfds_source.NAME}/labelled", "test", "gs://bucket/tfds")
        assert "\n" not in str(e.value)
    finally:
        os.environ.pop("CLOUD_STORAGE_EMULATOR_ENDPOINT", None)


def test_an_image_folder_on_gs_is_refused_in_one_line():
    from siim_jax.config import base_config
    from siim_jax.data.sources import SourceError, open_source

    config = base_config().data
    config.source = "imagefolder:gs://bucket/imagenet"
    with pytest.raises(SourceError, match=r"not supported .*tfds_data_dir=gs://.* gcsfuse") as error:
        open_source(config, 0)
    assert "\n" not in str(error.value)


@pytest.mark.slow
def test_fewshot_on_gs_gives_the_local_figures(gcs, pretrained, tmp_path):
    """fewshot --pretrained gs://<workdir> --workdir gs://: the summary line, metrics.jsonl, pretrained.json and
    a TensorBoard events object, with the figures of the same command on local paths."""
    upload(pretrained, "gs://bucket/pre")
    tiny = [*flags({**TINY_MODEL, "batch_size": 16}), "--config.fewshot.per_class=2"]
    remote = run_module("siim_jax.fewshot", "--config", "configs/fewshot_demo.py", *tiny,
                        "--pretrained", "gs://bucket/pre", "--workdir", "gs://bucket/fs")
    local = run_module("siim_jax.fewshot", "--config", "configs/fewshot_demo.py", *tiny,
                       "--pretrained", pretrained, "--workdir", str(tmp_path / "fs"))
    assert remote.returncode == 0 and local.returncode == 0, remote.stderr[-3000:] + local.stderr[-3000:]
    line = remote.stdout.strip().splitlines()[-1]
    assert "workdir gs://bucket/fs" in line
    assert line.split(", workdir")[0] == local.stdout.strip().splitlines()[-1].split(", workdir")[0]
    remote_records = [json.loads(r) for r in gcs.read("bucket", "fs/metrics.jsonl").decode().splitlines()]
    assert remote_records == [json.loads(r) for r in open(tmp_path / "fs" / "metrics.jsonl")]
    assert json.loads(gcs.read("bucket", "fs/pretrained.json")) == {"pretrained": "gs://bucket/pre",
                                                                    "encoder": "online"}
    assert any("tfevents" in name for name in gcs.objects("bucket", "fs/tensorboard/"))
    assert "fs/LOCK" not in gcs.objects("bucket", "fs/")


@pytest.mark.slow
def test_finetune_on_gs_exports_the_local_model_and_linear_probe_logs_the_local_metrics(gcs, pretrained, tmp_path):
    """finetune and linear_probe with --pretrained gs:// (a workdir; an exported .safetensors) and --workdir
    gs://: finetuned.safetensors, metrics.jsonl and pretrained.json equal to the same commands on local paths."""
    upload(pretrained, "gs://bucket/pre")
    tiny = [*flags({**TINY_MODEL, **TINY_RUN}), "--config.total_steps=2"]
    remote = run_module("siim_jax.finetune", "--config", "configs/finetune_demo.py", *tiny,
                        "--pretrained", "gs://bucket/pre", "--workdir", "gs://bucket/ft")
    local = run_module("siim_jax.finetune", "--config", "configs/finetune_demo.py", *tiny,
                       "--pretrained", pretrained, "--workdir", str(tmp_path / "ft"))
    assert remote.returncode == 0 and local.returncode == 0, remote.stderr[-3000:] + local.stderr[-3000:]
    ours = safetensors.numpy.load(gcs.read("bucket", "ft/finetuned.safetensors"))
    theirs = safetensors.numpy.load_file(str(tmp_path / "ft" / "finetuned.safetensors"))
    assert sorted(ours) == sorted(theirs) and "head.weight" in ours
    for key in theirs:
        np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-6, atol=1e-7)

    encoder = str(tmp_path / "enc.safetensors")
    method, state = interop.load_workdir_state(pretrained)
    interop.write_state_dict(interop.export_state_dict(method, state, "encoder"), encoder, "safetensors")
    import gcsfs
    gcsfs.GCSFileSystem().put_file(encoder, "bucket/files/enc.safetensors")
    probe = [*flags({**TINY_MODEL, **TINY_RUN}), "--config.total_steps=2"]
    remote = run_module("siim_jax.linear_probe", "--config", "configs/linprobe_demo.py", *probe,
                        "--pretrained", "gs://bucket/files/enc.safetensors", "--workdir", "gs://bucket/lp")
    local = run_module("siim_jax.linear_probe", "--config", "configs/linprobe_demo.py", *probe,
                       "--pretrained", encoder, "--workdir", str(tmp_path / "lp"))
    assert remote.returncode == 0 and local.returncode == 0, remote.stderr[-3000:] + local.stderr[-3000:]
    keys = ("step", "loss", "val_top1", "val_top5")
    pick = [{k: r[k] for k in keys if k in r} for r in
            (json.loads(line) for line in gcs.read("bucket", "lp/metrics.jsonl").decode().splitlines())]
    want = [{k: r[k] for k in keys if k in r} for r in (json.loads(line) for line in open(tmp_path / "lp" /
                                                                                           "metrics.jsonl"))]
    assert pick == want
    assert json.loads(gcs.read("bucket", "lp/pretrained.json"))["pretrained"] == "gs://bucket/files/enc.safetensors"
