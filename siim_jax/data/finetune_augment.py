"""Fine-tuning regularisers (SPEC section 5): mixup/cutmix with label smoothing and random erasing, on device
(RandAugment, on the host, is `siim_jax.data.randaugment`; drop path `siim_jax.models.vit.drop_path`).

Device functions are jit-able with static shapes and follow timm's conventions: mixup / cutmix as
`timm.data.Mixup(mode='batch')` on each GPU's batch, here on each device shard of the global batch (one draw per
shard, no image crossing devices), random erasing as `timm.data.RandomErasing` on each normalised image.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from siim_jax.parallel.sharding import logical_to_mesh_spec

MIXUP_ALPHA, CUTMIX_ALPHA, SWITCH_PROB, LABEL_SMOOTHING = 0.8, 1.0, 0.5, 0.1
ERASE_PROB = 0.25


def smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
    """Integer labels (N,) -> float32 (N, num_classes): s / C off the label, 1 - s + s / C on it (timm)."""
    return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * (1.0 - smoothing) + smoothing / num_classes


def cutmix_box(key: jax.Array, lam: jax.Array, height: int, width: int) -> jax.Array:
    """timm `rand_bbox` as a mask: bool (height, width), True inside a box of sides int(side * sqrt(1 - lam)) whose
    centre is uniform over the pixels, clipped at the borders."""
    y_key, x_key = jax.random.split(key)
    ratio = jnp.sqrt(1.0 - lam)

    def interval(key, size):
        cut = jnp.floor(size * ratio).astype(jnp.int32)
        centre = jax.random.randint(key, (), 0, size)
        return jnp.clip(centre - cut // 2, 0, size), jnp.clip(centre + (cut + 1) // 2, 0, size)

    (top, bottom), (left, right) = interval(y_key, height), interval(x_key, width)
    rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
    return (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)


def mixing_draw(key: jax.Array, height: int, width: int, mixup_alpha: float = MIXUP_ALPHA,
                cutmix_alpha: float = CUTMIX_ALPHA, switch_prob: float = SWITCH_PROB):
    """One batch's mixing draw (timm `Mixup._params_per_batch` + `cutmix_bbox_and_lam`): key ->
    (use_cutmix bool (), lam float32 (), box bool (height, width)).

    Cutmix with probability `switch_prob` (when both alphas > 0), else mixup; lam ~ Beta(alpha, alpha) of the
    chosen one. For cutmix, `box` is `cutmix_box` of the drawn lam and lam is corrected to 1 - box area /
    (height * width); for mixup, lam is the Beta draw (the box is unused).
    """
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        raise ValueError("mixup_cutmix needs mixup_alpha > 0 or cutmix_alpha > 0")
    switch_key, mixup_key, cutmix_key, box_key = jax.random.split(key, 4)
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = jax.random.uniform(switch_key) < switch_prob
    else:
        use_cutmix = jnp.asarray(cutmix_alpha > 0)
    lam_mixup = jax.random.beta(mixup_key, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else jnp.float32(1.0)
    lam_drawn = jax.random.beta(cutmix_key, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0 else jnp.float32(1.0)
    box = cutmix_box(box_key, lam_drawn, height, width)
    lam_cutmix = 1.0 - jnp.sum(box, dtype=jnp.int32).astype(jnp.float32) / (height * width)
    return use_cutmix, jnp.where(use_cutmix, lam_cutmix, lam_mixup).astype(jnp.float32), box


def _mix_one_batch(key, images, labels, num_classes, mixup_alpha, cutmix_alpha, switch_prob, label_smoothing):
    """mixup_cutmix of one shard (or of the whole batch): (N, H, W, C), (N,) -> (N, H, W, C), (N, num_classes)."""
    use_cutmix, lam, box = mixing_draw(key, images.shape[1], images.shape[2], mixup_alpha, cutmix_alpha,
                                       switch_prob)
    flipped = images[::-1]
    mixed_by_mixup = (images * lam + flipped * (1.0 - lam)).astype(images.dtype)
    mixed_by_cutmix = jnp.where(box[None, :, :, None], flipped, images)
    mixed = jnp.where(use_cutmix, mixed_by_cutmix, mixed_by_mixup)
    smoothed = smooth_one_hot(labels, num_classes, label_smoothing)
    return mixed, lam * smoothed + (1.0 - lam) * smoothed[::-1]


def batch_mesh_axes(rows: int, rules) -> tuple:
    """The axes of the context mesh (`jax.set_mesh`, as the train step's `sharding_context` sets) that split a
    batch of `rows` rows under the logical-axis `rules` (its `batch` rule), major first; () outside a mesh or
    where the batch is not split."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    axes = logical_to_mesh_spec(("batch",), (rows,), mesh, rules)[0] or ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def mixup_cutmix(key: jax.Array, images: jax.Array, labels: jax.Array, num_classes: int,
                 mixup_alpha: float = MIXUP_ALPHA, cutmix_alpha: float = CUTMIX_ALPHA,
                 switch_prob: float = SWITCH_PROB, label_smoothing: float = LABEL_SMOOTHING,
                 batch_axes: tuple = ()):
    """Batch-level mixup or cutmix with the batch reversed, per device shard (timm `Mixup(mode='batch')` on each
    GPU's batch): images (N, H, W, C), labels (N,) int -> (mixed images (N, H, W, C) in the images' dtype, soft
    targets float32 (N, num_classes)).

    `batch_axes` = (): the whole batch is one group, mixed with `mixing_draw(key)`. Otherwise the mesh axes of the
    context mesh (`jax.set_mesh`; see `batch_mesh_axes`) that split the batch dim, major first: the S shards of
    N / S rows each (shard s = rows [s N / S, (s + 1) N / S), s the linear index over `batch_axes`) are mixed
    independently inside a `jax.shard_map`, shard s with `mixing_draw(fold_in(key, s))` and its own rows
    reversed, so that no image or label crosses devices. Per group x of n rows with draw (use_cutmix, lam, box):
    mixup lam * x + (1 - lam) * x[::-1]; cutmix x with `box` pasted from x[::-1] (one box for the group);
    targets lam * smooth(y) + (1 - lam) * smooth(y[::-1]).
    """
    mix = functools.partial(_mix_one_batch, num_classes=num_classes, mixup_alpha=mixup_alpha,
                            cutmix_alpha=cutmix_alpha, switch_prob=switch_prob, label_smoothing=label_smoothing)
    if not batch_axes:
        return mix(key, images, labels)
    batch_axes = tuple(batch_axes)

    def per_shard(key, images, labels):
        return mix(jax.random.fold_in(key, jax.lax.axis_index(batch_axes)), images, labels)

    rows = PartitionSpec(batch_axes)
    return jax.shard_map(per_shard, in_specs=(PartitionSpec(), rows, rows), out_specs=(rows, rows))(
        key, images, labels)


