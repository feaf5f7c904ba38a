"""Evaluators the trainer schedules (config.evals, every config.eval_every_steps): each owns its data and its
jitted functions and `run(state)` returns named figures, the same on every process.

- "knn": weighted k-NN top-1 of the method's encoder feature (mean patch token), bank and queries on device
  (siim_jax/train/knn.py); the k-NN monitor of pretraining.
- "validation": top-1 / top-5 of a classifier (linear probe, fine-tune) on the validation split, official eval
  crop; padded rows masked, every image counted once over all processes.
"""

import logging
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from flax import nnx

from siim_jax.config import ConfigError
from siim_jax.data.classification import LabelledBatches
from siim_jax.data.photometric import normalize
from siim_jax.data.sources import ArraySource, BadImageError, load_rgb, make_builtin_images, open_source
from siim_jax.data.views import eval_view
from siim_jax.train.knn import knn_top1
from siim_jax.train.workdir_lock import note_progress
from siim_jax.parallel.sharding import (batch_sharding, batch_shards, global_batch, jit_in_mesh, local_rows,
                                        owned_rows_mask, replicated)

log = logging.getLogger(__name__)


def progress(iterable, desc: str, total: int | None = None):
    """The items of `iterable`, with a progress bar on process 0; each one counts as the run's progress (the
    workdir lock's heartbeat goes on)."""
    for item in tqdm.tqdm(iterable, desc=desc, total=total, disable=jax.process_index() != 0, mininterval=2.0,
                          leave=False, dynamic_ncols=True):
        note_progress()
        yield item


def padded_batch_size(batch: int, mesh, rules) -> int:
    """`batch` rounded up to a multiple of the batch shards."""
    shards = batch_shards(mesh, rules)
    return math.ceil(batch / shards) * shards


def make_feature_fn(config, method, graphdef, mesh, shardings, feature: str = "features", branch: str = "online"):
    """Jitted (params, ema, stats, uint8 images (N, H, W, 3)) -> encoder `feature` (N, D) float32 (the
    encoder's "features" = mean patch token, or "class_token"), sharded like the batch. Images of another size
    are resized (bicubic) to the model's."""
    size = config.model.image_size

    def features(params, ema_params, batch_stats, images):
        model = nnx.merge(graphdef, method.merge_params(params, ema_params), batch_stats)
        encoder = method.encoder(model, branch)
        images = normalize(images)
        if images.shape[1] != size:
            images = jax.image.resize(images, (images.shape[0], size, size, 3), "bicubic")
        return getattr(encoder, feature)(images).astype(jnp.float32)

    rules = config.mesh.logical_axis_rules
    return jit_in_mesh(features, mesh, rules, out_shardings=batch_sharding(mesh, rules, 2),
                       in_shardings=(shardings.params, shardings.ema_params, shardings.batch_stats,
                                     batch_sharding(mesh, rules, 4)))


def batch_features(feature_fn, state, host_batches, batch: int, mesh, rules):
    """Host batches ({"images", "labels", "valid"} over this process's rows of `batch`-row global batches) ->
    device arrays (features (M, D), labels (M,), valid (M,)), sharded along M like a batch; nothing gathered."""
    feats, labels, valid = [], [], []
    for host in host_batches:
        arrays = global_batch(host, mesh, rules, batch)
        feats.append(feature_fn(state.params, state.ema_params, state.batch_stats, arrays["images"]))
        labels.append(arrays["labels"])
        valid.append(arrays["valid"])
    return concatenate_rows(mesh, rules, feats, labels, valid)


def extract_array_features(feature_fn, state, images: np.ndarray, labels: np.ndarray, batch: int, mesh, rules,
                           desc: str = "features"):
    """batch_features of host images (N, H, W, 3) (the same array on every process) in padded batches
    (M >= N rows, the padding valid=False)."""
    batch = padded_batch_size(batch, mesh, rules)
    rows = local_rows(mesh, rules, batch)

    def host_batches():
        for start in progress(range(0, len(images), batch), desc, math.ceil(len(images) / batch)):
            chunk = images[start:start + batch]
            pad = batch - len(chunk)
            host = {"images": np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)]),
                    "labels": np.concatenate([labels[start:start + batch], np.zeros(pad, np.int32)]).astype(np.int32),
                    "valid": np.arange(batch) < len(chunk)}
            yield {k: v[rows] for k, v in host.items()}

    return batch_features(feature_fn, state, host_batches(), batch, mesh, rules)


def concatenate_rows(mesh, rules, *lists):
    """Lists of row-sharded device arrays -> one row-sharded array per list (on device)."""
    shardings = tuple(batch_sharding(mesh, rules, x[0].ndim) for x in lists)
    return jax.jit(lambda *ls: tuple(jnp.concatenate(x) for x in ls), out_shardings=shardings)(*lists)


