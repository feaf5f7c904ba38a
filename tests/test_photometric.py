import colorsys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from siim_jax.data import photometric as P

RNG = np.random.default_rng(0)
IMAGE = RNG.uniform(0, 1, (9, 11, 3)).astype(np.float32)
GRAY_WEIGHTS = np.array([0.2989, 0.587, 0.114])  # torchvision rgb_to_grayscale


def _gray(x):
    return x @ GRAY_WEIGHTS


@pytest.mark.parametrize("factor", [0.6, 1.0, 1.4])
def test_brightness(factor):
    np.testing.assert_allclose(P.brightness(IMAGE, factor), np.clip(IMAGE * factor, 0, 1), atol=1e-6)


def test_grayscale():
    out = np.asarray(P.grayscale(IMAGE))
    assert out.shape == IMAGE.shape
    for ch in range(3):
        np.testing.assert_allclose(out[..., ch], _gray(IMAGE), atol=1e-6)


@pytest.mark.parametrize("factor", [0.6, 1.3])
def test_contrast(factor):
    mean = _gray(IMAGE).mean()
    expected = np.clip(factor * IMAGE + (1 - factor) * mean, 0, 1)
    np.testing.assert_allclose(P.contrast(IMAGE, factor), expected, atol=1e-6)


@pytest.mark.parametrize("factor", [0.8, 1.2])
def test_saturation(factor):
    expected = np.clip(factor * IMAGE + (1 - factor) * _gray(IMAGE)[..., None], 0, 1)
    np.testing.assert_allclose(P.saturation(IMAGE, factor), expected, atol=1e-6)


@pytest.mark.parametrize("factor", [-0.1, 0.05, 0.1])
def test_hue(factor):
    out = np.asarray(P.hue(IMAGE, factor))
    for r, c in [(0, 0), (3, 7), (8, 10), (5, 2)]:
        h, s, v = colorsys.rgb_to_hsv(*IMAGE[r, c].astype(np.float64))
        np.testing.assert_allclose(out[r, c], colorsys.hsv_to_rgb((h + factor) % 1.0, s, v), atol=1e-5)


def _blur_reference(x, sigma):
    taps = np.arange(-6, 7)
    kernel = np.exp(-taps ** 2 / (2 * sigma ** 2))
    kernel /= kernel.sum()
    padded = np.pad(x.astype(np.float64), ((6, 6), (6, 6), (0, 0)), mode="edge")
    rows = np.stack([np.tensordot(kernel, padded[r:r + 13], axes=(0, 0)) for r in range(x.shape[0])])
    return np.stack([np.tensordot(kernel, rows[:, c:c + 13], axes=(0, 1)) for c in range(x.shape[1])], axis=1)


@pytest.mark.parametrize("sigma", [0.1, 0.7, 2.0])
def test_blur(sigma):
    image = RNG.uniform(0, 1, (20, 17, 3)).astype(np.float32)
    np.testing.assert_allclose(P.gaussian_blur(image, sigma), _blur_reference(image, sigma), atol=1e-5)


def test_blur_impulse_is_normalised_gaussian():
    image = np.zeros((15, 15, 3), np.float32)
    image[7, 7] = 1.0
    sigma = 1.5
    g = np.exp(-np.arange(-7, 8) ** 2 / (2 * sigma ** 2))
    g /= np.exp(-np.arange(-6, 7) ** 2 / (2 * sigma ** 2)).sum()
    g[[0, -1]] = 0.0  # 13 taps only
    out = np.asarray(P.gaussian_blur(image, sigma))
    np.testing.assert_allclose(out[..., 0], np.outer(g, g), atol=1e-6)
    np.testing.assert_allclose(out.sum(axis=(0, 1)), 1.0, atol=1e-5)


def test_solarize_threshold():
    values = np.array([0, 127, 128, 129, 255], np.float32) / 255
    out = np.asarray(P.solarize(values.reshape(1, 5, 1).repeat(3, -1)))[0, :, 0]
    expected = np.array([0, 127, 255 - 128, 255 - 129, 0], np.float32) / 255
    np.testing.assert_allclose(out, expected, atol=1e-7)


def test_normalize():
    images = RNG.integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    expected = (images / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    out = P.normalize(images)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize("augment", [P.augment_view1, P.augment_view2])
def test_augment_shapes_and_keys(augment):
    images = jnp.asarray(RNG.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8))
    fn = jax.jit(augment)
    a = fn(jax.random.key(0), images)
    b = fn(jax.random.key(0), images)
    c = fn(jax.random.key(1), images)
    assert a.shape == (6, 16, 16, 3) and a.dtype == jnp.float32
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    # examples get different randomness: identical inputs give different outputs
    same = fn(jax.random.key(2), jnp.broadcast_to(images[:1], images.shape))
    assert not np.allclose(same[0], same[1])
    # outputs are normalised values of [0, 1] images
    low = (0 - np.array(P.IMAGENET_MEAN)) / np.array(P.IMAGENET_STD)
    high = (1 - np.array(P.IMAGENET_MEAN)) / np.array(P.IMAGENET_STD)
    assert np.all(np.asarray(a) >= low - 1e-5) and np.all(np.asarray(a) <= high + 1e-5)


def test_color_jitter_equals_the_four_ops_in_the_sampled_order():
    image = RNG.uniform(0, 1, (12, 12, 3)).astype(np.float32)
    ops = (P.brightness, P.contrast, P.saturation, P.hue)
    for seed in range(12):
        key = jax.random.key(seed)
        k_order, *k_factors = jax.random.split(key, 5)
        bounds = [(1 - P.BRIGHTNESS, 1 + P.BRIGHTNESS), (1 - P.CONTRAST, 1 + P.CONTRAST),
                  (1 - P.SATURATION, 1 + P.SATURATION), (-P.HUE, P.HUE)]
        factors = [jax.random.uniform(k, (), minval=lo, maxval=hi) for k, (lo, hi) in zip(k_factors, bounds)]
        expected = image
        for op in np.asarray(jax.random.permutation(k_order, 4)):
            expected = ops[op](expected, factors[op])
        np.testing.assert_allclose(P._color_jitter(key, image), expected, atol=2e-6)
