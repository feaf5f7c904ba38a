"""Validation splits (open_source(..., split="validation")) and LabelledBatches, the evaluations' batch stream."""

import io
import math
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from siim_jax.data.classification import LabelledBatches
from siim_jax.data.sources import ArraySource, SourceError, open_source
from siim_jax.data.sources.builtin import make_builtin_images
from siim_jax.data.views import eval_view, sample_crop

IMAGES, LABELS = make_builtin_images(seed=0, num_images=21, image_size=24)


def _encode(pixels: np.ndarray, image_format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=image_format)
    return buffer.getvalue()


class EncodedSource:
    """Images of varied sizes as PNG bytes, labels int, and undecodable bytes at the indices `bad`."""

    def __init__(self, n: int, labels, bad=(), seed: int = 0):
        rng = np.random.default_rng(seed)
        self.pixels = [rng.integers(0, 256, (20 + 3 * (k % 5), 28 - 2 * (k % 4), 3), dtype=np.uint8)
                       for k in range(n)]
        self.labels = np.asarray(labels, np.int32)
        self.bad = set(bad)
        self.name = "encoded"

    def __len__(self):
        return len(self.pixels)

    def read(self, index):
        return b"not an image" if index in self.bad else _encode(self.pixels[index])

    def describe(self, index):
        return f"encoded[{index}]"

    def label(self, index):
        return int(self.labels[index])


def _data_config(**kw) -> ml_collections.ConfigDict:
    config = dict(source="builtin", split="train", num_train=40, num_classes=10, raw_size=24, tfds_data_dir="")
    config.update(kw)
    return ml_collections.ConfigDict(config)


def _assert_batch_equal(a, b):
    assert a.keys() == b.keys() == {"images", "labels", "valid"}
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def _concat(*batches):
    return {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}


def _torchvision_eval(image: Image.Image, short_side: int, size: int) -> np.ndarray:
    from torchvision import transforms
    bicubic = transforms.InterpolationMode.BICUBIC
    return np.asarray(transforms.Compose([transforms.Resize(short_side, interpolation=bicubic),
                                          transforms.CenterCrop(size)])(image))


# --- preprocessing against torchvision


@pytest.mark.parametrize("shape", [(375, 500), (500, 333), (260, 260)])
def test_eval_view_matches_torchvision_resize_256_centre_crop_224(shape):
    pytest.importorskip("torchvision")
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, shape + (3,), dtype=np.uint8))
    ours = eval_view(image, 224).astype(np.float64)
    reference = _torchvision_eval(image, 256, 224).astype(np.float64)
    assert ours.shape == reference.shape == (224, 224, 3)
    assert np.abs(ours - reference).mean() <= 1.0


def test_eval_batches_use_the_official_short_side_and_cover_every_image_once():
    """Eval: sequential, every image once with its label, tail padded with zeros and valid=False; images as
    torchvision Resize(int(S * 256 / 224), bicubic) + CenterCrop(S) at S = 32 (36, not round(36.57) = 37)."""
    pytest.importorskip("torchvision")
    n, global_batch, size = 11, 4, 32
    source = EncodedSource(n, labels=np.arange(n) * 7 % 5)
    batches = LabelledBatches(source, global_batch, size, seed=0, train=False)
    assert batches.num_steps == math.ceil(n / global_batch) == 3
    streamed = list(batches.iterate(0))
    assert len(streamed) == 3 and all(skipped == () for _, skipped in streamed)
    whole = _concat(*(batch for batch, _ in streamed))
    assert whole["images"].dtype == np.uint8 and whole["labels"].dtype == np.int32 and whole["valid"].dtype == bool
    np.testing.assert_array_equal(whole["valid"], np.arange(12) < n)
    np.testing.assert_array_equal(whole["labels"][:n], source.labels)
    assert not whole["images"][n:].any() and not whole["labels"][n:].any()
    for k in range(n):
        reference = _torchvision_eval(Image.fromarray(source.pixels[k]), int(size * 256 / 224), size)
        assert np.abs(whole["images"][k].astype(float) - reference).mean() <= 1.0


