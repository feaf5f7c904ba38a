"""Which PyTorch key holds which array of our train state, and how the layouts differ (SPEC section 6).

A layout is a list of `KeySpec`s (one per PyTorch key backed by train-state arrays) plus `FixedKey`s (keys the
PyTorch model stores but we compute: `decoder_pos_embed`, BatchNorm `num_batches_tracked`, the frozen
`student_norm` of `online_ln`). Two kinds:

- "encoder": timm / MAE names (`patch_embed.proj.weight`, `cls_token`, `pos_embed`, `blocks.i.*`, `norm.*` for
  the MAE encoder's final norm), read from the online (or target) encoder;
- "full": the official SiameseIM (or MAE) pretraining model's `state_dict()` names, target branch under `mm_*`.

Array layouts (ours -> PyTorch, all exact):
  linear    kernel (in, out)                  -> weight (out, in)
  qkv       kernel (D, 3, heads, head_dim)    -> weight (3D, D)     (q, k, v stacked; heads contiguous in each)
  flatten   qkv bias (3, heads, head_dim)     -> bias (3D,)
  attn_out  proj kernel (heads, head_dim, D)  -> weight (D, D)
  conv      kernel HWIO (p, p, 3, D)          -> weight OIHW (D, 3, p, p)
  same      everything else (tokens, position tables, norm scales and offsets)
"""

import dataclasses
from typing import Callable

import jax
import ml_collections
import numpy as np

from siim_jax.methods.base import Method
from siim_jax.models.pos_embed import sincos_2d
from siim_jax.models.variants import VIT_VARIANTS

TO_TORCH: dict[str, Callable] = {
    "same": lambda a: a,
    "linear": lambda a: a.T,
    "qkv": lambda a: a.reshape(a.shape[0], -1).T,
    "flatten": lambda a: a.reshape(-1),
    "attn_out": lambda a: a.reshape(-1, a.shape[-1]).T,
    "conv": lambda a: a.transpose(3, 2, 0, 1),
}


def from_torch(layout: str, array: np.ndarray, shape: tuple) -> np.ndarray:
    """Inverse of TO_TORCH[layout]: a PyTorch array -> our array of `shape`."""
    if layout in ("linear", "qkv", "attn_out"):
        return array.T.reshape(shape)
    if layout == "conv":
        return array.transpose(2, 3, 1, 0)
    return array.reshape(shape)


# (collection, path): an array of the TrainState, path = keys into that collection's pure dict
Location = tuple[str, tuple]


@dataclasses.dataclass(frozen=True)
class KeySpec:
    key: str  # PyTorch name
    torch_shape: tuple
    shape: tuple  # ours
    layout: str
    locations: tuple[Location, ...]  # exported from the first; an import writes every one


@dataclasses.dataclass(frozen=True)
class FixedKey:
    """A key the PyTorch model stores that our state does not hold as such."""
    key: str
    torch_shape: tuple
    kind: str  # "decoder_pos_embed" | "num_batches_tracked" | "ones" | "zeros"


@dataclasses.dataclass(frozen=True)
class Layout:
    kind: str  # "encoder" | "full"
    specs: tuple[KeySpec, ...]
    fixed: tuple[FixedKey, ...]

    def keys(self) -> list[str]:
        return [s.key for s in self.specs] + [f.key for f in self.fixed]


def _layout_of(path: tuple, shape: tuple) -> str:
    name, parent = path[-1], path[-2] if len(path) > 1 else None
    if name == "kernel":
        if len(shape) == 2:
            return "linear"
        if parent == "qkv":
            return "qkv"
        if len(shape) == 3:
            return "attn_out"
        return "conv"
    if name == "bias" and parent == "qkv":
        return "flatten"
    return "same"


def _torch_name(path: tuple) -> list[str]:
    """Our module path -> PyTorch module path: kernel/scale -> weight, layer scale ls1 -> ls1.gamma."""
    names = [str(k) for k in path]
    last = names[-1]
    if last in ("kernel", "scale"):
        names[-1] = "weight"
    elif last in ("ls1", "ls2"):
        names.append("gamma")
    return names


def _leaves(tree) -> list[tuple[tuple, tuple]]:
    """(path as a tuple of dict keys, shape) of every array in a pure dict."""
    return [(tuple(getattr(k, "key", getattr(k, "idx", k)) for k in p), tuple(x.shape))
            for p, x in jax.tree_util.tree_leaves_with_path(tree)]


def _spec(key: str, path: tuple, shape: tuple, locations: tuple) -> KeySpec:
    layout = _layout_of(path, shape)
    torch_shape = tuple(jax.eval_shape(TO_TORCH[layout], jax.ShapeDtypeStruct(shape, np.float32)).shape)
    return KeySpec(key, torch_shape, shape, layout, locations)


