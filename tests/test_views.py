import math

import numpy as np
import pytest

from siim_jax.data.views import (
    GEOMETRY_FIELDS,
    sample_crop,
    sample_two_views,
    view2_patch_centres_in_view1,
)


def test_crop_ranges():
    rng = np.random.default_rng(0)
    height, width, lo = 300, 400, 0.2
    areas, ratios = [], []
    for _ in range(2000):
        i, j, h, w = sample_crop(rng, height, width, (lo, 1.0))
        assert all(isinstance(v, int) for v in (i, j, h, w))
        assert 0 <= i <= height - h and 0 <= j <= width - w and 0 < h <= height and 0 < w <= width
        # w, h are rounded from exact values with w*h = s*H*W, w/h = r
        assert (w + 0.5) * (h + 0.5) >= lo * height * width and (w - 0.5) * (h - 0.5) <= height * width
        assert (w + 0.5) / (h - 0.5) >= 3 / 4 and (w - 0.5) / (h + 0.5) <= 4 / 3
        areas.append(w * h / (height * width))
        ratios.append(w / h)
    assert min(areas) < lo + 0.02 and max(areas) > 0.95
    assert min(ratios) < 0.77 and max(ratios) > 1.3



def test_crop_log_ratio_uniform():
    # on a square image with area fraction <= 0.5 every first try fits, so log(w/h) ~ U(log 3/4, log 4/3)
    rng = np.random.default_rng(1)
    log_ratios = []
    for _ in range(4000):
        _, _, h, w = sample_crop(rng, 400, 400, (0.2, 0.5))
        log_ratios.append(math.log(w / h))
    quartiles = np.quantile(log_ratios, [0.25, 0.5, 0.75])
    lo, hi = math.log(3 / 4), math.log(4 / 3)
    np.testing.assert_allclose(quartiles, [lo + (hi - lo) / 4, 0.0, hi - (hi - lo) / 4], atol=0.02)


@pytest.mark.parametrize("height,width,expected", [
    (10, 1000, (0, 493, 10, 13)),   # wider than 4/3: full height, w = round(10 * 4/3) = 13, centred
    (1000, 10, (493, 0, 13, 10)),   # taller than 3/4: full width, h = round(10 / (3/4)) = 13, centred
])
def test_crop_fallback(height, width, expected):
    # area fraction >= 0.9 with aspect in [3/4, 4/3] never fits such an image: 10 failed tries, then the fallback
    for seed in range(20):
        assert sample_crop(np.random.default_rng(seed), height, width, (0.9, 1.0)) == expected


def test_crop_fallback_whole_image():
    # an image inside the aspect range whose scale range can never be met (area > 1) falls back to the whole image
    assert sample_crop(np.random.default_rng(0), 30, 35, (1.5, 2.0)) == (0, 0, 30, 35)


def _bilinear(image, y, x):
    y0, x0 = int(math.floor(y)), int(math.floor(x))
    fy, fx = y - y0, x - x0
    patch = image[y0:y0 + 2, x0:x0 + 2].astype(np.float64)
    return ((1 - fy) * (1 - fx) * patch[0, 0] + (1 - fy) * fx * patch[0, 1]
            + fy * (1 - fx) * patch[1, 0] + fy * fx * patch[1, 1])


