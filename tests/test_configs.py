"""Recipes: they load, validate, carry SPEC's official values, lock misspelt keys; model sizes match timm."""

import glob
import importlib.util
import math
import os

import jax
import pytest
from flax import nnx

from siim_jax.config import validate
from siim_jax.methods import get_method
from siim_jax.train.schedules import peak_learning_rate
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
    commands = {"linprobe": "linear_probe", "finetune": "finetune", "fewshot": "fewshot"}
    command = commands.get(name.split("_")[0], "train")
    assert f"python -m siim_jax.{command} --config configs/" + name in module.__doc__
    for key in ("seed", "batch_size", "total_steps", "log_every_steps", "checkpoint_every_steps",
                "eval_every_steps"):
        assert key in config
    with pytest.raises((AttributeError, KeyError), match="batch_sise"):
        config.batch_sise = 3


def test_evaluation_recipes_have_spec_values():
    _, lin = load("linprobe_vit_b16.py")
    assert (lin.model.loss_type, lin.batch_size, lin.epochs, lin.warmup_epochs) == ("linear_probe", 16384, 90, 10)
    assert peak_learning_rate(lin) == pytest.approx(6.4) and lin.optim.weight_decay == 0.0
    assert (lin.classifier.lars_momentum, lin.classifier.trust_coefficient) == (0.9, 0.001)
    _, ft = load("finetune_vit_b16.py")
    assert (ft.model.loss_type, ft.batch_size, ft.epochs, ft.warmup_epochs) == ("finetune", 1024, 100, 5)
    assert (ft.optim.blr, ft.optim.min_lr, ft.optim.weight_decay, ft.optim.b1, ft.optim.b2) == (
        2.5e-4, 1e-6, 0.05, 0.9, 0.999)
    c = ft.classifier
    assert (c.layer_decay, c.drop_path, c.mixup, c.cutmix, c.mixup_switch_prob, c.label_smoothing, c.erase_prob) == (
        0.65, 0.1, 0.8, 1.0, 0.5, 0.1, 0.25)
    assert (c.randaugment_ops, c.randaugment_magnitude, c.randaugment_magnitude_std) == (2, 9, 0.5)
    _, few = load("fewshot_vit_b16.py")
    assert (few.fewshot.l2, few.fewshot.feature) == (0.1, "class_token")
    for name in ("linprobe_vit_h14.py", "finetune_vit_h14.py", "fewshot_vit_h14.py"):
        assert load(name)[1].model.variant == "H"


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
    method = get_method(c)
    _, params, _ = abstract_model(method)
    online, ema = method.split_params(nnx.to_pure_dict(params))
    count = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
    width = {"B": 768, "L": 1024}[c.model.variant]
    grid = c.model.image_size // 16
    # timm adds a 1000-class head and a final LayerNorm; the position table (frozen here) is counted by both
    expected = timm_params - (width * 1000 + 1000) - 2 * width
    assert grid == 14
    assert count(online["online"]["encoder"]) == expected
    assert count(ema["encoder"]) == expected
