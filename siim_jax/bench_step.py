"""Train-step benchmark: the real SiameseIM (or MAE) step and state on the devices present, compiled (timed on
its own), warmed up, then timed over N synced steps.

    python -m siim_jax.bench_step --config configs/demo.py [--config.x=y ...] [--steps 20] [--warmup 3]
        [--with-data] [--json]

Input is one synthetic in-memory batch (random views, identity geometry, exact masks), so the figures are the
step's alone; --with-data also times the steps fed by the real input pipeline of config.data and says whether
the host keeps up. Prints the figures; --json prints them as one JSON object on the last stdout line.
MFU = images/s x analytic FLOPs per image (siim_jax/perf/flops.py) / (devices x dense bf16 peak,
siim_jax/perf/chips.py); none on CPUs and unlisted chips.
"""

import json
import statistics
import sys
import time

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from siim_jax.cli import EXIT_FAILED, EXIT_USAGE, fail, flags_parser

USAGE = ("usage: python -m siim_jax.bench_step --config configs/<recipe>.py [--config.key=value ...] [--steps N] "
         "[--warmup N] [--with-data] [--json]")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file in configs/.", lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compiling.")
_WITH_DATA = flags.DEFINE_boolean("with-data", False, "Also time steps fed by the real input pipeline.")
_JSON = flags.DEFINE_boolean("json", False, "End with the figures as one JSON object on one line.")
flags.mark_flags_as_required(["config"])


def spread(seconds: list[float]) -> dict:
    """Median, min, max and interquartile range of per-step seconds."""
    q1, _, q3 = statistics.quantiles(seconds, n=4) if len(seconds) > 1 else (seconds[0],) * 3
    return {"median": statistics.median(seconds), "min": min(seconds), "max": max(seconds), "iqr": q3 - q1}


def time_steps(step, state, batches, count: int):
    """Runs `count` steps, each synced; returns (state, per-step seconds, seconds spent waiting for input)."""
    seconds, waiting = [], 0.0
    for _ in range(count):
        start = time.perf_counter()
        batch = next(batches)
        waiting += time.perf_counter() - start
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        seconds.append(time.perf_counter() - start)
    return state, seconds, waiting


def real_batches(method, plan):
    """Device batches of `method` from the real input pipeline (this process's rows), endless."""
    from siim_jax.data.sources import open_source
    from siim_jax.parallel.sharding import local_rows
    from siim_jax.train.loop import device_prefetch

    config = method.config
    rules = config.mesh.logical_axis_rules
    source = open_source(config.data, config.seed)
    rows = local_rows(plan.mesh, rules, config.batch_size)
    batches = method.make_batches(source, rows=rows, owned=None)
    return (batch for batch, _ in device_prefetch(batches.iterate(0), plan.mesh, rules, config.batch_size))


