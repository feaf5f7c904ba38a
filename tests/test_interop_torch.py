"""Against real PyTorch consumers: timm loads our export and computes our encoder's tokens; an independent
PyTorch SiameseIM (written from SPEC sections 2-3 with the official key names) imports into the train state and
gives our loss, gradients and BatchNorm statistics; torch.load never runs code from a file."""

import copy
import math

import numpy as np
import pytest
import timm  # the `torch` extra, which the README's test command installs: a missing install fails here
import torch
from conftest import tiny_config
from interop_helpers import encoder_tokens, fresh_state, randomized

from siim_jax import interop
from siim_jax.interop import CheckpointFileError
from siim_jax.methods import get_method

nn = torch.nn
F = torch.nn.functional


# ------------------------------------------------------------------ timm

def test_timm_vision_transformer_loads_the_export_and_matches_our_tokens(tmp_path):
    config = tiny_config()
    graphdef, fresh = fresh_state(config)
    state = randomized(fresh, seed=3)  # random pos_embed too: the table travels as a parameter
    path = str(tmp_path / "encoder.pth")
    interop.write_state_dict(interop.export_state_dict(get_method(config), state, "encoder"), path, "pth")

    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, mlp_ratio=4.0, qkv_bias=True,
        global_pool="avg", num_classes=10)
    state_dict = torch.load(path, map_location="cpu", weights_only=True)["model"]
    result = vit.load_state_dict(state_dict, strict=False)
    assert sorted(result.missing_keys) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert result.unexpected_keys == []

    images = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32)
    ours = encoder_tokens(config, graphdef, state, images)
    with torch.no_grad():
        theirs = vit.eval().forward_features(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    assert ours.shape == theirs.shape == (3, 17, 64)
    assert np.abs(ours - theirs).max() <= 1e-5


def test_position_table_resize_matches_torch_bicubic():
    table = np.random.default_rng(1).normal(size=(1, 1 + 7 * 7, 12)).astype(np.float32)
    for grid in (4, 11):
        grid_part = torch.from_numpy(table[:, 1:]).reshape(1, 7, 7, 12).permute(0, 3, 1, 2)
        expected = F.interpolate(grid_part, size=(grid, grid), mode="bicubic", align_corners=False)
        expected = expected.permute(0, 2, 3, 1).reshape(1, grid * grid, 12).numpy()
        resized = interop.interpolate_pos_embed(table, 1 + grid * grid)
        np.testing.assert_array_equal(resized[:, 0], table[:, 0])
        np.testing.assert_allclose(resized[:, 1:], expected, atol=1e-5)


# ------------------------------------------------------------------ an independent SiameseIM (SPEC 2-3)

def sincos(positions, width):
    """[sin(p*w), cos(p*w)], w_k = 10000^(-k/(width/2)): positions (...,) -> (..., width), float64."""
    omega = 10000.0 ** (-torch.arange(width // 2, dtype=torch.float64) / (width / 2))
    angles = positions.double()[..., None] * omega
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def standard_table(width, grid):
    """(1, 1 + grid^2, width): zero class row, then [sin/cos of the row, sin/cos of the column]."""
    index = torch.arange(grid * grid)
    table = torch.cat([sincos(index // grid, width // 2), sincos(index % grid, width // 2)], dim=-1)
    return torch.cat([torch.zeros(1, width, dtype=torch.float64), table]).float()[None]


def relative_embedding(geometry, width, grid):
    """(N, 6) [di, dj, dh, dw, rflip, dj_flip] -> (N, grid^2, 2*width), SPEC section 2."""
    di, dj, dh, dw, rflip, dj_flip = (geometry[:, k:k + 1].double() for k in range(6))
    index = torch.arange(grid * grid)
    r, c = (index // grid).double(), (index % grid).double()
    gh = dh * (r + 0.5) + di * grid - 0.5
    gw = torch.where(rflip > 0.5, -dw * (c + 0.5) + dj_flip * grid - 0.5, dw * (c + 0.5) + dj * grid - 0.5)
    scale_h = (10 * torch.log(dh)).expand_as(gh)
    scale_w = (10 * torch.log(dw)).expand_as(gw)
    half = width // 2
    return torch.cat([sincos(gh, half), sincos(gw, half), sincos(scale_h, half), sincos(scale_w, half)], -1).float()


class PermuteBN(nn.Module):
    """BatchNorm1d over (N, T, C) tokens, as the official `normK.bn`."""

    def __init__(self, dim):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)

    def forward(self, x):
        return self.bn(x.permute(0, 2, 1)).permute(0, 2, 1)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        n, t, c = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        weights = (q @ k.transpose(-2, -1) / math.sqrt(c // self.heads)).softmax(-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(n, t, c))


class Mlp(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, heads, batch_norm=False):
        super().__init__()
        norm = (lambda: PermuteBN(dim)) if batch_norm else (lambda: nn.LayerNorm(dim, eps=1e-6))
        self.norm1, self.attn, self.norm2, self.mlp = norm(), Attention(dim, heads), norm(), Mlp(dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)

    def forward(self, images):  # (N, 3, S, S) -> (N, grid^2, D), raster order
        return self.proj(images).flatten(2).transpose(1, 2)


class ReferenceSiameseIM(nn.Module):
    def __init__(self, width=64, depth=2, heads=2, patch=8, image=32, dec=32, dec_heads=2, proj=1, pred=1):
        super().__init__()
        self.grid = grid = image // patch
        self.patch_embed = PatchEmbed(patch, width)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, width))
        self.pos_embed = nn.Parameter(standard_table(width, grid), requires_grad=False)
        self.blocks = nn.ModuleList([Block(width, heads) for _ in range(depth)])
        self.decoder_embed = nn.Linear(width, dec)
        self.mask_token = nn.Parameter(0.02 * torch.randn(1, 1, dec))
        self.decoder_pos_embed = nn.Parameter(standard_table(dec, grid), requires_grad=False)
        self.projector_decoder_blocks = nn.ModuleList([Block(dec, dec_heads, True) for _ in range(proj)])
        self.decoder_pos_mlp = nn.Linear(2 * dec, dec)
        self.predictor_decoder_blocks = nn.ModuleList([Block(dec, dec_heads, True) for _ in range(pred)])
        self.decoder_pred = nn.Linear(dec, dec)
        for name in ("patch_embed", "cls_token", "blocks", "decoder_embed", "mask_token",
                     "projector_decoder_blocks"):
            setattr(self, f"mm_{name}", copy.deepcopy(getattr(self, name)))
        for name, p in self.named_parameters():
            if name.startswith(("mm_", "patch_embed")):
                p.requires_grad_(False)

    def forward(self, view1, view2, geometry, mask, neg_weight=0.02):
        """views (N, 3, S, S), geometry (N, 6), mask (N, grid^2) bool (True = masked) -> scalar loss."""
        n = view1.shape[0]
        tokens = self.patch_embed(view1) + self.pos_embed[:, 1:]
        visible = tokens[~mask].reshape(n, -1, tokens.shape[-1])
        x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(n, -1, -1), visible], dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.decoder_embed(x)
        for block in self.projector_decoder_blocks:
            x = block(x)
        dec = x.shape[-1]
        visible_pos = self.decoder_pos_embed[:, 1:].expand(n, -1, -1)[~mask].reshape(n, -1, dec)
        queries = self.mask_token + self.decoder_pos_mlp(relative_embedding(geometry, dec, self.grid))
        x = torch.cat([x[:, :1] + self.decoder_pos_embed[:, :1], x[:, 1:] + visible_pos, queries], dim=1)
        for block in self.predictor_decoder_blocks:
            x = block(x)
        pred = self.decoder_pred(x)[:, -self.grid ** 2:].reshape(-1, dec)

        with torch.no_grad():
            t = self.mm_patch_embed(view2)
            t = torch.cat([self.mm_cls_token.expand(n, -1, -1), t], dim=1) + self.pos_embed
            for block in self.mm_blocks:
                t = block(t)
            t = self.mm_decoder_embed(t)
            for block in self.mm_projector_decoder_blocks:
                t = block(t)
            target = F.layer_norm(t[:, 1:].reshape(-1, dec), (dec,), eps=1e-5)
        rows = pred.shape[0]
        positive = ((pred - target) ** 2).sum(-1).mean()
        correlation = target.T @ target / rows
        negative = ((pred @ correlation) * pred).sum(-1).mean()
        return (positive + neg_weight * negative) / dec


def reference_with_distinct_weights(seed=0):
    """The reference model with every array (target branch, BatchNorm affine and running statistics included)
    drawn at random, so that no two keys hold the same values."""
    torch.manual_seed(seed)
    model = ReferenceSiameseIM()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "pos_embed" in name:
                continue
            if p.ndim > 1:
                p.copy_(torch.randn_like(p) * 0.2)
            else:  # biases around 0, norm scales around 1
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith("weight") else 0.0))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn_like(b))
            elif name.endswith("running_var"):
                b.copy_(torch.rand_like(b) + 0.5)
            elif name.endswith("num_batches_tracked"):
                b.fill_(123)
    return model


def test_reference_state_dict_imports_and_gives_the_same_loss_gradients_and_batch_statistics(tmp_path):
    config = tiny_config()  # float32 compute, 4x4 grid, 10 of 16 patches masked
    method = get_method(config)
    reference = reference_with_distinct_weights()
    path = str(tmp_path / "official_layout.pth")
    torch.save({"model": reference.state_dict(), "epoch": 3}, path)

    _, fresh = fresh_state(config)
    state = interop.import_state_dict(method, fresh, interop.read_state_dict(path), log=lambda _: None)

    rng = np.random.default_rng(5)
    n = 4
    mask = np.zeros((n, 16), bool)
    for row in mask:
        row[rng.permutation(16)[:10]] = True
    geometry = np.stack([rng.uniform(-0.3, 0.3, n), rng.uniform(-0.3, 0.3, n), rng.uniform(0.6, 1.5, n),
                         rng.uniform(0.6, 1.5, n), np.array([0.0, 1.0, 0.0, 1.0]), rng.uniform(0.5, 1.5, n)],
                        axis=1).astype(np.float32)
    batch = {"view1": rng.normal(size=(n, 32, 32, 3)).astype(np.float32),
             "view2": rng.normal(size=(n, 32, 32, 3)).astype(np.float32), "geometry": geometry, "mask": mask}
    ours = interop.pretraining_loss(method, state, batch, with_grads=True)

    reference.train()
    loss = reference(*(torch.from_numpy(batch[k]).permute(0, 3, 1, 2) for k in ("view1", "view2")),
                     torch.from_numpy(geometry), torch.from_numpy(mask))
    loss.backward()
    assert ours["loss"] == pytest.approx(loss.item(), rel=1e-5)

    trainable = {name: p.grad.numpy() for name, p in reference.named_parameters() if p.requires_grad}
    assert set(ours["grads"]) == set(trainable)
    for key in ("decoder_pred.weight", "predictor_decoder_blocks.0.norm1.bn.weight", "decoder_pos_mlp.weight",
                "mask_token", "projector_decoder_blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight",
                "blocks.1.mlp.fc1.bias", "cls_token"):
        scale = np.abs(trainable[key]).max()
        assert scale > 0, key
        np.testing.assert_allclose(ours["grads"][key], trainable[key], rtol=1e-4, atol=1e-4 * scale, err_msg=key)

    after = interop.export_state_dict(method, state.replace(batch_stats=ours["batch_stats"]), "full")
    buffers = dict(reference.named_buffers())
    for key in ("projector_decoder_blocks.0.norm2.bn.running_var", "mm_projector_decoder_blocks.0.norm1.bn"
                ".running_mean", "predictor_decoder_blocks.0.norm1.bn.running_var"):
        np.testing.assert_allclose(after[key], buffers[key].numpy(), rtol=1e-5, atol=1e-6, err_msg=key)


def test_our_full_export_loads_strictly_into_the_reference_model(tmp_path):
    config = tiny_config()
    _, fresh = fresh_state(config)
    path = str(tmp_path / "full.pth")
    sd = interop.export_state_dict(get_method(config), randomized(fresh, seed=4), "full")
    interop.write_state_dict(sd, path, "pth")
    reference = ReferenceSiameseIM()
    reference.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["model"], strict=True)


# ------------------------------------------------------------------ safety

class CreatesAFileWhenUnpickled:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_objects_are_refused_without_running_them(tmp_path):
    path, marker = str(tmp_path / "evil.pth"), tmp_path / "marker"
    torch.save({"model": {"cls_token": torch.zeros(1, 1, 64)}, "extra": CreatesAFileWhenUnpickled(str(marker))},
               path)
    with pytest.raises(CheckpointFileError, match=r"weights_only=True.*re-save just the weights"):
        interop.read_state_dict(path)
    assert not marker.exists()


def test_training_checkpoints_with_their_argparse_namespace_load(tmp_path):
    import argparse
    sd = {"cls_token": torch.randn(1, 1, 64)}
    path = str(tmp_path / "mae_style.pth")
    torch.save({"model": {"cls_token": sd["cls_token"]}, "args": argparse.Namespace(lr=1e-3), "epoch": 5}, path)
    read = interop.read_state_dict(path)
    assert set(read) == {"cls_token"}
    np.testing.assert_array_equal(read["cls_token"], sd["cls_token"].numpy())
    torch.save({"model": {"blocks.0.norm1.weight": torch.ones(64, dtype=torch.bfloat16),
                          "pos_embed": torch.zeros(1, 17, 64, dtype=torch.complex64)}}, path)
    with pytest.raises(CheckpointFileError, match="'pos_embed' has dtype complex64"):
        interop.read_state_dict(path)
