"""Performance accounting and the compiled step's communication: analytic FLOPs, collective-byte parsing, no
collective that grows with the global batch, and the bench_step / aot commands."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import override, recipe_config, tiny_config
from siim_jax.config import base_config
from siim_jax.methods import get_method
from siim_jax.models.flops import block_flops
from siim_jax.perf.chips import chip_for
from siim_jax.perf.compiled import collective_bytes, plan_train_step
from siim_jax.perf.flops import train_flops_per_image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("variant, masked, expected", [("B", 118, 141.5), ("L", 118, 334.0), ("H", 154, 816.0)])
def test_analytic_flops_match_the_hand_counts_of_the_official_models(variant, masked, expected):
    # GFLOP/image counted by hand for the official recipes (ViT-B/16, L/16, H/14 at 224 px, 768-wide decoder)
    c = override(base_config(), {"model.variant": variant, "data.num_masked": masked})
    assert train_flops_per_image(get_method(c)) / 1e9 == pytest.approx(expected, abs=0.5)


def test_block_flops_match_xlas_count_of_a_block():
    from flax import nnx
    from siim_jax.models.vit import Block
    block = Block(512, 8, 4.0, dtype=np.float32, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(block)
    x = jax.ShapeDtypeStruct((2, 64, 512), np.float32)
    compiled = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, x).compile()
    counted = compiled.cost_analysis()["flops"]
    assert counted == pytest.approx(2 * block_flops(64, 512, 4.0), rel=0.03)  # norms, softmax, GELU: < 3%


def test_chip_table_tells_h100_pcie_from_sxm_and_knows_no_cpu_peak():
    assert chip_for("NVIDIA H100 PCIe").peak_bf16_flops < chip_for("NVIDIA H100 80GB HBM3").peak_bf16_flops
    assert chip_for("TPU v5 lite").name == "TPU v5e" and chip_for("TPU v5").name == "TPU v5p"
    assert chip_for("cpu") is None


def test_collective_bytes_of_hand_written_hlo():
    hlo = "\n".join([
        "  %ag = bf16[8,128]{1,0} all-gather(bf16[1,128]{1,0} %p), dimensions={0}",  # 2048 bytes
        "  %ar = (f32[], f32[16,4]{1,0}) all-reduce(f32[] %a, f32[16,4]{1,0} %b), to_apply=%add",  # 4 + 256
        "  %ags = (f32[2,3]{1,0}, f32[8,3]{1,0}) all-gather-start(f32[2,3]{1,0} %q), dimensions={0}",  # 96
        "  %agd = f32[8,3]{1,0} all-gather-done((f32[2,3]{1,0}, f32[8,3]{1,0}) %ags)",  # not counted again
        "  %cp = (u8[10]{0}, u8[10]{0}, u32[], u32[]) collective-permute-start(u8[10]{0} %r)",  # 10
        "  %rs = f32[4]{0} reduce-scatter(f32[32]{0} %s), dimensions={0}",  # 16
        "  %x = f32[4]{0} add(f32[4]{0} %t, f32[4]{0} %u)",
    ])
    assert collective_bytes(hlo) == {"all-gather": 2048 + 96, "all-reduce": 260, "reduce-scatter": 16,
                                     "all-to-all": 0, "collective-permute": 10}


# Collectives of compiled HLO text, parsed here independently of siim_jax.perf.compiled: an instruction line
# "%name = <result: one array or a tuple of arrays> <kind>[-start](<operands>) ..."; "-done" halves are not matched.
_COLLECTIVE_LINE = re.compile(r"=\s*(\([^=]*?\)|[a-z]+[0-9]*\[[0-9,]*\]\S*)\s+"
                              r"(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(")
_ARRAY = re.compile(r"\b(pred|[subf][0-9]+|bf16)\[([0-9,]*)\]")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4,
                "u32": 4, "f64": 8, "s64": 8, "u64": 8}


def hlo_collectives(hlo_text: str) -> list[tuple[str, list[tuple[int, ...]], int]]:
    """(kind, result array dims, result bytes) of every collective instruction in compiled HLO text."""
    found = []
    for line in hlo_text.splitlines():
        match = _COLLECTIVE_LINE.search(line)
        if match:
            arrays = [(dtype, tuple(int(d) for d in dims.split(",") if d)) for dtype, dims in
                      _ARRAY.findall(match.group(1))]
            found.append((match.group(2), [dims for _, dims in arrays],
                          sum(_DTYPE_BYTES[dtype] * int(np.prod(dims)) for dtype, dims in arrays)))
    return found


def test_the_collective_pattern_reads_every_form_of_hand_written_hlo():
    hlo = "\n".join([
        "  %ag = bf16[8,128]{1,0} all-gather(bf16[1,128]{1,0} %p), dimensions={0}",
        "  %ar = (f32[], f32[80]{0}) all-reduce(f32[] %a, f32[80]{0} %b), to_apply=%add",
        "  %ags = (f32[2,3]{1,0}, f32[8,3]{1,0}) all-gather-start(f32[2,3]{1,0} %q), dimensions={0}",
        "  %agd = f32[8,3]{1,0} all-gather-done((f32[2,3]{1,0}, f32[8,3]{1,0}) %ags)",
        "  %rs = f32[4]{0} reduce-scatter(f32[32]{0} %s), dimensions={0}",
        "  %x = f32[4]{0} add(f32[4]{0} %t, f32[4]{0} %u)",
    ])
    found = hlo_collectives(hlo)
    assert found == [("all-gather", [(8, 128)], 2048), ("all-reduce", [(), (80,)], 324),
                     ("all-gather", [(2, 3), (8, 3)], 120), ("reduce-scatter", [(4,)], 16)]
    assert holding(found, 80) == [found[1]]  # a 1-D per-row vector of 80 rows counts as holding the batch


def compiled_collectives(mesh: dict, batch: int, loss_type: str = "siamese") -> list:
    """hlo_collectives of the tiny step compiled for 8 devices at global batch `batch`."""
    config = tiny_config(batch_size=batch, **{"model.loss_type": loss_type},
                         **{f"mesh.{k}": v for k, v in mesh.items()})
    plan = plan_train_step(get_method(config))
    return hlo_collectives(plan.train_step.lower(plan.abstract_state, plan.abstract_batch).compile().as_text())


def bytes_by_kind(collectives) -> dict:
    totals = {}
    for kind, _, size in collectives:
        totals[kind] = totals.get(kind, 0) + size
    return totals


def holding(collectives, rows: int) -> list:
    """The collectives whose result has an axis of `rows` (1-D arrays included)."""
    return [c for c in collectives if any(rows in dims for dims in c[1])]


@pytest.mark.parametrize("loss_type, mesh", [
    pytest.param("siamese", {"data": 8}, marks=pytest.mark.slow), ("siamese", {"data": 1, "fsdp": 8}),
    pytest.param("mae", {"data": 1, "fsdp": 8}, marks=pytest.mark.slow)])
def test_collective_bytes_do_not_grow_with_the_global_batch(loss_type, mesh):
    """Global batches 40 and 80 (sizes no model dimension shares): every kind of collective moves exactly the same
    bytes, and no collective holds an axis of the global batch. Catches the relative-position path of the decoder
    gathered over the whole batch (issue 10), also when only a 1-D per-row vector such as f32[80] is gathered."""
    small, large = compiled_collectives(mesh, 40, loss_type), compiled_collectives(mesh, 80, loss_type)
    assert bytes_by_kind(large) == bytes_by_kind(small)
    assert not holding(large, 80) and not holding(small, 40), (holding(large, 80), holding(small, 40))


@pytest.mark.slow
def test_a_tensor_axis_never_gathers_the_global_batch():
    # fsdp x tensor: the tensor-parallel all-reduces of per-device activations grow with the per-device batch
    # (inherent to tensor parallelism); nothing may hold the whole global batch, and weights gather as before
    small = compiled_collectives({"data": 1, "fsdp": 4, "tensor": 2}, 40)
    large = compiled_collectives({"data": 1, "fsdp": 4, "tensor": 2}, 80)
    assert not holding(large, 80) and not holding(large, 40), holding(large, 80) + holding(large, 40)

    def not_per_device_activations(collectives, rows):
        return bytes_by_kind([c for c in collectives if c not in holding(collectives, rows)])

    # everything else (weights, gradients, statistics) moves the same bytes at either batch
    assert not_per_device_activations(large, 20) == not_per_device_activations(small, 10)


TINY_DEMO = ["--config", "configs/demo.py", "--config.batch_size=16", "--config.data.num_train=64"]


def run_module(module, *args):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)


def test_bench_step_reports_consistent_figures():
    done = run_module("siim_jax.bench_step", *TINY_DEMO, "--steps", "3", "--warmup", "1", "--with-data", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["devices"] == 8 and result["global_batch"] == 16 and result["mesh"]["data"] == 8
    assert result["images_per_sec"] == pytest.approx(16 / result["step_seconds"]["median"])
    assert result["images_per_sec_per_chip"] == pytest.approx(result["images_per_sec"] / 8)
    s = result["step_seconds"]
    assert 0 < s["min"] <= s["median"] <= s["max"] and result["compile_seconds"] > 0
    demo = recipe_config("demo", batch_size=16)
    assert result["analytic_gflop_per_image"] == pytest.approx(train_flops_per_image(get_method(demo)) / 1e9)
    assert result["mfu"] is None  # no peak for CPUs
    assert 0.9 < result["xla_gflop_per_image"] / result["analytic_gflop_per_image"] < 1.3
    assert result["peak_memory_bytes"] > 0
    assert result["with_data"]["images_per_sec"] > 0 and 0 <= result["with_data"]["input_wait_fraction"] <= 1
    assert "images/s" in done.stdout and "MFU n/a" in done.stdout


def test_bench_step_bad_input_is_one_line():
    done = run_module("siim_jax.bench_step", *TINY_DEMO, "--steps", "0")
    assert done.returncode == 2 and "error: --steps=0" in done.stderr and "Traceback" not in done.stderr
    done = run_module("siim_jax.bench_step", *TINY_DEMO, "--config.batch_size=12")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert [line for line in done.stderr.splitlines() if line.startswith("error:")][0].count("batch_size=12")


needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu not installed (pip install -e '.[tpu]')")


def test_aot_unknown_topology_is_one_error_line():
    bad = run_module("siim_jax.aot", *TINY_DEMO[:2], "--config.data.num_train=64", "--topology", "v9:2x2")
    assert bad.returncode == 1 and "error: --topology 'v9:2x2'" in bad.stderr and "Traceback" not in bad.stderr


@needs_libtpu
@pytest.mark.slow
def test_aot_fits_a_step_and_refuses_one_too_large():
    """`aot` on v5e:2x2 (4 chips, the demo model shrunk to 32px views and 1-block heads, at batch 64): the report
    adds up and the step fits; the demo model at batch 262144 does not fit (exit 1; the TPU compiler gives up
    early). What each remat policy keeps is test_model's (from JAX's own residual listing: one TPU compile per
    policy took ~50 s here). The shrunk model compiles in ~14 s alone, the full demo one at batch 256 in ~52 s."""
    done = run_module("siim_jax.aot", *TINY_DEMO[:2], "--config.data.num_train=64", "--config.batch_size=64",
                      "--config.model.image_size=32", "--config.data.raw_size=40", "--config.data.num_masked=10",
                      "--config.model.decoder_width=32", "--config.model.predictor_depth=1",
                      "--config.model.projector_depth=1", "--topology", "v5e:2x2", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["fits"] and result["chips"] == 4 and result["chip"] == "TPU v5e" and result["mesh"]["data"] == 4
    m = result["per_chip_bytes"]
    assert m["peak"] == m["argument"] + m["output"] + m["temp"] + m["code"] - m["alias"] > 0
    assert result["collective_bytes"]["all-reduce"] > 0  # data parallel: gradients are reduced
    too_large = run_module("siim_jax.aot", *TINY_DEMO[:2], "--config.data.num_train=64", "--config.batch_size=262144",
                           "--topology", "v5e:2x2")
    assert too_large.returncode == 1 and "DOES NOT FIT" in too_large.stdout, too_large.stderr[-2000:]
