import numpy as np
import pytest

from siim_jax.data.pipeline import TwoViewBatches
from siim_jax.data.sources.builtin import make_builtin_images

IMAGES, LABELS = make_builtin_images(seed=0, num_images=40, image_size=24)


def _batches(seed=0, **kw):
    args = dict(global_batch=4, out_size=16, patch_size=4, num_masked=7, crop_min=0.2, seed=seed)
    args.update(kw)
    return TwoViewBatches(IMAGES, **args)


def _assert_batch_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_batch_layout():
    batch = _batches().batch_at(3)
    assert batch["view1"].shape == batch["view2"].shape == (4, 16, 16, 3)
    assert batch["view1"].dtype == batch["view2"].dtype == np.uint8
    assert batch["geometry"].shape == (4, 6) and batch["geometry"].dtype == np.float32
    assert batch["mask"].shape == (4, 16) and batch["mask"].dtype == bool
    np.testing.assert_array_equal(batch["mask"].sum(1), 7)


def test_deterministic_and_seed_dependent():
    _assert_batch_equal(_batches(seed=1).batch_at(5), _batches(seed=1).batch_at(5))
    a, b = _batches(seed=1).batch_at(5), _batches(seed=2).batch_at(5)
    assert not np.array_equal(a["view1"], b["view1"])
    assert not np.array_equal(a["geometry"], b["geometry"])


def test_epoch_is_a_permutation():
    data = _batches()
    assert data.steps_per_epoch == 10
    seen = np.concatenate([data.indices_at(s) for s in range(10)])
    np.testing.assert_array_equal(np.sort(seen), np.arange(40))
    np.testing.assert_array_equal(data.indices_at(3), np.random.default_rng([0, 0]).permutation(40)[12:16])
    np.testing.assert_array_equal(data.indices_at(13), np.random.default_rng([0, 1]).permutation(40)[12:16])


def test_iterate_resumes_exactly():
    data = _batches(num_threads=2)
    for start in (0, 7):
        for step, (batch, skipped) in zip(range(start, start + 5), data.iterate(start)):
            _assert_batch_equal(batch, data.batch_at(step))
            assert skipped == ()


def test_processes_split_the_global_batch():
    p0 = _batches(global_batch=8, rows=np.arange(0, 4))
    p1 = _batches(global_batch=8, rows=np.arange(4, 8))
    single = _batches(global_batch=8)
    assert p0.steps_per_epoch == 5
    for step in range(6):
        i0, i1 = p0.indices_at(step), p1.indices_at(step)
        assert not set(i0) & set(i1)
        np.testing.assert_array_equal(np.concatenate([i0, i1]), single.indices_at(step))
    # augmentation depends on the global example position, so two processes reproduce a single-process run
    both = [p0.batch_at(2), p1.batch_at(2)]
    _assert_batch_equal({k: np.concatenate([b[k] for b in both]) for k in both[0]}, single.batch_at(2))


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="global batch"):
        _batches(global_batch=41)
    with pytest.raises(ValueError, match="num_masked=17"):
        _batches(num_masked=17)


def test_builtin_images_deterministic_and_indexable():
    images, labels = make_builtin_images(seed=0, num_images=12, image_size=24)
    assert images.shape == (12, 24, 24, 3) and images.dtype == np.uint8
    assert labels.shape == (12,) and labels.dtype == np.int32
    np.testing.assert_array_equal(images, IMAGES[:12])
    np.testing.assert_array_equal(labels, LABELS[:12])
    shifted, shifted_labels = make_builtin_images(seed=0, num_images=5, image_size=24, offset=30)
    np.testing.assert_array_equal(shifted, IMAGES[30:35])
    np.testing.assert_array_equal(shifted_labels, LABELS[30:35])
    other, _ = make_builtin_images(seed=1, num_images=12, image_size=24)
    assert not np.array_equal(other, images)


def test_builtin_classes_and_grey_levels():
    images, labels = make_builtin_images(seed=3, num_images=600, image_size=32)
    assert set(labels.tolist()) == set(range(10))
    assert 30 < np.bincount(labels).min()
    # brightness alone must not reveal the class: per-class mean levels are all close to the global mean
    means = images.reshape(600, -1, 3).mean(1)
    per_class = np.stack([means[labels == k].mean(0) for k in range(10)])
    assert np.abs(per_class - means.mean(0)).max() < 25
    # each image has two well separated grey levels (foreground and background), equal in all channels
    assert (images[..., 0] == images[..., 2]).all()
    spread = images.reshape(600, -1, 3).astype(float).std(1).max(1)
    assert spread.min() > 10
    with pytest.raises(ValueError, match="num_classes=11"):
        make_builtin_images(seed=0, num_images=1, image_size=8, num_classes=11)



def test_iterate_builds_a_bounded_number_of_batches_ahead():
    data, reference = _batches(num_threads=4), _batches()
    built = []
    original = data._empty_batch
    data._empty_batch = lambda: built.append(1) or original()
    stream = data.iterate(0, batches_ahead=2)
    for consumed in range(1, 6):
        batch, _ = next(stream)
        _assert_batch_equal(batch, reference.batch_at(consumed - 1))
        # host memory: the batch in hand plus 2 in flight, however many threads build them
        assert len(built) == consumed + 2
    stream.close()
