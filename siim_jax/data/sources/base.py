"""Random-access image sources for the two-view pipeline, chosen by `config.data.source`.

A source is a sequence of examples: `len(source)`, `source.read(i)` (encoded file bytes, or a decoded uint8
(H, W, 3) array), `source.describe(i)` (a file path or record id for skip reports) and `source.label(i)`
(the int class id, or None for unlabelled data; used by the k-NN monitor and the evaluations) and, where known,
`source.num_classes`. `open_source(..., split="validation")` opens the held-out labelled split of the same
source (see open_source). Spellings of `config.data.source`:

- `builtin`: the procedural grey-level images of `siim_jax.data.builtin` (`config.data.num_train` of them);
- `imagefolder:<root>`: `<root>/<config.data.split>/<class>/<image>`, the layout the official code reads
  (classes are the sorted sub-folder names; files with other extensions are ignored and counted);
- `tfds:<name>`: a TFDS dataset prepared under `config.data.tfds_data_dir` (see `siim_jax.data.tfds_source`).
"""

import io
import logging
import os
import time

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

# torchvision's ImageFolder extensions (what the official code accepts), compared case-insensitively
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class SourceError(ValueError):
    """A data source that cannot be opened; the message names the bad value and the fix."""


class BadImageError(ValueError):
    """One example that cannot be decoded (truncated, corrupt, unsupported); the pipeline skips and counts it."""


def check_image_size(image: Image.Image) -> None:
    """Raises BadImageError if `image` (header read, pixels not yet) has more than PIL's `Image.MAX_IMAGE_PIXELS`
    pixels (a decompression bomb: PIL itself only warns below twice that limit and would decode it)."""
    limit = Image.MAX_IMAGE_PIXELS
    width, height = image.size
    if limit is not None and width * height > limit:
        raise BadImageError(f"image of {width}x{height} = {width * height} pixels exceeds the limit of {limit} "
                            "pixels (PIL.Image.MAX_IMAGE_PIXELS; a possible decompression bomb)")


