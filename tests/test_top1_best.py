"""The classifiers report the last top-1 and the best over the evaluations (the official scripts' figure) in
metrics.jsonl, TensorBoard and the summary line."""

import glob
import json
import os
import struct

import numpy as np

from conftest import override
from siim_jax import config as config_lib
from siim_jax.train.evaluators import with_best_top1
from siim_jax.train.loop import format_summary, train_and_evaluate


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _tensorboard_scalars(workdir, tag):
    """{step: value} of `tag` in the workdir's TensorBoard event files (TFRecord framing, Event protos)."""
    from tensorboardX.proto import event_pb2
    values = {}
    for path in sorted(glob.glob(os.path.join(workdir, "tensorboard", "events.*"))):
        with open(path, "rb") as f:
            data = f.read()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                if value.tag == tag:
                    values[event.step] = value.simple_value
    return values


def test_best_is_the_running_maximum_and_the_summary_shows_both():
    earlier = [{"step": 0, "val_top1": 0.2}, {"step": 1, "loss": 2.0}, {"step": 2, "val_top1": 0.5}]
    assert with_best_top1({"val_top1": 0.4, "val_top5": 0.9}, earlier) == {"val_top1": 0.4, "val_top5": 0.9,
                                                                          "val_top1_best": 0.5}
    assert with_best_top1({"val_top1": 0.6}, earlier)["val_top1_best"] == 0.6
    assert with_best_top1({"knn_top1": 0.3}, earlier) == {"knn_top1": 0.3}  # not a classifier's figure
    line = format_summary({"step": 4, "total_steps": 4, "interrupted": False, "final_loss": 1.0,
                           "knn_top1_start": None, "top1": 0.4, "top1_best": 0.5, "top5": 0.9,
                           "checkpoint": "/c"})
    assert "top1: 0.4000," in line and "top1_best: 0.5000," in line
    assert float(line.split("top1: ")[1].split(",")[0]) == 0.4  # how the command tests read the last figure


def test_linear_probe_writes_top1_best_everywhere_and_keeps_it_across_a_resume(tmp_path):
    """Evaluated every step (random encoder, lr high enough that top-1 moves): val_top1_best in metrics.jsonl
    and TensorBoard is np.maximum.accumulate of val_top1, also after a resume; the summary has both."""
    config = override(config_lib.linear_probe_config("mu"), {
        "model.image_size": 32, "model.dtype": "float32", "data.num_train": 64, "data.raw_size": 40,
        "data.num_masked": 10, "data.num_val": 24, "classifier.num_classes": 10, "classifier.eval_batch_size": 16,
        "mesh.data": -1, "batch_size": 16, "total_steps": 4, "warmup_steps": 0, "log_every_steps": 1,
        "checkpoint_every_steps": 2, "eval_every_steps": 1, "optim.blr": 50.0})
    workdir = str(tmp_path / "lp")
    assert train_and_evaluate(config, workdir, stop_at_step=2)["interrupted"]
    summary = train_and_evaluate(config, workdir)

    evaluations = [r for r in _records(workdir) if "val_top1" in r]
    assert [r["step"] for r in evaluations] == [0, 1, 2, 3, 4]
    top1 = np.array([r["val_top1"] for r in evaluations])
    best = np.maximum.accumulate(top1)
    assert len(set(top1)) > 1  # top-1 moves, so last and best can differ
    np.testing.assert_array_equal([r["val_top1_best"] for r in evaluations], best)
    assert summary["top1"] == top1[-1] and summary["top1_best"] == best[-1]
    board = _tensorboard_scalars(workdir, "val_top1_best")
    np.testing.assert_allclose([board[s] for s in range(5)], best, rtol=1e-6)
    line = format_summary(summary)
    assert f"top1: {top1[-1]:.4f}," in line and f"top1_best: {best[-1]:.4f}," in line
