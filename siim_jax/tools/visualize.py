"""Draws sampled training pairs so that a person can check the relative geometry by eye.

    python -m siim_jax.tools.visualize --config configs/demo.py --out pairs.png [--num 8] [--step 0] [--scale 3]
        [--config.key=value ...]

The pairs are the first `--num` examples of the step-`--step` batch that training draws with this config (same
source, seed, crops, flips and masks; the colour augmentation runs later, on the device, and is not shown).
One row per pair, three panels:
  (a) view 1, masked patches dimmed and hatched, with the patch grid;
  (b) view 2 with a few of its patch centres marked in distinct colours;
  (c) view 1 again, with those centres drawn where the geometry (`views.view2_patch_centres_in_view1`, the
      formula of the model's relative embedding) puts them, and view 2's footprint outlined. A centre outside
      view 1 is drawn as a triangle in the border band, pointing towards where it lies (slid along the band
      when several would land on the same spot).
If the geometry is right, each coloured mark in (c) sits on the same image content as in (b). Also installed as
`siim-jax-visualize`; the old name `python -m siim_jax.data.visualize` still works. --out may be on gs://
(siim_jax.storage); an object-store failure is one error line, exit 1.
"""

import io
import os
import sys

import numpy as np
from absl import app, flags
from ml_collections import config_flags
from PIL import Image, ImageDraw, ImageFont

from siim_jax import config as config_lib
from siim_jax import storage
from siim_jax.cli import RunError, fail, flags_parser
from siim_jax.data.pipeline import TooManyBadImagesError, TwoViewBatches
from siim_jax.data.sources import SourceError, open_source
from siim_jax.data.views import view2_patch_centres_in_view1
from siim_jax.methods import get_method
from siim_jax.models.variants import VIT_VARIANTS

USAGE = ("usage: python -m siim_jax.tools.visualize --config configs/<recipe>.py --out <file.png> [--num 8] "
         "[--step 0] [--scale N] [--config.key=value ...]")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file in configs/.", lock_config=True)
_OUT = flags.DEFINE_string("out", None, "PNG file to write.")
_NUM = flags.DEFINE_integer("num", 8, "Pairs to draw (the first ones of the batch).", lower_bound=1)
_STEP = flags.DEFINE_integer("step", 0, "Training step whose batch is drawn.", lower_bound=0)
_SCALE = flags.DEFINE_integer("scale", None, "Upscaling of the views (default: about 192 px per view).",
                              lower_bound=1)
flags.mark_flags_as_required(["config", "out"])

# Layout, in canvas pixels: a title line, then per pair a label line and three square cells of
# view_size*scale + 2*BORDER (the view in the middle, a band around it for marks that fall outside), GAP apart.
BORDER = 14
GAP = 8
TITLE_HEIGHT = 16
LABEL_HEIGHT = 14
BACKGROUND = (32, 32, 32)
TEXT_COLOUR = (235, 235, 235)
MARKER_COLOURS = ((230, 25, 75), (60, 200, 75), (0, 130, 230), (255, 225, 25), (240, 50, 230))
PANEL_TITLES = ("view 1, masked patches hatched", "view 2, some patch centres marked",
                "those centres in view 1, by the geometry")


