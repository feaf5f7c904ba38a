"""Decoding of encoded images (or decoded arrays) into 8-bit RGB, with one error for every undecodable example
(BadImageError) and a refusal of decompression bombs."""

import io

import numpy as np
from PIL import Image

from siim_jax.data.sources.base import BadImageError


def check_image_size(image: Image.Image) -> None:
    """Raises BadImageError if `image` (header read, pixels not yet) has more than PIL's `Image.MAX_IMAGE_PIXELS`
    pixels (a decompression bomb: PIL itself only warns below twice that limit and would decode it)."""
    limit = Image.MAX_IMAGE_PIXELS
    width, height = image.size
    if limit is not None and width * height > limit:
        raise BadImageError(f"image of {width}x{height} = {width * height} pixels exceeds the limit of {limit} "
                            "pixels (PIL.Image.MAX_IMAGE_PIXELS; a possible decompression bomb)")


def open_image(data) -> Image.Image:
    """Encoded bytes or a uint8 (H, W, 3) array -> a lazily decoded PIL image (header read, pixels not yet).

    Raises BadImageError for anything PIL cannot identify, and for images of more than `Image.MAX_IMAGE_PIXELS`
    pixels (see check_image_size).
    """
    if isinstance(data, np.ndarray):
        return Image.fromarray(data)
    try:
        # PIL warns (DecompressionBombWarning, once per call site under the default filters) inside Image.open
        # for images between the limit and twice the limit, and raises above; the explicit check below refuses
        # both. No warnings.catch_warnings here: it changes process-wide state and images decode in threads.
        image = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError as e:
        raise BadImageError(f"not a readable image ({len(data)} bytes: empty, corrupt or an unknown format)") from e
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadImageError(f"cannot read the image header: {e}") from e
    check_image_size(image)
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Decodes `image` into 8-bit RGB (greyscale, palette, CMYK, 16-bit and alpha images included; alpha is
    dropped, as PIL's convert('RGB') in the official loader does). Raises BadImageError on truncated or corrupt
    pixel data, and for file-backed images of more than `Image.MAX_IMAGE_PIXELS` pixels."""
    if image.format is not None:  # opened from encoded data (Image.fromarray images have no format)
        check_image_size(image)
    try:
        image.load()
        if image.mode == "RGB":
            return image
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit greyscale: scale to 8 bits
            array = np.asarray(image, dtype=np.float64)
            peak = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
            image = Image.fromarray(np.clip(array * (255.0 / peak), 0, 255).astype(np.uint8))
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadImageError(f"cannot decode the pixels (truncated or corrupt?): {e}") from e


def load_rgb(data) -> Image.Image:
    """Encoded bytes or a uint8 (H, W, 3) array -> a decoded 8-bit RGB PIL image. Raises BadImageError."""
    return to_rgb(open_image(data))


def decode_rgb(data) -> np.ndarray:
    """Encoded bytes or a uint8 array -> uint8 (H, W, 3). Raises BadImageError."""
    return np.asarray(load_rgb(data))
