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
    view = np.asarray(image.crop((left, i, left + w, i + h)).resize((out_size, out_size), Image.BICUBIC))
    return (view[:, ::-1] if flip else view), flip, (i, j, h, w)


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
    return np.ascontiguousarray(view1), np.ascontiguousarray(view2), geometry
