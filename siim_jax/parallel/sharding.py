"""Mesh from config and logical-axis -> mesh-axis rules (MaxText style).

Model code names logical axes (`embed`, `mlp`, `heads`; `batch` for data); `config.mesh.logical_axis_rules`
maps each to mesh axes among MESH_AXES. A logical axis with no rule, or whose size the mesh axes do not divide,
is replicated.
"""

import contextlib
import logging
import math

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from siim_jax.config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
log = logging.getLogger(__name__)


DCN_AXES = ("dcn_data", "dcn_fsdp")  # config.mesh keys: how many slices (granules) the data / fsdp axes span


def _granule_key(device) -> int:
    """The DCN unit of a device: its TPU slice, or else its process (GPU nodes, CPU processes)."""
    return getattr(device, "slice_index", None) if hasattr(device, "slice_index") else device.process_index


def create_mesh(mesh_config, devices=None) -> Mesh:
    """Mesh of shape (data, fsdp, tensor) from config; one -1 entry takes the remaining devices.

    With mesh.dcn_data * mesh.dcn_fsdp = S > 1 (multi-slice), data and fsdp are S-fold outer (DCN) axes times
    inner (ICI) axes: the devices are grouped into S slices (TPU slice_index; processes elsewhere), each slice
    holds a (data, fsdp, tensor) block in ICI-aware order, and the full mesh is
    (dcn_data * data, dcn_fsdp * fsdp, tensor). The tensor axis never crosses DCN.
    """
    devices = jax.devices() if devices is None else list(devices)
    shape = [int(mesh_config[a]) for a in MESH_AXES]
    dcn = [int(mesh_config.get(a, 1)) for a in DCN_AXES]
    keys = "config.mesh.data/fsdp/tensor"
    if min(dcn) < 1:
        raise ConfigError(f"config.mesh.dcn_data/dcn_fsdp={dcn} must be integers >= 1")
    slices = math.prod(dcn)
    if len(devices) % slices:
        raise ConfigError(f"config.mesh.dcn_data * dcn_fsdp = {slices} slices cannot split the {len(devices)} "
                          "devices evenly")
    per_slice = len(devices) // slices
    where = f"{per_slice} devices per slice ({slices} slices)" if slices > 1 else f"{len(devices)} devices"
    if shape.count(-1) > 1:
        raise ConfigError(f"{keys}={shape}: at most one axis may be -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if per_slice % known:
            raise ConfigError(f"{keys}={shape} cannot fill the {where}: the fixed axes' product {known} must "
                              f"divide {per_slice}")
        shape[shape.index(-1)] = per_slice // known
    if math.prod(shape) != per_slice:
        raise ConfigError(f"{keys}={shape} needs {math.prod(shape)} devices, found {where}; set one axis to -1 "
                          "to fill")
    if slices == 1:
        return Mesh(mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True), MESH_AXES)
    granules = sorted({_granule_key(d) for d in devices})
    if len(granules) != slices:
        raise ConfigError(f"config.mesh.dcn_data * dcn_fsdp = {slices} slices, but the devices form "
                          f"{len(granules)} (TPU slices, or processes where devices have no slice_index)")
    array = mesh_utils.create_hybrid_device_mesh(shape, dcn + [1], devices,
                                                 process_is_granule=not hasattr(devices[0], "slice_index"),
                                                 allow_split_physical_axes=True)
    return Mesh(array, MESH_AXES)


def logical_to_mesh_spec(logical: tuple, shape: tuple, mesh: Mesh, rules) -> PartitionSpec:
    """Maps logical axis names (one per array dim, None = replicated) to a mesh PartitionSpec."""
    table = {name: (axes,) if isinstance(axes, str) else tuple(axes) for name, axes in rules}
    spec, used = [], set()
    for name, size in zip(logical, shape):
        axes = tuple(a for a in table.get(name, ()) if a not in used and mesh.shape[a] > 1)
        if axes and size % math.prod(mesh.shape[a] for a in axes):
            log.info("replicating logical axis %r of size %d: mesh axes %s do not divide it", name, size, axes)
            axes = ()
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return PartitionSpec(*spec)


_activation_rules = None  # set by sharding_context while a step is traced


