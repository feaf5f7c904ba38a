"""Random-access image sources, chosen by `config.data.source` (see base.py): importing this package registers
every kind (builtin, imagefolder, tfds) with open_source."""

from siim_jax.data.sources.base import (OPENERS, SPLITS, ArraySource, BadImageError, SourceError, SubsetSource,
                                        listing_fingerprint, open_source, register_source)
from siim_jax.data.sources.builtin import make_builtin_images
from siim_jax.data.sources.decode import check_image_size, decode_rgb, load_rgb, open_image, to_rgb
from siim_jax.data.sources.imagefolder import IMAGE_EXTENSIONS, ImageFolderSource, class_folders
from siim_jax.data.sources.tfds import TfdsSource

__all__ = ["IMAGE_EXTENSIONS", "OPENERS", "SPLITS", "ArraySource", "BadImageError", "ImageFolderSource",
           "SourceError", "SubsetSource", "TfdsSource", "check_image_size", "class_folders", "decode_rgb",
           "listing_fingerprint", "load_rgb", "make_builtin_images", "open_image", "open_source", "register_source", "to_rgb"]