def assert_torchvision_crops(images, indices, crop_fn, seed: int, step: int, size: int):
    """images (B, size, size, 3) uint8 are torchvision's bicubic resized_crop of IMAGES[indices] at the box
    crop_fn draws from default_rng([seed, step, position]) (scale (0.08, 1)), flipped when the next draw < 0.5."""
    tf = pytest.importorskip("torchvision.transforms.functional")
    from torchvision.transforms import InterpolationMode
    for q, index in enumerate(indices):
        rng = np.random.default_rng([seed, step, q])
        i, j, h, w = crop_fn(rng, 24, 24, (0.08, 1.0), (3 / 4, 4 / 3))
        reference = tf.resized_crop(Image.fromarray(IMAGES[index]), i, j, h, w, [size, size],
                                    InterpolationMode.BICUBIC)
        if rng.random() < 0.5:
            reference = tf.hflip(reference)
        np.testing.assert_array_equal(images[q], np.asarray(reference))


def test_train_view_is_torchvision_resized_crop_then_flip():
    """Each training image is torchvision's resized_crop (bicubic) of the box sample_crop draws from
    default_rng([seed, step, position]) with scale (0.08, 1), flipped when the next draw is < 0.5; labels
    follow the epoch permutation default_rng([seed, epoch]).permutation(n)."""
    seed, global_batch, size, step = 3, 5, 16, 6  # 4 steps per epoch: step 6 is epoch 1, window 2
    batch = LabelledBatches(ArraySource(IMAGES, LABELS), global_batch, size, seed, train=True).batch_at(step)
    indices = np.random.default_rng([seed, 1]).permutation(len(IMAGES))[10:15]
    np.testing.assert_array_equal(batch["labels"], LABELS[indices])
    assert batch["valid"].all()
    assert_torchvision_crops(batch["images"], indices, sample_crop, seed, step, size)


# --- the stream: rows, purity, bad images


@pytest.mark.parametrize("train", [True, False])
def test_rows_split_across_processes_equals_the_single_process_batch(train):
    source = EncodedSource(19, labels=np.arange(19) % 4, bad={2, 9})
    make = lambda rows=None: LabelledBatches(source, 8, 16, seed=1, train=train, rows=rows, num_threads=2)
    single, low, high = make(), make(np.arange(0, 4)), make(np.arange(4, 8))
    for step in (0, 1, 2):
        (a, a_skipped), (b, b_skipped), (c, c_skipped) = (x.batch_and_skipped(step) for x in (single, low, high))
        _assert_batch_equal(_concat(b, c), a)
        assert sorted(b_skipped + c_skipped) == sorted(a_skipped)
    interleaved = make(np.array([6, 1, 3]))  # any rows, any order
    _assert_batch_equal(interleaved.batch_at(1), {k: v[[6, 1, 3]] for k, v in single.batch_at(1).items()})


def test_stream_is_a_pure_function_of_seed_and_step():
    source = ArraySource(IMAGES, LABELS)
    first, second = (LabelledBatches(source, 4, 16, seed=7, train=True) for _ in range(2))
    _assert_batch_equal(first.batch_at(5), second.batch_at(5))  # no steps 0-4 needed
    for step, (batch, skipped) in zip(range(5, 9), first.iterate(5)):
        _assert_batch_equal(batch, second.batch_at(step))
        assert skipped == ()
    other = LabelledBatches(source, 4, 16, seed=8, train=True).batch_at(5)
    assert not np.array_equal(other["images"], first.batch_at(5)["images"])