@contextlib.contextmanager
def sharding_context(mesh: Mesh, rules):
    """Mesh and logical rules for tracing: `constrain` inside model code resolves against them."""
    global _activation_rules
    previous, _activation_rules = _activation_rules, rules
    try:
        with jax.set_mesh(mesh):
            yield
    finally:
        _activation_rules = previous


def jit_in_mesh(fn, mesh, rules, **jit_kwargs):
    """jax.jit(fn, **jit_kwargs), traced and run inside sharding_context(mesh, rules); `.lower(*args)` lowers it
    there too (arguments may be ShapeDtypeStructs with shardings, for ahead-of-time compiles)."""
    jitted = jax.jit(fn, **jit_kwargs)

    def call(*args):
        with sharding_context(mesh, rules):
            return jitted(*args)

    def lower(*args):
        with sharding_context(mesh, rules):
            return jitted.lower(*args)

    call.lower = lower
    return call


def constrain(x, logical: tuple):
    """Pins activation `x` to the sharding its logical axes map to (no-op outside sharding_context).

    Model code calls this at block boundaries, e.g. ("batch", None, None) for (N, T, D) tokens, so that XLA never
    shards the token axis (odd token counts would otherwise be padded).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if _activation_rules is None or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_mesh_spec(logical, x.shape, mesh, _activation_rules))


def state_shardings(abstract_state, mesh: Mesh, rules):
    """Pure-dict tree of NamedShardings for an nnx.State whose Variables carry `logical_axes` names."""
    def one(variable):
        logical = variable.get_metadata().get("logical_axes") or (None,) * variable.get_value().ndim
        return NamedSharding(mesh, logical_to_mesh_spec(tuple(logical), variable.get_value().shape, mesh, rules))
    return nnx.to_pure_dict(jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def batch_sharding(mesh: Mesh, rules, ndim: int) -> NamedSharding:
    """Leading (batch) dim split over the mesh axes the `batch` rule names; other dims replicated."""
    spec = logical_to_mesh_spec(("batch",) + (None,) * (ndim - 1), (0,) + (1,) * (ndim - 1), mesh, rules)
    return NamedSharding(mesh, spec)


def batch_shards(mesh: Mesh, rules) -> int:
    """How many ways batch_sharding splits the batch dimension (the product of the mesh axes `batch` maps to)."""
    axes = batch_sharding(mesh, rules, 1).spec[0] or ()
    return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def _row_blocks(sharding: NamedSharding, global_rows: int, devices) -> list[tuple[int, int]]:
    """Sorted distinct [start, stop) row ranges that `devices` hold of a (global_rows, ...) array."""
    indices = sharding.devices_indices_map((global_rows,))
    return sorted({(index[0].start or 0, global_rows if index[0].stop is None else index[0].stop)
                   for device, index in indices.items() if device in devices})


def local_rows(mesh: Mesh, rules, global_rows: int) -> np.ndarray:
    """Global row positions int64 (L,), ascending, of a batch of `global_rows` rows that this process's devices
    hold under batch_sharding: exactly the rows this process must feed (in this order) to global_batch.

    Rows are shared by processes whose devices are replicas (e.g. a tensor axis spanning processes); a process
    never feeds rows that it does not hold.
    """
    mine = set(mesh.local_devices)
    blocks = _row_blocks(batch_sharding(mesh, rules, 1), global_rows, mine)
    return np.concatenate([np.arange(a, b) for a, b in blocks]).astype(np.int64)


def owned_rows_mask(mesh: Mesh, rules, global_rows: int) -> np.ndarray:
    """bool (L,) over local_rows: True where this process is the lowest-index process holding the row, so that
    per-row counts summed over processes count every row once."""
    sharding = batch_sharding(mesh, rules, 1)
    lower = {d for d in mesh.devices.flat if d.process_index < jax.process_index()}
    held_below = np.zeros(global_rows, bool)
    for a, b in _row_blocks(sharding, global_rows, lower):
        held_below[a:b] = True
    return ~held_below[local_rows(mesh, rules, global_rows)]


def global_batch(local_batch: dict, mesh: Mesh, rules, global_rows: int) -> dict:
    """Host-local NumPy arrays holding rows `local_rows(mesh, rules, global_rows)` of the global batch -> global
    jax.Arrays with leading dim `global_rows`."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, rules, np.ndim(v)), v,
                                                      (global_rows,) + np.shape(v)[1:])
            for k, v in local_batch.items()}