def grid_size(config: ml_collections.ConfigDict) -> int:
    return config.model.image_size // VIT_VARIANTS[config.model.variant][3]


def fixed_value(fixed: FixedKey, method: Method, step: int = 0) -> np.ndarray:
    """The value a PyTorch model of this method stores under a fixed key (num_batches_tracked: BatchNorm
    forward passes in train mode, one per micro-batch of each step)."""
    config = method.config
    if fixed.kind == "decoder_pos_embed":
        return sincos_2d(method.decoder_width, grid_size(config), class_token=True)[None]
    if fixed.kind == "num_batches_tracked":
        return np.asarray(step * config.grad_accum_steps, np.int64)
    return (np.ones if fixed.kind == "ones" else np.zeros)(fixed.torch_shape, np.float32)


def state_layout(method: Method, state, kind: str, branch: str = "online") -> Layout:
    """The PyTorch keys of `state` (a TrainState of `method`, arrays or ShapeDtypeStructs) in format `kind`.

    branch ("online" | "target") picks the encoder that kind="encoder" reads; an import of that kind writes the
    online encoder and, for SiameseIM, the target encoder too (the target is an exact copy at step 0).
    """
    if kind not in ("encoder", "full"):
        raise ValueError(f"unknown checkpoint kind {kind!r}: choose 'encoder' or 'full'")
    if branch not in ("online", "target"):
        raise ValueError(f"unknown branch {branch!r}: choose 'online' or 'target'")
    if not method.has_target and branch == "target":
        raise ValueError(f"the {method.name} method has no target branch: use branch 'online'")
    if kind == "encoder":
        online = ("params", method.online_encoder_path)
        target = ("ema_params", method.target_encoder_path)
        roots = [target, online] if branch == "target" else [online] + ([target] if method.has_target else [])
        collection, root = roots[0]
        tree = getattr(state, collection)
        for k in root:
            tree = tree[k]
        specs = [_spec(".".join(_torch_name(path)), path, shape,
                       tuple((c, r + path) for c, r in roots))
                 for path, shape in _leaves(tree)]
        return Layout("encoder", tuple(specs), ())

    specs, fixed = [], []
    bn_modules = set()
    for path, shape in _leaves(state.batch_stats):  # BatchNorm running statistics
        names = _full_name(path, target=path[0] == "target")
        module = ".".join(names[:-1])
        bn_modules.add(module)
        running = {"mean": "running_mean", "var": "running_var"}[names[-1]]
        specs.append(_spec(f"{module}.bn.{running}", path, shape, (("batch_stats", path),)))
    for module in sorted(bn_modules):
        fixed.append(FixedKey(f"{module}.bn.num_batches_tracked", (), "num_batches_tracked"))

    def add(collection: str, path: tuple, shape: tuple, target: bool):
        names = _torch_name(_full_name(path, target))
        module = ".".join(names[:-1])
        key = f"{module}.bn.{names[-1]}" if module in bn_modules else ".".join(names)
        locations = ((collection, path),)
        if method.has_target and path == method.online_encoder_path + ("pos_embed",):
            locations += (("ema_params", ("encoder", "pos_embed")),)  # one table shared by both branches
        specs.append(_spec(key, path, shape, locations))

    for path, shape in _leaves(state.params):
        add("params", path, shape, target=False)
    for path, shape in _leaves(state.ema_params):
        if path != ("encoder", "pos_embed"):
            add("ema_params", path, shape, target=True)
    dd, grid = method.decoder_width, grid_size(method.config)
    fixed.append(FixedKey("decoder_pos_embed", (1, 1 + grid * grid, dd), "decoder_pos_embed"))
    if method.has_target and method.config.model.online_ln:  # the official frozen LayerNorm on the predictions: 1 and 0
        fixed += [FixedKey("student_norm.weight", (dd,), "ones"), FixedKey("student_norm.bias", (dd,), "zeros")]
    return Layout("full", tuple(specs), tuple(fixed))


def _full_name(path: tuple, target: bool) -> list:
    """Our path in params / ema_params / batch_stats -> the official module path (before leaf renaming).

    Online: `online.encoder.X` -> `X`, `online.Y` -> `Y`; target: `encoder.X` -> `mm_X`, `Y` -> `mm_Y`
    (batch_stats: `target.Y` -> `mm_Y`); MAE: `encoder.X` -> `X`.
    """
    path = [str(k) for k in path]
    if path[0] in ("online", "target"):
        path = path[1:]
    if path[0] == "encoder":
        path = path[1:]
    if target:
        path[0] = f"mm_{path[0]}"
    return path
