"""Training length, learning-rate and EMA-momentum schedules (SPEC section 4), all per optimiser step."""

import dataclasses

import jax.numpy as jnp
import ml_collections

from siim_jax.config import ConfigError


@dataclasses.dataclass(frozen=True)
class TrainingLength:
    total_steps: int
    warmup_steps: int
    steps_per_epoch: int


def training_length(config: ml_collections.ConfigDict, num_train: int) -> TrainingLength:
    """Optimiser steps: epochs * (num_train // batch_size), unless config.total_steps > 0 overrides it; warmup
    is warmup_epochs worth of steps (the same fraction of total_steps when that is set) unless warmup_steps >= 0."""
    steps_per_epoch = num_train // config.batch_size
    if config.total_steps > 0:
        total = config.total_steps
        warmup = round(total * config.warmup_epochs / config.epochs) if config.epochs > 0 else 0
    else:
        if steps_per_epoch == 0:
            raise ConfigError(f"config.batch_size={config.batch_size} exceeds the {num_train} training examples; "
                              "lower it or set config.total_steps")
        total = config.epochs * steps_per_epoch
        warmup = config.warmup_epochs * steps_per_epoch
    if config.warmup_steps >= 0:
        warmup = config.warmup_steps
    if not 0 <= warmup < total:
        raise ConfigError(f"warmup of {warmup} steps must be shorter than the {total} training steps; "
                          "adjust config.warmup_epochs or config.warmup_steps")
    return TrainingLength(total, warmup, max(steps_per_epoch, 1))


def peak_learning_rate(config: ml_collections.ConfigDict) -> float:
    return config.optim.blr * config.batch_size / 256


def learning_rate_fn(config: ml_collections.ConfigDict, length: TrainingLength):
    """step -> lr: linear warmup from 0, then half-cosine to min_lr."""
    peak, floor = peak_learning_rate(config), config.optim.min_lr
    warmup, total = length.warmup_steps, length.total_steps

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak * step / max(warmup, 1)
        progress = jnp.clip((step - warmup) / max(total - warmup, 1), 0.0, 1.0)
        cosine = floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(step < warmup, warm, cosine)

    return schedule


def ema_momentum_fn(config: ml_collections.ConfigDict, length: TrainingLength):
    """step -> m = 1 - (1 - base) * (1 + cos(pi * step / total)) / 2, rising from base to 1."""
    base, total = config.ema.base_momentum, length.total_steps

    def schedule(step):
        progress = jnp.asarray(step, jnp.float32) / total
        return 1.0 - (1.0 - base) * (1.0 + jnp.cos(jnp.pi * progress)) / 2.0

    return schedule
