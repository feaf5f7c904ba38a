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


def create_mesh(mesh_config, devices=None) -> Mesh:
    """Mesh of shape (data, fsdp, tensor) from config; one -1 entry takes the remaining devices."""
    devices = jax.devices() if devices is None else devices
    shape = [int(mesh_config[a]) for a in MESH_AXES]
    if shape.count(-1) > 1:
        raise ConfigError(f"config.mesh.data/fsdp/tensor={shape}: at most one axis may be -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if len(devices) % known:
            raise ConfigError(f"config.mesh.data/fsdp/tensor={shape} cannot fill the {len(devices)} devices: the "
                              f"fixed axes' product {known} must divide {len(devices)}")
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise ConfigError(f"config.mesh.data/fsdp/tensor={shape} needs {math.prod(shape)} devices, "
                         f"found {len(devices)}; set one axis to -1 to fill")
    return Mesh(mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True), MESH_AXES)


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
    """Pure-dict tree of NamedShardings for an nnx.State whose Variables carry `out_sharding` logical names."""
    def one(variable):
        logical = variable.get_metadata().get("out_sharding") or (None,) * variable.get_value().ndim
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


def global_batch(local_batch: dict, mesh: Mesh, rules) -> dict:
    """Host-local NumPy arrays (this process's slice of the global batch) -> global jax.Arrays."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, rules, np.ndim(v)), v)
            for k, v in local_batch.items()}
