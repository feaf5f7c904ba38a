"""`config.data.source = "imagefolder:<root>"`: files `<root>/<split>/<class>/<image>`, the layout the official
code reads; its validation split is `<root>/val/`.

`<root>` must be on a file system. A bucket (`imagefolder:gs://...`) is refused with one line rather than
supported through siim_jax.storage: this source lists every file when it opens (ImageNet: 1.28 M objects, about
1300 listing requests before the first step, on every process) and then opens one object per image. Put the
images in a TFDS array_record dataset on the bucket instead (`data.source=tfds:<name>`,
`data.tfds_data_dir=gs://...`: a few large objects, their record index read once), or mount the bucket with
gcsfuse and name the mount point."""

import logging
import os
import time

import numpy as np

from siim_jax.data.sources.base import BadImageError, SourceError, register_source

log = logging.getLogger(__name__)

# torchvision's ImageFolder extensions (what the official code accepts), compared case-insensitively
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
VALIDATION = "val"  # the official code's <root>/val


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


@register_source("imagefolder")
def open_imagefolder(location: str, data_config, seed: int, split: str) -> ImageFolderSource:
    """`<location>/<config.data.split>/` for training; `<location>/val/` for validation, labelled with the
    training split's class indices."""
    if "://" in location:
        raise SourceError(f"imagefolder:{location}: image folders on an object store are not supported (listing "
                          "and opening one object per image); use a TFDS array_record dataset on the "
                          "bucket (data.source=tfds:<name>, data.tfds_data_dir=gs://...), or mount the bucket with "
                          "gcsfuse and use imagefolder:<mount point>")
    root = os.path.expanduser(location)
    if split == "train":
        return ImageFolderSource(root, data_config.split)
    return _validation(root, data_config.split)


def _validation(root: str, train_split: str) -> ImageFolderSource:
    """`<root>/val/` labelled with the class indices of `<root>/<train_split>/`. Raises SourceError."""
    directory = os.path.join(root, VALIDATION)
    if not os.path.isdir(directory):
        raise SourceError(f"imagefolder: no validation split: {directory!r} is not a directory (looked for "
                          f"<root>/{VALIDATION}/<class>/<image>, the layout of the official code)")
    train_directory = os.path.join(root, train_split)
    if not os.path.isdir(train_directory):
        raise SourceError(f"imagefolder: {train_directory!r} is not a directory; the validation split takes its "
                          f"class indices from the training split <root>/{train_split}/<class>/")
    return ImageFolderSource(root, VALIDATION, classes=class_folders(train_directory))
