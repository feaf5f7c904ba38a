"""Evaluation figures against independent references (issue 24, item 3).

Each figure the project reports is recomputed here from inputs taken independently of the code under test: the
images are cropped with PIL and normalised in NumPy, the model (its logits / feature function, the thing being
evaluated, not the evaluation) runs unsharded on one CPU device, and the figure itself is counted in NumPy or
fitted by scikit-learn. Sizes are chosen so that the evaluators pad: validation 21 images in eval batches of 16
(11 padded rows), k-NN bank 27 / queries 13 in batches of 8 (5 / 3 padded rows), few-shot 20 training and 21
validation images in batches of 16. The meshes spread rows over 8 or 4 batch shards, and data2_fsdp2_tensor2
also shares every row between the two devices of a tensor pair (a count summed per device would double).

Exactness: a figure is a count over images, so it must be equal, not close. Each test first checks that no
image lies within float rounding of a decision boundary (logit margins, the k-th neighbour gap, vote margins),
so that equality is what correct code gives, not luck.
"""

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from PIL import Image

from conftest import override, tiny_config
from siim_jax import config as config_lib
from siim_jax.data.sources import open_source
from siim_jax.methods import get_method
from siim_jax.parallel.sharding import batch_sharding, create_mesh, replicated
from siim_jax.train.evaluators import build_evaluators, extract_array_features
from siim_jax.train.state import init_train_state

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])
TINY_MODEL = {"model.variant": "mu", "model.image_size": 32, "model.dtype": "float32", "data.num_train": 64,
              "data.raw_size": 40, "data.num_masked": 10, "data.num_val": 21, "classifier.num_classes": 10,
              "batch_size": 16}
MESHES = {"data8": {"mesh.data": 8}, "data2_fsdp2_tensor2": {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}}


