"""TfdsSource on tiny TFDS datasets prepared in the test from images made with NumPy and PIL (no network)."""

import concurrent.futures
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from siim_jax.data.pipeline import TwoViewBatches
from siim_jax.data.sources import BadImageError, SourceError, decode_rgb
from siim_jax.data.sources.tfds import TfdsSource

NAME = "siim_tiny_images"  # the snake-case name TFDS registers for SiimTinyImages
NUM_CLASSES = 3
NUM_GOOD = 10  # valid images in `train`; one truncated JPEG follows them


def _encode(pixels: np.ndarray, image_format: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=image_format)
    return buffer.getvalue()


def _train_examples() -> list[dict]:
    """NUM_GOOD distinct images (PNG and JPEG alternately, sizes 20..29 x 24) and a truncated JPEG last."""
    rng = np.random.default_rng(0)
    examples = []
    for k in range(NUM_GOOD):
        pixels = rng.integers(0, 256, (20 + k, 24, 3), dtype=np.uint8)
        encoded = _encode(pixels, "PNG" if k % 2 == 0 else "JPEG")
        examples.append({"image": encoded, "label": k % NUM_CLASSES})
    whole = _encode(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), "JPEG")
    examples.append({"image": whole[:len(whole) // 2], "label": 0})
    return examples


TRAIN = _train_examples()
TRUNCATED = TRAIN[-1]["image"]


class SiimTinyImages(tfds.core.GeneratorBasedBuilder):
    """Configs: `labelled` (image + label), `two_images` (photo + thumbnail, no label), `no_image` (label)."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = tuple(tfds.core.BuilderConfig(name=n) for n in ("labelled", "two_images", "no_image"))

    def _info(self):
        image = tfds.features.Image(shape=(None, None, 3))
        label = tfds.features.ClassLabel(num_classes=NUM_CLASSES)
        features = {"labelled": {"image": image, "label": label},
                    "two_images": {"photo": image, "thumbnail": image},
                    "no_image": {"label": label}}[self.builder_config.name]
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(TRAIN), "test": self._generate_examples(TRAIN[:2])}

    def _generate_examples(self, examples):
        for key, example in enumerate(examples):
            yield key, {"labelled": example,
                        "two_images": {"photo": example["image"], "thumbnail": example["image"]},
                        "no_image": {"label": example["label"]}}[self.builder_config.name]


def _prepare(data_dir, config: str = "labelled", file_format: str = "array_record"):
    builder = SiimTinyImages(config=config, data_dir=os.fspath(data_dir), file_format=file_format)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A TFDS data_dir holding all three configs of siim_tiny_images as array_record."""
    tfds.disable_progress_bar()
    path = tmp_path_factory.mktemp("tfds")
    for config in ("labelled", "two_images", "no_image"):
        _prepare(path, config)
    return os.fspath(path)


@pytest.fixture(scope="module")
def source(data_dir):
    return TfdsSource(NAME, "train", data_dir)


def _source_error(*args, **kwargs) -> str:
    """The message of the SourceError that TfdsSource(*args, **kwargs) raises; it must be one line."""
    with pytest.raises(SourceError) as error:
        TfdsSource(*args, **kwargs)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_reads_every_example_once_with_its_label(source):
    assert len(source) == len(TRAIN)
    assert source.name == f"tfds:{NAME}"
    written = {example["image"]: example["label"] for example in TRAIN}
    read = [source.read(i) for i in range(len(source))]
    assert all(isinstance(data, bytes) for data in read)
    assert sorted(read) == sorted(written)  # the stored bytes, untouched, each example exactly once
    assert [source.label(i) for i in range(len(source))] == [written[data] for data in read]
    assert source.num_classes == NUM_CLASSES


def test_decoded_pixels_match_what_was_written(source):
    rng = np.random.default_rng(0)  # regenerate the pixels as _train_examples drew them
    originals = [rng.integers(0, 256, (20 + k, 24, 3), dtype=np.uint8) for k in range(NUM_GOOD)]
    by_bytes = {example["image"]: k for k, example in enumerate(TRAIN[:NUM_GOOD])}
    for i in range(len(source)):
        data = source.read(i)
        if data == TRUNCATED:
            with pytest.raises(BadImageError):
                decode_rgb(data)
            continue
        k = by_bytes[data]
        pixels = decode_rgb(data)
        if k % 2 == 0:  # PNG: lossless
            np.testing.assert_array_equal(pixels, originals[k])
        else:  # JPEG: PIL's own decode of the bytes that were written
            assert pixels.shape == originals[k].shape
            np.testing.assert_array_equal(pixels, np.asarray(Image.open(io.BytesIO(TRAIN[k]["image"]))))


def test_describe_and_split_slices(data_dir, source):
    assert source.describe(4) == f"tfds:{NAME}/train[4]"
    test_split = TfdsSource(NAME, "test", data_dir)
    assert len(test_split) == 2
    first_half = TfdsSource(NAME, "train[:50%]", data_dir)
    assert 0 < len(first_half) < len(TRAIN)
    assert [first_half.read(i) for i in range(len(first_half))] == [source.read(i) for i in range(len(first_half))]


def test_concurrent_reads_equal_serial_reads(source):
    indices = list(range(len(source))) * 8
    serial = [(source.read(i), source.label(i)) for i in indices]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(lambda i: (source.read(i), source.label(i)), indices))
    assert parallel == serial


def test_two_processes_read_disjoint_halves_of_the_one_process_batch(source):
    args = {"out_size": 16, "patch_size": 4, "num_masked": 6, "crop_min": 0.2, "seed": 3}
    single = TwoViewBatches(source, global_batch=4, **args)
    halves = [TwoViewBatches(source, global_batch=4, rows=np.arange(2 * p, 2 * p + 2), **args) for p in (0, 1)]
    truncated_index = next(i for i in range(len(source)) if source.read(i) == TRUNCATED)
    with_truncated = next(step for step in range(100) if truncated_index in single.indices_at(step))
    saw_truncated = False
    for step in sorted({0, 1, 2, with_truncated}):
        first, second = (half.indices_at(step) for half in halves)
        assert not set(first) & set(second)
        np.testing.assert_array_equal(np.concatenate([first, second]), single.indices_at(step))
        (whole, skipped), parts = single.batch_and_skipped(step), [h.batch_and_skipped(step) for h in halves]
        for key in ("view1", "view2", "geometry", "mask"):
            np.testing.assert_array_equal(np.concatenate([parts[0][0][key], parts[1][0][key]]), whole[key])
        assert skipped == parts[0][1] + parts[1][1]
        if truncated_index in single.indices_at(step):  # the undecodable record is reported and replaced
            assert f"tfds:{NAME}/train[{truncated_index}]" in skipped
            saw_truncated = True
    assert saw_truncated


def test_unlabelled_dataset_and_choice_of_image_feature(data_dir):
    message = _source_error(f"{NAME}/two_images", "train", data_dir)
    assert "photo" in message and "thumbnail" in message
    photos = TfdsSource(f"{NAME}/two_images", "train", data_dir, image_key="photo")
    assert photos.label(0) is None
    assert sorted(photos.read(i) for i in range(len(photos))) == sorted(e["image"] for e in TRAIN)


def test_dataset_without_image_feature(data_dir):
    message = _source_error(f"{NAME}/no_image", "train", data_dir)
    assert "Image feature" in message and "label" in message


def test_unknown_name(data_dir):
    message = _source_error("siim_tiny_imagez", "train", data_dir)
    assert "'siim_tiny_imagez'" in message and data_dir in message
    assert NAME in message  # what is prepared there


def test_not_prepared_under_data_dir(tmp_path):
    message = _source_error(NAME, "train", os.fspath(tmp_path))
    assert "not prepared" in message and os.fspath(tmp_path) in message
    assert "--file_format=array_record" in message


def test_missing_split(data_dir):
    message = _source_error(NAME, "validation", data_dir)
    assert "'validation'" in message and "config.data.split" in message and "'train'" in message


def test_tfrecord_dataset_names_the_conversion(tmp_path):
    # writing tfrecord imports TensorFlow: keep it out of this process, which runs JAX tests
    program = (f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import test_tfds_source; "
               f"test_tfds_source._prepare({os.fspath(tmp_path)!r}, file_format='tfrecord')")
    subprocess.run([sys.executable, "-c", program], check=True, capture_output=True, timeout=300)
    message = _source_error(NAME, "train", os.fspath(tmp_path))
    version_dir = os.path.join(os.fspath(tmp_path), NAME, "labelled", "1.0.0")
    assert "tfrecord" in message
    assert f"tfds convert_format --dataset_version_dir={version_dir} --out_file_format=array_record" in message


def test_reading_does_not_import_tensorflow(data_dir):
    """TensorFlow must stay out of the training process (it would claim accelerator memory on GPU hosts)."""
    program = (f"import sys; from siim_jax.data.sources.tfds import TfdsSource; "
               f"s = TfdsSource({NAME!r}, 'train', {data_dir!r}); s.read(0); s.label(0); "
               f"assert 'tensorflow' not in sys.modules, 'tensorflow was imported'")
    subprocess.run([sys.executable, "-c", program], check=True, capture_output=True, timeout=120)


@pytest.mark.slow
def test_entry_point_pretrains_on_a_tfds_dataset(data_dir, tmp_path):
    """`python -m siim_jax.train` on the dataset prepared above (11 records: one step per epoch of 8)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "siim_jax.train", "--config", os.path.join(repo, "configs", "demo.py"),
           "--workdir", str(tmp_path), f"--config.data.source=tfds:{NAME}/labelled",
           f"--config.data.tfds_data_dir={data_dir}", "--config.batch_size=8", "--config.total_steps=2",
           "--config.warmup_steps=1", "--config.log_every_steps=1", "--config.eval_every_steps=2",
           "--config.knn.num_bank=6", "--config.knn.num_query=4", "--config.knn.batch_size=8",
           "--config.model.image_size=32", "--config.data.num_masked=10"]
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("done: step 2/2") and "knn_top1" in last
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert os.path.isdir(tmp_path / "checkpoints" / "2")