def test_bad_images_are_replaced_when_training_and_marked_invalid_when_evaluating():
    n, bad = 12, {1, 4, 5, 10}
    source = EncodedSource(n, labels=np.arange(n), bad=bad)  # label = index identifies the image
    train = LabelledBatches(source, n, 16, seed=4, train=True, owned=np.arange(n) % 2 == 0)
    batch, skipped = train.batch_and_skipped(0)
    order = np.random.default_rng([4, 0]).permutation(n)
    assert batch["valid"].all()
    expected_skipped = []
    for q, index in enumerate(order):
        attempt, names = 0, []
        while index in bad:  # the replacement rule: default_rng([seed, step, q, a]).integers(n)
            names.append(f"encoded[{index}]")
            attempt += 1
            index = int(np.random.default_rng([4, 0, q, attempt]).integers(n))
        assert batch["labels"][q] == index
        if q % 2 == 0:
            expected_skipped += names
    assert list(skipped) == expected_skipped

    evaluation = LabelledBatches(source, 5, 16, seed=4, train=False)
    results = [evaluation.batch_and_skipped(step) for step in range(evaluation.num_steps)]
    valid = np.concatenate([b["valid"] for b, _ in results])
    np.testing.assert_array_equal(valid, [k < n and k not in bad for k in range(15)])
    assert [name for _, s in results for name in s] == [f"encoded[{k}]" for k in sorted(bad)]
    images = np.concatenate([b["images"] for b, _ in results])
    assert not images[~valid].any() and images[valid].any()


def test_augment_hook_runs_on_the_cropped_view_with_the_example_rng():
    source = ArraySource(IMAGES, LABELS)
    seen = []

    def invert(rng, image):
        seen.append((image.size, image.mode, float(rng.random())))
        return Image.fromarray(255 - np.asarray(image))

    plain = LabelledBatches(source, 4, 16, seed=2, train=True).batch_at(3)
    augmented = LabelledBatches(source, 4, 16, seed=2, train=True, augment=invert, num_threads=1).batch_at(3)
    np.testing.assert_array_equal(augmented["images"], 255 - plain["images"])
    assert [s[:2] for s in seen] == [((16, 16), "RGB")] * 4
    assert len({s[2] for s in seen}) == 4  # each example its own generator


def test_unlabelled_source_and_bad_rows_are_refused():
    with pytest.raises(ValueError, match="no labels"):
        LabelledBatches(ArraySource(IMAGES), 4, 16, seed=0, train=False)
    with pytest.raises(ValueError, match="rows"):
        LabelledBatches(ArraySource(IMAGES, LABELS), 4, 16, seed=0, train=False, rows=[3, 4])
    evaluation = LabelledBatches(ArraySource(IMAGES, LABELS), 4, 16, seed=0, train=False)
    with pytest.raises(ValueError, match="outside"):
        evaluation.batch_at(evaluation.num_steps)


# --- validation splits


def test_builtin_validation_split_is_held_out_and_labelled():
    config = _data_config(num_train=30, num_val=12)
    train, validation = open_source(config, 5, "train"), open_source(config, 5, split="validation")
    assert len(train) == 30 and len(validation) == 12
    assert train.num_classes == validation.num_classes == 10
    flat_train = train.images.reshape(len(train), -1)
    for k in range(len(validation)):  # no validation image equals any training image
        assert not (flat_train == validation.read(k).reshape(1, -1)).all(axis=1).any()
    labels = [validation.label(k) for k in range(len(validation))]
    assert all(0 <= label < 10 for label in labels) and len(set(labels)) > 1
    assert len({validation.describe(k) for k in range(12)}) == 12
    # the same stream as the generator's images 30..41 (what the k-NN monitor's queries are)
    np.testing.assert_array_equal(validation.images, make_builtin_images(5, 12, 24, 10, offset=30)[0])


def _image_folder(root, split: str, classes: dict):
    for name, count in classes.items():
        os.makedirs(root / split / name, exist_ok=True)
        for k in range(count):
            Image.fromarray(np.full((8, 10, 3), 40 * k, np.uint8)).save(root / split / name / f"{k}.png")


def test_imagefolder_validation_uses_the_training_class_indices(tmp_path):
    _image_folder(tmp_path, "train", {"ant": 1, "bee": 2, "cat": 1, "dog": 1})
    _image_folder(tmp_path, "val", {"bee": 2, "dog": 1})  # own sorted order would give bee=0, dog=1
    config = _data_config(source=f"imagefolder:{tmp_path}")
    validation = open_source(config, 0, split="validation")
    assert [validation.label(k) for k in range(len(validation))] == [1, 1, 3]
    assert validation.num_classes == open_source(config, 0).num_classes == 4
    assert validation.describe(2) == os.path.join(str(tmp_path), "val", "dog", "0.png")
    batch = LabelledBatches(validation, 2, 8, seed=0, train=False)
    np.testing.assert_array_equal(np.concatenate([b["labels"] for b, _ in batch.iterate()]), [1, 1, 3, 0])

    _image_folder(tmp_path, "val", {"eel": 1})
    with pytest.raises(SourceError, match="eel") as error:
        open_source(config, 0, split="validation")
    assert "\n" not in str(error.value)


