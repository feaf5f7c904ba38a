import math

import numpy as np
import pytest

from siim_jax.data.masks import _sample_block, block_mask


@pytest.mark.parametrize("grid,num_masked", [(14, 118), (8, 38), (14, 75), (7, 20), (14, 0), (8, 64), (4, 5)])
def test_exact_count(grid, num_masked):
    for seed in range(200):
        mask = block_mask(np.random.default_rng(seed), grid, num_masked)
        assert mask.shape == (grid * grid,) and mask.dtype == bool
        assert mask.sum() == num_masked


def test_deterministic_and_varied():
    a = block_mask(np.random.default_rng(3), 14, 118)
    b = block_mask(np.random.default_rng(3), 14, 118)
    c = block_mask(np.random.default_rng(4), 14, 118)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def test_sample_block_bounds():
    """Continuous area a in [16, M] and aspect r in [0.3, 1/0.3] with bh = round(sqrt(a r)), bw = round(sqrt(a/r))."""
    grid, m, lo, hi = 14, 118, 0.3, 1 / 0.3
    rng = np.random.default_rng(0)
    areas, seen = [], 0
    for _ in range(3000):
        block = _sample_block(rng, grid, 16, m, (math.log(lo), math.log(hi)))
        if block is None:
            continue
        seen += 1
        top, left, bh, bw = block
        assert 1 <= bh < grid and 1 <= bw < grid
        assert 0 <= top <= grid - bh and 0 <= left <= grid - bw
        # rounding moves each side by at most 0.5
        assert (bh + 0.5) * (bw + 0.5) >= 16 and (bh - 0.5) * (bw - 0.5) <= m
        assert (bh + 0.5) / (bw - 0.5) >= lo and (bh - 0.5) / (bw + 0.5) <= hi
        areas.append(bh * bw)
    assert seen > 2000
    # a ~ U(16, 118) has mean 67; rounded rectangle areas scatter around it
    assert 55 < np.mean(areas) < 80


def test_sample_block_too_big_is_rejected():
    # area >= 100 with aspect 1 gives 10x10 or more, which never fits a 9x9 grid (needs bh, bw < grid)
    rng = np.random.default_rng(0)
    blocks = [_sample_block(rng, 9, 100, 120, (0.0, 0.0)) for _ in range(100)]
    assert all(b is None for b in blocks)


def _components(mask2d):
    """4-connected components of True cells: list of cell counts."""
    seen = np.zeros_like(mask2d)
    sizes = []
    for start in zip(*np.nonzero(mask2d)):
        if seen[start]:
            continue
        stack, size = [start], 0
        seen[start] = True
        while stack:
            r, c = stack.pop()
            size += 1
            for nr, nc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if 0 <= nr < mask2d.shape[0] and 0 <= nc < mask2d.shape[1] and mask2d[nr, nc] and not seen[nr, nc]:
                    seen[nr, nc] = True
                    stack.append((nr, nc))
        sizes.append(size)
    return sizes


def test_masks_are_blocky():
    """Blocks of >= ~16 cells: few connected components, unlike uniform random masking of the same count."""
    block_counts, random_counts = [], []
    for seed in range(50):
        rng = np.random.default_rng(seed)
        block_counts.append(len(_components(block_mask(rng, 14, 75).reshape(14, 14))))
        rand = np.zeros(196, bool)
        rand[rng.permutation(196)[:75]] = True
        random_counts.append(len(_components(rand.reshape(14, 14))))
    assert np.mean(block_counts) < 5 < np.mean(random_counts)


@pytest.mark.parametrize("bad", [-1, 197])
def test_bad_count_raises(bad):
    with pytest.raises(ValueError, match=f"num_masked={bad}"):
        block_mask(np.random.default_rng(0), 14, bad)
