"""Ahead-of-time fit check: compiles the train step of a recipe for a Cloud TPU topology on this machine (no TPU
needed; `pip install -e ".[tpu]"` installs libtpu) and reports whether it fits the chips' HBM.

    python -m siim_jax.aot --config configs/siamese_vit_b16_1600ep.py --topology v5p:4x4x4
        [--config.mesh.fsdp=-1 --config.mesh.data=1 ...] [--json]

Topologies are <generation>:<chips per axis>, generation v4, v5e, v5p or v6e (v4 as megacore: one device per chip).
Reports per-chip bytes (argument, output, temp, code; peak = their sum less donated buffers), `fits`, XLA's
GFLOP per image, collective bytes per chip by kind, the mesh and the global batch. Exit status 0 when the step
fits, 1 when it does not (or the recipe / mesh cannot work on that topology), 2 for a bad command line.
"""

import json
import os
import sys
import time

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from siim_jax.cli import EXIT_FAILED, EXIT_USAGE, fail, flags_parser

USAGE = ("usage: python -m siim_jax.aot --config configs/<recipe>.py --topology v5p:4x4x4 [--config.key=value ...] "
         "[--json]")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file in configs/.", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU topology, e.g. v5p:4x4x4, v5e:16x16, v4:2x2x2, v6e:8x8.")
_JSON = flags.DEFINE_boolean("json", False, "End with the figures as one JSON object on one line.")
flags.mark_flags_as_required(["config", "topology"])


def topology_devices(topology: str):
    """The devices of a TPU topology description (compile-only; nothing runs on them)."""
    from jax.experimental import topologies

    from siim_jax.config import ConfigError
    from siim_jax.perf.chips import TOPOLOGY_PREFIXES

    generation, _, shape = topology.partition(":")
    if generation not in TOPOLOGY_PREFIXES or not shape:
        raise ConfigError(f"--topology {topology!r}: expected <generation>:<chips per axis> with generation one of "
                          f"{sorted(TOPOLOGY_PREFIXES)}, e.g. v5p:4x4x4")
    kwargs = {"chip_config_name": "megacore"} if generation == "v4" else {}
    try:
        return topologies.get_topology_desc(topology, "tpu", **kwargs).devices
    except Exception as error:  # noqa: BLE001 - libtpu missing, a shape the generation does not have, ...
        message = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        raise ConfigError(f"--topology {topology}: no TPU topology description ({message}); install libtpu with "
                          "pip install -e \".[tpu]\" and check the shape exists for that generation") from None


def compile_for_topology(config, topology: str) -> dict:
    from siim_jax.config import validate
    from siim_jax.methods import get_method
    from siim_jax.perf.chips import chip_for
    from siim_jax.perf.compiled import collective_bytes, memory_per_device, plan_train_step, xla_flops
    from siim_jax.perf.flops import train_flops_per_image

    validate(config)
    method = get_method(config)
    devices = topology_devices(topology)
    chip = chip_for(devices[0].device_kind)
    plan = plan_train_step(method, devices)
    start = time.perf_counter()
    lowered = plan.train_step.lower(plan.abstract_state, plan.abstract_batch)
    common = {"topology": topology, "chip": chip.name, "chips": len(devices), "mesh": dict(plan.mesh.shape),
              "global_batch": config.batch_size, "hbm_bytes_per_chip": chip.hbm_bytes,
              "model": f"{config.model.loss_type} {config.model.variant} {config.model.image_size}px "
                       f"{config.model.dtype}"}
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as error:  # the TPU compiler refuses a step that cannot fit
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        return {**common, "fits": False, "per_chip_bytes": {}, "compile_seconds": time.perf_counter() - start,
                "compiler_message": " ".join(str(error).split())[:400]}
    seconds = time.perf_counter() - start
    text = compiled.as_text()
    memory = memory_per_device(compiled)
    counted = xla_flops(compiled)
    has_loops = " while(" in text
    return {
        **common,
        "per_chip_bytes": memory,
        "fits": memory["peak"] <= chip.hbm_bytes,
        "xla_gflop_per_image": counted * len(devices) / config.batch_size / 1e9 if counted else None,
        "analytic_gflop_per_image": train_flops_per_image(method) / 1e9,
        "xla_counts_loops_once": has_loops,
        "collective_bytes": collective_bytes(text),
        "compile_seconds": seconds,
    }


def report(r: dict) -> str:
    gib = 2 ** 30
    m = r["per_chip_bytes"]
    if not m:
        return (f"{r['model']}, global batch {r['global_batch']} on {r['topology']} ({r['chips']} x {r['chip']}), "
                f"mesh {r['mesh']}: DOES NOT FIT; the TPU compiler says: {r['compiler_message']}")
    lines = [f"{r['model']}, global batch {r['global_batch']} on {r['topology']} ({r['chips']} x {r['chip']}), "
             f"mesh {r['mesh']}; compiled in {r['compile_seconds']:.0f} s",
             f"per chip: peak {m['peak'] / gib:.2f} GiB of {r['hbm_bytes_per_chip'] / gib:.0f} GiB HBM (argument "
             f"{m['argument'] / gib:.2f}, output {m['output'] / gib:.2f}, temp {m['temp'] / gib:.2f}, code "
             f"{m['code'] / gib:.3f}, donated {m['alias'] / gib:.2f}): "
             + ("fits" if r["fits"] else "DOES NOT FIT"),
             f"GFLOP/image: XLA {r['xla_gflop_per_image']:.4g}, analytic {r['analytic_gflop_per_image']:.4g}"
             + (" (the step has while loops, e.g. windowed einsums or gradient accumulation, whose bodies XLA "
                "counts once: its FLOPs and collective bytes undercount)" if r["xla_counts_loops_once"] else ""),
             "collective MiB per chip: " + ", ".join(f"{k} {v / 2**20:.1f}" for k, v in r["collective_bytes"].items())]
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments: {argv[1:]}", EXIT_USAGE, USAGE)
    from siim_jax.config import ConfigError

    logging.set_verbosity(logging.WARNING)
    try:
        config = _CONFIG.value
        config.seed  # a recipe that failed to load raises here
        result = compile_for_topology(config, _TOPOLOGY.value)
    except ConfigError as e:
        fail(str(e), EXIT_FAILED)
    print(report(result), flush=True)
    if _JSON.value:
        print(json.dumps(result), flush=True)
    sys.exit(0 if result["fits"] else EXIT_FAILED)


def run():
    # compile-only: JAX itself runs on the CPU; libtpu is asked for topology descriptions, not for chips
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # several compile-only runs at once (no chips held)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_STDERR_LOG_LEVEL", "3")
    os.environ.setdefault("TPU_MIN_LOG_LEVEL", "3")
    app.run(main, flags_parser=flags_parser(USAGE))


if __name__ == "__main__":
    run()
