"""Export of a train state to PyTorch state dicts and import of PyTorch state dicts into a train state.

Strict by default: an import whose keys or shapes differ from the model's is an error listing every missing,
unexpected and mis-shaped key; `allow_partial=True` loads what matches and prints what it skipped. Everything is
checked before any array of the state is touched.
"""

import json
import math

import jax
import ml_collections
import numpy as np

from siim_jax import storage
from siim_jax.cli import RunError
from siim_jax.config import base_config
from siim_jax.interop.files import CheckpointFileError
from siim_jax.interop.keys import TO_TORCH, FixedKey, Layout, fixed_value, from_torch, state_layout
from siim_jax.methods.base import Method
from siim_jax.models.pos_embed import sincos_2d
from siim_jax.parallel.sharding import create_mesh
from siim_jax.train.state import TrainState, abstract_train_state

LISTED = 30  # keys listed per category in an error message
FIXED_TABLE_TOLERANCE = 1e-5  # a stored sin-cos table (float32 of a float64 computation) vs ours


class StateDictMismatchError(RunError, ValueError):
    """A state dict whose keys, shapes or fixed values do not fit the model; the message lists them all."""


def export_state_dict(method: Method, state: TrainState, kind: str = "encoder",
                      branch: str = "online") -> dict[str, np.ndarray]:
    """PyTorch key -> float32 NumPy array (num_batches_tracked: int64) for `state` (of `method`) in format `kind`.

    kind "encoder": timm / MAE names of the `branch` encoder, `pos_embed` (1, 1 + N, D) with its zero class row.
    kind "full": the official pretraining model's state_dict() (see siim_jax.interop.keys).
    """
    layout = state_layout(method, state, kind, branch)
    host = jax.device_get({"params": state.params, "ema_params": state.ema_params,
                           "batch_stats": state.batch_stats})
    out = {}
    for spec in layout.specs:
        collection, path = spec.locations[0]
        out[spec.key] = np.asarray(TO_TORCH[spec.layout](np.asarray(_get(host[collection], path))), np.float32,
                                   order="C")
    step = int(jax.device_get(state.step))
    for fixed in layout.fixed:
        out[fixed.key] = fixed_value(fixed, method, step)
    return out


def classifier_state_dict(method: Method, state: TrainState) -> dict[str, np.ndarray]:
    """A fine-tuned classifier's state as a timm ViT with global_pool='avg': the encoder keys, `fc_norm.*` and
    `head.*` (PyTorch Linear layout)."""
    out = export_state_dict(method, state, "encoder")
    params = jax.device_get(state.params)
    out["fc_norm.weight"] = np.asarray(params["fc_norm"]["scale"], np.float32)
    out["fc_norm.bias"] = np.asarray(params["fc_norm"]["bias"], np.float32)
    out["head.weight"] = np.ascontiguousarray(np.asarray(params["head"]["kernel"], np.float32).T)
    out["head.bias"] = np.asarray(params["head"]["bias"], np.float32)
    return out


def detect_kind(state_dict: dict) -> str:
    """"full" for a pretraining model's state dict (decoder / target branch keys present), else "encoder"."""
    full = any(k.startswith(("mm_", "decoder_embed.", "decoder_pred.")) or k == "mask_token" for k in state_dict)
    return "full" if full else "encoder"


