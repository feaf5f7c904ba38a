"""siim_jax: Siamese Image Modeling (SiameseIM, CVPR 2023) in JAX / Flax NNX."""

__version__ = "0.1.0"
