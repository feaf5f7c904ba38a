"""The 1% few-shot protocol point for point against the official main_logistic.py (SPEC section 5): cyanure's row
preprocessing, the bilinear eval resize, the float32 encoder, the per-variant lambda."""

import importlib.util
import os

import jax
import numpy as np
import pytest
from PIL import Image

from siim_jax.data.classification import LabelledBatches
from siim_jax.data.views import eval_view
from siim_jax.eval.logistic import centre_and_normalise_rows

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _cyanure_preprocess(x):
    """NumPy rendering of cyanure preprocess(X, normalize=True, columns=False, centering=True): X (N, D), rows are
    samples; each row minus its own mean over D, then divided by its own L2 norm (zero rows stay zero)."""
    x = np.array(x, np.float64)
    out = np.zeros_like(x)
    for n, row in enumerate(x):
        row = row - row.sum() / row.size
        norm = np.sqrt(np.dot(row, row))
        if norm > 0:
            out[n] = row / norm
    return out


def _features_with_shared_offset(n, d=48, seed=0):
    """(n, d) float64: a large offset common to every sample (as class tokens have) plus per-sample signal."""
    rng = np.random.default_rng(seed)
    return 4.0 * rng.normal(size=d) + rng.normal(size=(n, d))


def test_rows_are_preprocessed_as_cyanure_does():
    train, val = _features_with_shared_offset(64, seed=0), _features_with_shared_offset(40, seed=1)
    val[5] = 3.25  # a constant row centres to zero: must stay zero, not NaN
    got_train, got_val = np.asarray(centre_and_normalise_rows(train)), np.asarray(centre_and_normalise_rows(val))
    assert got_train.dtype == got_val.dtype == np.float32
    np.testing.assert_allclose(got_train, _cyanure_preprocess(train), atol=2e-6)
    np.testing.assert_allclose(got_val, _cyanure_preprocess(val), atol=2e-6)
    assert np.all(got_val[5] == 0)

    # The old rule (subtract the training set's per-feature mean, then L2 per row) is far from it on these.
    centred = val - train.mean(0)
    old = centred / np.linalg.norm(centred, axis=1, keepdims=True)
    cosine = np.sum(old * _cyanure_preprocess(val), axis=1)[np.arange(len(val)) != 5]
    assert np.max(cosine) < 0.85 and np.abs(old - _cyanure_preprocess(val)).max() > 0.2


def test_each_sample_is_preprocessed_on_its_own():
    """No statistic is shared: a row's result does not depend on the other rows (or on the training set)."""
    x = _features_with_shared_offset(16, seed=2)
    together = np.asarray(centre_and_normalise_rows(x))
    alone = np.concatenate([np.asarray(centre_and_normalise_rows(x[i:i + 1])) for i in range(len(x))])
    np.testing.assert_allclose(together, alone, atol=1e-6)
    shifted_others = x.copy()
    shifted_others[1:] += 100.0
    np.testing.assert_allclose(np.asarray(centre_and_normalise_rows(shifted_others))[0], together[0], atol=1e-6)


def test_rows_keep_their_sharding():
    devices = np.array(jax.devices())
    sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(devices, ("data",)),
                                          jax.sharding.PartitionSpec("data"))
    x = _features_with_shared_offset(8 * len(devices), seed=3).astype(np.float32)
    got = centre_and_normalise_rows(jax.device_put(x, sharding))
    assert got.sharding.is_equivalent_to(sharding, 2)
    np.testing.assert_allclose(np.asarray(got), _cyanure_preprocess(x), atol=2e-6)


# --- the eval transform: bilinear for few-shot (torchvision's default Resize(256)), bicubic elsewhere


@pytest.mark.parametrize("shape", [(375, 500), (500, 333), (260, 260)])
def test_fewshot_eval_view_is_torchvision_default_resize_and_centre_crop(shape):
    transforms = pytest.importorskip("torchvision.transforms")
    image = Image.fromarray(np.random.default_rng(4).integers(0, 256, shape + (3,), dtype=np.uint8))
    official = np.asarray(transforms.Compose([transforms.Resize(size=256), transforms.CenterCrop(size=224)])(image))
    bilinear = eval_view(image, 224, 256, "bilinear")
    np.testing.assert_array_equal(bilinear, official)
    assert not np.array_equal(eval_view(image, 224, 256), official)  # the bicubic view (linear probe) differs


def test_fewshot_batches_are_bilinear_and_the_classification_ones_bicubic(monkeypatch):
    """What the few-shot command builds its batches with, and that eval_resample reaches the images."""
    from siim_jax.data.sources import ArraySource
    from siim_jax.eval import fewshot

    rng = np.random.default_rng(5)
    images, labels = rng.integers(0, 256, (3, 40, 52, 3), dtype=np.uint8), np.arange(3)
    source = ArraySource(images, labels)
    for resample in ("bilinear", "bicubic"):
        batch = LabelledBatches(source, 4, 32, seed=0, train=False, eval_resample=resample).batch_at(0)
        expected = [eval_view(Image.fromarray(im), 32, 36, resample) for im in images]
        np.testing.assert_array_equal(batch["images"][:3], np.stack(expected))
    assert LabelledBatches(source, 4, 32, seed=0, train=False).eval_resample == "bicubic"

    seen = {}

    class Stop(Exception):
        pass

    def capture(*args, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr("siim_jax.data.classification.LabelledBatches", capture)
    from siim_jax.parallel.sharding import create_mesh
    _, config = _load("fewshot_demo.py")
    with pytest.raises(Stop):
        fewshot.encoder_features(config, None, None, source, create_mesh(config.mesh))
    assert seen["eval_resample"] == "bilinear" and seen["train"] is False


def test_fewshot_encoder_runs_in_float32_whatever_model_dtype(monkeypatch, tmp_path):
    from siim_jax.eval import fewshot

    _, config = _load("fewshot_demo.py")
    config.model.dtype = "bfloat16"
    seen = []

    class Stop(Exception):
        pass

    def capture(c):
        seen.append(c.model.dtype)
        raise Stop

    monkeypatch.setattr("siim_jax.methods.get_method", capture)
    with pytest.raises(Stop):
        fewshot.evaluate_few_shot(config, str(tmp_path), "none", "online")
    assert seen == ["float32"] and config.model.dtype == "bfloat16"  # the caller's config is left alone


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIGS, name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, module.get_config()


def test_fewshot_lambda_per_variant_is_the_official_one():
    """Official scripts: --lambd 0.1 for ViT-B (configs/few-shot), 0.01 for ViT-L (semisup_sim_large_1600ep.sh);
    ViT-H has no published value and keeps ViT-B's."""
    lambdas = {name: _load(f"fewshot_vit_{name}.py")[1].fewshot.l2 for name in ("b16", "l16", "h14")}
    assert lambdas == {"b16": 0.1, "l16": 0.01, "h14": 0.1}