def soft_target_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean over the batch of -sum_c targets * log_softmax(logits): logits, targets (N, C) -> float32 scalar."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.mean(-jnp.sum(targets.astype(jnp.float32) * log_probs, axis=-1))


def random_erasing(key: jax.Array, images: jax.Array, prob: float = ERASE_PROB, mode: str = "pixel",
                   min_area: float = 0.02, max_area: float = 1 / 3, min_aspect: float = 0.3,
                   max_attempts: int = 10) -> jax.Array:
    """timm RandomErasing (one box per image) on normalised images (N, H, W, C), on device (jit-able).

    Each image, with probability `prob`: of `max_attempts` draws of area fraction U(min_area, max_area) and aspect
    h / w log-uniform in [min_aspect, 1 / min_aspect], h = round(sqrt(area * aspect)), w = round(sqrt(area /
    aspect)), the first box strictly smaller than the image is placed uniformly and filled with N(0, 1) noise
    per pixel (mode 'pixel'), per channel ('rand') or zeros ('const'); no box fits: the image is kept.
    """
    if mode not in ("pixel", "rand", "const"):
        raise ValueError(f"random_erasing mode must be 'pixel', 'rand' or 'const', got {mode!r}")
    _, height, width, channels = images.shape

    def erase(key, image):
        hit_key, area_key, aspect_key, top_key, left_key, fill_key = jax.random.split(key, 6)
        area = jax.random.uniform(area_key, (max_attempts,), minval=min_area, maxval=max_area) * height * width
        aspect = jnp.exp(jax.random.uniform(aspect_key, (max_attempts,), minval=math.log(min_aspect),
                                            maxval=math.log(1 / min_aspect)))
        box_h = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
        box_w = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
        fits = (box_h < height) & (box_w < width)
        first = jnp.argmax(fits)  # the first attempt that fits
        box_h, box_w = box_h[first], box_w[first]
        top = jnp.floor(jax.random.uniform(top_key) * (height - box_h + 1)).astype(jnp.int32)
        left = jnp.floor(jax.random.uniform(left_key) * (width - box_w + 1)).astype(jnp.int32)
        rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
        box = ((rows >= top) & (rows < top + box_h) & (cols >= left) & (cols < left + box_w)
               & fits.any() & (jax.random.uniform(hit_key) < prob))
        if mode == "pixel":
            fill = jax.random.normal(fill_key, image.shape)
        elif mode == "rand":
            fill = jnp.broadcast_to(jax.random.normal(fill_key, (1, 1, channels)), image.shape)
        else:
            fill = jnp.zeros(image.shape)
        return jnp.where(box[..., None], fill.astype(image.dtype), image)

    return jax.vmap(erase)(jax.random.split(key, images.shape[0]), images)
