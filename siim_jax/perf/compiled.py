"""The real train step built for a list of devices (the ones present, or a TPU topology's for an ahead-of-time
compile), and what XLA made of it: memory per device, FLOPs, collective bytes."""

import dataclasses
import math
import re

import jax
import numpy as np

from siim_jax.config import ConfigError
from siim_jax.methods.base import Method
from siim_jax.parallel.sharding import batch_sharding, batch_shards, create_mesh
from siim_jax.train.schedules import ema_momentum_fn, learning_rate_fn, training_length
from siim_jax.train.state import abstract_train_state
from siim_jax.train.step import jit_train_step


@dataclasses.dataclass
class StepPlan:
    mesh: jax.sharding.Mesh
    train_step: object  # jit_in_mesh wrapper: call(state, batch), .lower(state, batch)
    abstract_state: object  # TrainState of ShapeDtypeStructs carrying their shardings
    abstract_batch: dict  # ShapeDtypeStructs carrying their shardings
    learning_rate: object


def plan_train_step(method: Method, devices=None) -> StepPlan:
    """The train step of `method` on a mesh over `devices` (default: all), with abstract state and batch;
    nothing is allocated. Raises ConfigError for a mesh or batch size that does not fit the devices."""
    config = method.config
    mesh = create_mesh(config.mesh, devices)
    rules = config.mesh.logical_axis_rules
    shards = batch_shards(mesh, rules)
    if config.batch_size % (shards * config.grad_accum_steps):
        raise ConfigError(f"config.batch_size={config.batch_size} must be divisible by the {shards} data shards "
                          f"times config.grad_accum_steps={config.grad_accum_steps}")
    length = training_length(config, max(config.data.num_train, config.batch_size))
    lr_fn, momentum_fn = learning_rate_fn(config, length), ema_momentum_fn(config, length)
    graphdef, tx, abstract_state, shardings = abstract_train_state(method, mesh, lr_fn)
    step = jit_train_step(method, graphdef, tx, lr_fn, momentum_fn, mesh, shardings)
    batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(mesh, rules, len(shape)))
             for k, (shape, dtype) in method.batch_spec(config.batch_size).items()}
    return StepPlan(mesh, step, abstract_state, batch, lr_fn)


def memory_per_device(compiled) -> dict:
    """Bytes per device of a compiled executable: argument, output, temp, code, alias and peak (the sum less
    the donated / aliased bytes), or {} where the backend does not say."""
    stats = compiled.memory_analysis()
    if stats is None:
        return {}
    out = {"argument": stats.argument_size_in_bytes, "output": stats.output_size_in_bytes,
           "temp": stats.temp_size_in_bytes, "code": stats.generated_code_size_in_bytes,
           "alias": stats.alias_size_in_bytes}
    out["peak"] = out["argument"] + out["output"] + out["temp"] + out["code"] - out["alias"]
    return {k: int(v) for k, v in out.items()}


def xla_flops(compiled) -> float | None:
    """XLA's FLOP count of one execution, summed over devices (None where the backend gives none). XLA counts a
    while-loop body once, so steps with loops (gradient accumulation, windowed einsums) undercount."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        return None
    return float(analysis["flops"])


COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128)\[([\d,]*)\]")
# "%name = <result shape(s)> <opcode>(" in post-optimisation HLO; async forms end in -start
_INSTRUCTION = re.compile(r"=\s*(.+?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")


def _shapes_bytes(text: str) -> list[int]:
    return [_DTYPE_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
            for dtype, dims in _SHAPE.findall(text)]


def collective_bytes(hlo_text: str) -> dict:
    """Bytes per device moved by each kind of collective in compiled HLO text (`compiled.as_text()`): the size
    of each collective's result (for async `-start` forms, of the result half of the (operand, result) tuple).
    Like XLA's FLOPs, a collective inside a while loop is counted once."""
    totals = dict.fromkeys(COLLECTIVES, 0)
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.search(line)
        if not match:
            continue
        shapes, kind, start = match.groups()
        sizes = _shapes_bytes(shapes)
        if start and kind in ("all-gather", "collective-permute", "all-to-all", "reduce-scatter") and len(sizes) >= 2:
            sizes = sizes[len(sizes) // 2:] if kind != "collective-permute" else sizes[1:2]
        totals[kind] += sum(sizes)
    return totals


def synthetic_batch(method: Method, plan: StepPlan, seed: int = 0) -> dict:
    """A valid random train batch of the method (siim_jax/methods) in the step's shardings: the default input of
    the step benchmark, so that it times the step and nothing else."""
    arrays = method.synthetic_batch(method.config.batch_size, np.random.default_rng(seed))
    return {k: jax.device_put(v, plan.abstract_batch[k].sharding) for k, v in arrays.items()}