def knn_sets(config: ml_collections.ConfigDict, source):
    """(bank images, bank labels, query images, query labels) for the k-NN monitor, or None without labels.

    Built-in source: the first knn.num_bank training images, and knn.num_query freshly generated held-out images.
    Other sources: two disjoint random subsets of the (labelled) training source, each image resized (shorter
    side to image_size * 256/224, bicubic) and centre-cropped to image_size, as the official evaluations do;
    undecodable images are left out.
    """
    if isinstance(source, ArraySource) and source.name == "builtin":
        bank_n = min(config.knn.num_bank, len(source))
        queries, query_labels = make_builtin_images(config.seed, config.knn.num_query, config.data.raw_size,
                                                    config.data.num_classes, offset=len(source))
        return source.images[:bank_n], source.labels[:bank_n], queries, query_labels
    if source.label(0) is None:
        log.warning("k-NN monitor off: %s has no labels", config.data.source)
        return None
    total = min(config.knn.num_bank + config.knn.num_query, len(source))
    chosen = np.random.default_rng([config.seed, 1]).choice(len(source), total, replace=False)
    images, labels = [], []
    for index in progress(chosen, "k-NN images"):
        try:
            images.append(eval_view(load_rgb(source.read(int(index))), config.model.image_size))
            labels.append(source.label(int(index)))
        except BadImageError as e:
            log.warning("k-NN monitor: skipping %s: %s", source.describe(int(index)), e)
    images, labels = np.stack(images), np.asarray(labels, np.int32)
    bank_n = len(images) * config.knn.num_bank // total
    return images[:bank_n], labels[:bank_n], images[bank_n:], labels[bank_n:]


class KnnEvaluator:
    """k-NN top-1 ("knn_top1") of the encoder feature: bank = labelled training images, queries = held-out."""

    name = "knn"

    def __init__(self, config, method, graphdef, mesh, shardings, source):
        self.config, self.mesh = config, mesh
        self.rules = config.mesh.logical_axis_rules
        self.sets = knn_sets(config, source)
        if self.sets is None:
            return
        self.feature_fn = make_feature_fn(config, method, graphdef, mesh, shardings)
        bank_labels, query_labels = self.sets[1], self.sets[3]
        self.num_classes = int(max(bank_labels.max(), query_labels.max())) + 1
        if config.knn.k > len(bank_labels):
            log.warning("k-NN monitor: config.knn.k=%d exceeds the %d bank images; every query votes with all of "
                        "them", config.knn.k, len(bank_labels))

    @property
    def enabled(self) -> bool:
        return self.sets is not None

    def run(self, state) -> dict:
        bank_images, bank_labels, query_images, query_labels = self.sets
        kw = dict(batch=self.config.knn.batch_size, mesh=self.mesh, rules=self.rules)
        bank = extract_array_features(self.feature_fn, state, bank_images, bank_labels, desc="k-NN bank", **kw)
        queries = extract_array_features(self.feature_fn, state, query_images, query_labels, desc="k-NN queries",
                                         **kw)
        axes = batch_sharding(self.mesh, self.rules, 1).spec[0] or ()
        top1 = knn_top1(*bank, *queries, k=self.config.knn.k, temperature=self.config.knn.temperature,
                        num_classes=self.num_classes, mesh=self.mesh,
                        batch_axes=(axes,) if isinstance(axes, str) else tuple(axes))
        return {"knn_top1": top1}


def with_best_top1(figures: dict, records: list[dict]) -> dict:
    """figures plus "val_top1_best" (the best val_top1 of the earlier `records` and of figures: what the official
    scripts report) when figures has "val_top1"; else figures unchanged."""
    if "val_top1" not in figures:
        return figures
    earlier = [r["val_top1"] for r in records if "val_top1" in r]
    return {**figures, "val_top1_best": max(earlier + [figures["val_top1"]])}


class ValidationEvaluator:
    """Top-1 and top-5 ("val_top1", "val_top5") of the method's classifier on the validation split."""

    name = "validation"

    def __init__(self, config, method, graphdef, mesh, shardings, source):
        rules = config.mesh.logical_axis_rules
        self.mesh, self.rules = mesh, rules
        self.batch = padded_batch_size(config.classifier.eval_batch_size, mesh, rules)
        val = open_source(config.data, config.seed, "validation")
        self.batches = LabelledBatches(val, self.batch, config.model.image_size, config.seed, train=False,
                                       rows=local_rows(mesh, rules, self.batch),
                                       owned=owned_rows_mask(mesh, rules, self.batch), num_threads=config.data.threads)
        self.enabled = True

        def counts(params, batch_stats, batch):
            model = nnx.merge(graphdef, params, batch_stats)
            logits = method.logits(model, normalize(batch["images"]))
            top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
            hit = top5 == batch["labels"][:, None]
            valid = batch["valid"]
            return jnp.stack([jnp.sum(valid & hit[:, 0]), jnp.sum(valid & hit.any(-1)), jnp.sum(valid)])

        spec = method.batch_spec(self.batch)
        self.counts = jit_in_mesh(counts, mesh, rules, out_shardings=replicated(mesh),
                                  in_shardings=(shardings.params, shardings.batch_stats,
                                                {k: batch_sharding(mesh, rules, len(s)) for k, (s, _) in spec.items()}))

    def run(self, state) -> dict:
        total = np.zeros(3, np.int64)
        for batch, _ in progress(self.batches.iterate(0), "validation", self.batches.num_steps):
            arrays = global_batch(batch, self.mesh, self.rules, self.batch)
            total += np.asarray(jax.device_get(self.counts(state.params, state.batch_stats, arrays)), np.int64)
        n = max(int(total[2]), 1)
        return {"val_top1": total[0] / n, "val_top5": total[1] / n}


EVALUATORS = {e.name: e for e in (KnnEvaluator, ValidationEvaluator)}


def build_evaluators(config, method, graphdef, mesh, shardings, source) -> list:
    """The enabled evaluators of config.evals (none when config.eval_every_steps <= 0)."""
    if config.eval_every_steps <= 0:
        return []
    unknown = [name for name in config.evals if name not in EVALUATORS]
    if unknown:
        raise ConfigError(f"config.evals={tuple(config.evals)}: unknown {unknown}; choose from {sorted(EVALUATORS)}")
    built = [EVALUATORS[name](config, method, graphdef, mesh, shardings, source) for name in config.evals]
    return [e for e in built if e.enabled]