def normalised(images_uint8) -> np.ndarray:
    """uint8 (N, H, W, 3) -> float32: x / 255 minus the ImageNet mean, over the ImageNet std (NumPy)."""
    return ((images_uint8.astype(np.float64) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)


def eval_crops(images_uint8, size: int, resample) -> np.ndarray:
    """SPEC section 5's evaluation transform scaled to `size` (resize 256 -> centre crop 224: shorter side to
    int(size * 256 / 224), centred size x size crop), with PIL, for the square built-in images."""
    short = int(size * 256 / 224)
    offset = round((short - size) / 2)
    return np.stack([np.asarray(Image.fromarray(image).convert("RGB").resize((short, short), resample))
                     [offset:offset + size, offset:offset + size] for image in images_uint8])


def on_one_device(fn, *args) -> np.ndarray:
    """fn(*args) jitted on one CPU device from host copies of args (no mesh, no sharding), as float64 NumPy."""
    with jax.default_device(jax.devices("cpu")[0]):
        return np.asarray(jax.jit(fn)(*jax.device_get(args)), np.float64)


def top_k_hits(logits, labels, k: int) -> np.ndarray:
    """bool (N,): the label's logit is among the k largest (fewer than k other logits strictly larger)."""
    mine = logits[np.arange(len(labels)), labels]
    return np.sum(logits > mine[:, None], axis=1) < k


def label_margins(logits, labels, k: int) -> np.ndarray:
    """(N,) distance of the label's logit from the k-th largest of the other logits (the top-k boundary)."""
    others = np.where(np.arange(logits.shape[1])[None, :] == labels[:, None], -np.inf, logits)
    kth = -np.sort(-others, axis=1)[:, k - 1]
    return np.abs(logits[np.arange(len(labels)), labels] - kth)


# ---------------------------------------------------------------------------------------------------------------
# validation top-1 / top-5 (train/evaluators.py: ValidationEvaluator)


def probe_config(**overrides):
    return override(config_lib.linear_probe_config("mu"), {
        **TINY_MODEL, "classifier.eval_batch_size": 16, "total_steps": 1, "warmup_steps": 0, "eval_every_steps": 1,
        **overrides})


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_validation_top1_top5_equal_numpy_counts_of_independent_logits(mesh_name):
    """ValidationEvaluator.run's val_top1 / val_top5 equal NumPy top-1 / top-5 counts over the 21 validation
    images of logits computed here (PIL crop, NumPy normalisation, the linear-probe model on one device).

    The head is set so the figures mean something: random N(0, 0.5^2) kernel (predictions vary between images),
    a bias that makes the padded rows (zero images, label 0) a top-1 and top-5 hit, and random BatchNorm running
    statistics. So a count that drops the `valid` mask from a numerator or its denominator ((h + 11) / 32
    instead of h / 21), sums the per-device counts of rows that two tensor devices share, or evaluates with the
    batch's statistics instead of the running ones gives other figures and fails here.
    """
    config = probe_config(**MESHES[mesh_name])
    method = get_method(config)
    mesh = create_mesh(config.mesh)
    graphdef, _, state, shardings = init_train_state(method, mesh, lambda step: 0.0)

    def logits_fn(params, batch_stats, images):
        return method.logits(nnx.merge(graphdef, params, batch_stats), images)

    val = open_source(config.data, config.seed, "validation")
    images = eval_crops(np.stack([val.read(i) for i in range(len(val))]), 32, Image.BICUBIC)
    labels = np.array([val.label(i) for i in range(len(val))])
    inputs = normalised(np.concatenate([np.zeros((1, 32, 32, 3), np.uint8), images]))  # a padded row first

    params, stats = jax.device_get(state.params), jax.device_get(state.batch_stats)
    head = params["head"]
    head["kernel"] = np.random.default_rng(0).normal(0, 0.5, np.shape(head["kernel"])).astype(np.float32)
    head["bias"] = np.zeros(np.shape(head["bias"]), np.float32)
    padding = on_one_device(logits_fn, params, stats, inputs)[0]
    head["bias"][0] = padding.max() - padding[0] + 1.0
    rng = np.random.default_rng(1)  # running statistics that matter (the initial ones are 0 and 1)
    stats = jax.tree_util.tree_map_with_path(
        lambda path, x: (rng.uniform(0.5, 2.0, np.shape(x)) if getattr(path[-1], "key", None) == "var"
                         else rng.normal(0, 0.3, np.shape(x))).astype(np.float32), stats)
    state = state.replace(params=jax.device_put(params, shardings.params),
                          batch_stats=jax.device_put(stats, shardings.batch_stats))
    padding, *logits = on_one_device(logits_fn, params, stats, inputs)
    logits = np.stack(logits)
    assert len(labels) == 21 and logits.shape == (21, 10)
    assert np.argmax(padding) == 0  # a padded row, if counted, is a hit for both figures
    assert len(set(np.argmax(logits, 1))) > 2  # predictions vary between images
    for k in (1, 5):  # no image within float rounding of the top-k boundary
        assert label_margins(logits, labels, k).min() > 1e-3

    (evaluator,) = build_evaluators(config, method, graphdef, mesh, shardings, source=None)
    assert evaluator.name == "validation" and evaluator.batch == 16
    figures = evaluator.run(state)

    top1, top5 = int(top_k_hits(logits, labels, 1).sum()), int(top_k_hits(logits, labels, 5).sum())
    assert 0 < top1 < top5 < 21
    assert figures["val_top1"] == top1 / 21 and figures["val_top5"] == top5 / 21, (figures, top1, top5)
    # what the unmasked count would give is a different figure (the test can see a dropped mask)
    assert (top1 + 11) / 32 != top1 / 21 and (top5 + 11) / 32 != top5 / 21


def test_fewshot_top1_equals_sklearn_logistic_regression_on_the_same_features(tmp_path):
    """evaluate_few_shot's top1 (2 training images per class, 21 validation images, random encoder: the
    `--pretrained none` baseline) equals scikit-learn's multinomial LogisticRegression, no intercept,
    C = 1 / lambda (the module's convention C = 1 / (N l2) with l2 = lambda / N), fitted on features computed
    here: bilinear crop (PIL), NumPy normalisation, class token of the last block on one device, each row
    minus its own mean and divided by its own L2 norm (NumPy, float64).

    Ties: the solver stops at gradient norm g; F is l2-strongly convex, so its weights are within g / l2 of the
    minimiser and each logit within g / l2 (rows have norm 1). A prediction can only differ where sklearn's
    top-2 logit margin is below 2 g / l2 (+ float slack); such images are counted and allowed to differ (there
    must be at most one, else the test says nothing). Catches: padded validation rows counted (top-1 over 32),
    padded training rows fitted, preprocessing across samples (column statistics) or none, a penalty of lambda
    instead of lambda / n_train (or missing), an intercept, the mean patch token instead of the class token,
    the bicubic instead of the bilinear resize, the final norm applied.
    """
    linear_model = pytest.importorskip("sklearn.linear_model")
    from siim_jax.eval.fewshot import evaluate_few_shot
    from siim_jax.eval.logistic import few_shot_subset
    from siim_jax.eval.pretrained import NO_PRETRAINING

    config = override(config_lib.fewshot_config("mu"), {
        **TINY_MODEL, "mesh.data": 8, "fewshot.per_class": 2, "fewshot.batch_size": 16})
    assert config.fewshot.feature == "class_token" and config.fewshot.l2 == 0.1
    summary = evaluate_few_shot(config, str(tmp_path / "fewshot"), NO_PRETRAINING, "online")

    method = get_method(config)
    graphdef, params, stats = nnx.split(method.create_model(config.seed), nnx.Param, nnx.BatchStat)
    params, stats = nnx.to_pure_dict(params), nnx.to_pure_dict(stats)

    def class_token(params, batch_stats, images):
        return nnx.merge(graphdef, params, batch_stats).encoder.class_token(images)

    def rows(x):
        x = x - x.mean(axis=1, keepdims=True)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    train, val = open_source(config.data, config.seed), open_source(config.data, config.seed, "validation")
    chosen = few_shot_subset(train.labels, per_class=2, seed=config.seed)
    tokens = on_one_device(class_token, params, stats, normalised(
        eval_crops(np.concatenate([train.images[chosen], val.images]), 32, Image.BILINEAR)))
    x_train, x_val = rows(tokens[:len(chosen)]), rows(tokens[len(chosen):])  # each row on its own
    y_train = train.labels[chosen]
    assert len(chosen) == 20 and len(set(y_train)) == 10 and len(val) == 21
    assert summary["n_train"] == 20 and summary["n_val"] == 21

    reference = linear_model.LogisticRegression(C=1.0 / config.fewshot.l2, fit_intercept=False, tol=1e-10,
                                                max_iter=10000).fit(x_train, y_train)
    scores = reference.decision_function(x_val)
    hits = int(np.sum(reference.predict(x_val) == val.labels))
    ranked = -np.sort(-scores, axis=1)
    bound = 2 * summary["grad_norm"] / (config.fewshot.l2 / 20) + 1e-4
    ambiguous = int(np.sum(ranked[:, 0] - ranked[:, 1] < bound))
    assert ambiguous <= 1, (ambiguous, bound)
    assert 0 < hits < 21
    assert abs(summary["top1"] * 21 - hits) <= ambiguous + 1e-9, (summary, hits, ambiguous)
    if ambiguous == 0:
        assert summary["top1"] == hits / 21


# ---------------------------------------------------------------------------------------------------------------
# the k-NN monitor (train/evaluators.py: KnnEvaluator)


def numpy_knn(bank, bank_labels, queries, k: int, temperature: float, num_classes: int):
    """(predictions (Q,), ambiguous (Q,) bool) of DINO's weighted k-NN in float64 NumPy: cosine similarity of L2
    normalised rows, the k most similar bank rows vote exp(sim / T) for their label, argmax (lowest class first).

    A prediction is ambiguous when float rounding of the features (~1e-6 here; 1e-4 allowed) could change it:
    the k-th and (k+1)-th similarities are closer than 1e-4 (the voters could differ), or the two largest class
    votes are closer than the factor exp(2e-4 / T) that such errors can move each vote by."""
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    sims = unit(queries) @ unit(bank).T
    order = np.argsort(-sims, axis=1, kind="stable")
    k = min(k, bank.shape[0])
    votes = np.zeros((len(queries), num_classes))
    for q in range(len(queries)):
        for j in order[q, :k]:
            votes[q, bank_labels[j]] += np.exp(sims[q, j] / temperature)
    ranked = -np.sort(-sims, axis=1)
    gap = ranked[:, k - 1] - ranked[:, k] if k < bank.shape[0] else np.full(len(queries), np.inf)
    top2 = -np.sort(-votes, axis=1)[:, :2]
    ambiguous = (gap < 1e-4) | (top2[:, 0] < top2[:, 1] * np.exp(2e-4 / temperature))
    return np.argmax(votes, axis=1), ambiguous


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_knn_monitor_top1_equals_numpy_knn_of_independent_features(mesh_name):
    """KnnEvaluator.run's knn_top1 (bank 27, queries 13 in batches of 8: 5 and 3 padded rows) equals weighted
    k-NN counted in NumPy on features computed here (NumPy normalisation, the encoder's mean patch token on one
    device, no mesh), with k = 20 of 27 so the k-th neighbour boundary is crossed. Images at the model's size (no
    resize in either path). Predictions within float rounding of a boundary are counted as either (at most 2
    allowed, else the test says nothing). Catches: padded queries counted (hits / 16), padded bank rows voting
    (their zero images' features vote for label 0), votes summed per device over rows shared by two tensor
    devices, the query labels misaligned with their rows, a temperature or k not applied."""
    config = override(tiny_config(), {
        **TINY_MODEL, **MESHES[mesh_name], "data.raw_size": 32, "data.num_train": 27, "data.num_classes": 3,
        "knn.num_bank": 27, "knn.num_query": 13, "knn.batch_size": 8, "knn.k": 20, "eval_every_steps": 1})
    method = get_method(config)
    mesh = create_mesh(config.mesh)
    graphdef, _, state, shardings = init_train_state(method, mesh, lambda step: 0.0)
    source = open_source(config.data, config.seed)
    (evaluator,) = build_evaluators(config, method, graphdef, mesh, shardings, source)
    assert evaluator.name == "knn"
    figure = evaluator.run(state)["knn_top1"]

    from siim_jax.data.sources.builtin import make_builtin_images
    bank_images, bank_labels = make_builtin_images(config.seed, 27, 32, config.data.num_classes)
    query_images, query_labels = make_builtin_images(config.seed, 13, 32, config.data.num_classes, offset=27)

    def features(params, ema_params, batch_stats, images):
        model = nnx.merge(graphdef, method.merge_params(params, ema_params), batch_stats)
        return method.encoder(model, "online").features(images)

    host = jax.device_get((state.params, state.ema_params, state.batch_stats))
    feats = on_one_device(features, *host, normalised(np.concatenate([bank_images, query_images])))
    predicted, ambiguous = numpy_knn(feats[:27], bank_labels, feats[27:], k=20, temperature=config.knn.temperature,
                                     num_classes=config.data.num_classes)
    sure = ~ambiguous
    low = int(np.sum((predicted == query_labels) & sure))
    high = low + int(ambiguous.sum())
    assert ambiguous.sum() <= 2, ambiguous
    assert 0 < high and low < 13  # neither all wrong nor all right: the count says something
    assert low / 13 <= figure <= high / 13, (figure, low, high)
    # what counting the padded queries would report (hits / 16) lies outside the allowed range: the test sees it
    assert all(not low / 13 <= hits / 16 <= high / 13 for hits in range(max(low, 1), high + 1)), (low, high, figure)
