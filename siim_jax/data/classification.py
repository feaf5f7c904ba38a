"""Deterministic, resumable labelled single-view batches for the evaluations (linear probe, fine-tune, few-shot).

A batch is a dict of NumPy arrays over this process's rows: images uint8 (B, S, S, 3), labels int32 (B,) and
valid bool (B,) (False only for eval padding and undecodable eval images, whose image and label are zeros).
Alongside each batch comes `skipped`: the descriptions of the examples that could not be decoded.

Training batches (train=True) follow the official linear-probe / fine-tune recipe: RandomResizedCrop (scale
(0.08, 1), ratio (3/4, 4/3), bicubic; torchvision's ten-try sampler for fine-tuning, the official util/crop.py
single draw for the linear probe: train_crop), then a horizontal flip with p=0.5, then an optional host
`augment` hook (timm applies RandAugment there, after the crop and flip). Evaluation batches (train=False)
resize the shorter side to views.official_eval_short_side(S) (256 at S = 224), bicubic (eval_resample; the
few-shot protocol's is bilinear), and take the centred S x S crop.
"""

import logging
import math
from collections.abc import Callable

import numpy as np
from PIL import Image

from siim_jax.data.pipeline import StepBatches, _epoch_permutation, decode_with_replacements
from siim_jax.data.sources import BadImageError, load_rgb
from siim_jax.data.views import RESAMPLE, TRAIN_CROPS, eval_view, official_eval_short_side

log = logging.getLogger(__name__)

Augment = Callable[[np.random.Generator, Image.Image], Image.Image]


def random_resized_crop_flip(rng: np.random.Generator, image: Image.Image, out_size: int,
                             scale: tuple[float, float] = (0.08, 1.0),
                             ratio: tuple[float, float] = (3 / 4, 4 / 3), crop: str = "torchvision") -> Image.Image:
    """RandomResizedCrop(out_size, scale, ratio, bicubic) then RandomHorizontalFlip(0.5), drawing from `rng` in
    that order: RGB PIL image -> RGB PIL image (out_size, out_size). `crop`: "torchvision" (ten tries, then a
    centre crop: fine-tune) or "single_draw" (the official linear probe's util/crop.py: one draw, sides clamped)."""
    width, height = image.size
    i, j, h, w = TRAIN_CROPS[crop](rng, height, width, scale, ratio)
    view = image.crop((j, i, j + w, i + h)).resize((out_size, out_size), Image.BICUBIC)
    if rng.random() < 0.5:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return view


