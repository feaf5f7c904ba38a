"""The SiameseIM pretraining loss for given weights and a given, already augmented batch: no randomness, so it
can be compared with a PyTorch implementation on identical inputs."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from siim_jax.interop.keys import TO_TORCH, state_layout
from siim_jax.methods.pretraining import SiameseMethod
from siim_jax.models.variants import VIT_VARIANTS
from siim_jax.parallel.sharding import create_mesh, jit_in_mesh, replicated
from siim_jax.train.state import TrainState, abstract_model


def pretraining_loss(method: SiameseMethod, state: TrainState, batch: dict, with_grads: bool = False,
                     mesh=None) -> dict:
    """SiameseIM loss (SPEC section 3) of `state`'s weights on `batch`, deterministically.

    method: the SiameseIM method (get_method(config)) whose train state `state` is.
    state: a TrainState (e.g. from init_train_state, import_state_dict or load_workdir_state); its online
      params, its target (EMA) params as they are (no EMA update) and its BatchNorm statistics are used.
    batch: view1, view2 (N, S, S, 3) float32, already augmented and normalised (NHWC, S = image size);
      geometry (N, 6) float32 [di, dj, dh, dw, rflip, dj_flip]; mask (N, g*g) bool, True = masked, exactly
      config.data.num_masked per row.
    Returns {"loss": float, "batch_stats": the BatchNorm running statistics after this forward (train mode,
    PyTorch momentum 0.1)} and, with `with_grads`, "grads": {PyTorch key: gradient} of the trainable online
    weights under the official key names (patch embedding and position tables are frozen and left out).
    Runs on `mesh` (default: one device); BatchNorm and the loss use the whole batch either way.
    """
    config = method.config
    if not isinstance(method, SiameseMethod):
        raise ValueError(f"pretraining_loss computes the SiameseIM loss; config.model.loss_type is "
                         f"{config.model.loss_type!r}")
    inputs = _validated_batch(config, batch)
    mesh = mesh or create_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    graphdef, _, _ = abstract_model(method)
    loss_fn = method.make_augmented_loss_fn(graphdef)
    if with_grads:
        loss_fn = jax.value_and_grad(loss_fn, has_aux=True)
    params, ema, stats = jax.device_get((state.params, state.ema_params, state.batch_stats))
    run = jit_in_mesh(loss_fn, mesh, config.mesh.logical_axis_rules, in_shardings=replicated(mesh),
                      out_shardings=replicated(mesh))
    out = jax.device_get(run(params, ema, stats, inputs))
    (loss, new_stats), grads = out if with_grads else (out, None)
    result = {"loss": float(loss), "batch_stats": new_stats}
    if with_grads:
        labels = method.trainable_labels(grads)
        layout = state_layout(method, state.replace(params=grads), "full")
        result["grads"] = {}
        for spec in layout.specs:
            collection, path = spec.locations[0]
            if collection != "params":
                continue
            label, grad = labels, grads
            for k in path:
                label, grad = label[k], grad[k]
            if label == "train":
                result["grads"][spec.key] = np.asarray(TO_TORCH[spec.layout](np.asarray(grad)))
    return result


def _validated_batch(config: ml_collections.ConfigDict, batch: dict) -> dict:
    """The batch as float32 / bool NumPy arrays, or a ValueError naming the bad entry."""
    size = config.model.image_size
    grid = size // VIT_VARIANTS[config.model.variant][3]
    required = {"view1", "view2", "geometry", "mask"}
    if set(batch) != required:
        raise ValueError(f"batch needs exactly the entries {sorted(required)}, got {sorted(batch)}")
    out = {k: np.asarray(v) for k, v in batch.items()}
    n = out["view1"].shape[0] if out["view1"].ndim else 0
    expected = {"view1": (n, size, size, 3), "view2": (n, size, size, 3), "geometry": (n, 6), "mask": (n, grid ** 2)}
    for key, shape in expected.items():
        if out[key].shape != shape:
            raise ValueError(f"batch[{key!r}] has shape {out[key].shape}, expected {shape} (NHWC views of "
                             f"{size}px, {grid}x{grid} patches)")
    for key in ("view1", "view2", "geometry"):
        if not np.issubdtype(out[key].dtype, np.floating):
            raise ValueError(f"batch[{key!r}] has dtype {out[key].dtype}: pass float32 (views normalised with the "
                             "ImageNet mean and std, see siim_jax.data.photometric.normalize)")
        out[key] = out[key].astype(np.float32)
    if out["mask"].dtype != bool:
        raise ValueError(f"batch['mask'] has dtype {out['mask'].dtype}: pass bool, True = masked")
    counts = out["mask"].sum(axis=1)
    if not np.all(counts == config.data.num_masked):
        raise ValueError(f"every mask row must mask exactly config.data.num_masked={config.data.num_masked} "
                         f"patches; rows mask {sorted(set(counts.tolist()))}")
    return {k: jnp.asarray(v) for k, v in out.items()}
