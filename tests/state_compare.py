"""Whole-state comparisons for the resume, fault-injection and multi-process tests.

`assert_same_state(a, b, rtol, atol)` loads the newest checkpoint of two workdirs and compares every leaf of the
train state (step, params, EMA params, optimiser state, BatchNorm statistics, and any field added to TrainState
later) and the run's counters saved beside it (`data_skipped_total`, `images_seen`); a difference names the leaf.
`resumed_from(log_text)` is the step a run resumed from, read from the trainer's "resumed from <checkpoint>" line
(siim_jax/train/loop.py logs it on logger `siim_jax.train.loop`: stderr of a command, `caplog.text` in-process).
"""

import dataclasses
import os
import re

import jax
import numpy as np

# loop.py: log.info("resumed from %s", checkpoints.path(resume_step)), path = <workdir>/checkpoints/<step>
_RESUMED = re.compile(r"resumed from \S*?checkpoints[/\\](\d+)\b")
RESUME_LOGGER = "siim_jax"  # caplog.at_level(logging.INFO, logger=RESUME_LOGGER) makes the line visible in-process


def resume_steps(log_text: str) -> list[int]:
    """Every step a "resumed from" line of `log_text` names, in order (one per process of a multi-process run)."""
    return [int(step) for step in _RESUMED.findall(log_text)]


def resumed_from(log_text: str) -> int | None:
    """The step the run of `log_text` resumed from; None when it started afresh. Every process of a multi-process
    run logs the line: they must all name the same step."""
    steps = set(resume_steps(log_text))
    assert len(steps) <= 1, f"the processes resumed from different steps: {sorted(steps)}"
    return steps.pop() if steps else None


def _read_counters(workdir: str, config) -> tuple[int, dict]:
    """(newest saved step, the counters saved with it)."""
    import orbax.checkpoint as ocp

    from siim_jax.train.checkpoint import Checkpointer
    checkpoints = Checkpointer(workdir, config)
    try:
        step = checkpoints.latest_step()
        assert step is not None, f"{workdir} holds no checkpoint"
        try:
            saved = checkpoints.manager.restore(step, args=ocp.args.Composite(counters=ocp.args.JsonRestore()))
            counters = dict(saved["counters"] or {})
        except Exception:  # noqa: BLE001 - a checkpoint without counters: compared as {}
            counters = {}
    finally:
        checkpoints.close()
    return step, counters


def load_newest(workdir) -> tuple[int, dict]:
    """(newest saved step of `workdir`, {"state": {field: subtree of every TrainState field}, "counters": ...})
    as host NumPy arrays, whatever mesh or number of processes wrote it."""
    from siim_jax.interop import load_workdir_state, workdir_config
    workdir = str(workdir)
    step, counters = _read_counters(workdir, workdir_config(workdir))
    _, state = load_workdir_state(workdir, step)
    fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    return step, {"state": jax.device_get(fields), "counters": counters}


def _leaves(tree) -> dict:
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _difference(a, b, rtol: float, atol: float) -> str | None:
    """None when the leaves agree (integers and booleans exactly, floats within atol + rtol * |b|), else what
    differs."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return f"shape/dtype {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
    if not np.issubdtype(a.dtype, np.inexact):
        bad = a != b
        if not bad.any():
            return None
        return f"{int(bad.sum())} of {a.size} values differ (first: {a[bad].flat[0]} vs {b[bad].flat[0]})"
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    error = np.abs(a64 - b64)
    bad = ~(error <= atol + rtol * np.abs(b64))  # NaN anywhere is a difference
    if not bad.any():
        return None
    worst = np.unravel_index(np.argmax(np.where(bad, error, -1.0)), a.shape) if a.ndim else ()
    return (f"{int(bad.sum())} of {a.size} values differ beyond rtol={rtol} atol={atol}; worst at {worst}: "
            f"{a64[worst]!r} vs {b64[worst]!r} (max |a-b| {np.nanmax(error):.3g})")


KEY_BIAS = "['qkv']['bias']"  # (3, heads, head_dim): index 1 of axis 0 is the key bias


def _without_key_bias(path: str, leaf):
    """The attention key bias has a gradient of exactly zero (q . b_k is the same for every key, and softmax
    ignores it), so what reaches it across meshes is float noise that Adam scales to full-size steps: leaves of
    that bias (params, EMA, optimiser moments) are compared without it. It changes no output."""
    leaf = np.asarray(leaf)
    return np.delete(leaf, 1, axis=0) if path.endswith(KEY_BIAS) and leaf.ndim and leaf.shape[0] == 3 else leaf


def assert_same_state(workdir_a, workdir_b, rtol: float = 0.0, atol: float = 0.0,
                      other_mesh: bool = False) -> dict:
    """Asserts the newest checkpoints of the two workdirs hold the same step and the same train state and
    counters, leaf by leaf: integer leaves (step, optimiser counts, counters) exactly, floating ones within
    `atol + rtol * |b|` elementwise. The assertion message names every differing leaf path (e.g.
    "['state']['batch_stats']['projector']['bn_0']['mean']"). Returns {TrainState field: number of leaves compared}
    so that a caller can check no part of the state is empty. `other_mesh`: the runs summed in another order
    (another mesh or process count), so the attention key bias, pure float noise there, is left out."""
    step_a, a = load_newest(workdir_a)
    step_b, b = load_newest(workdir_b)
    leaves_a, leaves_b = _leaves(a), _leaves(b)
    problems = []
    if step_a != step_b:
        problems.append(f"newest checkpoint: step {step_a} vs step {step_b}")
    only_a, only_b = sorted(set(leaves_a) - set(leaves_b)), sorted(set(leaves_b) - set(leaves_a))
    if only_a or only_b:
        problems.append(f"different structure: only in a {only_a[:10]}, only in b {only_b[:10]}")
    for path in sorted(set(leaves_a) & set(leaves_b)):
        pair = (leaves_a[path], leaves_b[path])
        if other_mesh:
            pair = tuple(_without_key_bias(path, leaf) for leaf in pair)
        difference = _difference(*pair, rtol, atol)
        if difference:
            problems.append(f"{path}: {difference}")
    assert not problems, (f"the newest checkpoints of {workdir_a} (a, step {step_a}) and {workdir_b} (b, step "
                          f"{step_b}) differ in {len(problems)} place(s):\n  " + "\n  ".join(problems[:40]))
    return {name: len(jax.tree.leaves(subtree)) for name, subtree in a["state"].items()}


def saved_steps(workdir) -> list[int]:
    """The finished step folders in <workdir>/checkpoints (Orbax writes <step>.orbax-checkpoint-tmp-* first)."""
    directory = os.path.join(str(workdir), "checkpoints")
    return sorted(int(d) for d in os.listdir(directory) if d.isdigit()) if os.path.isdir(directory) else []


def _set_aside(workdir) -> set[str]:
    directory = os.path.join(str(workdir), "checkpoints_unusable")
    return set(os.listdir(directory)) if os.path.isdir(directory) else set()


def checkpoints_before_relaunch(workdir) -> tuple[list[int], set[str]]:
    """What expected_resume_step needs to know of the workdir, taken before a relaunch starts."""
    return saved_steps(workdir), _set_aside(workdir)


def expected_resume_step(before, workdir) -> int | None:
    """The step a relaunch must have resumed from: the newest step saved before it started, unless restore found
    it unreadable and moved it to checkpoints_unusable/ (then the newest one left); None when there was none."""
    steps, set_aside_before = before
    passed_over = {int(name.split("-")[0]) for name in _set_aside(workdir) - set_aside_before}
    return max(set(steps) - passed_over, default=None)