def test_missing_validation_split_is_a_one_line_source_error(tmp_path):
    _image_folder(tmp_path, "train", {"ant": 1})
    with pytest.raises(SourceError) as error:
        open_source(_data_config(source=f"imagefolder:{tmp_path}"), 0, split="validation")
    message = str(error.value)
    assert "\n" not in message and os.path.join(str(tmp_path), "val") in message and "validation" in message
    with pytest.raises(SourceError, match="split"):
        open_source(_data_config(), 0, split="test")


def test_tfds_validation_split(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    pytest.importorskip("array_record")
    rng = np.random.default_rng(0)
    examples = [{"image": _encode(rng.integers(0, 256, (12, 14, 3), dtype=np.uint8)), "label": k % 3}
                for k in range(5)]

    class SiimTinyWithValidation(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")
        BUILDER_CONFIGS = tuple(tfds.core.BuilderConfig(name=n) for n in ("with_val", "train_only"))

        def _info(self):
            features = {"image": tfds.features.Image(shape=(None, None, 3)),
                        "label": tfds.features.ClassLabel(num_classes=3)}
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

        def _split_generators(self, dl_manager):
            splits = {"train": self._generate_examples(examples[:2])}
            if self.builder_config.name == "with_val":
                splits["validation"] = self._generate_examples(examples[2:])
            return splits

        def _generate_examples(self, chosen):
            for key, example in enumerate(chosen):
                yield key, example

    tfds.disable_progress_bar()
    for config_name in ("with_val", "train_only"):
        builder = SiimTinyWithValidation(config=config_name, data_dir=str(tmp_path), file_format="array_record")
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    config = _data_config(source="tfds:siim_tiny_with_validation/with_val", tfds_data_dir=str(tmp_path))
    validation = open_source(config, 0, split="validation")
    assert len(validation) == 3 and validation.num_classes == 3
    assert validation.describe(0).endswith("/validation[0]")
    decode = lambda data: np.asarray(Image.open(io.BytesIO(data)))
    written = {decode(e["image"]).tobytes(): e["label"] for e in examples[2:]}  # TFDS stores them shuffled
    read = {decode(validation.read(k)).tobytes(): validation.label(k) for k in range(3)}
    assert read == written
    config.source = "tfds:siim_tiny_with_validation/train_only"
    with pytest.raises(SourceError, match="validation") as error:
        open_source(config, 0, split="validation")
    assert "\n" not in str(error.value) and "siim_tiny_with_validation/train_only" in str(error.value)


# --- the linear probe's official train crop (util/crop.py: one draw, sides clamped, no retries)


def _official_single_draw_numpy(height, width, u_area, u_ratio, u_i, u_j, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """NumPy rendering of the official util/crop.py RandomResizedCrop.get_params for given uniforms in [0, 1):
    area fraction and log aspect drawn uniformly, sides rounded and clamped to the image, then the top-left
    corner uniform over the positions that fit. Returns (h, w, i, j)."""
    frac = scale[0] + (scale[1] - scale[0]) * u_area
    log_lo, log_hi = np.log(ratio[0]), np.log(ratio[1])
    aspect = np.exp(log_lo + (log_hi - log_lo) * u_ratio)
    area = height * width * frac
    w = min(int(np.round(np.sqrt(area * aspect))), width)
    h = min(int(np.round(np.sqrt(area / aspect))), height)
    return h, w, int(np.floor(u_i * (height - h + 1))), int(np.floor(u_j * (width - w + 1)))


class _FixedUniforms:
    """Stands in for np.random.Generator: uniform / integers read the next of the given uniforms in [0, 1)."""

    def __init__(self, uniforms):
        self.uniforms = list(uniforms)

    def uniform(self, low, high):
        return low + (high - low) * self.uniforms.pop(0)

    def integers(self, low, high):
        return low + int(np.floor(self.uniforms.pop(0) * (high - low)))


@pytest.mark.parametrize("shape", [(24, 24), (375, 500), (500, 333), (40, 400)])
def test_single_draw_crop_matches_official_get_params_for_fixed_uniforms(shape):
    from siim_jax.data.views import sample_crop_single_draw
    height, width = shape
    rng = np.random.default_rng(11)
    clamped = 0
    for uniforms in rng.random((400, 4)):
        i, j, h, w = sample_crop_single_draw(_FixedUniforms(uniforms), height, width)
        assert (h, w, i, j) == _official_single_draw_numpy(height, width, *uniforms)
        assert 0 < h <= height and 0 < w <= width and 0 <= i <= height - h and 0 <= j <= width - w
        clamped += h == height or w == width
    assert clamped > 0  # the clamp is exercised


def test_single_draw_crop_distribution_is_the_official_one_not_torchvision():
    """Over 20,000 draws on a 100 x 100 image: the sides' distribution is the official rendering's (drawn from
    independent uniforms), and about 7% of crops are clamped to the full height with a narrower width, which
    torchvision's ten-try sampler (the old crop) practically never gives."""
    from siim_jax.data.views import sample_crop_single_draw
    n, side = 20000, 100
    rng = np.random.default_rng(12)
    ours = np.array([sample_crop_single_draw(rng, side, side) for _ in range(n)])[:, [2, 3, 0, 1]]  # (h, w, i, j)
    uniforms = np.random.default_rng(13).random((n, 4))
    official = np.array([_official_single_draw_numpy(side, side, *u) for u in uniforms])
    old = np.array([sample_crop(rng, side, side, (0.08, 1.0)) for _ in range(n)])[:, [2, 3, 0, 1]]
    for k in range(4):  # means within 4 standard errors, histograms close
        a, b = ours[:, k].astype(float), official[:, k].astype(float)
        assert abs(a.mean() - b.mean()) < 4 * np.sqrt((a.var() + b.var()) / n), k
        bins = np.linspace(0, side + 1, 11)
        assert np.abs(np.histogram(a, bins)[0] - np.histogram(b, bins)[0]).max() / n < 0.02, k
    full_height = lambda x: np.mean((x[:, 0] == side) & (x[:, 1] < side))
    assert 0.05 < full_height(ours) < 0.10 and abs(full_height(ours) - full_height(official)) < 0.01
    assert full_height(old) < 0.01


def test_linear_probe_batches_use_the_single_draw_crop():
    """train_crop="single_draw": each image is torchvision's resized_crop (bicubic) of the box that
    sample_crop_single_draw draws from default_rng([seed, step, position]), then the flip draw."""
    from siim_jax.data.views import sample_crop_single_draw
    seed, global_batch, size, step = 3, 5, 16, 6
    batch = LabelledBatches(ArraySource(IMAGES, LABELS), global_batch, size, seed, train=True,
                            train_crop="single_draw").batch_at(step)
    indices = np.random.default_rng([seed, 1]).permutation(len(IMAGES))[10:15]
    assert_torchvision_crops(batch["images"], indices, sample_crop_single_draw, seed, step, size)
    with pytest.raises(ValueError, match="train_crop"):
        LabelledBatches(ArraySource(IMAGES, LABELS), 4, 16, 0, train=True, train_crop="tensorflow")


@pytest.mark.parametrize("recipe, crop", [
    ("linprobe_vit_b16.py", "single_draw"), ("linprobe_vit_l16.py", "single_draw"),
    ("linprobe_vit_h14.py", "single_draw"), ("linprobe_demo.py", "single_draw"),
    ("finetune_vit_b16.py", "torchvision"), ("finetune_demo.py", "torchvision")])
def test_recipes_select_the_official_train_crop(recipe, crop):
    import importlib.util

    from siim_jax.methods import get_method
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", recipe)
    spec = importlib.util.spec_from_file_location(recipe, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    assert config.classifier.train_crop == crop
    config.batch_size = 4  # the 21-image source
    batches = get_method(config).make_batches(ArraySource(IMAGES, LABELS), np.arange(4), np.ones(4, bool))
    assert batches.train_crop == crop
