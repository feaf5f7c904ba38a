"""Deterministic, resumable two-view batches for the SiameseIM train step.

A batch is a dict of NumPy arrays: view1 uint8 (B,S,S,3), view2 uint8 (B,S,S,3), geometry float32 (B,6)
(fields `views.GEOMETRY_FIELDS`), mask bool (B, g*g) with g = S // patch_size and exactly num_masked True per row.
Alongside each batch comes `skipped`: the descriptions (file paths, record ids) of the examples that could not be
decoded and were replaced.
"""

import collections
import concurrent.futures
import functools
import logging

import numpy as np

from siim_jax.cli import RunError
from siim_jax.data.masks import block_mask
from siim_jax.data.sources import ArraySource, BadImageError, load_rgb
from siim_jax.data.views import sample_two_views

log = logging.getLogger(__name__)

MAX_REPLACEMENTS = 64  # consecutive undecodable examples before the pipeline gives up on a slot


class TooManyBadImagesError(RunError, RuntimeError):
    pass


def decode_with_replacements(source, seed: int, step: int, position: int, index: int, make):
    """(make(rng, image, index), skipped descriptions) for the example at global `position` of `step`.

    rng = default_rng([seed, step, position]) and image = load_rgb(source.read(index)), an RGB PIL image. When
    reading, decoding or `make` raises BadImageError, the example is logged, its description recorded, and it is
    replaced by index default_rng([seed, step, position, a]).integers(len(source)) (attempt a = 1, 2, ...),
    which `make` receives with that generator. TooManyBadImagesError after MAX_REPLACEMENTS in a row.
    """
    skipped = []
    rng = np.random.default_rng([seed, step, position])
    for attempt in range(1, MAX_REPLACEMENTS + 1):
        try:
            return make(rng, load_rgb(source.read(index)), index), skipped
        except BadImageError as e:
            name = source.describe(index)
            log.warning("skipping %s: %s", name, e)
            skipped.append(name)
        rng = np.random.default_rng([seed, step, position, attempt])
        index = int(rng.integers(len(source)))
    raise TooManyBadImagesError(f"{MAX_REPLACEMENTS} undecodable examples in a row at step {step} (last: "
                                f"{skipped[-1]}); check config.data.source")


