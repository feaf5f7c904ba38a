"""Bad input data: decompression bombs and unlistable / looping image folders."""

import io
import os

import pytest
from PIL import Image

from siim_jax.data.pipeline import TwoViewBatches
from siim_jax.data.sources import BadImageError, ImageFolderSource, SourceError, load_rgb


def _bomb_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (10000, 10000)).save(buffer, format="PNG")  # 1e8 pixels > MAX_IMAGE_PIXELS, a tiny file
    return buffer.getvalue()


def test_decompression_bomb_is_refused_and_skipped(tmp_path):
    assert 10000 * 10000 > Image.MAX_IMAGE_PIXELS
    data = _bomb_png()
    with pytest.raises(BadImageError, match=f"10000x10000.*{Image.MAX_IMAGE_PIXELS}"):
        load_rgb(data)
    folder = tmp_path / "train" / "a"
    folder.mkdir(parents=True)
    (folder / "bomb.png").write_bytes(data)
    for k in range(3):
        Image.new("RGB", (20, 20), (k * 40, 0, 0)).save(folder / f"ok{k}.png")
    batches = TwoViewBatches(ImageFolderSource(str(tmp_path)), 4, 16, 4, 5, 0.2, seed=0, num_threads=1)
    _, skipped = batches.batch_and_skipped(0)
    assert str(folder / "bomb.png") in skipped


def test_symlink_loops_give_one_source_error(tmp_path):
    folder = tmp_path / "train" / "a"
    folder.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(folder / "x.png")
    os.symlink("loop", tmp_path / "train" / "loop")
    with pytest.raises(SourceError, match="loop"):
        ImageFolderSource(str(tmp_path))
    os.remove(tmp_path / "train" / "loop")
    os.symlink("inner", folder / "inner")
    with pytest.raises(SourceError, match="inner"):
        ImageFolderSource(str(tmp_path))


def test_unreadable_class_folder_gives_one_source_error(tmp_path, monkeypatch):
    folder = tmp_path / "train" / "a"
    folder.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(folder / "x.png")
    real = os.scandir

    def scandir(path="."):
        if os.fspath(path) == str(folder):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(SourceError, match=f"{folder}.*permissions"):
        ImageFolderSource(str(tmp_path))
