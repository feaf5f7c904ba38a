"""What a source is, its errors, the sources in memory, and the registry that `config.data.source` picks from.

A source is a sequence of examples: `len(source)`, `source.read(i)` (encoded file bytes, or a decoded uint8
(H, W, 3) array), `source.describe(i)` (a file path or record id for skip reports) and `source.label(i)`
(the int class id, or None for unlabelled data; used by the k-NN monitor and the evaluations) and, where known,
`source.num_classes`. `open_source(..., split="validation")` opens the held-out labelled split of the same
source (see open_source). Spellings of `config.data.source`, each registered by its module:

- `builtin`: the procedural grey-level images of `siim_jax.data.sources.builtin` (`config.data.num_train`);
- `imagefolder:<root>`: `<root>/<config.data.split>/<class>/<image>`, the layout the official code reads
  (classes are the sorted sub-folder names; files with other extensions are ignored and counted;
  `siim_jax.data.sources.imagefolder`);
- `tfds:<name>`: a TFDS dataset prepared under `config.data.tfds_data_dir` (see `siim_jax.data.sources.tfds`).
"""

import hashlib
from typing import Callable

import numpy as np

from siim_jax.cli import RunError

SPLITS = ("train", "validation")

# kind (the part of config.data.source before ":") -> opener(location, data_config, seed, split) -> source
OPENERS: dict[str, Callable] = {}


class SourceError(RunError, ValueError):
    """A data source that cannot be opened; the message names the bad value and the fix."""


class BadImageError(ValueError):
    """One example that cannot be decoded (truncated, corrupt, unsupported); the pipeline skips and counts it."""


def register_source(kind: str):
    """Decorator: `opener(location, data_config, seed, split)` opens the sources `config.data.source` spells
    `<kind>:<location>` (`builtin`: no location)."""
    def register(opener):
        OPENERS[kind] = opener
        return opener
    return register


def listing_fingerprint(source) -> int:
    """What a source lists, as a 63-bit int: its length, each example's description (file path, record id) and,
    for sources that keep them in memory, the labels. Processes of one run must agree on it (the loop checks)."""
    digest = hashlib.sha256(str(len(source)).encode())
    for index in range(len(source)):
        digest.update(source.describe(index).encode() + b"\0")
    labels = getattr(source, "labels", None)
    if labels is not None:
        digest.update(np.asarray(labels, np.int64).tobytes())
    return int.from_bytes(digest.digest()[:8], "little") >> 1


class ArraySource:
    """Decoded images in memory: uint8 (N, H, W, 3), with optional labels int (N,)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | None = None, name: str = "array",
                 num_classes: int | None = None):
        self.images = images
        self.labels = None if labels is None else np.asarray(labels, np.int32)
        self.name = name
        self.num_classes = num_classes

    def label(self, index: int) -> int | None:
        return None if self.labels is None else int(self.labels[index])

    def __len__(self) -> int:
        return len(self.images)

    def read(self, index: int) -> np.ndarray:
        return self.images[index]

    def describe(self, index: int) -> str:
        return f"{self.name}[{index}]"


class SubsetSource:
    """The examples `indices` (int (M,)) of another source, in that order."""

    def __init__(self, source, indices):
        self.source, self.indices = source, np.asarray(indices, np.int64)
        self.num_classes = getattr(source, "num_classes", None)

    def __len__(self) -> int:
        return len(self.indices)

    def read(self, index: int):
        return self.source.read(int(self.indices[index]))

    def label(self, index: int) -> int | None:
        return self.source.label(int(self.indices[index]))

    def describe(self, index: int) -> str:
        return self.source.describe(int(self.indices[index]))


def open_source(data_config, seed: int, split: str = "train"):
    """The source named by `data_config.source` (see the module docstring), its training or validation split.

    split="train": the training data (`config.data.split` of an image folder or TFDS dataset). split="validation":
    held-out labelled images, never training ones: builtin -> `data.num_val` images freshly generated
    after the training ones (make_builtin_images offset=num_train, as the k-NN monitor's queries);
    `imagefolder:<root>` -> `<root>/val/`, labelled with the class indices of `<root>/<config.data.split>/`;
    `tfds:<name>` -> its split "validation". Raises SourceError (one line) when there is no such split.
    """
    if split not in SPLITS:
        raise SourceError(f"open_source: split={split!r}; use one of {', '.join(SPLITS)}")
    spec = data_config.source
    kind, _, location = spec.partition(":")
    if kind in OPENERS and (spec == kind if kind == "builtin" else bool(location)):
        return OPENERS[kind](location, data_config, seed, split)
    raise SourceError(f"config.data.source={spec!r}: use 'builtin', 'imagefolder:<root>' or 'tfds:<name>'")
