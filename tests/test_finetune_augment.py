"""Fine-tuning regularisers: mixup/cutmix, soft-target loss, drop path (device); random erasing, RandAugment (host)."""

import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from scipy import stats

from siim_jax.data import finetune_augment as F
from siim_jax.data import randaugment as R
from siim_jax.models import vit

N, H, W, C, NUM_CLASSES, SMOOTHING = 4, 8, 6, 2, 5, 0.1
LABELS = np.array([3, 0, 4, 1])
NUM_KEYS = 2000


def _identifiable_images():
    """Image i holds 10 (i + 1) + a per-pixel pattern in [0, 1): every value names its image and position."""
    pattern = np.arange(H * W * C, dtype=np.float32).reshape(H, W, C) / (H * W * C)
    return np.stack([10.0 * (i + 1) + pattern for i in range(N)]).astype(np.float32)


def _smooth(labels):
    return np.eye(NUM_CLASSES)[labels] * (1 - SMOOTHING) + SMOOTHING / NUM_CLASSES


@pytest.fixture(scope="module")
def mixed_batches():
    """NUM_KEYS batches (default alphas and switch prob) from one jit of a vmap over keys."""
    images = _identifiable_images()
    run = jax.jit(jax.vmap(lambda key: F.mixup_cutmix(key, jnp.asarray(images), jnp.asarray(LABELS), NUM_CLASSES,
                                                      label_smoothing=SMOOTHING)))
    mixed, targets = run(jax.random.split(jax.random.key(0), NUM_KEYS))
    mixed, targets = np.asarray(mixed), np.asarray(targets)
    flipped = images[::-1]
    from_self, from_flipped = mixed == images, mixed == flipped  # (K, N, H, W, C)
    is_cutmix = np.all(from_self | from_flipped, axis=(1, 2, 3, 4))
    # lam read off the pixels: cutmix = share of own pixels; mixup solves m = lam x + (1 - lam) x_flipped
    lam_cutmix = 1.0 - from_flipped[:, 0].mean(axis=(1, 2, 3))
    lam_mixup_pixels = (mixed - flipped) / np.where(images == flipped, np.nan, images - flipped)
    lam_mixup = np.nanmean(lam_mixup_pixels, axis=(1, 2, 3, 4))
    return dict(images=images, mixed=mixed, targets=targets, is_cutmix=is_cutmix, from_flipped=from_flipped,
                lam=np.where(is_cutmix, lam_cutmix, lam_mixup), lam_mixup_pixels=lam_mixup_pixels)


def test_targets_sum_to_one_and_match_the_lam_read_off_the_pixels(mixed_batches):
    targets, lam = mixed_batches["targets"], mixed_batches["lam"]
    np.testing.assert_allclose(targets.sum(-1), 1.0, atol=1e-6)
    expected = lam[:, None, None] * _smooth(LABELS) + (1 - lam[:, None, None]) * _smooth(LABELS[::-1])
    np.testing.assert_allclose(targets, expected, atol=2e-6)
    assert targets.dtype == np.float32


def test_cutmix_pastes_one_shared_box_from_the_flipped_batch(mixed_batches):
    is_cutmix, from_flipped, images, mixed = (mixed_batches[k] for k in ("is_cutmix", "from_flipped", "images",
                                                                        "mixed"))
    for k in np.flatnonzero(is_cutmix)[:200]:
        box = from_flipped[k, 0, :, :, 0]
        # the same box in every image and channel, and everything else untouched
        assert np.all(from_flipped[k] == box[None, :, :, None])
        np.testing.assert_array_equal(mixed[k], np.where(box[None, :, :, None], images[::-1], images))
        if box.any():
            _box_sides(box)  # a rectangle


def test_mixup_blends_every_pixel_with_one_lam(mixed_batches):
    pixels = mixed_batches["lam_mixup_pixels"][~mixed_batches["is_cutmix"]]
    spread = np.nanmax(pixels, axis=(1, 2, 3, 4)) - np.nanmin(pixels, axis=(1, 2, 3, 4))
    assert spread.max() < 1e-4


def test_switch_probability_and_mixup_lam_distribution(mixed_batches):
    is_cutmix, lam = mixed_batches["is_cutmix"], mixed_batches["lam"]
    assert abs(is_cutmix.mean() - F.SWITCH_PROB) < 0.04  # 4 standard errors
    lam_mixup = lam[~is_cutmix]
    assert abs(lam_mixup.mean() - 0.5) < 0.04  # Beta(0.8, 0.8) is symmetric
    assert stats.kstest(lam_mixup, stats.beta(F.MIXUP_ALPHA, F.MIXUP_ALPHA).cdf).pvalue > 1e-3


