"""MSN's 1% few-shot protocol (SPEC section 5), the logic of `python -m siim_jax.fewshot`: the class token of
the last block (config.fewshot.feature), computed in float32 whatever config.model.dtype, of the training subset
and of the validation split (bilinear resize 256 + centre crop, no augmentation), each feature vector centred on
its own mean and L2-normalised on its own (cyanure's row preprocessing; nothing shared between samples or
splits), then multinomial logistic regression with L2 penalty lambda / n_train solved on device (L-BFGS,
siim_jax/eval/logistic.py).
"""

import json
import logging
import time

from siim_jax import storage

log = logging.getLogger("siim_jax.fewshot")
EVAL_RESAMPLE = "bilinear"  # official main_logistic.py: torchvision's default Resize(256)
FEATURE_DTYPE = "float32"  # official: the encoder runs in float32 (no autocast) for the features


def encoder_features(config, feature_fn, state, source, mesh):
    """feature_fn's features of every image of `source` (eval crop), on device: (features (M, D), labels (M,),
    valid (M,)) sharded along M (M >= len(source): padded; undecodable images are valid=False)."""
    from siim_jax.data.classification import LabelledBatches
    from siim_jax.parallel.sharding import local_rows, owned_rows_mask
    from siim_jax.train.evaluators import batch_features, padded_batch_size, progress

    rules = config.mesh.logical_axis_rules
    batch = padded_batch_size(config.fewshot.batch_size, mesh, rules)
    batches = LabelledBatches(source, batch, config.model.image_size, config.seed, train=False,
                              rows=local_rows(mesh, rules, batch), owned=owned_rows_mask(mesh, rules, batch),
                              num_threads=config.data.threads, eval_resample=EVAL_RESAMPLE)

    def host_batches():
        for host, skipped in progress(batches.iterate(0), "features", batches.num_steps):
            for what in skipped:
                log.warning("few-shot: skipping undecodable %s", what)
            yield host

    return batch_features(feature_fn, state, host_batches(), batch, mesh, rules)


def evaluate_few_shot(config, workdir: str, pretrained: str, branch: str) -> dict:
    """Runs the protocol; returns the summary dict (also appended to <workdir>/metrics.jsonl)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from siim_jax.config import ConfigError, validate
    from siim_jax.data.sources import SubsetSource, open_source
    from siim_jax.eval.logistic import centre_and_normalise_rows, few_shot_subset, fit_logistic_regression
    from siim_jax.eval.pretrained import (NO_PRETRAINING, pretrained_encoder, record_pretrained,
                                          with_pretrained_encoder)
    from siim_jax.methods import get_method
    from jax.sharding import NamedSharding, PartitionSpec

    from siim_jax.parallel.distributed import to_host
    from siim_jax.parallel.sharding import create_mesh
    from siim_jax.train.evaluators import make_feature_fn
    from siim_jax.train.state import init_train_state
    from siim_jax.train.workdir_lock import WorkdirLock

    validate(config)
    if config.model.dtype != FEATURE_DTYPE:
        print(f"few-shot: the encoder runs in {FEATURE_DTYPE} (config.model.dtype={config.model.dtype!r} ignored), "
              "as the official protocol does", flush=True)
        config = config.copy_and_resolve_references()
        config.model.dtype = FEATURE_DTYPE
    method = get_method(config)
    f = config.fewshot
    if (f.per_class > 0) == bool(f.subset_file):
        raise ConfigError(f"set exactly one of config.fewshot.per_class (now {f.per_class}) and "
                          f"config.fewshot.subset_file (now {f.subset_file!r})")
    workdir = storage.absolute(workdir)
    storage.makedirs(workdir)
    with storage.object_store_errors(workdir), WorkdirLock(workdir, enabled=jax.process_index() == 0):
        started = time.perf_counter()
        mesh = create_mesh(config.mesh)
        graphdef, _, state, shardings = init_train_state(method, mesh, lambda step: 0.0)
        if pretrained != NO_PRETRAINING:
            state_dict, origin = pretrained_encoder(pretrained, branch)
            print(f"pretrained encoder: {origin}, {len(state_dict)} arrays", flush=True)
            state = with_pretrained_encoder(state_dict)(method, state)
        else:
            print("pretrained encoder: none (random initialisation, a baseline)", flush=True)
        record_pretrained(workdir, pretrained, branch)

        train = open_source(config.data, config.seed)
        labels = np.asarray([train.label(i) for i in range(len(train))])
        if f.per_class > 0:
            chosen = few_shot_subset(labels, per_class=f.per_class, seed=config.seed)
        else:
            chosen = few_shot_subset(labels, index_file=f.subset_file,
                                     names=[train.describe(i) for i in range(len(train))])
        feature = {"class_token": "class_token", "mean_patch": "features"}.get(f.feature)
        if feature is None:
            raise ConfigError(f"config.fewshot.feature={f.feature!r}: choose class_token or mean_patch")
        feature_fn = make_feature_fn(config, method, graphdef, mesh, shardings, feature=feature, branch="online")
        train_feats, train_labels, train_valid = encoder_features(config, feature_fn, state,
                                                                  SubsetSource(train, chosen), mesh)
        # the subset is small (1% of the data): gathered to every process, which all fit the same weights
        keep = np.flatnonzero(to_host(train_valid))
        x_train = jnp.asarray(to_host(train_feats))[keep]
        y_train = jnp.asarray(to_host(train_labels))[keep]
        val_feats, val_labels, val_valid = encoder_features(
            config, feature_fn, state, open_source(config.data, config.seed, "validation"), mesh)
        x_train, x_val = centre_and_normalise_rows(x_train), centre_and_normalise_rows(val_feats)
        n = len(keep)
        weights, info = fit_logistic_regression(x_train, y_train, config.classifier.num_classes, f.l2 / n,
                                                max_iter=f.max_iter, return_info=True)
        weights = jax.device_put(np.asarray(weights), NamedSharding(mesh, PartitionSpec()))  # on every device
        correct = jax.jit(lambda x, y, v, w: jnp.stack([jnp.sum(v & (jnp.argmax(x @ w, -1) == y)), jnp.sum(v)]))(
            x_val, val_labels, val_valid, weights)
        hits, total = (int(c) for c in to_host(correct))
        summary = {"top1": hits / max(total, 1), "n_train": n, "n_val": total, "l2": f.l2, "feature": f.feature,
                   "iterations": info["iterations"], "grad_norm": info["grad_norm"],
                   "seconds": time.perf_counter() - started, "workdir": workdir,
                   "interrupted": False}
        if jax.process_index() == 0:
            storage.append_text(storage.join(workdir, "metrics.jsonl"), json.dumps(
                {"step": 0, "fewshot_top1": summary["top1"], "n_train": n, "n_val": total,
                 "iterations": info["iterations"]}) + "\n")
            from tensorboardX import SummaryWriter
            with SummaryWriter(storage.join(workdir, "tensorboard")) as board:
                board.add_scalar("fewshot_top1", summary["top1"], 0)
    return summary


def summary_line(s: dict) -> str:
    return (f"done: few-shot logistic regression on the {s['feature']} features of {s['n_train']} training images "
            f"(lambda {s['l2']} / n_train, "
            f"{s['iterations']} L-BFGS iterations), {s['n_val']} validation images, top1: {s['top1']:.4f}, "
            f"workdir {s['workdir']}")

