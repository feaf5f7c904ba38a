"""Training methods by name (config.model.loss_type): get_method(config) is what the trainer, the state, the
checkpoint, export and evaluation ask about the model, its parameters, its loss and its features."""

import ml_collections

from siim_jax.methods.base import Method
from siim_jax.methods.classification import FinetuneMethod, LinearProbeMethod
from siim_jax.methods.pretraining import MAEMethod, SiameseMethod

METHODS: dict[str, type[Method]] = {m.name: m for m in (SiameseMethod, MAEMethod, LinearProbeMethod,
                                                        FinetuneMethod)}


def get_method(config: ml_collections.ConfigDict) -> Method:
    """The method config.model.loss_type names, bound to `config`."""
    name = config.model.loss_type
    if name not in METHODS:
        raise ValueError(f"config.model.loss_type={name!r}: choose one of {sorted(METHODS)}")
    return METHODS[name](config)
