"""Host-side two-view sampling: flips, random resized crops and their relative geometry (SPEC section 1)."""

import math

import numpy as np
from PIL import Image

GEOMETRY_FIELDS = ("di", "dj", "dh", "dw", "rflip", "dj_flip")


def sample_crop(rng: np.random.Generator, height: int, width: int, scale: tuple[float, float] = (0.2, 1.0),
                ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params: returns the crop (top i, left j, height h, width w)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(rng.integers(0, height - h + 1))
            j = int(rng.integers(0, width - w + 1))
            return i, j, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def sample_crop_single_draw(rng: np.random.Generator, height: int, width: int,
                            scale: tuple[float, float] = (0.08, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """The official linear probe's RandomResizedCrop.get_params (SiameseIM / MAE util/crop.py, after BYOL's TF
    code): one draw, no retries. area fraction ~ U(scale), log aspect ~ U(log ratio) (drawn in that order), sides
    w = round(sqrt(A * frac * aspect)), h = round(sqrt(A * frac / aspect)) clamped to the image, then top i ~
    U{0..H-h}, left j ~ U{0..W-w}. Returns (i, j, h, w)."""
    target_area = height * width * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    w = min(int(round(math.sqrt(target_area * aspect))), width)
    h = min(int(round(math.sqrt(target_area / aspect))), height)
    i = int(rng.integers(0, height - h + 1))
    j = int(rng.integers(0, width - w + 1))
    return i, j, h, w


TRAIN_CROPS = {"torchvision": sample_crop, "single_draw": sample_crop_single_draw}


def _one_view(rng: np.random.Generator, image: Image.Image, out_size: int, crop_min: float):
    """Flip (p=0.5), then crop and bicubic-resize. Returns (view uint8 (S,S,3), flip bool, (i, j, h, w)).

    (i, j, h, w) is the crop in the flipped image. Flipping the whole image and then cropping equals cropping
    the mirrored box [W-j-w, W-j) of the original and mirroring the S x S result (bit-identical with PIL's
    bicubic), which is what runs: no full-size flipped copy. Crop, then resize, as torchvision does (PIL's
    resize(box=...) would also read pixels outside the box).
    """
    width, height = image.size
    flip = bool(rng.random() < 0.5)
    i, j, h, w = sample_crop(rng, height, width, (crop_min, 1.0))
    left = width - j - w if flip else j
    view = image.crop((left, i, left + w, i + h)).resize((out_size, out_size), Image.BICUBIC)
    if flip:  # PIL's mirror is ~4x faster than copying a negatively strided NumPy view
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(view), flip, (i, j, h, w)


def sample_two_views(rng: np.random.Generator, image, out_size: int, crop_min: float):
    """Two independently flipped and cropped views of `image` (uint8 (H, W, 3) array or an RGB PIL image).

    Returns (view1 uint8 (S,S,3), view2 uint8 (S,S,3), geometry float32 (6,) ordered as GEOMETRY_FIELDS):
    view 2 relative to view 1, di = (i2-i1)/h1, dj = (j2-j1)/w1, dh = h2/h1, dw = w2/w1,
    rflip = flip1 xor flip2, dj_flip = (W-j1-j2)/w1.
    """
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    width = image.size[0]
    view1, flip1, (i1, j1, h1, w1) = _one_view(rng, image, out_size, crop_min)
    view2, flip2, (i2, j2, h2, w2) = _one_view(rng, image, out_size, crop_min)
    geometry = np.array([(i2 - i1) / h1, (j2 - j1) / w1, h2 / h1, w2 / w1, float(flip1 != flip2),
                         (width - j1 - j2) / w1], dtype=np.float32)
    return view1, view2, geometry


def official_eval_short_side(size: int) -> int:
    """The shorter side the official evaluations resize to before the centred `size` crop (MAE's build_transform,
    which SiameseIM keeps): int(size / (224 / 256)) up to size 224 (256 at 224, 36 at 32), `size` above."""
    return int(size * 256 / 224) if size <= 224 else size


RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


def eval_view(image: Image.Image, size: int, short_side: int | None = None, resample: str = "bicubic") -> np.ndarray:
    """The evaluation transform (SPEC section 5 at size 224: resize 256, centre crop 224), with torchvision's
    rounding: shorter side to `short_side` (default round(size * 256 / 224); official_eval_short_side(size) is
    the official code's, equal at 224), the longer one int(scaled), then the centred size x size crop.
    `resample`: "bicubic" (linear probe, fine-tune: `Resize(256, interpolation=3)`) or "bilinear" (few-shot:
    torchvision's default `Resize(256)`). RGB PIL image -> uint8 (size, size, 3)."""
    if resample not in RESAMPLE:
        raise ValueError(f"resample={resample!r}: choose one of {sorted(RESAMPLE)}")
    width, height = image.size
    short = round(size * 256 / 224) if short_side is None else short_side
    new_w, new_h = (short, int(short * height / width)) if width <= height else (int(short * width / height), short)
    resized = image.resize((new_w, new_h), RESAMPLE[resample])
    top, left = round((new_h - size) / 2), round((new_w - size) / 2)
    return np.asarray(resized.crop((left, top, left + size, top + size)))


def view2_patch_grid_coordinates(geometry, grid: int, xp=np):
    """Where the centres of view 2's patches lie in view 1's patch-grid frame (SPEC section 2, "Relative
    embedding"); the one implementation, shared by the model's relative embedding and the view tools.

    geometry (B, 6) ordered as GEOMETRY_FIELDS -> (gh, gw), each (B, grid*grid) over view 2's patches in raster
    order, in view-1 patch units where view-1 patch (r, c) is centred at (r, c):
    gh = dh*(r+0.5) + di*g - 0.5, gw = dw*(c+0.5) + dj*g - 0.5, or with rflip gw = -dw*(c+0.5) + dj_flip*g - 0.5.
    `xp` is the array module of `geometry` (numpy or jax.numpy).
    """
    di, dj, dh, dw, rflip, dj_flip = (geometry[:, k, None] for k in range(6))
    rows, cols = np.divmod(np.arange(grid * grid, dtype=np.float32), grid)
    gh = dh * (rows + 0.5) + di * grid - 0.5
    gw_straight = dw * (cols + 0.5) + dj * grid - 0.5
    gw_mirrored = -dw * (cols + 0.5) + dj_flip * grid - 0.5
    return gh, xp.where(rflip > 0.5, gw_mirrored, gw_straight)


def view2_patch_centres_in_view1(geometry, grid: int, view_size: int) -> np.ndarray:
    """Pixel coordinates in view 1 of the centres of view 2's patches: geometry (B, 6) -> float64 (B, grid*grid, 2)
    as (y, x), view 2's patches in raster order.

    Continuous coordinates: view-1 pixel (row k, column l) covers [k, k+1) x [l, l+1), so the top-left corner of
    view 1 is (0, 0) and its bottom-right (view_size, view_size); y = (gh + 0.5) * p, x = (gw + 0.5) * p with
    p = view_size / grid. Points may lie outside [0, view_size) when view 2 reaches beyond view 1.
    """
    gh, gw = view2_patch_grid_coordinates(np.asarray(geometry, np.float64), grid)
    return np.stack([gh + 0.5, gw + 0.5], axis=-1) * (view_size / grid)
