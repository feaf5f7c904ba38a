"""siim_jax: Siamese Image Modeling (SiameseIM, CVPR 2023) in JAX / Flax NNX."""

import os as _os

__version__ = "0.1.0"

# object stores (siim_jax/storage.py): etils epath (Orbax, TFDS) on gcsfs, not tf.io.gfile, which ignores the
# emulator variables; no gRPC bucket-type probe against an emulator
_os.environ.setdefault("EPATH_USE_TF", "false")
if _os.environ.get("STORAGE_EMULATOR_HOST"):
    _os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
try:  # gcsfs keeps folder listings forever by default; Orbax lists steps that other clients (TensorStore, other
    # processes, a move) changed since, so listings are always read afresh
    import fsspec.config as _fsspec_config
    _fsspec_config.conf.setdefault("gs", {}).setdefault("use_listings_cache", False)
except ImportError:
    pass
