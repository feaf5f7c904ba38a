"""Device-side photometric augmentation (SPEC section 1 step 4), torchvision semantics on [0, 1] floats.

Every op acts on one image float32 (H, W, 3) in [0, 1]; the batch functions vmap over per-example keys.
"""

import math

import dm_pix
import jax
import jax.numpy as jnp

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

BRIGHTNESS, CONTRAST, SATURATION, HUE = 0.4, 0.4, 0.2, 0.1
BLUR_SIGMA = (0.1, 2.0)  # pixels of a 224-px view; scaled with the view size (exact at 224)
REFERENCE_SIZE = 224
SOLARIZE_THRESHOLD = 128 / 255


def brightness(image: jax.Array, factor) -> jax.Array:
    """Multiplies by `factor`, clipped to [0, 1]."""
    return jnp.clip(image * factor, 0.0, 1.0)


def grayscale(image: jax.Array) -> jax.Array:
    """Rec. 601 luma (0.2989, 0.587, 0.114) tiled to 3 channels: (H, W, 3)."""
    return dm_pix.rgb_to_grayscale(image, keep_dims=True)


def contrast(image: jax.Array, factor) -> jax.Array:
    """Blends with the scalar mean of the grayscale image, clipped to [0, 1]."""
    mean = jnp.mean(grayscale(image)[..., 0])
    return jnp.clip(factor * image + (1.0 - factor) * mean, 0.0, 1.0)


def saturation(image: jax.Array, factor) -> jax.Array:
    """Blends with the grayscale image, clipped to [0, 1]."""
    return jnp.clip(factor * image + (1.0 - factor) * grayscale(image), 0.0, 1.0)


def hue(image: jax.Array, factor) -> jax.Array:
    """Shifts HSV hue by `factor` (fraction of a turn, modulo 1), clipped to [0, 1]."""
    return jnp.clip(dm_pix.adjust_hue(image, factor), 0.0, 1.0)


def blur_radius(size: int) -> int:
    """Static kernel radius covering 3 sigma at the largest sigma for `size`-px views (6, i.e. 13 taps, at 224)."""
    return max(1, math.ceil(3 * BLUR_SIGMA[1] * size / REFERENCE_SIZE))


def gaussian_blur(image: jax.Array, sigma, radius: int = 6) -> jax.Array:
    """Separable normalised Gaussian of 2 * radius + 1 taps, `sigma` in pixels, edge-replicating borders (like
    PIL)."""
    offsets = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    kernel = jnp.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / jnp.sum(kernel)
    height, width = image.shape[:2]
    padded = jnp.pad(image, ((radius, radius), (radius, radius), (0, 0)), mode="edge")
    rows = sum(kernel[k] * padded[k:k + height] for k in range(2 * radius + 1))
    return sum(kernel[k] * rows[:, k:k + width] for k in range(2 * radius + 1))


def solarize(image: jax.Array) -> jax.Array:
    """Inverts (1 - x) the values x >= 128/255."""
    return jnp.where(image >= SOLARIZE_THRESHOLD, 1.0 - image, image)


def _normalize_float(image: jax.Array) -> jax.Array:
    return (image - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)


def normalize(images: jax.Array) -> jax.Array:
    """uint8 (..., 3) -> float32 (..., 3): x / 255, then ImageNet mean/std."""
    return _normalize_float(jnp.asarray(images, jnp.float32) / 255.0)


def _blend(image: jax.Array, op, factor) -> jax.Array:
    """Brightness (op 0), contrast (op 1) or saturation (op 2) with `factor`; op 3 (hue) passes through."""
    gray = grayscale(image)
    reference = jnp.where(op == 0, 0.0, jnp.where(op == 1, jnp.mean(gray[..., 0]), gray))
    blended = jnp.clip(factor * image + (1.0 - factor) * reference, 0.0, 1.0)
    return jnp.where(op == 3, image, blended)


def _color_jitter(key: jax.Array, image: jax.Array) -> jax.Array:
    """Brightness, contrast, saturation and hue with torchvision factor ranges, in a random order.

    Same result as applying the four ops in the sampled order, computed with one hue shift per image: the
    blend ops that come before hue, then hue, then those after it (under vmap a `switch` would run every op at
    every position).
    """
    k_order, k_b, k_c, k_s, k_h = jax.random.split(key, 5)
    factors = jnp.stack([jax.random.uniform(k_b, (), minval=1 - BRIGHTNESS, maxval=1 + BRIGHTNESS),
                         jax.random.uniform(k_c, (), minval=1 - CONTRAST, maxval=1 + CONTRAST),
                         jax.random.uniform(k_s, (), minval=1 - SATURATION, maxval=1 + SATURATION),
                         jax.random.uniform(k_h, (), minval=-HUE, maxval=HUE)])
    order = jax.random.permutation(k_order, 4)  # order[slot] = op index (0 b, 1 c, 2 s, 3 hue)
    hue_slot = jnp.argmax(order == 3)
    for slot in range(4):  # blend ops before hue
        op = jnp.where(slot < hue_slot, order[slot], 3)
        image = _blend(image, op, factors[op])
    image = hue(image, factors[3])
    for slot in range(4):  # blend ops after hue
        op = jnp.where(slot > hue_slot, order[slot], 3)
        image = _blend(image, op, factors[op])
    return image


def _augment_one(key: jax.Array, image: jax.Array, blur_p: float, solarize_p: float) -> jax.Array:
    """uint8 (H, W, 3) -> normalised float32 (H, W, 3)."""
    k_jit_p, k_jit, k_gray, k_blur_p, k_sigma, k_sol = jax.random.split(key, 6)
    x = jnp.asarray(image, jnp.float32) / 255.0
    x = jnp.where(jax.random.bernoulli(k_jit_p, 0.8), _color_jitter(k_jit, x), x)
    x = jnp.where(jax.random.bernoulli(k_gray, 0.2), grayscale(x), x)
    scale = image.shape[0] / REFERENCE_SIZE
    sigma = jax.random.uniform(k_sigma, (), minval=BLUR_SIGMA[0] * scale, maxval=BLUR_SIGMA[1] * scale)
    x = jnp.where(jax.random.bernoulli(k_blur_p, blur_p), gaussian_blur(x, sigma, blur_radius(image.shape[0])), x)
    if solarize_p > 0:
        x = jnp.where(jax.random.bernoulli(k_sol, solarize_p), solarize(x), x)
    return _normalize_float(x)


def augment_view1(key: jax.Array, images: jax.Array) -> jax.Array:
    """View 1: jitter p=0.8, grayscale p=0.2, blur p=1.0. uint8 (N,S,S,3) -> float32 (N,S,S,3) normalised."""
    keys = jax.random.split(key, images.shape[0])
    return jax.vmap(lambda k, x: _augment_one(k, x, 1.0, 0.0))(keys, images)


def augment_view2(key: jax.Array, images: jax.Array) -> jax.Array:
    """View 2: jitter p=0.8, grayscale p=0.2, blur p=0.1, solarize p=0.2. uint8 (N,S,S,3) -> float32 normalised."""
    keys = jax.random.split(key, images.shape[0])
    return jax.vmap(lambda k, x: _augment_one(k, x, 0.1, 0.2))(keys, images)
