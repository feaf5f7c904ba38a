"""Recipes: they load, validate, carry SPEC's official values, lock misspelt keys; model sizes match timm."""

import glob
import importlib.util
import math
import os

import jax
import pytest
from flax import nnx

from siim_jax.config import validate
from siim_jax.train.schedules import peak_learning_rate
from siim_jax.methods import get_method
from siim_jax.train.state import abstract_model

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIGS, name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, module.get_config()


@pytest.mark.parametrize("name", sorted(os.path.basename(p) for p in glob.glob(os.path.join(CONFIGS, "*.py"))))
def test_every_recipe_validates_locks_and_documents_its_command(name):
    module, config = load(name)
    validate(config)
    assert "python -m siim_jax.train --config configs/" + name in module.__doc__
    for key in ("seed", "batch_size", "total_steps", "log_every_steps", "checkpoint_every_steps",
                "eval_every_steps"):
        assert key in config
    with pytest.raises((AttributeError, KeyError), match="batch_sise"):
        config.batch_sise = 3


def test_official_vit_b16_recipe_has_spec_values():
    _, c = load("siamese_vit_b16_1600ep.py")
    assert (c.batch_size, c.epochs, c.warmup_epochs) == (4096, 1600, 40)
    assert (c.optim.blr, c.optim.b1, c.optim.b2, c.optim.weight_decay, c.optim.min_lr, c.optim.clip_norm) == (
        6.25e-5, 0.9, 0.95, 0.05, 0.0, 1.0)
    assert peak_learning_rate(c) == pytest.approx(1e-3)  # 6.25e-5 * 4096 / 256
    assert (c.ema.base_momentum, c.loss.neg_weight) == (0.995, 0.02)
    assert (c.data.num_masked, c.data.crop_min, c.model.image_size) == (118, 0.08, 224)
    assert (c.model.decoder_width, c.model.decoder_heads, c.model.projector_depth, c.model.predictor_depth) == (
        768, 16, 2, 4)
    assert not (c.model.use_proj_ln or c.model.use_pred_ln or c.model.train_patch_embed)


@pytest.mark.parametrize("name, timm_params", [
    # timm vit_{base_patch16,large_patch16,huge_patch14}_224 parameter counts (1000-class head included)
    ("siamese_vit_b16_1600ep.py", 86_567_656),
    ("siamese_vit_l16.py", 304_326_632),
])
def test_encoder_parameter_count_matches_timm(name, timm_params):
    _, c = load(name)
    _, params, _ = abstract_model(c)
    online, ema = get_method(c).split_params(nnx.to_pure_dict(params))
    count = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
    width = {"B": 768, "L": 1024}[c.model.variant]
    grid = c.model.image_size // 16
    # timm adds a 1000-class head and a final LayerNorm; the position table (frozen here) is counted by both
    expected = timm_params - (width * 1000 + 1000) - 2 * width
    assert grid == 14
    assert count(online["online"]["encoder"]) == expected
    assert count(ema["encoder"]) == expected
