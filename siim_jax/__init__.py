"""siim_jax: Siamese Image Modeling (SiameseIM, CVPR 2023) in JAX / Flax NNX."""

import flax

# Logical-axis annotations on parameters are resolved to mesh shardings by siim_jax.parallel, explicitly;
# Flax must not try to shard variables eagerly at creation.
flax.config.update("flax_always_shard_variable", False)

__version__ = "0.1.0"