def import_state_dict(method: Method, state: TrainState, state_dict: dict[str, np.ndarray],
                      kind: str = "auto", allow_partial: bool = False, log=print) -> TrainState:
    """A copy of `state` (of `method`) with the arrays of `state_dict` (PyTorch names, e.g. from read_state_dict) in it.

    kind "full": every array of the official pretraining state (online, target `mm_*`, BatchNorm running
    statistics); kind "encoder": a timm / MAE encoder, written to the online encoder and (SiameseIM) to the
    target encoder; the rest keeps its values. "auto" picks by the keys (detect_kind). An encoder `pos_embed`
    of another grid size is resized (bicubic, class row kept). The optimiser state and step are kept as given.
    Raises StateDictMismatchError listing every problem unless `allow_partial`, which loads what fits and
    reports the rest through `log`.
    """
    kind = detect_kind(state_dict) if kind == "auto" else kind
    layout = state_layout(method, state, kind)
    values, problems = _match(method, layout, state_dict, log)
    config = method.config
    if problems:
        if not allow_partial:
            hint = (f"\nThe keys look like the {detect_kind(state_dict)} format: pass kind='{detect_kind(state_dict)}'"
                    f" (CLI: --kind {detect_kind(state_dict)})." if detect_kind(state_dict) != kind else "")
            raise StateDictMismatchError(
                f"the {kind} state dict does not fit this model ({config.model.loss_type} method, variant "
                f"{config.model.variant}, {config.model.image_size}px):\n" + "\n".join(problems) + hint
                + "\nUse a checkpoint of the same architecture, or pass allow_partial=True (CLI: --allow-partial) "
                "to load the arrays that fit and keep the others as they are.")
        log("partial load: skipped\n" + "\n".join(problems))

    host = jax.device_get({"params": state.params, "ema_params": state.ema_params,
                           "batch_stats": state.batch_stats})
    host = jax.tree.map(np.array, host)  # fresh containers and writable arrays
    for spec in layout.specs:
        if spec.key in values:
            for collection, path in spec.locations:
                _set(host[collection], path, values[spec.key])
    placed = {}
    for name, tree in host.items():
        current = getattr(state, name)
        placed[name] = jax.tree.map(
            lambda new, old: jax.device_put(new.astype(old.dtype), old.sharding)
            if isinstance(old, jax.Array) else new.astype(old.dtype), tree, current)
    log(f"imported {sum(1 for s in layout.specs if s.key in values)} of {len(layout.specs)} arrays "
        f"({kind} format)")
    return state.replace(**placed)


def _match(method: Method, layout: Layout, state_dict: dict, log) -> tuple[dict[str, np.ndarray], list[str]]:
    """Our-layout arrays by PyTorch key for every key that fits, and a description of every problem."""
    expected = {s.key: s for s in layout.specs}
    fixed = {f.key: f for f in layout.fixed}
    missing = [k for k in layout.keys() if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected and k not in fixed]
    misshaped, wrong_values, values = [], [], {}
    for key, spec in expected.items():
        if key not in state_dict:
            continue
        array = state_dict[key]
        if array.dtype != np.float32:
            misshaped.append(f"{key}: dtype {array.dtype}, expected floating point")
        elif tuple(array.shape) == spec.torch_shape:
            values[key] = from_torch(spec.layout, array, spec.shape)
        elif key == "pos_embed" and _resizable(array.shape, spec.torch_shape):
            values[key] = interpolate_pos_embed(array, spec.torch_shape[1])
            log(f"pos_embed: resized the {math.isqrt(array.shape[1] - 1)}^2 grid to "
                f"{math.isqrt(spec.torch_shape[1] - 1)}^2 (bicubic, class row kept)")
        else:
            misshaped.append(f"{key}: expected {spec.torch_shape}, found {tuple(array.shape)}")
    for key, f in fixed.items():
        if key in state_dict:
            shape_problem, value_problem = _check_fixed(f, state_dict[key], method)
            if shape_problem:
                misshaped.append(f"{key}: {shape_problem}")
            if value_problem:
                wrong_values.append(f"{key}: {value_problem}")
    problems = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped),
                         ("values differ from this model's fixed ones", wrong_values)):
        if items:
            shown = items[:LISTED] + ([f"... and {len(items) - LISTED} more"] if len(items) > LISTED else [])
            problems.append(f"  {len(items)} {title}: " + ", ".join(shown))
    return values, problems


def _check_fixed(fixed: FixedKey, array: np.ndarray, method: Method) -> tuple[str | None, str | None]:
    """(shape problem, value problem) of a stored value of a key we compute ourselves; None where fine."""
    if fixed.kind == "num_batches_tracked":  # a count of forward passes: its value does not matter
        return (None if array.shape == () else f"expected () (a count), found {tuple(array.shape)}"), None
    ours = fixed_value(fixed, method)
    if fixed.kind == "decoder_pos_embed" and array.shape != ours.shape and _resizable(array.shape, ours.shape):
        grid = math.isqrt(array.shape[1] - 1)  # another resolution: must be the standard table of its own grid
        ours = sincos_2d(ours.shape[-1], grid, class_token=True)[None]
    if array.shape != ours.shape:
        return f"expected {ours.shape}, found {tuple(array.shape)}", None
    diff = float(np.max(np.abs(array - ours))) if array.size else 0.0
    if diff > FIXED_TABLE_TOLERANCE:
        what = ("the fixed 2-D sin-cos table (row half first)" if fixed.kind == "decoder_pos_embed"
                else f"all {'ones' if fixed.kind == 'ones' else 'zeros'}")
        return None, f"max |difference| {diff:.3g} from {what}, which this model always uses"
    return None, None


