"""Procedural labelled images: one shape or texture family per class, grey levels independent of the class.

Every class fills the whole image with its structure, so that any random resized crop (scale down to 0.2) still
shows it: the five object families are 2x2 or 3x3 jittered grids of randomly sized and rotated instances, the
five texture families cover the image. Foreground and background are two grey levels (at least 0.3 apart,
randomly assigned), with mild noise. There is no colour on purpose: with two flat colours per image the colour
pair identifies an image across its two views far more easily than its shape, and a short dense
self-supervised run then learns the colour pair instead of the structure (k-NN stays where it started).

`config.data.source = "builtin"`: `config.data.num_train` of them for training, `config.data.num_val` more for
validation.
"""

import logging

import numpy as np

from siim_jax.data.sources.base import ArraySource, register_source

log = logging.getLogger(__name__)

NUM_FAMILIES = 10  # disc, square, triangle, ring, cross, h-stripes, v-stripes, checkerboard, diag-stripes, dots


def _object_mask(rng: np.random.Generator, label: int, y: np.ndarray, x: np.ndarray, r: float, cy: float,
                 cx: float) -> np.ndarray:
    """One instance of object family `label` (0..4) of size r centred at (cy, cx), random rotation."""
    theta = rng.uniform(0, 2 * np.pi)
    u = np.cos(theta) * (x - cx) + np.sin(theta) * (y - cy)
    v = -np.sin(theta) * (x - cx) + np.cos(theta) * (y - cy)
    if label == 0:
        return u * u + v * v <= r * r
    if label == 1:
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8 * r
    if label == 2:
        angles = theta + 2 * np.pi * np.arange(3) / 3
        proj = np.cos(angles)[:, None, None] * (x - cx) + np.sin(angles)[:, None, None] * (y - cy)
        return np.all(proj <= 0.5 * r, axis=0)
    if label == 3:
        d2 = u * u + v * v
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    arm = r / 3
    return ((np.abs(u) <= r) & (np.abs(v) <= arm)) | ((np.abs(v) <= r) & (np.abs(u) <= arm))


def _shape_mask(rng: np.random.Generator, label: int, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Foreground bool (S, S) of family `label`; y, x are pixel-centre coordinates in [-1, 1], shape (S, S)."""
    if label < 5:  # objects: a k x k jittered grid of instances, each with its own size, offset and rotation
        k = int(rng.integers(2, 4))
        cell = 2.0 / k
        mask = np.zeros(y.shape, bool)
        for a in range(k):
            for b in range(k):
                r = cell / 2 * rng.uniform(0.55, 0.85)
                cy = -1 + (a + 0.5) * cell + rng.uniform(-1, 1) * (cell / 2 - r)
                cx = -1 + (b + 0.5) * cell + rng.uniform(-1, 1) * (cell / 2 - r)
                mask |= _object_mask(rng, label, y, x, r, cy, cx)
        return mask
    # textures over the whole image: random period and phase, orientation jittered by at most 0.15 rad
    period = rng.uniform(0.25, 0.6)
    phase = rng.uniform(0, 2 * np.pi, size=2)
    base = {5: 0.0, 6: np.pi / 2, 7: 0.0, 8: rng.choice([np.pi / 4, -np.pi / 4]), 9: 0.0}[label]
    theta = base + rng.uniform(-0.15, 0.15)
    u = np.cos(theta) * x + np.sin(theta) * y
    v = -np.sin(theta) * x + np.cos(theta) * y
    k = 2 * np.pi / period
    if label in (5, 6, 8):  # bands vary along v: horizontal for theta = 0, vertical for pi / 2
        return np.sin(k * v + phase[0]) > 0
    if label == 7:
        return (np.sin(k * u + phase[0]) > 0) ^ (np.sin(k * v + phase[1]) > 0)
    du = (u / period + phase[0] / (2 * np.pi)) % 1.0 - 0.5
    dv = (v / period + phase[1] / (2 * np.pi)) % 1.0 - 0.5
    return du * du + dv * dv <= 0.3 ** 2


def make_builtin_images(seed: int, num_images: int, image_size: int, num_classes: int = 10,
                        offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images offset .. offset+num_images-1 of the stream defined by `seed`.

    Image k depends only on (seed, k). Returns (images uint8 (n, S, S, 3), labels int32 (n,)); the three
    channels are equal.
    """
    if not 1 <= num_classes <= NUM_FAMILIES:
        raise ValueError(f"num_classes={num_classes} must be in [1, {NUM_FAMILIES}]")
    coords = (np.arange(image_size) + 0.5) / image_size * 2 - 1
    y, x = np.meshgrid(coords, coords, indexing="ij")
    images = np.empty((num_images, image_size, image_size, 3), np.uint8)
    labels = np.empty((num_images,), np.int32)
    for n in range(num_images):
        rng = np.random.default_rng([seed, offset + n])
        label = int(rng.integers(num_classes))
        low = rng.uniform(0.05, 0.6)
        levels = np.array([low, low + rng.uniform(0.3, 0.9 - low + 0.05)])
        fg, bg = levels[rng.permutation(2)]  # same distribution for both: mean grey says nothing of the class
        mask = _shape_mask(rng, label, y, x)
        image = np.where(mask, fg, bg) + rng.normal(0, 0.03, (image_size, image_size))
        images[n] = np.clip(np.round(image * 255), 0, 255).astype(np.uint8)[..., None]
        labels[n] = label
    return images, labels


@register_source("builtin")
def open_builtin(location: str, data_config, seed: int, split: str) -> ArraySource:
    """Training: images 0 .. num_train-1 of the stream of `seed`; validation: the num_val images after them (the
    k-NN monitor's queries are drawn the same way)."""
    if split == "train":
        log.info("generating %d built-in images", data_config.num_train)
        images, labels = make_builtin_images(seed, data_config.num_train, data_config.raw_size,
                                             data_config.num_classes)
        return ArraySource(images, labels, "builtin", num_classes=data_config.num_classes)
    num_val = data_config.num_val
    log.info("generating %d held-out built-in images", num_val)
    images, labels = make_builtin_images(seed, num_val, data_config.raw_size, data_config.num_classes,
                                         offset=data_config.num_train)
    return ArraySource(images, labels, "builtin:validation", num_classes=data_config.num_classes)