class LabelledBatches(StepBatches):
    """Labelled batches as a pure function of (seed, step, rows), over any labelled random-access source.

    train=True: step `step` of epoch e = step // steps_per_epoch takes a contiguous window of `global_batch`
    examples of `default_rng([seed, e]).permutation(n)` (the last partial window is dropped); the example at
    global position q uses `default_rng([seed, step, q])` for its crop, flip and `augment(rng, view)`. An
    undecodable example is logged and replaced exactly as in TwoViewBatches (pipeline.decode_with_replacements),
    with the replacement's label.
    train=False: step s holds source indices s * global_batch + q in order, num_steps = ceil(n / global_batch);
    rows past the end are zeros with valid=False, and so are undecodable images (reported in `skipped`).
    A process builds only the global positions `rows` (default all) and reports the skipped examples of the rows
    it `owned` (default all), as TwoViewBatches does, so the global batch does not depend on the process count.
    `augment(rng, PIL RGB image S x S) -> PIL image S x S` runs on the cropped and flipped view (train only).
    `eval_resample`: the eval resize filter, "bicubic" or "bilinear" (views.eval_view); `train_crop`: the train
    crop sampler, "torchvision" or "single_draw" (views.TRAIN_CROPS).
    """

    def __init__(self, source, global_batch: int, out_size: int, seed: int, *, train: bool, rows=None,
                 owned=None, num_threads: int = 2, augment: Augment | None = None,
                 crop_scale: tuple[float, float] = (0.08, 1.0), crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 eval_resample: str = "bicubic", train_crop: str = "torchvision"):
        self.source = source
        self.global_batch = global_batch
        self.out_size = out_size
        self.seed = seed
        self.train = train
        self.augment = augment
        self.crop_scale = crop_scale
        self.crop_ratio = crop_ratio
        self.short_side = official_eval_short_side(out_size)
        if eval_resample not in RESAMPLE:
            raise ValueError(f"eval_resample={eval_resample!r}: choose one of {sorted(RESAMPLE)}")
        self.eval_resample = eval_resample
        if train_crop not in TRAIN_CROPS:
            raise ValueError(f"train_crop={train_crop!r}: choose one of {sorted(TRAIN_CROPS)}")
        self.train_crop = train_crop
        self.num_threads = num_threads
        self.rows = np.arange(global_batch) if rows is None else np.asarray(rows, np.int64)
        if len(self.rows) == 0 or self.rows.min() < 0 or self.rows.max() >= global_batch:
            raise ValueError(f"rows must be positions in [0, {global_batch}), got {self.rows}")
        self.batch_size = len(self.rows)  # rows this process builds
        self.owned = np.ones(self.batch_size, bool) if owned is None else np.asarray(owned, bool)
        name = getattr(source, "name", type(source).__name__)
        if len(source) == 0:
            raise ValueError(f"{name}: the source is empty")
        if source.label(0) is None:
            raise ValueError(f"{name}: the source has no labels; classification batches need them")
        if train:
            self.steps_per_epoch = len(source) // global_batch
            if self.steps_per_epoch == 0:
                raise ValueError(f"the source has {len(source)} examples, fewer than the global batch {global_batch}")
            self.num_steps = None  # endless: epoch after epoch
        else:
            self.num_steps = math.ceil(len(source) / global_batch)

    def indices_at(self, step: int) -> np.ndarray:
        """Source indices int64 (len(rows),) of this process's examples at `step` (before replacements); -1 marks
        eval padding past the end of the source."""
        if self.train:
            if step < 0:
                raise ValueError(f"step={step} must be >= 0")
            epoch, position = divmod(step, self.steps_per_epoch)
            return _epoch_permutation(self.seed, epoch, len(self.source))[position * self.global_batch + self.rows]
        if not 0 <= step < self.num_steps:
            raise ValueError(f"step={step} is outside the {self.num_steps} evaluation steps")
        indices = step * self.global_batch + self.rows
        return np.where(indices < len(self.source), indices, -1)

    def _train_view(self, rng: np.random.Generator, image: Image.Image) -> np.ndarray:
        view = random_resized_crop_flip(rng, image, self.out_size, self.crop_scale, self.crop_ratio, self.train_crop)
        if self.augment is not None:
            view = self.augment(rng, view)
            if view.size != (self.out_size, self.out_size):
                raise ValueError(f"augment returned an image of {view.size}, not {(self.out_size,) * 2}")
            view = view.convert("RGB")
        return np.asarray(view)

    def example(self, step: int, position: int, index: int):
        """(image uint8 (S, S, 3), label int, valid bool, skipped descriptions) of global `position` at `step`."""
        if self.train:
            def view_and_label(rng, image, index):
                return self._train_view(rng, image), self.source.label(index)

            (view, label), skipped = decode_with_replacements(self.source, self.seed, step, position, index,
                                                              view_and_label)
            return view, label, True, skipped
        if index < 0:
            return None, 0, False, []
        try:
            view = eval_view(load_rgb(self.source.read(index)), self.out_size, self.short_side, self.eval_resample)
            return view, self.source.label(index), True, []
        except BadImageError as e:
            name = self.source.describe(index)
            log.warning("skipping %s: %s", name, e)
            return None, 0, False, [name]

    def _empty_batch(self) -> dict:
        return {"images": np.zeros((self.batch_size, self.out_size, self.out_size, 3), np.uint8),
                "labels": np.zeros((self.batch_size,), np.int32), "valid": np.zeros((self.batch_size,), bool)}

    def _fill_rows(self, batch: dict, step: int, indices: np.ndarray, rows: range) -> list[str]:
        """Writes `rows` of this process's batch at `step` into `batch` (zeros stay for invalid rows); returns
        the skipped examples of the owned rows."""
        skipped = []
        for row in rows:
            image, label, valid, bad = self.example(step, int(self.rows[row]), int(indices[row]))
            if valid:
                batch["images"][row], batch["labels"][row], batch["valid"][row] = image, label, True
            if self.owned[row]:
                skipped += bad
        return skipped