def marked_patches(grid: int) -> tuple[int, ...]:
    """Raster indices of the view-2 patches that get marks, in MARKER_COLOURS order: the four corners
    (top-left, top-right, bottom-left, bottom-right, so a mirror swaps colours sideways) and the centre."""
    last = grid - 1
    return (0, last, last * grid, last * grid + last, (grid // 2) * grid + grid // 2)


def default_scale(view_size: int) -> int:
    """Upscaling that draws a view about 192 px wide (3 for the demo's 64-px views, 1 for 224 px)."""
    return max(1, round(192 / view_size))


def marker_radius(scale: int) -> int:
    """Canvas radius of the disc marking a patch centre."""
    return max(4, 2 * scale)


def canvas_size(num_rows: int, view_size: int, scale: int) -> tuple[int, int]:
    """(width, height) of the drawing of `num_rows` pairs."""
    cell = view_size * scale + 2 * BORDER
    return 3 * cell + 4 * GAP, TITLE_HEIGHT + num_rows * (LABEL_HEIGHT + cell + GAP) + GAP


def view_origin(row: int, panel: int, view_size: int, scale: int) -> tuple[int, int]:
    """Canvas (x, y) of the top-left corner of the view drawn in `panel` (0, 1, 2 = a, b, c) of `row`: view pixel
    coordinates (y, x) (pixel k covers [k, k+1)) appear at canvas (x0 + x*scale, y0 + y*scale)."""
    cell = view_size * scale + 2 * BORDER
    x0 = GAP + panel * (cell + GAP) + BORDER
    y0 = TITLE_HEIGHT + row * (LABEL_HEIGHT + cell + GAP) + LABEL_HEIGHT + BORDER
    return x0, y0


def sample_pairs(config, num: int, step: int) -> dict:
    """The first `num` examples of the global batch that training draws at `step` with `config`.

    Returns view1, view2 uint8 (num, S, S, 3), geometry float32 (num, 6), mask bool (num, g*g), names (num,) str,
    patch_size int. Equals `TwoViewBatches(...).batch_at(step)` restricted to its first `num` rows (one process),
    computed for those rows only.
    """
    config_lib.validate(config)
    get_method(config)  # what the model cannot take (variant, patches, masked count) fails here, as in training
    if not 0 < num <= config.batch_size:
        raise ValueError(f"num={num} must be in [1, config.batch_size={config.batch_size}]")
    patch_size = VIT_VARIANTS[config.model.variant][3]
    source = open_source(config.data, config.seed)
    batches = TwoViewBatches(source, config.batch_size, config.model.image_size, patch_size,
                             config.data.num_masked, config.data.crop_min, config.seed, num_threads=1)
    rows, names = [], []
    for position, index in enumerate(batches.indices_at(step)[:num]):
        view1, view2, geometry, mask, skipped = batches.example(step, position, int(index))
        for name in skipped:
            print(f"warning: skipped undecodable {name}", file=sys.stderr)
        rows.append((view1, view2, geometry, mask))
        names.append(source.describe(int(index)))
    view1, view2, geometry, mask = (np.stack(column) for column in zip(*rows))
    return {"view1": view1, "view2": view2, "geometry": geometry, "mask": mask, "names": names,
            "patch_size": patch_size}


def _upscaled(view: np.ndarray, scale: int) -> np.ndarray:
    return np.repeat(np.repeat(view.astype(np.float32), scale, axis=0), scale, axis=1)


def _with_grid(panel: np.ndarray, step: int) -> np.ndarray:
    """Lightens every `step`-th row and column: the patch grid."""
    panel = panel.copy()
    for k in range(step, panel.shape[0], step):
        panel[k, :] = 0.6 * panel[k, :] + 0.4 * 255
        panel[:, k] = 0.6 * panel[:, k] + 0.4 * 255
    return panel


def _masked_view(view: np.ndarray, mask: np.ndarray, patch_size: int, scale: int) -> np.ndarray:
    """View 1 (S, S, 3) upscaled, masked patches (mask (g*g,), True = masked) dimmed and hatched, grid drawn."""
    grid = view.shape[0] // patch_size
    panel = _upscaled(view, scale)
    cells = np.kron(mask.reshape(grid, grid), np.ones((patch_size * scale, patch_size * scale), bool))
    yy, xx = np.indices(cells.shape)
    hatch = cells & ((yy + xx) % 6 == 0)
    panel[cells] *= 0.35
    panel[hatch] = (255, 170, 60)
    return _with_grid(panel, patch_size * scale)


def _draw_marker(draw: ImageDraw.ImageDraw, centre: tuple[float, float], colour, radius: int):
    cx, cy = centre
    draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour, outline=(0, 0, 0))


def _draw_outside_marker(draw: ImageDraw.ImageDraw, point: tuple[float, float], box: tuple[float, float],
                         colour, taken: list):
    """A triangle in the border band around the view box (x0, y0, x1, y1 in `box`), pointing at `point` (x, y):
    at the nearest band position, slid along the band past the triangles already placed (`taken`, updated)."""
    x0, y0, x1, y1 = box
    half = BORDER / 2
    size = half - 1
    px, py = point
    cx, cy = min(max(px, x0 - half), x1 + half), min(max(py, y0 - half), y1 + half)
    along_x = not y0 <= cy <= y1  # top or bottom band (corners included): slide sideways, else up/down
    for k in (0, 1, -1, 2, -2, 3, -3, 4, -4, 5, -5):
        offset = k * (2 * size + 1)
        tx = min(max(cx + offset, x0 - half), x1 + half) if along_x else cx
        ty = cy if along_x else min(max(cy + offset, y0 - half), y1 + half)
        if all(max(abs(tx - ox), abs(ty - oy)) > 2 * size for ox, oy in taken):
            cx, cy = tx, ty
            break
    taken.append((cx, cy))
    dx, dy = px - (x0 + x1) / 2, py - (y0 + y1) / 2
    norm = max(np.hypot(dx, dy), 1e-9)
    dx, dy = dx / norm, dy / norm
    tip = (cx + dx * size, cy + dy * size)
    base = (cx - dx * size * 0.7, cy - dy * size * 0.7)
    left = (base[0] - dy * size * 0.8, base[1] + dx * size * 0.8)
    right = (base[0] + dy * size * 0.8, base[1] - dx * size * 0.8)
    draw.polygon([tip, left, right], fill=colour, outline=(0, 0, 0))


def render_pairs(pairs: dict, scale: int) -> Image.Image:
    """Draws `pairs` (as returned by sample_pairs) into one RGB image of canvas_size(len, S, scale)."""
    view1, view2, geometry, mask = pairs["view1"], pairs["view2"], pairs["geometry"], pairs["mask"]
    num, size = view1.shape[:2]
    patch_size = pairs["patch_size"]
    grid = size // patch_size
    side = size * scale
    radius = marker_radius(scale)
    marked = marked_patches(grid)
    view2_centres = (np.stack(np.divmod(np.asarray(marked), grid), axis=-1) + 0.5) * patch_size  # (y, x)
    in_view1 = view2_patch_centres_in_view1(geometry, grid, size)  # (num, g*g, 2) as (y, x)

    canvas = Image.new("RGB", canvas_size(num, size, scale), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for panel, title in enumerate(PANEL_TITLES):
        x0, _ = view_origin(0, panel, size, scale)
        draw.text((x0 - BORDER, 2), title, fill=TEXT_COLOUR, font=font)
    for row in range(num):
        di, dj, dh, dw, rflip, dj_flip = (float(v) for v in geometry[row])
        origins = [view_origin(row, panel, size, scale) for panel in range(3)]
        orientation = "one view mirrored" if rflip > 0.5 else "same orientation"
        label = (f"{pairs['names'][row]}  rflip={rflip:.0f} ({orientation})  dh={dh:.2f} dw={dw:.2f}  "
                 f"di={di:+.2f} dj={dj:+.2f} dj_flip={dj_flip:+.2f}  masked {int(mask[row].sum())}/{grid * grid}")
        draw.text((GAP, origins[0][1] - BORDER - LABEL_HEIGHT + 1), label, fill=TEXT_COLOUR, font=font)

        panels = (_masked_view(view1[row], mask[row], patch_size, scale), _upscaled(view2[row], scale),
                  _with_grid(_upscaled(view1[row], scale), patch_size * scale))
        for (x0, y0), pixels in zip(origins, panels):
            canvas.paste(Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8)), (x0, y0))

        # (c): view 2's footprint in view 1, from its outermost patch centres plus half a patch spacing
        (cx0, cy0), centres = origins[2], in_view1[row] * scale
        half_y, half_x = dh * patch_size * scale / 2, dw * patch_size * scale / 2
        top, bottom = centres[:, 0].min() - half_y, centres[:, 0].max() + half_y
        left, right = centres[:, 1].min() - half_x, centres[:, 1].max() + half_x
        top, bottom, left, right = np.clip((top, bottom, left, right), 1 - BORDER, side + BORDER - 1)
        draw.rectangle((cx0 + left, cy0 + top, cx0 + right, cy0 + bottom), outline=(255, 255, 255))

        outside_marks = []
        for colour, patch, v2_centre in zip(MARKER_COLOURS, marked, view2_centres):
            bx0, by0 = origins[1]
            _draw_marker(draw, (bx0 + v2_centre[1] * scale, by0 + v2_centre[0] * scale), colour, radius)
            y, x = in_view1[row, patch]
            point = (cx0 + x * scale, cy0 + y * scale)
            if 0 <= y < size and 0 <= x < size:
                _draw_marker(draw, point, colour, radius)
            else:
                _draw_outside_marker(draw, point, (cx0, cy0, cx0 + side, cy0 + side), colour, outside_marks)
    return canvas


