"""Training methods by name (config.model.loss_type). get_method(config) is called once per run, at the entry
points (the trainer's train_and_evaluate, the commands); the method object it returns travels from there to
the train state, the step, the evaluators, export and the FLOP count."""

import ml_collections

from siim_jax.config import ConfigError
from siim_jax.methods.base import Method
from siim_jax.methods.classification import FinetuneMethod, LinearProbeMethod
from siim_jax.methods.pretraining import MAEMethod, SiameseMethod

METHODS: dict[str, type[Method]] = {m.name: m for m in (SiameseMethod, MAEMethod, LinearProbeMethod,
                                                        FinetuneMethod)}


def get_method(config: ml_collections.ConfigDict) -> Method:
    """The method config.model.loss_type names, bound to `config`; ConfigError for a config it cannot take
    (call config.validate(config) first for the generic checks)."""
    name = config.model.loss_type
    if name not in METHODS:
        raise ConfigError(f"config.model.loss_type={name!r}: the method; choose one of {sorted(METHODS)}")
    return METHODS[name](config)
