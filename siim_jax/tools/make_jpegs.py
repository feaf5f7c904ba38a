"""Photo-like colour JPEGs in the image-folder layout, for tests and the input-pipeline benchmark (no downloads;
`python -m siim_jax.tools.bench_input --make-jpegs DIR` writes them).

The images are smooth colour fields with a few coloured shapes and fine noise (sigma 10), saved at JPEG quality 90
with 4:2:0 chroma subsampling, so their file sizes (~65 KB at 500x375; ImageNet averages ~110 KB) and decode cost
resemble ImageNet photos.
"""

import os

import numpy as np
from PIL import Image, ImageDraw


def photo_like(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """uint8 (height, width, 3): a bicubic-upsampled 6x8 colour field, 3-8 random shapes, Gaussian noise (sigma 10)."""
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    image = coarse.resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 9))):
        y0, y1 = sorted(rng.integers(0, height, 2))
        x0, x1 = sorted(rng.integers(0, width, 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1 + 1, y1 + 1), fill=colour)
    noisy = np.asarray(image, np.float32) + rng.normal(0, 10, (height, width, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


def write_image_folder(root: str, num_classes: int, per_class: int, size: tuple[int, int] = (375, 500),
                       seed: int = 0, split: str = "train") -> list[str]:
    """Writes `<root>/<split>/class_<k>/img_<n>.JPEG` (size = (height, width)); returns the paths in order."""
    rng = np.random.default_rng(seed)
    paths = []
    for k in range(num_classes):
        directory = os.path.join(root, split, f"class_{k:03d}")
        os.makedirs(directory, exist_ok=True)
        for n in range(per_class):
            path = os.path.join(directory, f"img_{n:05d}.JPEG")
            Image.fromarray(photo_like(rng, *size)).save(path, quality=90, subsampling=2)
            paths.append(path)
    return paths
