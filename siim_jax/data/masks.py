"""BEiT block-wise masking with an exact masked count (SPEC section 1 step 5)."""

import math

import numpy as np


def _sample_block(rng: np.random.Generator, grid: int, min_area: float, max_area: float,
                  log_aspect: tuple[float, float]):
    """Draws one candidate block as BEiT does.

    Area ~ U(min_area, max_area) (Python `random.uniform` semantics, so max_area < min_area draws from
    [max_area, min_area]); aspect log-uniform in `log_aspect`.
    Returns (top, left, bh, bw) ints, or None when the block does not fit (bh >= grid or bw >= grid).
    """
    area = min_area + (max_area - min_area) * rng.random()
    aspect = math.exp(rng.uniform(*log_aspect))
    bh = int(round(math.sqrt(area * aspect)))
    bw = int(round(math.sqrt(area / aspect)))
    if bw >= grid or bh >= grid:
        return None
    top = int(rng.integers(0, grid - bh + 1))
    left = int(rng.integers(0, grid - bw + 1))
    return top, left, bh, bw


def block_mask(rng: np.random.Generator, grid: int, num_masked: int, min_block_area: int = 16,
               min_aspect: float = 0.3) -> np.ndarray:
    """Block-wise mask with exactly `num_masked` True cells.

    Returns bool (grid*grid,), True = masked, raster order (row-major over the grid x grid patches).
    """
    total = grid * grid
    if num_masked < 0 or num_masked > total:
        raise ValueError(f"num_masked={num_masked} must be in [0, grid*grid={total}]")
    log_aspect = (math.log(min_aspect), math.log(1.0 / min_aspect))
    mask = np.zeros((grid, grid), dtype=bool)
    count = 0
    while count < num_masked:
        budget = num_masked - count  # BEiT min(M - masked, max block = M)
        delta = 0
        for _ in range(10):
            block = _sample_block(rng, grid, min_block_area, budget, log_aspect)
            if block is not None:
                top, left, bh, bw = block
                window = mask[top:top + bh, left:left + bw]
                new = bh * bw - int(window.sum())
                if 0 < new <= budget:
                    window[...] = True
                    delta = new
                    break
        if delta == 0:
            break
        count += delta
    if count < num_masked:
        free = np.flatnonzero(~mask.reshape(-1))
        fill = rng.permutation(free)[:num_masked - count]
        mask.reshape(-1)[fill] = True
    return mask.reshape(-1)
