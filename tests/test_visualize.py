"""The pair-drawing tool: the command writes the PNG, draws training's own pairs, puts the marks where the geometry
says, and reports a bad flag in one line with exit status 2."""

import os
import subprocess
import sys

import numpy as np
from PIL import Image

from conftest import recipe_config
from siim_jax.data.pipeline import TwoViewBatches
from siim_jax.data.sources.builtin import make_builtin_images
from siim_jax.data.views import view2_patch_centres_in_view1
from siim_jax.tools import visualize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def demo_config(num_train):
    return recipe_config("demo", **{"data.num_train": num_train})


def run_tool(*args, module="siim_jax.tools.visualize"):
    return subprocess.run([sys.executable, "-m", module, "--config", "configs/demo.py", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120, check=False)


def test_command_draws_the_training_pairs_with_marks_where_the_geometry_puts_them(tmp_path):
    out = tmp_path / "p.png"
    result = run_tool("--config.data.num_train=64", f"--out={out}", "--num=4", "--step=1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    assert not [name for name in os.listdir(tmp_path) if name != "p.png"]  # no temporary file left
    config = demo_config(64)
    size, scale, patch = 64, 3, 8  # demo: 64-px views, 8-px patches; default scale ~192 px per view
    grid = size // patch
    drawing = np.asarray(Image.open(out).convert("RGB"))
    cell = size * scale + 2 * visualize.BORDER
    assert drawing.shape == (visualize.TITLE_HEIGHT + 4 * (visualize.LABEL_HEIGHT + cell + visualize.GAP)
                             + visualize.GAP, 3 * cell + 4 * visualize.GAP, 3)

    # what training sees at step 1 (built as train/loop.py builds it), first 4 rows
    images, _ = make_builtin_images(config.seed, 64, config.data.raw_size, config.data.num_classes)
    expected = TwoViewBatches(images, config.batch_size, size, patch, config.data.num_masked,
                              config.data.crop_min, config.seed).batch_at(1)
    pairs = visualize.sample_pairs(config, 4, 1)
    for key in ("view1", "view2", "geometry", "mask"):
        np.testing.assert_array_equal(pairs[key], expected[key][:4])
    # the views are drawn unmasked where they are unmasked: panel (b) is view 2 upscaled
    x0, y0 = visualize.view_origin(2, 1, size, scale)
    np.testing.assert_array_equal(drawing[y0 + 1, x0 + 1], expected["view2"][2, 0, 0])

    # marks: in (b) at view 2's patch centres, in (c) where the geometry function maps them, if inside view 1
    centres = view2_patch_centres_in_view1(expected["geometry"][:4], grid, size)
    radius = visualize.marker_radius(scale)
    checked = 0
    for row in range(4):
        marks = []
        for colour, patch_index in zip(visualize.MARKER_COLOURS, visualize.marked_patches(grid)):
            r, c = divmod(patch_index, grid)
            marks.append((colour, 1, ((r + 0.5) * patch, (c + 0.5) * patch)))
            marks.append((colour, 2, tuple(centres[row, patch_index])))
        for k, (colour, panel, (y, x)) in enumerate(marks):
            others = [m[2] for j, m in enumerate(marks) if j != k and m[1] == panel]
            if not (0 <= y < size and 0 <= x < size) or any(
                    np.hypot(y - oy, x - ox) * scale < 2 * radius + 2 for oy, ox in others):
                continue  # outside view 1 (drawn in the border band), or overlapping another mark
            x0, y0 = visualize.view_origin(row, panel, size, scale)
            centre = np.array([y0 + y * scale, x0 + x * scale])  # continuous canvas coordinates
            top, left = (centre - 2 * radius).astype(int)
            window = drawing[top:top + 4 * radius + 1, left:left + 4 * radius + 1]
            blob = np.argwhere(np.all(window == colour, axis=-1)) + 0.5 + (top, left)
            assert len(blob) > radius * radius, (row, panel, y, x)  # a filled disc of that colour...
            assert np.abs(blob.mean(0) - centre).max() < 1.0, (row, panel, y, x)  # ...centred on the point
            checked += panel == 2
    assert checked >= 4


def test_bad_flag_exits_2_with_one_line(tmp_path):
    # under the tool's old name, which users may still type
    result = run_tool("--config.data.crop_mni=0.3", f"--out={tmp_path / 'p.png'}", module="siim_jax.data.visualize")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and "crop_mni" in lines[0]
    assert len(lines) == 2 and lines[1].startswith("usage: ")
    assert not (tmp_path / "p.png").exists()


def test_centres_outside_view1_are_marked_in_the_border_band():
    """View 2 entirely below view 1 (di = 1.5): every mark of panel (c) lies in the band around the view, none on
    it, and the footprint outline, wholly outside, does not break the drawing."""
    size, patch, scale = 32, 8, 2
    grey = np.full((1, size, size, 3), 128, np.uint8)
    pairs = {"view1": grey, "view2": grey, "geometry": np.array([[1.5, 0.0, 1.0, 1.0, 0.0, 1.0]], np.float32),
             "mask": np.zeros((1, (size // patch) ** 2), bool), "names": ["synthetic"], "patch_size": patch}
    drawing = np.asarray(visualize.render_pairs(pairs, scale))
    x0, y0 = visualize.view_origin(0, 2, size, scale)
    side, band = size * scale, visualize.BORDER
    cell = drawing[y0 - band:y0 + side + band, x0 - band:x0 + side + band]
    view = drawing[y0:y0 + side, x0:x0 + side]
    for colour in visualize.MARKER_COLOURS:
        assert np.all(cell == colour, axis=-1).sum() >= 4, colour
        assert not np.all(view == colour, axis=-1).any(), colour