def _resizable(found: tuple, expected: tuple) -> bool:
    """Both (1, 1 + g^2, D) tables of square grids with the same width."""
    def square(n):
        return n > 1 and math.isqrt(n - 1) ** 2 == n - 1
    return (len(found) == 3 and len(expected) == 3 and found[0] == expected[0] == 1 and found[2] == expected[2]
            and square(found[1]) and square(expected[1]))


def _cubic_weights(t: float, a: float = -0.75) -> list[float]:
    """Keys cubic convolution weights (PyTorch's a = -0.75) of the samples at offsets -1, 0, 1, 2."""
    def near(x):
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) matrix of 1-D bicubic resampling as torch.nn.functional.interpolate(mode='bicubic',
    align_corners=False) does it: half-pixel centres, border samples repeated."""
    matrix = np.zeros((out_size, in_size))
    scale = in_size / out_size
    for o in range(out_size):
        source = (o + 0.5) * scale - 0.5
        base = math.floor(source)
        for offset, weight in zip(range(-1, 3), _cubic_weights(source - base)):
            matrix[o, min(max(base + offset, 0), in_size - 1)] += weight
    return matrix


def interpolate_pos_embed(table: np.ndarray, new_length: int) -> np.ndarray:
    """(1, 1 + n^2, D) -> (1, new_length = 1 + g^2, D): class row kept, the n x n grid resized bicubically
    (the MAE / SiameseIM fine-tuning code's interpolate_pos_embed)."""
    n, g = math.isqrt(table.shape[1] - 1), math.isqrt(new_length - 1)
    grid = table[0, 1:].reshape(n, n, -1).astype(np.float64)
    m = bicubic_matrix(n, g)
    resized = np.einsum("ia,jb,abd->ijd", m, m, grid).reshape(g * g, -1)
    return np.concatenate([table[0, :1], resized.astype(np.float32)])[None]


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree, path, value):
    parent = _get(tree, path[:-1])
    if tuple(parent[path[-1]].shape) != tuple(value.shape):  # a layout bug, never user input
        raise AssertionError(f"{path}: {parent[path[-1]].shape} vs {value.shape}")
    parent[path[-1]] = value


# ---------------------------------------------------------------------------------------------- workdirs

def workdir_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a training run recorded in <workdir>/config.json, on top of today's defaults."""
    path = storage.join(workdir, "config.json")
    if not storage.isfile(path):
        storage.require_bucket(path)  # a missing bucket: ObjectStoreError, saying so
        raise CheckpointFileError(f"{path} not found: --workdir must be a directory written by "
                                  "python -m siim_jax.train or python -m siim_jax.import_weights")
    recorded = json.loads(storage.read_text(path))
    config = base_config()

    def update(node, values):
        for key, value in values.items():
            if key not in node:  # keys of another version do not shape the state; the signature check guards
                continue
            if isinstance(node[key], ml_collections.ConfigDict):
                update(node[key], value)
            elif isinstance(node[key], tuple):  # JSON turned tuples (e.g. logical_axis_rules) into lists
                node[key] = _tuples(value)
            else:
                node[key] = value
    update(config, recorded)
    return config


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def load_workdir_state(workdir: str, step: int | None = None) -> tuple[Method, TrainState]:
    """(the method the run trained, bound to its recorded config as `method.config`; train state as host NumPy
    arrays) of a saved step (default: the newest) of a workdir, whatever mesh it was trained on. A recorded run
    is an entry point: its method is built here."""
    from siim_jax.methods import get_method
    from siim_jax.train.checkpoint import Checkpointer

    config = workdir_config(workdir)
    method = get_method(config)
    if not storage.isdir(storage.join(workdir, "checkpoints")):
        raise CheckpointFileError(f"{workdir} has no checkpoints/ directory")
    # one device of this process: every process of a multi-process command reads the whole state
    mesh = create_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.local_devices()[:1])
    _, _, abstract, _ = abstract_train_state(method, mesh, lambda step: 0.0)
    checkpoints = Checkpointer(workdir, config)
    try:
        steps = sorted(checkpoints.manager.all_steps())
        if not steps:
            raise CheckpointFileError(f"{workdir}/checkpoints holds no saved step")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise CheckpointFileError(f"{workdir} has no checkpoint of step {step}; saved steps: {steps}")
        state = jax.device_get(checkpoints.restore(step, abstract))
    finally:
        checkpoints.close()
    return method, state
