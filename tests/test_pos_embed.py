"""Sin-cos tables and the relative embedding against direct NumPy formulas (SPEC section 2)."""

import math

import numpy as np
import pytest

from siim_jax.models.pos_embed import relative_position_embedding, sincos_2d


def reference_entry(pos: float, width: int, k: int):
    """(sin, cos) of pos * 10000^(-k/(width/4)) for a table of total `width` (2-D) or half-table of `width/2`."""
    w = 10000.0 ** (-k / (width / 4))
    return math.sin(pos * w), math.cos(pos * w)


def reference_table(width: int, grid: int) -> np.ndarray:
    q = width // 4
    out = np.zeros((grid * grid, width))
    for n in range(grid * grid):
        r, c = n // grid, n % grid  # height first
        for k in range(q):
            out[n, k], out[n, q + k] = reference_entry(r, width, k)
            out[n, 2 * q + k], out[n, 3 * q + k] = reference_entry(c, width, k)
    return out


def reference_relative(geom, width: int, grid: int) -> np.ndarray:
    di, dj, dh, dw, rflip, dj_flip = geom
    q = width // 4
    out = np.zeros((grid * grid, 2 * width))
    for n in range(grid * grid):
        r, c = n // grid, n % grid
        gh = dh * (r + 0.5) + di * grid - 0.5
        gw = (-dw * (c + 0.5) + dj_flip * grid - 0.5) if rflip else (dw * (c + 0.5) + dj * grid - 0.5)
        for part, pos in enumerate([gh, gw, 10 * math.log(dh), 10 * math.log(dw)]):
            for k in range(q):
                out[n, 2 * q * part + k], out[n, 2 * q * part + q + k] = reference_entry(pos, width, k)
    return out


def test_standard_table_matches_formula_and_has_zero_class_row():
    table = sincos_2d(32, 5, class_token=True)
    assert table.shape == (26, 32) and table.dtype == np.float32
    np.testing.assert_array_equal(table[0], 0)
    np.testing.assert_allclose(table[1:], reference_table(32, 5), atol=1e-6)
    # Height first: patches in the same row share the first half of the vector.
    np.testing.assert_allclose(table[1, :16], table[2, :16])
    assert not np.allclose(table[1, 16:], table[2, 16:])


def test_identical_views_reproduce_the_standard_table():
    geom = np.array([[0.0, 0.0, 1.0, 1.0, 0.0, 1.0]], np.float32)
    rel = np.asarray(relative_position_embedding(geom, 32, 4))[0]
    np.testing.assert_allclose(rel[:, :32], reference_table(32, 4), atol=1e-5)
    np.testing.assert_allclose(rel[:, 32:], reference_relative(geom[0], 32, 4)[:, 32:], atol=1e-6)
    # scale terms: log(1) = 0 -> sin 0, cos 1
    np.testing.assert_allclose(rel[:, 32:40], 0, atol=1e-7)
    np.testing.assert_allclose(rel[:, 40:48], 1, atol=1e-7)


def test_mirrored_view_lands_on_mirrored_columns():
    # Same full crop, only view 2 mirrored: j1 = j2 = 0, w1 = W -> dj_flip = (W - 0 - 0) / W = 1.
    grid = 4
    geom = np.array([[0.0, 0.0, 1.0, 1.0, 1.0, 1.0]], np.float32)
    rel = np.asarray(relative_position_embedding(geom, 32, grid))[0]
    table = reference_table(32, grid)
    for n in range(grid * grid):
        r, c = divmod(n, grid)
        np.testing.assert_allclose(rel[n, :32], table[r * grid + (grid - 1 - c)], atol=1e-5)


@pytest.mark.parametrize("geom", [
    (0.0, 0.0, 0.5, 0.5, 0.0, 1.5),  # view 2 = top-left quarter of view 1
    (0.25, 0.125, 0.6, 1.3, 0.0, 0.9),  # shifted, anisotropically scaled
    (-0.1, 0.3, 1.7, 0.8, 1.0, 1.2),  # mirrored, partly outside view 1
])
def test_scaled_and_shifted_views_match_formula(geom):
    rel = np.asarray(relative_position_embedding(np.array([geom], np.float32), 32, 4))[0]
    np.testing.assert_allclose(rel, reference_relative(geom, 32, 4), atol=2e-5)


def test_quarter_view_centres_hand_checked():
    # View 2 = top-left quarter: its patch (r, c) centre sits at view-1 patch coordinate (r + 0.5)/2 - 0.5.
    rel = np.asarray(relative_position_embedding(np.array([[0, 0, 0.5, 0.5, 0, 1]], np.float32), 8, 4))[0]
    # width 8: entries 0 and 1 are sin(gh * 1), sin(gh * 10000^(-1/2)) for the lowest frequency
    assert rel[5, 0] == pytest.approx(math.sin(0.25), abs=1e-6)  # r = 1: gh = 0.5 * 1.5 - 0.5 = 0.25
    assert rel[0, 0] == pytest.approx(math.sin(-0.25), abs=1e-6)  # r = 0: gh = 0.25 - 0.5 = -0.25
