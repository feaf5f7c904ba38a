"""1% few-shot solver: feature normalisation, L2 logistic regression against scikit-learn, few-shot subsets."""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from siim_jax.eval.logistic import (centre_and_normalise_rows, few_shot_subset, fit_logistic_regression, predict,
                                    top1)

NUM_TRAIN, NUM_TEST, DIM, NUM_CLASSES = 300, 200, 32, 5


def _blobs(num_train=NUM_TRAIN, seed=0):
    """Overlapping Gaussian blobs (train accuracy well below 1), each row centred and normalised on its own."""
    rng = np.random.default_rng(seed)
    centres = 0.25 * rng.normal(size=(NUM_CLASSES, DIM))
    labels = rng.integers(0, NUM_CLASSES, size=num_train + NUM_TEST)
    features = centres[labels] + rng.normal(size=(num_train + NUM_TEST, DIM))
    train, test = (np.asarray(centre_and_normalise_rows(f)) for f in (features[:num_train], features[num_train:]))
    return train, labels[:num_train], test, labels[num_train:]


def _objective(features, labels, weights, bias, l2):
    """float64 NumPy: mean_i CE(softmax(x_i W + b), y_i) + (l2 / 2) ||W||^2."""
    logits = features.astype(np.float64) @ weights + bias
    log_norm = np.log(np.sum(np.exp(logits - logits.max(1, keepdims=True)), 1)) + logits.max(1)
    return np.mean(log_norm - logits[np.arange(len(labels)), labels]) + 0.5 * l2 * np.sum(weights ** 2)


@pytest.mark.parametrize("fit_intercept", [False, True])
def test_fit_matches_sklearn(fit_intercept):
    linear_model = pytest.importorskip("sklearn.linear_model")
    train, train_labels, test, test_labels = _blobs()
    l2 = 0.1 / NUM_TRAIN
    *params, info = fit_logistic_regression(train, train_labels, NUM_CLASSES, l2, tol=1e-7,
                                            fit_intercept=fit_intercept, return_info=True)
    weights = np.asarray(params[0], np.float64)
    bias = np.asarray(params[1], np.float64) if fit_intercept else np.zeros(NUM_CLASSES)
    assert weights.shape == (DIM, NUM_CLASSES) and info["grad_norm"] < 1e-7

    # sklearn's 0.5 ||w||^2 + C sum loss has the same minimiser as mean loss + (l2 / 2) ||w||^2 for C = 1 / (N l2).
    reference = linear_model.LogisticRegression(C=1.0 / (NUM_TRAIN * l2), fit_intercept=fit_intercept, tol=1e-10,
                                                max_iter=10000).fit(train.astype(np.float64), train_labels)
    ref_weights = reference.coef_.T
    ref_bias = reference.intercept_ if fit_intercept else np.zeros(NUM_CLASSES)
    assert np.max(np.abs(weights - ref_weights)) <= 1e-3 * np.max(np.abs(ref_weights))
    np.testing.assert_allclose(bias, ref_bias, atol=1e-3 * np.max(np.abs(ref_weights)))

    ours = _objective(train, train_labels, weights, bias, l2)
    best = _objective(train, train_labels, ref_weights, ref_bias, l2)
    assert abs(ours - best) <= 1e-6 * best
    assert abs(info["objective"] - ours) <= 1e-5 * ours  # the reported value is the objective at the returned W

    ref_predictions = reference.predict(test)
    predictions = np.asarray(predict(params[0], test, params[1] if fit_intercept else None))
    assert predictions.shape == (NUM_TEST,) and np.mean(predictions == ref_predictions) >= 0.99
    assert top1(params[0], test, test_labels, params[1] if fit_intercept else None) == pytest.approx(
        np.mean(ref_predictions == test_labels), abs=0.01)
    assert top1(params[0], test, test_labels, params[1] if fit_intercept else None) == pytest.approx(
        np.mean(np.argmax(test @ weights + bias, 1) == test_labels))


def test_fit_on_features_sharded_over_devices_matches_single_device():
    devices = np.array(jax.devices())
    num_train = 40 * len(devices)
    train, train_labels, _, _ = _blobs(num_train, seed=2)
    l2 = 0.1 / num_train
    single = np.asarray(fit_logistic_regression(train, train_labels, NUM_CLASSES, l2))
    sharding = NamedSharding(Mesh(devices, ("data",)), PartitionSpec("data"))
    sharded = fit_logistic_regression(jax.device_put(train, sharding), jax.device_put(train_labels, sharding),
                                      NUM_CLASSES, l2)
    assert np.max(np.abs(np.asarray(sharded) - single)) <= 1e-3 * np.max(np.abs(single))


def test_few_shot_per_class_counts_and_reproducible():
    rng = np.random.default_rng(3)
    class_sizes = {0: 10, 1: 3, 2: 7, 5: 1}  # labels need not be contiguous
    labels = rng.permutation(np.concatenate([np.full(n, c) for c, n in class_sizes.items()]))
    subset = few_shot_subset(labels, per_class=4, seed=0)
    assert subset.dtype == np.int64 and len(np.unique(subset)) == len(subset)
    chosen_per_class = {c: int(np.sum(labels[subset] == c)) for c in class_sizes}
    assert chosen_per_class == {c: min(4, n) for c, n in class_sizes.items()}
    np.testing.assert_array_equal(few_shot_subset(labels, per_class=4, seed=0), subset)
    subsets = {tuple(few_shot_subset(labels, per_class=4, seed=s)) for s in range(5)}
    assert len(subsets) > 1  # the seed matters (C(10,4) * C(7,4) choices)
    with pytest.raises(ValueError, match="exactly one"):
        few_shot_subset(labels)


def test_few_shot_index_file(tmp_path):
    names = [f"n0144076{c}/n0144076{c}_{i}.JPEG" for c in range(3) for i in range(4)]  # relative paths
    labels = np.repeat(np.arange(3), 4)
    listing = tmp_path / "1percent.txt"
    listing.write_text("n01440762_3.JPEG\nn01440760_1.JPEG\n\nn01440761_0.JPEG\n")
    np.testing.assert_array_equal(few_shot_subset(labels, index_file=str(listing), names=names), [1, 4, 11])

    listing.write_text("n01440760_1.JPEG\nn09999999_7.JPEG\nn01440761_9.JPEG\nn01440761_0.JPEG\n")
    with pytest.raises(ValueError, match=r"2 of the 4 names.*n09999999_7\.JPEG.*n01440761_9\.JPEG"):
        few_shot_subset(labels, index_file=str(listing), names=names)
    with pytest.raises(ValueError, match="needs names"):
        few_shot_subset(labels, index_file=str(listing))