def test_cutmix_lam_distribution_matches_timm(mixed_batches):
    timm_mixup = pytest.importorskip("timm.data.mixup")
    np.random.seed(0)
    timm_lams = [timm_mixup.cutmix_bbox_and_lam((N, C, H, W), np.random.beta(1.0, 1.0))[1] for _ in range(4000)]
    ours = mixed_batches["lam"][mixed_batches["is_cutmix"]]
    assert abs(ours.mean() - np.mean(timm_lams)) < 0.04
    assert stats.ks_2samp(ours, timm_lams).pvalue > 1e-3


def test_single_method_when_the_other_alpha_is_zero():
    images, labels = jnp.asarray(_identifiable_images()), jnp.asarray(LABELS)
    keys = jax.random.split(jax.random.key(1), 16)
    for mixup_alpha, cutmix_alpha in ((0.8, 0.0), (0.0, 1.0)):
        mix = jax.jit(jax.vmap(lambda key: F.mixup_cutmix(key, images, labels, NUM_CLASSES, mixup_alpha, cutmix_alpha)))
        mixed, _ = mix(keys)
        only_original_pixels = np.all((np.asarray(mixed) == images) | (np.asarray(mixed) == images[::-1]), (1, 2, 3, 4))
        assert np.all(only_original_pixels == (cutmix_alpha > 0))


def test_soft_target_cross_entropy_against_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, NUM_CLASSES)) * 3
    targets = rng.dirichlet(np.ones(NUM_CLASSES), size=6)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    expected = np.mean(-(targets * log_probs).sum(-1))
    np.testing.assert_allclose(F.soft_target_cross_entropy(jnp.asarray(logits, jnp.float32), targets), expected,
                               rtol=1e-5)


def test_drop_path_keeps_whole_samples_at_rate_and_preserves_the_mean():
    rate, x = 0.25, jnp.ones((20000, 3, 2))
    out = np.asarray(jax.jit(lambda key, x: vit.drop_path(key, x, rate, deterministic=False))(jax.random.key(2), x))
    kept = out[:, 0, 0] != 0
    np.testing.assert_allclose(out[kept], 1 / (1 - rate), rtol=1e-6)  # whole samples, scaled by 1 / keep
    assert np.all(out[~kept] == 0)
    assert abs(kept.mean() - (1 - rate)) < 0.015
    assert abs(out.mean() - 1.0) < 0.02
    assert vit.drop_path(jax.random.key(2), x, rate, deterministic=True) is x
    assert vit.drop_path(jax.random.key(2), x, 0.0, deterministic=False) is x


def test_drop_path_rates_linspace():
    np.testing.assert_allclose(vit.drop_path_rates(12, 0.1), np.linspace(0, 0.1, 12), rtol=1e-12, atol=1e-15)
    assert vit.drop_path_rates(1, 0.1) == [0.0]
    assert all(isinstance(r, float) for r in vit.drop_path_rates(12, 0.1))


# ---------------------------------------------------------------- device: random erasing

ERASE_SHAPE = (16, 20, 3)
ERASE_VALUE = 7.0  # far outside N(0, 1): erased pixels are the ones that changed


def _erased_boxes(seed, n, **kwargs):
    """(hit flags (n,), [(box mask (H, W), filled values)] of the hits) of random_erasing on n constant images."""
    images = np.full((n, *ERASE_SHAPE), ERASE_VALUE, np.float32)
    out = np.asarray(jax.jit(lambda key, x: F.random_erasing(key, x, **kwargs))(jax.random.key(seed), images))
    hits, boxes = [], []
    for image in out:
        changed = (image != ERASE_VALUE).any(-1)
        hits.append(changed.any())
        if changed.any():
            boxes.append((changed, image[changed]))
    return np.array(hits), boxes


