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


# ---------------------------------------------------------------- device: mixup / cutmix per device shard

SHARD_N, SHARD_CLASSES = 16, 20
SHARD_LABELS = np.array([7, 2, 19, 0, 11, 5, 3, 14, 8, 1, 16, 12, 4, 18, 9, 6])  # distinct: a target names its rows
# (mesh shape, mesh axes, batch axes): 4 shards with a tensor axis replicating them, and 8 shards of 2 rows
SHARD_MESHES = [((2, 2, 2), ("data", "fsdp", "tensor"), ("data", "fsdp")), ((8,), ("data",), ("data",))]


def _shard_images():
    """Image i holds 10 (i + 1) + a per-pixel pattern in [0, 1): every value names its image and position."""
    pattern = np.arange(H * W * C, dtype=np.float32).reshape(H, W, C) / (H * W * C)
    return np.stack([10.0 * (i + 1) + pattern for i in range(SHARD_N)]).astype(np.float32)


def _sharded_mixing(mesh_shape, mesh_axes, batch_axes, images, labels=SHARD_LABELS):
    """keys (K,) -> (mixed (K, N, H, W, C), targets (K, N, classes)) of mixup_cutmix per shard over a mesh of the
    8 CPU devices, the batch split over `batch_axes`, as the train step runs it (inside jit and jax.set_mesh)."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(mesh_shape), mesh_axes)
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(batch_axes))
    images, labels = jax.device_put(images, rows), jax.device_put(labels, rows)

    def run(keys):
        with jax.set_mesh(mesh):
            step = jax.jit(lambda key, x, y: F.mixup_cutmix(key, x, y, SHARD_CLASSES, label_smoothing=SMOOTHING,
                                                            batch_axes=batch_axes))
            outputs = [step(key, images, labels) for key in keys]
        return np.stack([np.asarray(m) for m, _ in outputs]), np.stack([np.asarray(t) for _, t in outputs])

    return run


def _shard_smooth(labels):
    return np.eye(SHARD_CLASSES)[labels] * (1 - SMOOTHING) + SMOOTHING / SHARD_CLASSES


@pytest.mark.parametrize("mesh_shape, mesh_axes, batch_axes", SHARD_MESHES)
def test_each_shard_mixes_its_own_rows_with_its_own_draw(mesh_shape, mesh_axes, batch_axes):
    """NumPy rendering of timm's per-GPU Mixup(mode='batch'): shard s (rows [s n, (s + 1) n), s the linear index
    over the batch axes, major first) mixed with its own reversed rows and the draw of fold_in(key, s)."""
    images = _shard_images()
    shards = int(np.prod(mesh_shape[:len(batch_axes)]))
    n = SHARD_N // shards
    keys = jax.random.split(jax.random.key(3), 24)
    mixed, targets = _sharded_mixing(mesh_shape, mesh_axes, batch_axes, images)(keys)
    np.testing.assert_allclose(targets.sum(-1), 1.0, atol=1e-6)  # every row of the global batch, with smoothing
    kinds, lams = set(), []
    for k, key in enumerate(keys):
        for s in range(shards):
            use_cutmix, lam, box = (np.asarray(a) for a in F.mixing_draw(jax.random.fold_in(key, s), H, W))
            x, y = images[s * n:(s + 1) * n], SHARD_LABELS[s * n:(s + 1) * n]
            if use_cutmix:
                expected = np.where(box[None, :, :, None], x[::-1], x)
                assert lam == pytest.approx(1 - box.mean(), abs=1e-6)
            else:
                expected = lam * x + (1 - lam) * x[::-1]
            np.testing.assert_allclose(mixed[k, s * n:(s + 1) * n], expected, rtol=1e-6, atol=1e-5)
            np.testing.assert_allclose(targets[k, s * n:(s + 1) * n],
                                       lam * _shard_smooth(y) + (1 - lam) * _shard_smooth(y[::-1]), atol=2e-6)
            kinds.add(bool(use_cutmix))
            lams.append(float(lam))
    assert kinds == {True, False}  # both kinds were checked
    lams = np.array(lams).reshape(len(keys), shards)
    assert np.all(np.ptp(lams, axis=1) > 0)  # one draw per shard: the shards of a step differ


@pytest.mark.parametrize("mesh_shape, mesh_axes, batch_axes", SHARD_MESHES[:1])
def test_no_output_row_takes_anything_from_another_shard(mesh_shape, mesh_axes, batch_axes):
    """A NaN planted in one input row reaches only output rows of that row's shard (under mixup exactly the row
    and its mirror in the shard), whatever the draw."""
    shards = int(np.prod(mesh_shape[:len(batch_axes)]))
    n = SHARD_N // shards
    keys = jax.random.split(jax.random.key(4), 12)
    for poisoned in (0, 5, 10, 15):
        images = _shard_images()
        images[poisoned, 2, 3, 1] = np.nan
        mixed, _ = _sharded_mixing(mesh_shape, mesh_axes, batch_axes, images)(keys)
        reached = np.isnan(mixed).any(axis=(2, 3, 4))  # (K, N)
        shard = poisoned // n
        mirror = shard * n + (n - 1 - (poisoned % n))
        outside = np.ones(SHARD_N, bool)
        outside[shard * n:(shard + 1) * n] = False
        assert not reached[:, outside].any(), np.argwhere(reached[:, outside])
        assert np.all(reached[:, poisoned] | reached[:, mirror])  # the poisoned pixel lands in its row or mirror
        mixup = reached.sum(1) == 2
        assert mixup.any() and np.all(reached[mixup][:, [poisoned, mirror]])


def test_per_shard_draw_statistics_are_the_single_batch_ones():
    """Read off 400 steps x 4 shards: cutmix in half of the draws, mixup lam ~ Beta(0.8, 0.8), cutmix lam as timm
    (the box-corrected Beta(1, 1)), and the shards of one step independent of each other."""
    mesh_shape, mesh_axes, batch_axes = SHARD_MESHES[0]
    images, n, shards = _shard_images(), 4, 4
    keys = jax.random.split(jax.random.key(5), 400)
    mixed, targets = _sharded_mixing(mesh_shape, mesh_axes, batch_axes, images)(keys)
    groups = mixed.reshape(len(keys), shards, n, H, W, C)
    own = images.reshape(shards, n, H, W, C)
    is_cutmix = np.all((groups == own) | (groups == own[:, ::-1]), axis=(2, 3, 4, 5))  # (K, shards)
    # lam from the targets: row 0 of each shard has its own label's share lam (1 - s) + s / C
    first = targets[:, ::n]  # (K, shards, classes)
    lam = (first[:, np.arange(shards), SHARD_LABELS[::n]] - SMOOTHING / SHARD_CLASSES) / (1 - SMOOTHING)
    assert abs(is_cutmix.mean() - F.SWITCH_PROB) < 0.035  # 4 standard errors of 1600 draws
    lam_mixup = lam[~is_cutmix]
    assert abs(lam_mixup.mean() - 0.5) < 0.03
    assert stats.kstest(lam_mixup, stats.beta(F.MIXUP_ALPHA, F.MIXUP_ALPHA).cdf).pvalue > 1e-3
    timm_mixup = pytest.importorskip("timm.data.mixup")
    np.random.seed(0)
    timm_lams = [timm_mixup.cutmix_bbox_and_lam((n, C, H, W), np.random.beta(1.0, 1.0))[1] for _ in range(4000)]
    # cutmix lams are box fractions (atoms): rounded, so that float32 rounding does not split an atom
    assert stats.ks_2samp(np.round(lam[is_cutmix].astype(np.float64), 4), np.round(timm_lams, 4)).pvalue > 1e-3
    for a, b in ((0, 1), (0, 3), (2, 3)):  # independent shards: uncorrelated lams and kinds
        assert abs(np.corrcoef(lam[:, a], lam[:, b])[0, 1]) < 0.2  # 4 standard errors of 400 pairs
        assert abs(np.corrcoef(is_cutmix[:, a], is_cutmix[:, b])[0, 1]) < 0.2


def test_one_shard_is_the_single_batch_function():
    """batch_axes=() and a mesh whose batch axes have one device both give the plain whole-batch mixing."""
    images, labels = jnp.asarray(_shard_images()), jnp.asarray(SHARD_LABELS)
    key = jax.random.key(6)
    plain = F.mixup_cutmix(key, images, labels, SHARD_CLASSES)
    use_cutmix, lam, box = (np.asarray(a) for a in F.mixing_draw(key, H, W))
    x = np.asarray(images)
    expected = np.where(box[None, :, :, None], x[::-1], x) if use_cutmix else lam * x + (1 - lam) * x[::-1]
    np.testing.assert_allclose(plain[0], expected, rtol=1e-6, atol=1e-5)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))
    with jax.set_mesh(mesh):
        rules = (("batch", ("data", "fsdp")),)
        assert F.batch_mesh_axes(SHARD_N, rules) == ()
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4, 1), ("data", "fsdp", "tensor"))
    with jax.set_mesh(mesh):
        assert F.batch_mesh_axes(SHARD_N, rules) == ("data", "fsdp")
        assert F.batch_mesh_axes(SHARD_N + 4, rules) == ()  # 8 shards do not divide 20 rows: not split
    assert F.batch_mesh_axes(SHARD_N, rules) == ()  # no mesh


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


# ---------------------------------------------------------------- the compiled fine-tune step's communication

def _finetune_step_collective_bytes(mesh: dict, batch: int) -> dict:
    """collective_bytes of the tiny fine-tune train step compiled for the 8 CPU devices at global batch `batch`."""
    from conftest import override
    from siim_jax.config import finetune_config
    from siim_jax.methods import get_method
    from siim_jax.perf.compiled import collective_bytes, plan_train_step
    config = override(finetune_config("mu"), {
        "model.image_size": 32, "model.dtype": "float32", "data.num_masked": 10, "data.raw_size": 40,
        "data.num_train": 64, "classifier.num_classes": 10, "batch_size": batch,
        **{f"mesh.{k}": v for k, v in mesh.items()}})
    plan = plan_train_step(get_method(config))
    return collective_bytes(plan.train_step.lower(plan.abstract_state, plan.abstract_batch).compile().as_text())


@pytest.mark.parametrize("mesh", [{"data": 8}, pytest.param({"data": 1, "fsdp": 8}, marks=pytest.mark.slow)])
def test_no_collective_of_the_finetune_step_grows_with_the_global_batch(mesh):
    """Global batches 40 and 80 (as pretraining's check, tests/test_perf.py): no kind of collective moves more
    than 1.25x the bytes at twice the batch, and none permutes rows (the whole-batch reversal of mixup / cutmix
    moved every image between devices: collective-permute 61640 -> 123280 bytes per device on 8 data shards)."""
    small, large = _finetune_step_collective_bytes(mesh, 40), _finetune_step_collective_bytes(mesh, 80)
    for kind in small:
        assert large[kind] <= 1.25 * small[kind], (kind, small, large)
    assert small["collective-permute"] == large["collective-permute"] == 0, (small, large)
    assert small["all-reduce"] > 0  # the gradients: the HLO was read