def build_ahead(start, batch_size: int, num_threads: int, start_step: int, batches_ahead: int = 2,
                end_step: int | None = None):
    """Yields (batch, skipped) for steps start_step, start_step + 1, ... (up to end_step, exclusive, if given).

    start(step) -> (batch, fill_rows): an unfilled batch of `batch_size` rows and fill_rows(rows: range) ->
    skipped descriptions, which writes those rows. The next `batches_ahead` batches are built concurrently by
    `num_threads` threads (PIL decodes and resizes without the GIL), each split into 2 * num_threads chunks of
    rows, so host memory holds about batches_ahead + 1 batches whatever the thread count.
    """
    chunks = min(batch_size, 2 * num_threads)
    bounds = np.linspace(0, batch_size, chunks + 1).round().astype(int)
    ahead = max(1, batches_ahead)
    first = range(start_step, start_step + ahead if end_step is None else min(start_step + ahead, end_step))
    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:

        def submit(step):
            batch, fill_rows = start(step)
            return batch, [pool.submit(fill_rows, range(lo, hi)) for lo, hi in zip(bounds, bounds[1:])]

        pending = collections.deque(submit(s) for s in first)
        step = start_step + ahead
        try:
            while pending:
                batch, rows = pending.popleft()
                skipped = tuple(name for row in rows for name in row.result())
                if end_step is None or step < end_step:
                    pending.append(submit(step))
                step += 1
                yield batch, skipped
        finally:
            for _, rows in pending:
                for row in rows:
                    row.cancel()


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of epoch `epoch`: default_rng([seed, epoch]).permutation(n), computed once (~20 ms at 1.3 M)."""
    permutation = np.random.default_rng([seed, epoch]).permutation(n)
    permutation.flags.writeable = False
    return permutation


class StepBatches:
    """What a per-step batch stream shares: subclasses give `_empty_batch()`, `_fill_rows(batch, step, indices,
    rows) -> skipped descriptions`, `indices_at(step)`, and `batch_size`, `num_threads`, `num_steps` (None:
    endless)."""

    num_steps = None

    def batch_and_skipped(self, step: int) -> tuple[dict, tuple[str, ...]]:
        """(batch_at(step), descriptions of the examples replaced or left out in it), built in this thread."""
        batch = self._empty_batch()
        return batch, tuple(self._fill_rows(batch, step, self.indices_at(step), range(self.batch_size)))

    def batch_at(self, step: int) -> dict:
        """The batch of this process at `step` (see the module docstring for the layout)."""
        return self.batch_and_skipped(step)[0]

    def iterate(self, start_step: int = 0, batches_ahead: int = 2):
        """Yields batch_and_skipped(start_step), batch_and_skipped(start_step + 1), ... (up to num_steps - 1).

        The next `batches_ahead` batches are built concurrently by `num_threads` threads (PIL decodes and
        resizes without the GIL), each batch split into 2 * num_threads chunks of rows, so host memory holds
        about batches_ahead + 1 batches whatever the thread count.
        """

        def start(step):
            batch, indices = self._empty_batch(), self.indices_at(step)
            return batch, lambda rows: self._fill_rows(batch, step, indices, rows)

        return build_ahead(start, self.batch_size, self.num_threads, start_step, batches_ahead,
                           end_step=self.num_steps)


class TwoViewBatches(StepBatches):
    """Batches as a pure function of (seed, step, rows), over any random-access source.

    Step `step` of epoch e = step // steps_per_epoch takes a contiguous window of `global_batch` examples of the
    permutation `default_rng([seed, e]).permutation(n)` (the last partial window is dropped). A process builds
    only the global positions `rows` of that window (its devices' rows, `siim_jax.parallel.sharding.local_rows`;
    default all), so the global batch of a step does not depend on the number of processes or the mesh, and
    processes holding the same rows build the same examples. The example at global position q of the step uses
    `default_rng([seed, step, q])` for its views and mask. An example that cannot be decoded is
    logged, counted and replaced by the example `default_rng([seed, step, q, a]).integers(n)` (attempt a = 1, 2,
    ...), drawn with that generator's views and mask: the stream stays deterministic and shapes static.
    `images` is a source (`siim_jax.data.sources`) or a uint8 (N, H, W, 3) array.
    """

    def __init__(self, images, global_batch: int, out_size: int, patch_size: int, num_masked: int,
                 crop_min: float, seed: int, rows=None, owned=None, num_threads: int = 2):
        self.source = ArraySource(images) if isinstance(images, np.ndarray) else images
        self.out_size = out_size
        self.grid = out_size // patch_size
        self.num_masked = num_masked
        self.crop_min = crop_min
        self.seed = seed
        self.global_batch = global_batch
        self.rows = np.arange(global_batch) if rows is None else np.asarray(rows, np.int64)
        if len(self.rows) == 0 or self.rows.min() < 0 or self.rows.max() >= global_batch:
            raise ValueError(f"rows must be positions in [0, {global_batch}), got {self.rows}")
        self.batch_size = len(self.rows)  # rows this process builds
        # rows whose replaced examples this process reports in `skipped` (the others' are another's to count)
        self.owned = np.ones(self.batch_size, bool) if owned is None else np.asarray(owned, bool)
        self.num_threads = num_threads
        self.steps_per_epoch = len(self.source) // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"the source has {len(self.source)} examples, fewer than the global batch "
                             f"{self.global_batch}")
        if not 0 <= num_masked <= self.grid * self.grid:
            raise ValueError(f"num_masked={num_masked} must be in [0, {self.grid * self.grid}]")

    def indices_at(self, step: int) -> np.ndarray:
        """Source indices int64 (len(rows),) of this process's examples at `step` (before replacements)."""
        epoch, position = divmod(step, self.steps_per_epoch)
        permutation = _epoch_permutation(self.seed, epoch, len(self.source))
        return permutation[position * self.global_batch + self.rows]

    def example(self, step: int, position: int, index: int):
        """(view1, view2, geometry, mask, skipped descriptions) of global `position` at `step`."""
        def views_and_mask(rng, image, index):
            view1, view2, geometry = sample_two_views(rng, image, self.out_size, self.crop_min)
            return view1, view2, geometry, block_mask(rng, self.grid, self.num_masked)

        result, skipped = decode_with_replacements(self.source, self.seed, step, position, index, views_and_mask)
        return (*result, skipped)

    def _empty_batch(self) -> dict:
        size = (self.batch_size, self.out_size, self.out_size, 3)
        return {"view1": np.empty(size, np.uint8), "view2": np.empty(size, np.uint8),
                "geometry": np.empty((self.batch_size, 6), np.float32),
                "mask": np.empty((self.batch_size, self.grid * self.grid), bool)}

    def _fill_rows(self, batch: dict, step: int, indices: np.ndarray, rows: range) -> list[str]:
        """Writes `rows` of this process's batch at `step` (source indices `indices`) into `batch`; returns the
        skipped files."""
        skipped = []
        for row in rows:
            view1, view2, geometry, mask, bad = self.example(step, int(self.rows[row]), int(indices[row]))
            batch["view1"][row], batch["view2"][row], batch["geometry"][row], batch["mask"][row] = \
                view1, view2, geometry, mask
            if self.owned[row]:
                skipped += bad
        return skipped