def _box_sides(mask):
    """(h, w) of the True region of `mask` (H, W), asserting it is one filled rectangle."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    assert mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all() and mask.sum() == len(rows) * len(cols)
    return len(rows), len(cols)


def test_random_erasing_rate_box_and_noise():
    hits, boxes = _erased_boxes(0, 3000)
    assert abs(hits.mean() - F.ERASE_PROB) < 0.035  # 4 standard errors
    area = ERASE_SHAPE[0] * ERASE_SHAPE[1]
    for mask, _ in boxes:
        h, w = _box_sides(mask)  # one rectangle
        # h, w are round(sqrt(a * r)), round(sqrt(a / r)) with a in [0.02, 1/3] * area, r in [0.3, 1 / 0.3]
        assert (h + 0.5) * (w + 0.5) >= 0.02 * area and (h - 0.5) * (w - 0.5) <= area / 3
        assert (h - 0.5) / (w + 0.5) <= 1 / 0.3 and (h + 0.5) / (w - 0.5) >= 0.3
        assert h < ERASE_SHAPE[0] and w < ERASE_SHAPE[1]
    # placement uniform over every position where the box fits: some boxes touch each border
    for axis in (0, 1):
        covered = np.array([mask.any(1 - axis) for mask, _ in boxes])
        assert covered[:, 0].any() and covered[:, -1].any()
    noise = np.concatenate([values.ravel() for _, values in boxes])
    assert abs(noise.mean()) < 0.02 and abs(noise.std() - 1) < 0.02


def _box_geometry(mask):
    """(area fraction, log(h / w), top, left) of one erased rectangle."""
    h, w = _box_sides(mask)
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return mask.mean(), np.log(h / w), rows[0], cols[0]


def test_random_erasing_matches_timm_distribution():
    timm_erasing = pytest.importorskip("timm.data.random_erasing")
    import torch
    random.seed(0)
    torch.manual_seed(0)
    erase = timm_erasing.RandomErasing(probability=F.ERASE_PROB, mode="pixel", device="cpu")
    timm_boxes, timm_hits = [], []
    for _ in range(3000):
        changed = (erase(torch.full((ERASE_SHAPE[2], *ERASE_SHAPE[:2]), ERASE_VALUE)).numpy() != ERASE_VALUE).any(0)
        timm_hits.append(changed.any())
        if changed.any():
            timm_boxes.append(_box_geometry(changed))
    hits, boxes = _erased_boxes(1, 3000)
    assert abs(hits.mean() - np.mean(timm_hits)) < 0.05
    ours = np.array([_box_geometry(mask) for mask, _ in boxes])
    for name, ours_values, timm_values in zip(("area", "log aspect", "top", "left"), ours.T, np.array(timm_boxes).T):
        assert stats.ks_2samp(ours_values, timm_values).pvalue > 1e-3, name


def test_random_erasing_fill_modes():
    _, const_boxes = _erased_boxes(3, 40, prob=1.0, mode="const")
    assert len(const_boxes) == 40 and all(np.all(values == 0) for _, values in const_boxes)
    _, rand_boxes = _erased_boxes(4, 40, prob=1.0, mode="rand")
    for _, values in rand_boxes:  # one colour per box
        assert np.all(values == values[:1])


# ---------------------------------------------------------------- host: RandAugment

def _test_image(seed=0, size=(20, 14)):
    """A random RGB image with a smooth gradient (so geometric ops have structure) spanning 0..255."""
    rng = np.random.default_rng(seed)
    gradient = np.linspace(0, 255, size[0])[None, :, None] * np.ones((size[1], 1, 3))
    array = np.clip(0.6 * gradient + rng.integers(0, 100, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    array[0, 0], array[-1, -1] = 0, 255
    return Image.fromarray(array)


@pytest.mark.parametrize("magnitude", [2.5, 7.3, 9.0])
def test_every_op_matches_timm(magnitude):
    auto_augment = pytest.importorskip("timm.data.auto_augment")
    image = _test_image()
    hparams = dict(img_mean=R.FILL, interpolation=R.BICUBIC, translate_const=100)
    for seed, name in enumerate(R.INCREASING_OPS):
        random.seed(seed)  # timm's sign is `random.random() > 0.5`, its first draw for a signed op
        negate = random.random() > 0.5
        random.seed(seed)
        expected = auto_augment.AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=hparams)(image)
        ours = R.apply_op(image, name, magnitude, negate)
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(expected), err_msg=name)


def test_posterize_zero_bits_is_black_and_matches_the_bit_mask():
    array = np.asarray(_test_image())
    assert not np.asarray(R.apply_op(Image.fromarray(array), "PosterizeIncreasing", 10.0)).any()
    for bits in (1, 3, 8):
        np.testing.assert_array_equal(np.asarray(R.posterize(Image.fromarray(array), bits)),
                                      array & (0xFF << (8 - bits) & 0xFF))


def test_rand_augment_size_mode_and_determinism():
    image = _test_image(size=(21, 13))
    outputs = [R.rand_augment(np.random.default_rng(seed), image) for seed in range(12)]
    assert all(out.size == image.size and out.mode == image.mode for out in outputs)
    again = [R.rand_augment(np.random.default_rng(seed), image) for seed in range(12)]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(outputs, again))
    assert len({np.asarray(out).tobytes() for out in outputs}) > 6


def test_rand_augment_applies_each_op_with_probability_half():
    image = _test_image()
    original = np.asarray(image)
    # ops that leave this image unchanged at magnitude ~9 (AutoContrast: it already spans 0..255)
    no_ops = sum(np.array_equal(np.asarray(R.apply_op(image, name, 9.0)), original) for name in R.INCREASING_OPS)
    expected_unchanged = (0.5 + 0.5 * no_ops / len(R.INCREASING_OPS)) ** 2
    rng = np.random.default_rng(5)
    unchanged = np.mean([np.array_equal(np.asarray(R.rand_augment(rng, image)), original) for _ in range(600)])
    assert abs(unchanged - expected_unchanged) < 0.075  # 4 standard errors
    assert np.array_equal(np.asarray(R.rand_augment(rng, image, prob=0.0)), original)
