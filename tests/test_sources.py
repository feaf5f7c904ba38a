"""Image-folder source, decoding of odd files, skip-and-count, and the entry point on a folder of JPEGs."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from ml_collections import ConfigDict
from PIL import Image

from conftest import recipe_config
from siim_jax.data.pipeline import TooManyBadImagesError, TwoViewBatches
from siim_jax.data.sources import (BadImageError, ImageFolderSource, SourceError, decode_rgb, open_source)
from siim_jax.data.views import eval_view
from siim_jax.tools.make_jpegs import write_image_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RNG = np.random.default_rng(0)
PIXELS = RNG.integers(0, 256, (30, 40, 3), dtype=np.uint8)
GREY = RNG.integers(0, 256, (30, 40), dtype=np.uint8)
DEEP = RNG.integers(0, 65536, (20, 24), dtype=np.uint16)


def _encoded(image: Image.Image, image_format: str, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **kw)
    return buffer.getvalue()


GOOD_JPEG = _encoded(Image.fromarray(PIXELS), "JPEG", quality=95)
# files a JPEG tree may hold: name -> (bytes, expected decoded uint8 (H, W, 3) or None if it must be skipped)
ODD_FILES = {
    "png_inside.JPEG": (_encoded(Image.fromarray(PIXELS), "PNG"), PIXELS),
    "grey.JPEG": (_encoded(Image.fromarray(GREY), "PNG"), np.repeat(GREY[..., None], 3, axis=2)),
    "rgba.png": (_encoded(Image.fromarray(np.dstack([PIXELS, GREY])), "PNG"), PIXELS),
    "deep.png": (_encoded(Image.fromarray(DEEP), "PNG"),
                 np.repeat(np.clip(DEEP * (255 / 65535), 0, 255).astype(np.uint8)[..., None], 3, axis=2)),
    "tiny.JPEG": (_encoded(Image.fromarray(PIXELS[:2, :3]), "PNG"), PIXELS[:2, :3]),
    "truncated.JPEG": (GOOD_JPEG[:len(GOOD_JPEG) // 2], None),
    "garbage.JPEG": (RNG.integers(0, 256, 5000, dtype=np.uint8).tobytes(), None),
    "empty.JPEG": (b"", None),
}
BAD = sorted(name for name, (_, expected) in ODD_FILES.items() if expected is None)


def _cmyk_jpeg() -> tuple[bytes, np.ndarray]:
    """A CMYK JPEG and PIL's own RGB decode of it (the official loader's reference)."""
    data = _encoded(Image.fromarray(PIXELS).convert("CMYK"), "JPEG", quality=95)
    return data, np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """<root>/train/class_000..001 with 6 photo-like JPEGs each, odd files in class_001 and a stray text file."""
    root = tmp_path_factory.mktemp("folder")
    write_image_folder(str(root), num_classes=2, per_class=6, size=(48, 64), seed=1)
    odd = root / "train" / "class_001"
    for name, (data, _) in ODD_FILES.items():
        (odd / name).write_bytes(data)
    (odd / "cmyk.JPEG").write_bytes(_cmyk_jpeg()[0])
    (odd / "notes.txt").write_text("not an image")
    return root


def test_listing_order_labels_and_ignored_files(tree):
    source = ImageFolderSource(str(tree))
    assert source.classes == ["class_000", "class_001"]
    names = [os.path.relpath(source.describe(i), tree / "train") for i in range(len(source))]
    expected = ([f"class_000/img_{n:05d}.JPEG" for n in range(6)] +
                sorted([f"class_001/img_{n:05d}.JPEG" for n in range(6)] +
                       [f"class_001/{name}" for name in [*ODD_FILES, "cmyk.JPEG"]]))
    assert names == expected
    assert [source.label(i) for i in range(len(source))] == [0] * 6 + [1] * (len(source) - 6)
    assert source.read(0) == open(source.describe(0), "rb").read()


def test_source_spelling_and_missing_folders(tree, tmp_path):
    data = ConfigDict({"source": f"imagefolder:{tree}", "split": "train", "tfds_data_dir": ""})
    assert len(open_source(data, seed=0)) == 6 + 6 + len(ODD_FILES) + 1
    with pytest.raises(SourceError, match="'val'"):
        open_source(ConfigDict({**data, "split": "val"}), seed=0)
    (tmp_path / "train" / "empty_class").mkdir(parents=True)
    with pytest.raises(SourceError, match="no images under"):
        ImageFolderSource(str(tmp_path))
    with pytest.raises(SourceError, match="imagefoldr:x"):
        open_source(ConfigDict({**data, "source": "imagefoldr:x"}), seed=0)


@pytest.mark.parametrize("name", sorted(ODD_FILES))
def test_odd_files_decode_or_raise_bad_image(name):
    data, expected = ODD_FILES[name]
    if expected is None:
        with pytest.raises(BadImageError):
            decode_rgb(data)
    else:
        decoded = decode_rgb(data)
        assert decoded.dtype == np.uint8
        np.testing.assert_array_equal(decoded, expected)


def test_cmyk_jpeg_decodes_like_pil():
    data, expected = _cmyk_jpeg()
    np.testing.assert_array_equal(decode_rgb(data), expected)


def test_bad_files_are_skipped_counted_and_replaced_deterministically(tree):
    source = ImageFolderSource(str(tree))
    bad_paths = {str(tree / "train" / "class_001" / name) for name in BAD}
    batches = TwoViewBatches(source, 7, 16, 4, 5, 0.2, seed=3)
    assert batches.steps_per_epoch == 3  # 21 examples, 7 per step
    skipped = []
    for step in range(3):
        batch, bad = batches.batch_and_skipped(step)
        skipped += bad
        # every slot holds a real example: replaced images are full, valid two-view examples
        assert batch["view1"].shape == (7, 16, 16, 3) and (batch["mask"].sum(1) == 5).all()
        again, bad_again = batches.batch_and_skipped(step)
        assert bad_again == bad
        np.testing.assert_array_equal(again["view1"], batch["view1"])
    # each bad file is met once per epoch as itself, and possibly again as a (bad) replacement draw
    assert bad_paths <= set(skipped) <= bad_paths and len(skipped) >= len(bad_paths)


def test_a_source_of_only_bad_files_stops_with_a_clear_error(tmp_path):
    folder = tmp_path / "train" / "broken"
    folder.mkdir(parents=True)
    for k in range(4):
        (folder / f"{k}.JPEG").write_bytes(b"not a jpeg")
    batches = TwoViewBatches(ImageFolderSource(str(tmp_path)), 2, 16, 4, 5, 0.2, seed=0)
    with pytest.raises(TooManyBadImagesError, match="undecodable examples in a row"):
        batches.batch_at(0)


def test_two_processes_read_disjoint_files_and_rebuild_the_global_batch(tree):
    source = ImageFolderSource(str(tree))
    hosts = [TwoViewBatches(source, 10, 16, 4, 5, 0.2, seed=2, rows=np.arange(5 * p, 5 * p + 5)) for p in (0, 1)]
    single = TwoViewBatches(source, 10, 16, 4, 5, 0.2, seed=2)
    for step in range(4):
        parts = [h.batch_and_skipped(step) for h in hosts]
        assert not {source.describe(i) for i in hosts[0].indices_at(step)} & \
            {source.describe(i) for i in hosts[1].indices_at(step)}
        whole, whole_skipped = single.batch_and_skipped(step)
        for key in ("view1", "view2", "geometry", "mask"):
            np.testing.assert_array_equal(np.concatenate([p[0][key] for p in parts]), whole[key])
        assert parts[0][1] + parts[1][1] == whole_skipped


def test_resumed_stream_continues_where_it_stopped(tree):
    source = ImageFolderSource(str(tree))
    batches = TwoViewBatches(source, 4, 16, 4, 5, 0.2, seed=5, num_threads=2)
    uninterrupted = [b for _, b in zip(range(9), batches.iterate(0))]
    resumed = [b for _, b in zip(range(4), TwoViewBatches(source, 4, 16, 4, 5, 0.2, seed=5).iterate(5))]
    for (a, a_skipped), (b, b_skipped) in zip(uninterrupted[5:], resumed):
        assert a_skipped == b_skipped
        for key in ("view1", "view2", "geometry", "mask"):
            np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("size", [(375, 500), (500, 375), (300, 300), (40, 700)])
def test_eval_view_matches_torchvision(size):
    from torchvision import transforms
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, size + (3,), dtype=np.uint8))
    reference = transforms.Compose([transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC),
                                    transforms.CenterCrop(224)])(image)
    np.testing.assert_array_equal(eval_view(image, 224), np.asarray(reference))


@pytest.mark.slow
def test_entry_point_pretrains_on_an_image_folder_and_reports_skips(tree, tmp_path):
    cmd = [sys.executable, "-m", "siim_jax.train", "--config", os.path.join(REPO, "configs", "demo.py"),
           "--workdir", str(tmp_path), f"--config.data.source=imagefolder:{tree}", "--config.batch_size=8",
           "--config.total_steps=3", "--config.warmup_steps=1", "--config.log_every_steps=1",
           "--config.eval_every_steps=3", "--config.knn.num_bank=8", "--config.knn.num_query=6",
           "--config.knn.batch_size=8", "--config.model.image_size=32", "--config.data.num_masked=10"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("done: step 3/3") and "knn_top1" in last
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    total = [r["data_skipped_total"] for r in records if "data_skipped_total" in r]
    assert total == sorted(total) and len(total) == 3
    # the same three steps built directly (8 fake devices, one process; demo seed and crop_min)
    demo = _load_demo()
    batches = TwoViewBatches(ImageFolderSource(str(tree)), 8, 32, 8, 10, demo.data.crop_min, demo.seed)
    expected = np.cumsum([len(batches.batch_and_skipped(step)[1]) for step in range(3)])
    assert total == expected.tolist() and total[-1] > 0
    assert f"{int(total[-1])} undecodable images skipped" in last
    skip_lines = [line for line in proc.stderr.splitlines() if "skipping" in line]
    assert skip_lines and all(any(name in line for name in BAD) for line in skip_lines)


def _load_demo():
    return recipe_config("demo")


def test_bench_prints_its_figures(tree, tmp_path, capsys):
    from siim_jax.tools import bench_input as bench
    bench.main(["--make-jpegs", str(tmp_path / "jpegs"), "--count", "20"])
    assert len(ImageFolderSource(str(tmp_path / "jpegs"))) == 20
    bench.main(["--source", f"imagefolder:{tree}", "--batch", "4", "--steps", "2", "--image-size", "32",
                "--patch-size", "8", "--num-masked", "10", "--baseline"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith("official-style") for line in lines)
    assert any(line.startswith("speed-up per core") for line in lines)
    name, value = lines[-1].split(": ")
    assert name == "images_per_sec_per_core" and float(value) > 0
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--source", f"imagefolder:{tmp_path / 'missing'}"])
    assert exit_info.value.code == 2
