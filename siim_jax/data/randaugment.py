"""RandAugment 'rand-m9-mstd0.5-inc1' (timm's increasing-severity op set) on PIL images, host side (SPEC section 5).

Each of `num_ops` slots picks one of `INCREASING_OPS` uniformly (with replacement) and applies it with
probability 0.5, at a magnitude drawn from N(magnitude, magnitude_std) clipped to [0, 10]; ops with a direction
(rotate, shear, translate, the enhance blends) flip its sign with probability 1/2. Magnitude -> argument mappings
are timm's (`timm.data.auto_augment.LEVEL_TO_ARG`, as the MAE-style fine-tune transform configures it: bicubic
resampling, fill = round(255 * ImageNet mean)). All randomness comes from one NumPy Generator.
"""

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

FILL = (124, 116, 104)  # round(255 * ImageNet mean), timm's `img_mean` hparam
MAX_MAGNITUDE = 10.0  # timm's _LEVEL_DENOM: magnitude 10 is full strength
BICUBIC = Image.Resampling.BICUBIC

INCREASING_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
    "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
    "TranslateXRel", "TranslateYRel",
)
_ENHANCERS = {"ColorIncreasing": ImageEnhance.Color, "ContrastIncreasing": ImageEnhance.Contrast,
              "BrightnessIncreasing": ImageEnhance.Brightness, "SharpnessIncreasing": ImageEnhance.Sharpness}


def _signed(value: float, negate: bool) -> float:
    return -value if negate else value


def _apply_lut(image: Image.Image, lut: np.ndarray) -> Image.Image:
    """Applies the 256-entry table `lut` to every band of an L or RGB image."""
    return image.point([int(v) for v in lut] * len(image.getbands()))


def posterize(image: Image.Image, bits: int) -> Image.Image:
    """Keeps the `bits` (0-8) most significant bits of every value; 0 bits gives black (PIL >= 12 refuses 0, older
    PIL, and so timm at magnitude 10, gave black)."""
    return _apply_lut(image, np.arange(256) & ~(2 ** (8 - bits) - 1))


def solarize_add(image: Image.Image, add: int, threshold: int = 128) -> Image.Image:
    """Adds `add` (saturating at 255) to the values below `threshold`."""
    values = np.arange(256)
    return _apply_lut(image, np.where(values < threshold, np.minimum(values + add, 255), values))


def _affine(image: Image.Image, matrix: tuple, fill: tuple, resample: int) -> Image.Image:
    """PIL inverse affine map (output (x, y) samples input (a x + b y + c, d x + e y + f)), same size."""
    return image.transform(image.size, Image.Transform.AFFINE, matrix, resample=resample, fillcolor=fill)


def _enhance_factor(magnitude: float, negate: bool) -> float:
    """Blend factor moving away from 1 (no change) by 0.9 * magnitude / 10, either way, floored at 0.1."""
    return max(0.1, 1.0 + _signed(magnitude / MAX_MAGNITUDE * 0.9, negate))


def apply_op(image: Image.Image, name: str, magnitude: float, negate: bool = False, fill: tuple = FILL,
             resample: int = BICUBIC) -> Image.Image:
    """One RandAugment op `name` (from `INCREASING_OPS`) at `magnitude` in [0, 10] on an RGB image; `negate` flips
    the direction of the signed ops (ignored by the others)."""
    level = magnitude / MAX_MAGNITUDE
    width, height = image.size
    if name == "AutoContrast":
        return ImageOps.autocontrast(image)
    if name == "Equalize":
        return ImageOps.equalize(image)
    if name == "Invert":
        return ImageOps.invert(image)
    if name == "Rotate":  # +-30 degrees
        return image.rotate(_signed(level * 30.0, negate), resample=resample, fillcolor=fill)
    if name == "PosterizeIncreasing":  # 4 bits down to 0
        return posterize(image, 4 - int(level * 4))
    if name == "SolarizeIncreasing":  # threshold 256 (no change) down to 0 (invert all)
        return ImageOps.solarize(image, 256 - min(256, int(level * 256)))
    if name == "SolarizeAdd":  # add 0 to 110 below 128
        return solarize_add(image, min(128, int(level * 110)))
    if name in _ENHANCERS:
        return _ENHANCERS[name](image).enhance(_enhance_factor(magnitude, negate))
    if name == "ShearX":  # +-0.3
        return _affine(image, (1, _signed(level * 0.3, negate), 0, 0, 1, 0), fill, resample)
    if name == "ShearY":
        return _affine(image, (1, 0, 0, _signed(level * 0.3, negate), 1, 0), fill, resample)
    if name == "TranslateXRel":  # +-45% of the width
        return _affine(image, (1, 0, _signed(level * 0.45, negate) * width, 0, 1, 0), fill, resample)
    if name == "TranslateYRel":
        return _affine(image, (1, 0, 0, 0, 1, _signed(level * 0.45, negate) * height), fill, resample)
    raise ValueError(f"unknown RandAugment op {name!r}; expected one of {INCREASING_OPS}")


def rand_augment(rng: np.random.Generator, image: Image.Image, num_ops: int = 2, magnitude: float = 9,
                 magnitude_std: float = 0.5, prob: float = 0.5, fill: tuple = FILL,
                 resample: int = BICUBIC) -> Image.Image:
    """timm 'rand-m{magnitude}-mstd{magnitude_std}-inc1' on an RGB PIL image -> a PIL image of the same size/mode.

    `num_ops` ops drawn uniformly with replacement from `INCREASING_OPS`, each applied with probability `prob` at
    magnitude N(magnitude, magnitude_std) (uniform on [0, magnitude] if magnitude_std is inf) clipped to [0, 10].
    """
    for op_index in rng.integers(len(INCREASING_OPS), size=num_ops):
        if rng.random() >= prob:
            continue
        if magnitude_std == float("inf"):
            op_magnitude = rng.uniform(0.0, magnitude)
        elif magnitude_std > 0:
            op_magnitude = rng.normal(magnitude, magnitude_std)
        else:
            op_magnitude = magnitude
        op_magnitude = float(np.clip(op_magnitude, 0.0, MAX_MAGNITUDE))
        negate = bool(rng.random() < 0.5)
        image = apply_op(image, INCREASING_OPS[op_index], op_magnitude, negate, fill, resample)
    return image