def benchmark(config, steps: int, warmup: int, with_data: bool) -> dict:
    from siim_jax.config import validate
    from siim_jax.methods import get_method
    from siim_jax.perf.chips import chip_for
    from siim_jax.perf.compiled import memory_per_device, plan_train_step, synthetic_batch, xla_flops
    from siim_jax.perf.flops import train_flops_per_image
    from siim_jax.train.state import init_train_state

    validate(config)
    method = get_method(config)
    plan = plan_train_step(method)
    _, _, state, _ = init_train_state(method, plan.mesh, plan.learning_rate)
    batch = synthetic_batch(method, plan)
    start = time.perf_counter()
    compiled = plan.train_step.lower(state, batch).compile()
    compile_seconds = time.perf_counter() - start
    print(f"compiled in {compile_seconds:.1f} s; {warmup} warm-up and {steps} timed steps", file=sys.stderr,
          flush=True)

    def same_batch():
        while True:
            yield batch

    state, _, _ = time_steps(compiled, state, same_batch(), warmup)
    state, seconds, _ = time_steps(compiled, state, same_batch(), steps)

    devices = jax.devices()
    kind = devices[0].device_kind
    chip = chip_for(kind)
    median = statistics.median(seconds)
    images_per_sec = config.batch_size / median
    analytic = train_flops_per_image(method)
    counted = xla_flops(compiled)
    memory = memory_per_device(compiled)
    runtime_peak = [d.memory_stats() or {} for d in jax.local_devices()]
    peak = max((s.get("peak_bytes_in_use", 0) for s in runtime_peak), default=0) or memory.get("peak")
    result = {
        "images_per_sec": images_per_sec,
        "images_per_sec_per_chip": images_per_sec / len(devices),
        "step_seconds": spread(seconds),
        "mfu": images_per_sec * analytic / (len(devices) * chip.peak_bf16_flops) if chip else None,
        "xla_gflop_per_image": counted * len(devices) / config.batch_size / 1e9 if counted else None,
        "analytic_gflop_per_image": analytic / 1e9,
        "peak_memory_bytes": peak,
        "peak_memory_source": "runtime" if any("peak_bytes_in_use" in s for s in runtime_peak) else "compiled",
        "compiled_memory_bytes": memory,
        "compile_seconds": compile_seconds,
        "device": kind,
        "chip": chip.name if chip else None,
        "devices": len(devices),
        "processes": jax.process_count(),
        "mesh": dict(plan.mesh.shape),
        "global_batch": config.batch_size,
        "model": f"{config.model.loss_type} {config.model.variant} {config.model.image_size}px {config.model.dtype}",
    }
    if with_data:
        batches = real_batches(method, plan)
        state, _, _ = time_steps(compiled, state, batches, warmup)
        state, data_seconds, waiting = time_steps(compiled, state, batches, steps)
        rate = config.batch_size / statistics.median(data_seconds)
        result["with_data"] = {"images_per_sec": rate, "step_seconds": spread(data_seconds),
                               "input_wait_fraction": waiting / sum(data_seconds),
                               "host_keeps_up": rate >= 0.95 * images_per_sec}
    return result


def report(r: dict) -> str:
    """Human-readable lines of a benchmark result."""
    s = r["step_seconds"]
    lines = [f"{r['model']}, global batch {r['global_batch']} on {r['devices']} x {r['device']} "
             f"(mesh {r['mesh']}, {r['processes']} process(es))",
             f"step {s['median'] * 1e3:.1f} ms median (min {s['min'] * 1e3:.1f}, max {s['max'] * 1e3:.1f}, "
             f"iqr {s['iqr'] * 1e3:.1f}); compile {r['compile_seconds']:.1f} s",
             f"images/s {r['images_per_sec']:.1f} ({r['images_per_sec_per_chip']:.1f} per chip); MFU "
             + (f"{r['mfu']:.1%} of {r['chip']} dense bf16 peak" if r["mfu"] is not None else "n/a (no peak known "
                "for this device)"),
             f"GFLOP/image: analytic {r['analytic_gflop_per_image']:.2f}, XLA "
             + (f"{r['xla_gflop_per_image']:.2f}" if r["xla_gflop_per_image"] else "n/a")
             + " (XLA counts a loop body once: grad_accum_steps > 1 undercounts)",
             f"peak memory per device {r['peak_memory_bytes'] / 2**20:.1f} MiB ({r['peak_memory_source']})"]
    if "with_data" in r:
        d = r["with_data"]
        lines.append(f"with the input pipeline: images/s {d['images_per_sec']:.1f}, waiting for input "
                     f"{d['input_wait_fraction']:.0%} of the time; host keeps up: {'yes' if d['host_keeps_up'] else 'no'}")
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments: {argv[1:]}", EXIT_USAGE, USAGE)
    for name, flag in (("steps", _STEPS), ("warmup", _WARMUP)):
        if flag.value < (1 if name == "steps" else 0):
            fail(f"--{name}={flag.value} must be >= {1 if name == 'steps' else 0}", EXIT_USAGE, USAGE)
    from siim_jax.config import ConfigError
    from siim_jax.data.sources import SourceError

    logging.set_verbosity(logging.WARNING)
    try:
        config = _CONFIG.value
        config.seed  # a recipe that failed to load raises here
        result = benchmark(config, _STEPS.value, _WARMUP.value, _WITH_DATA.value)
    except (ConfigError, SourceError) as e:
        fail(str(e), EXIT_FAILED)
    print(report(result), flush=True)
    if _JSON.value:
        print(json.dumps(result), flush=True)


def run():
    app.run(main, flags_parser=flags_parser(USAGE))


if __name__ == "__main__":
    run()