def write_png(image: Image.Image, path: str) -> str:
    """Writes `image` to `path` atomically (a temporary file in the same folder, then os.replace; on an object
    store: one whole-object upload). Returns the absolute path."""
    if storage.is_remote(path):
        encoded = io.BytesIO()
        image.save(encoded, format="PNG")
        storage.write_bytes(path, encoded.getvalue())
        return storage.absolute(path)
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f"{path}.tmp{os.getpid()}"
    try:
        image.save(temporary, format="PNG")
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments: {argv[1:]}", 2, USAGE)
    try:
        config = _CONFIG.value
        config.seed  # noqa: B018 (a recipe that failed to load raises here)
    except OSError as error:
        fail(str(error), 2, USAGE)
    if _NUM.value > config.batch_size:
        fail(f"--num={_NUM.value} exceeds the batch size config.batch_size={config.batch_size}", 2, USAGE)
    try:
        pairs = sample_pairs(config, _NUM.value, _STEP.value)
        scale = _SCALE.value or default_scale(config.model.image_size)
        path = write_png(render_pairs(pairs, scale), _OUT.value)
    except (config_lib.ConfigError, RunError, SourceError, TooManyBadImagesError, OSError) as error:
        fail(str(error), 1)
    print(path, flush=True)


def run():
    """Console-script entry point (`siim-jax-visualize`)."""
    app.run(main, flags_parser=flags_parser(USAGE))


if __name__ == "__main__":
    run()