def open_image(data) -> Image.Image:
    """Encoded bytes or a uint8 (H, W, 3) array -> a lazily decoded PIL image (header read, pixels not yet).

    Raises BadImageError for anything PIL cannot identify, and for images of more than `Image.MAX_IMAGE_PIXELS`
    pixels (see check_image_size).
    """
    if isinstance(data, np.ndarray):
        return Image.fromarray(data)
    try:
        # PIL warns (DecompressionBombWarning, once per call site under the default filters) inside Image.open
        # for images between the limit and twice the limit, and raises above; the explicit check below refuses
        # both. No warnings.catch_warnings here: it changes process-wide state and images decode in threads.
        image = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError as e:
        raise BadImageError(f"not a readable image ({len(data)} bytes: empty, corrupt or an unknown format)") from e
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadImageError(f"cannot read the image header: {e}") from e
    check_image_size(image)
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Decodes `image` into 8-bit RGB (greyscale, palette, CMYK, 16-bit and alpha images included; alpha is
    dropped, as PIL's convert('RGB') in the official loader does). Raises BadImageError on truncated or corrupt
    pixel data, and for file-backed images of more than `Image.MAX_IMAGE_PIXELS` pixels."""
    if image.format is not None:  # opened from encoded data (Image.fromarray images have no format)
        check_image_size(image)
    try:
        image.load()
        if image.mode == "RGB":
            return image
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit greyscale: scale to 8 bits
            array = np.asarray(image, dtype=np.float64)
            peak = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
            image = Image.fromarray(np.clip(array * (255.0 / peak), 0, 255).astype(np.uint8))
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadImageError(f"cannot decode the pixels (truncated or corrupt?): {e}") from e


def load_rgb(data) -> Image.Image:
    """Encoded bytes or a uint8 (H, W, 3) array -> a decoded 8-bit RGB PIL image. Raises BadImageError."""
    return to_rgb(open_image(data))


def decode_rgb(data) -> np.ndarray:
    """Encoded bytes or a uint8 array -> uint8 (H, W, 3). Raises BadImageError."""
    return np.asarray(load_rgb(data))


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


def _list_directory(directory: str) -> list:
    """os.scandir entries of `directory`; SourceError (naming it and the fix) if it cannot be listed."""
    try:
        with os.scandir(directory) as entries:
            return list(entries)
    except OSError as e:
        raise SourceError(f"imagefolder: cannot list the folder {directory!r} ({e.strerror or e}); fix its "
                          "permissions (it must be readable and searchable) or remove it") from None


def _entry_is(entry, kind: str) -> bool:
    """entry.is_dir() / entry.is_file() (following symbolic links); SourceError for a symbolic-link loop or an
    entry whose type cannot be read."""
    try:
        return entry.is_dir() if kind == "dir" else entry.is_file()
    except OSError as e:
        raise SourceError(f"imagefolder: cannot follow {entry.path!r} ({e.strerror or e}; a symbolic link loop?); "
                          "remove it or point it at a real folder or file") from None


def class_folders(directory: str) -> list[str]:
    """Sorted names of the sub-folders of `directory` (an image folder's classes). Raises SourceError."""
    return sorted(e.name for e in _list_directory(directory) if _entry_is(e, "dir"))


class ImageFolderSource:
    """Files `<root>/<split>/<class>/<image>` in sorted (class, file name) order; labels are class indices.

    `classes` (sorted class names) fixes the class-index mapping, e.g. a validation split labelled with the
    training split's classes: a class folder not in it is a SourceError. Default: the split's own sub-folders.
    """

    def __init__(self, root: str, split: str = "train", classes: list[str] | None = None):
        directory = os.path.join(root, split)
        if not os.path.isdir(directory):
            raise SourceError(f"imagefolder: {directory!r} is not a directory; expected the layout "
                              f"<root>/{split}/<class>/<image> (set config.data.split to change '{split}')")
        start = time.perf_counter()
        found = class_folders(directory)
        self.classes = found if classes is None else list(classes)
        class_index = {name: label for label, name in enumerate(self.classes)}
        unknown = [name for name in found if name not in class_index]
        if unknown:
            shown = ", ".join(repr(name) for name in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
            raise SourceError(f"imagefolder: {directory!r} has {len(unknown)} class folder(s) that the training "
                              f"split lacks ({shown}); its classes must be among the {len(self.classes)} "
                              "training class folders")
        self.num_classes = len(self.classes)
        paths, labels, ignored = [], [], 0
        for name in found:
            label = class_index[name]
            entries = _list_directory(os.path.join(directory, name))
            for entry in sorted(entries, key=lambda e: e.name):
                if _entry_is(entry, "file") and entry.name.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(entry.path)
                    labels.append(label)
                else:
                    ignored += 1
        if not paths:
            raise SourceError(f"imagefolder: no images under {directory!r} (expected <class>/<image> files "
                              f"with one of the extensions {', '.join(IMAGE_EXTENSIONS)})")
        self.paths = paths
        self.labels = np.asarray(labels, np.int32)
        self.name = f"imagefolder:{root}"
        log.info("imagefolder %s: %d images in %d classes (%d other entries ignored), listed in %.1f s",
                 directory, len(paths), len(self.classes), ignored, time.perf_counter() - start)

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, index: int) -> bytes:
        try:
            with open(self.paths[index], "rb") as f:
                return f.read()
        except OSError as e:
            raise BadImageError(f"cannot read file: {e}") from e

    def describe(self, index: int) -> str:
        return self.paths[index]

    def label(self, index: int) -> int:
        return int(self.labels[index])


SPLITS = ("train", "validation")
IMAGEFOLDER_VALIDATION = "val"  # the official code's <root>/val
TFDS_VALIDATION = "validation"  # ImageNet's name in TFDS
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
    if spec == "builtin":
        from siim_jax.data.builtin import make_builtin_images
        if split == "train":
            log.info("generating %d built-in images", data_config.num_train)
            images, labels = make_builtin_images(seed, data_config.num_train, data_config.raw_size,
                                                 data_config.num_classes)
            return ArraySource(images, labels, "builtin", num_classes=data_config.num_classes)
        num_val = data_config.num_val
        log.info("generating %d held-out built-in images", num_val)
        images, labels = make_builtin_images(seed, num_val, data_config.raw_size, data_config.num_classes,
                                             offset=data_config.num_train)
        return ArraySource(images, labels, "builtin:validation", num_classes=data_config.num_classes)
    kind, _, location = spec.partition(":")
    if kind == "imagefolder" and location:
        root = os.path.expanduser(location)
        if split == "train":
            return ImageFolderSource(root, data_config.split)
        return _imagefolder_validation(root, data_config.split)
    if kind == "tfds" and location:
        from siim_jax.data.tfds_source import TfdsSource
        if split == "train":
            return TfdsSource(location, data_config.split, data_config.tfds_data_dir)
        return TfdsSource(location, TFDS_VALIDATION, data_config.tfds_data_dir,
                          missing_split=f"no validation split (looked for the TFDS split {TFDS_VALIDATION!r})")
    raise SourceError(f"config.data.source={spec!r}: use 'builtin', 'imagefolder:<root>' or 'tfds:<name>'")


def _imagefolder_validation(root: str, train_split: str) -> ImageFolderSource:
    """`<root>/val/` labelled with the class indices of `<root>/<train_split>/`. Raises SourceError."""
    directory = os.path.join(root, IMAGEFOLDER_VALIDATION)
    if not os.path.isdir(directory):
        raise SourceError(f"imagefolder: no validation split: {directory!r} is not a directory (looked for "
                          f"<root>/{IMAGEFOLDER_VALIDATION}/<class>/<image>, the layout of the official code)")
    train_directory = os.path.join(root, train_split)
    if not os.path.isdir(train_directory):
        raise SourceError(f"imagefolder: {train_directory!r} is not a directory; the validation split takes its "
                          f"class indices from the training split <root>/{train_split}/<class>/")
    return ImageFolderSource(root, IMAGEFOLDER_VALIDATION, classes=class_folders(train_directory))
