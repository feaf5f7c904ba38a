"""Reading and writing PyTorch state dicts without executing code from the file.

`.safetensors` needs no torch (safetensors.numpy); `.pth` / `.pt` / `.bin` needs torch and is read with
`torch.load(..., weights_only=True)`, which refuses arbitrary pickled objects. Every array comes back as NumPy:
floating arrays as float32, integer arrays only where the key allows it (BatchNorm `num_batches_tracked`).
Files may be on gs:// (siim_jax.storage): read from a downloaded temporary copy, written to a local temporary
file that is then uploaded.
"""

import argparse
import logging
import os

import numpy as np

from siim_jax import storage
from siim_jax.cli import RunError

SAFETENSORS_SUFFIX = ".safetensors"
INTEGER_KEY_SUFFIXES = ("num_batches_tracked",)  # the only keys that may hold integers

log = logging.getLogger(__name__)


def _note_conversions(path: str, counts: dict) -> None:
    """One notice per file: how many half-precision arrays were widened to float32."""
    if counts:
        log.warning("%s: converted %s to float32", path,
                    ", ".join(f"{n} {name} array{'s' if n > 1 else ''}" for name, n in sorted(counts.items())))


def _read_safetensors(path: str, local: str) -> dict:
    """key -> NumPy array of the file `path` (a local copy at `local`); bfloat16 / float16 arrays come back as
    float32 (one notice per file). Read with safetensors' flax backend, which (unlike its numpy backend)
    represents bfloat16 (ml_dtypes.bfloat16)."""
    import ml_dtypes
    import safetensors
    out, counts = {}, {}
    with safetensors.safe_open(local, framework="flax") as f:
        for key in f.keys():
            array = np.asarray(f.get_tensor(key))
            if array.dtype in (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)):
                counts[array.dtype.name] = counts.get(array.dtype.name, 0) + 1
                array = array.astype(np.float32)
            out[key] = array
    _note_conversions(path, counts)
    return out


class CheckpointFileError(RunError, ValueError):
    """A file that cannot be read as a state dict, or holds arrays of a kind we refuse."""


def format_of(path: str) -> str:
    return "safetensors" if path.endswith(SAFETENSORS_SUFFIX) else "pth"


def require_torch(purpose: str):
    try:
        import torch
    except ImportError:
        raise CheckpointFileError(
            f"{purpose} needs PyTorch, which is not installed: pip install torch (CPU wheels suffice), or use "
            "the .safetensors format, which needs no torch") from None
    return torch


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """PyTorch key -> NumPy array from a `.safetensors` or torch-pickle file, validated (see module doc).

    Accepts {'model': sd}, {'state_dict': sd} or a bare sd; strips a DistributedDataParallel `module.` prefix.
    """
    if not storage.isfile(path):
        storage.require_bucket(path)  # a missing bucket: ObjectStoreError, saying so
        raise CheckpointFileError(f"checkpoint file {path} does not exist")
    with storage.local_file(path, os.path.splitext(path)[1]) as local:
        if format_of(path) == "safetensors":
            try:
                raw = _read_safetensors(path, local)
            except Exception as error:  # safetensors raises its own error types (bad header, unknown dtype ...)
                raise CheckpointFileError(f"cannot read {path} as safetensors: {error}") from None
        else:
            raw = _read_torch_file(path, local)
    if len(raw) == 1 and next(iter(raw)) in ("model", "state_dict") and isinstance(next(iter(raw.values())), dict):
        raw = next(iter(raw.values()))
    if raw and all(k.startswith("module.") for k in raw):
        raw = {k[len("module."):]: v for k, v in raw.items()}
    return {key: validated_array(key, value, path) for key, value in raw.items()}


def _read_torch_file(path: str, local: str) -> dict:
    torch = require_torch(f"reading {path}")
    try:
        # MAE-style training checkpoints carry the argparse Namespace of their run next to the weights: allow
        # that one plain-data class, nothing else.
        with torch.serialization.safe_globals([argparse.Namespace]):
            loaded = torch.load(local, map_location="cpu", weights_only=True)
    except Exception as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointFileError(
            f"cannot load {path} with torch.load(weights_only=True) ({first_line}); the file holds objects other "
            "than tensors: re-save just the weights, e.g. torch.save({'model': sd}, 'weights.pth') or "
            "safetensors.torch.save_file(sd, 'weights.safetensors')") from None
    if not isinstance(loaded, dict):
        raise CheckpointFileError(f"{path} holds a {type(loaded).__name__}, not a state dict")
    for wrapper in ("model", "state_dict"):
        if wrapper in loaded and isinstance(loaded[wrapper], dict):
            loaded = loaded[wrapper]
            break
    out, counts = {}, {}
    for key, value in loaded.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointFileError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor; pass a "
                                      "file whose state dict holds only tensors")
        value = value.detach().cpu()
        if value.is_floating_point():
            if value.dtype in (torch.float16, torch.bfloat16):
                name = str(value.dtype).removeprefix("torch.")
                counts[name] = counts.get(name, 0) + 1
            value = value.float()  # float16 / bfloat16 -> float32; NumPy has no bfloat16
        out[key] = value.numpy()
    _note_conversions(path, counts)
    return out


def validated_array(key: str, value, path: str) -> np.ndarray:
    """float32 copy of a floating array; int64 for `num_batches_tracked`; anything else is an error."""
    array = np.asarray(value)
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)):
            raise CheckpointFileError(f"{path}: {key!r} holds non-finite values")
        return array.astype(np.float32)
    if np.issubdtype(array.dtype, np.integer) and key.endswith(INTEGER_KEY_SUFFIXES):
        return array.astype(np.int64)
    raise CheckpointFileError(f"{path}: {key!r} has dtype {array.dtype}; weights must be floating point "
                              "(float16/bfloat16/float32/float64)")


def write_state_dict(state_dict: dict[str, np.ndarray], path: str, file_format: str = "pth") -> None:
    """Writes {'model': state_dict} with torch.save (file_format "pth") or a flat safetensors file."""
    arrays = {k: np.asarray(v, order="C") for k, v in state_dict.items()}  # (ascontiguousarray makes 0-d 1-d)
    if file_format not in ("safetensors", "pth"):
        raise ValueError(f"unknown file format {file_format!r}: choose 'pth' or 'safetensors'")
    torch = require_torch("writing a .pth file") if file_format == "pth" else None
    storage.makedirs(storage.parent(path))
    with storage.writable_local_file(path, os.path.splitext(path)[1]) as local:
        if file_format == "safetensors":
            import safetensors.numpy
            safetensors.numpy.save_file(arrays, local, metadata={"format": "pt"})
        else:
            torch.save({"model": {k: torch.from_numpy(v.copy()) for k, v in arrays.items()}}, local)