def test_geometry_maps_view2_pixels_into_view1():
    """Pixels encode their own (row, col); SPEC section 2's relative coordinates, in pixel units (g = S), must
    point each view-2 pixel at the view-1 location showing the same image point."""
    height, width, size, margin = 180, 240, 48, 3
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    image = np.stack([rows, cols, np.zeros_like(rows)], -1).astype(np.uint8)
    assert GEOMETRY_FIELDS == ("di", "dj", "dh", "dw", "rflip", "dj_flip")
    combos, checked = set(), 0
    for seed in range(60):
        view1, view2, geometry = sample_two_views(np.random.default_rng(seed), image, size, 0.35)
        assert view1.shape == view2.shape == (size, size, 3) and view1.dtype == view2.dtype == np.uint8
        assert geometry.shape == (6,) and geometry.dtype == np.float32
        di, dj, dh, dw, rflip, dj_flip = geometry.astype(np.float64)
        assert rflip in (0.0, 1.0)
        flip1 = view1[size // 2, -1, 1] < view1[size // 2, 0, 1]
        flip2 = view2[size // 2, -1, 1] < view2[size // 2, 0, 1]
        assert rflip == float(flip1 != flip2)
        combos.add((bool(flip1), bool(flip2)))
        # both views hold linear ramps rounded to uint8 (error <= 0.5 each) and bilinear interpolation of a ramp
        # is exact, so the match is within ~1 original pixel, well under 1.5 view pixels of crop scale
        tol = 1.1
        for r in range(margin, size - margin, 3):
            for c in range(margin, size - margin, 3):
                gh = dh * (r + 0.5) + di * size - 0.5
                gw = (-dw * (c + 0.5) + dj_flip * size - 0.5) if rflip else (dw * (c + 0.5) + dj * size - 0.5)
                if not (margin <= gh <= size - 1 - margin and margin <= gw <= size - 1 - margin):
                    continue
                seen_in_view1 = _bilinear(view1, gh, gw)
                assert abs(seen_in_view1[0] - float(view2[r, c, 0])) <= tol, (seed, r, c)
                assert abs(seen_in_view1[1] - float(view2[r, c, 1])) <= tol, (seed, r, c)
                checked += 1
    assert combos == {(False, False), (False, True), (True, False), (True, True)}
    assert checked > 1000


def test_two_views_deterministic():
    image = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    a = sample_two_views(np.random.default_rng(5), image, 32, 0.2)
    b = sample_two_views(np.random.default_rng(5), image, 32, 0.2)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_view2_patch_centres_of_identical_and_mirrored_views():
    """Identical crops: view 2's patch centres are view 1's, ((r+0.5)p, (c+0.5)p); the same crop with exactly one
    view mirrored (j1 = j2 = 0, w1 = W, so dj_flip = 1): the columns are mirrored, x -> S - x."""
    grid, size = 4, 32
    p = size // grid
    rows, cols = np.divmod(np.arange(grid * grid), grid)
    straight = np.stack([(rows + 0.5) * p, (cols + 0.5) * p], -1)
    geometry = np.array([[0, 0, 1, 1, 0, 1], [0, 0, 1, 1, 1, 1]], np.float32)
    centres = view2_patch_centres_in_view1(geometry, grid, size)
    assert centres.shape == (2, grid * grid, 2) and centres.dtype == np.float64
    np.testing.assert_allclose(centres[0], straight, atol=1e-9)
    np.testing.assert_allclose(centres[1], np.stack([straight[:, 0], size - straight[:, 1]], -1), atol=1e-9)
    # view 2 = bottom-right quarter of view 1 (di = dj = 1/2, dh = dw = 1/2)
    quarter = view2_patch_centres_in_view1(np.array([[0.5, 0.5, 0.5, 0.5, 0, 0]]), grid, size)[0]
    np.testing.assert_allclose(quarter, size / 2 + straight / 2, atol=1e-9)


def test_view2_patch_centres_land_on_the_same_image_point_in_view1():
    """Every view-2 patch centre and its predicted view-1 location must show the same point of the original image.

    The original 300x400 image is given as two float ("F" mode) images holding each pixel's own row and column:
    sample_two_views with the same seed crops and flips both identically (its draws depend only on the size), and
    float images carry no quantisation. Which original point a location of a view shows is read off by bilinear
    interpolation (`_bilinear`, exact on a linear ramp) of those coordinate images. The two readings are
    compared in view-1 pixels (original pixels per view-1 pixel measured on view 1 itself). Error left: PIL's
    bicubic downscaling reproduces a linear ramp only approximately (measured < 0.004 view-1 pixels), and float32;
    the tolerance is 0.05 view-1 pixels. A half-pixel slip in the centre convention would be 0.5, a missing 0.5
    in gh/gw half a patch (4 pixels).
    """
    height, width, size, patch, margin = 300, 400, 64, 8, 3
    grid = size // patch
    row_image, col_image = np.meshgrid(np.arange(height, dtype=np.float32), np.arange(width, dtype=np.float32),
                                       indexing="ij")
    errors = {}  # (flip1, flip2) -> max error in view-1 pixels of every checked patch centre
    for seed in range(48):
        rows1, rows2, geometry = sample_two_views(np.random.default_rng(seed), row_image, size, 0.2)
        cols1, cols2, geometry_again = sample_two_views(np.random.default_rng(seed), col_image, size, 0.2)
        np.testing.assert_array_equal(geometry, geometry_again)
        flip1, flip2 = (bool(view[size // 2, -1] < view[size // 2, 0]) for view in (cols1, cols2))
        assert geometry[4] == float(flip1 != flip2)
        inner = size - 1 - 2 * margin
        rows_per_pixel = (rows1[size - 1 - margin, size // 2] - rows1[margin, size // 2]) / inner
        cols_per_pixel = abs(cols1[size // 2, size - 1 - margin] - cols1[size // 2, margin]) / inner
        predicted = view2_patch_centres_in_view1(geometry[None], grid, size)[0]
        for n, (y, x) in enumerate(predicted):
            y1, x1 = y - 0.5, x - 0.5  # continuous -> pixel-index coordinates
            if not (margin <= y1 <= size - 1 - margin and margin <= x1 <= size - 1 - margin):
                continue  # outside view 1, or where the resize kernel is cut by the crop border
            r, c = divmod(n, grid)
            y2, x2 = (r + 0.5) * patch - 0.5, (c + 0.5) * patch - 0.5
            row_error = (_bilinear(rows1, y1, x1) - _bilinear(rows2, y2, x2)) / rows_per_pixel
            col_error = (_bilinear(cols1, y1, x1) - _bilinear(cols2, y2, x2)) / cols_per_pixel
            errors.setdefault((flip1, flip2), []).append(max(abs(row_error), abs(col_error)))
    assert set(errors) == {(False, False), (True, False), (False, True), (True, True)}
    for case, case_errors in errors.items():
        assert len(case_errors) >= 100, case
        assert max(case_errors) < 0.05, (case, max(case_errors))
