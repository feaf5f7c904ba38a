"""Fixed sin-cos position embeddings (SPEC section 2): the standard 2-D table and the relative embedding that
tells the online branch where view 2's patches lie in view 1's frame."""

import jax.numpy as jnp
import numpy as np

from siim_jax.data.views import view2_patch_grid_coordinates


def sincos_1d(positions, width: int):
    """[sin(p*w), cos(p*w)] with w_k = 10000^(-k/(width/2)); positions (...,) -> (..., width)."""
    if width % 2:
        raise ValueError(f"sin-cos width {width} must be even")
    xp = jnp if isinstance(positions, jnp.ndarray) else np
    omega = 1.0 / 10000 ** (np.arange(width // 2, dtype=np.float64) / (width / 2))
    angles = positions[..., None] * omega.astype(np.float32 if xp is jnp else np.float64)
    return xp.concatenate([xp.sin(angles), xp.cos(angles)], axis=-1)


def sincos_2d(width: int, grid: int, class_token: bool = False) -> np.ndarray:
    """Standard 2-D table (grid*grid [+1], width), float32, row (height) half first.

    Patch index n has row n // grid, column n % grid. With `class_token`, a zero row is prepended.
    """
    if width % 4:
        raise ValueError(f"2-D sin-cos width {width} must be a multiple of 4")
    rows, cols = np.divmod(np.arange(grid * grid, dtype=np.float64), grid)
    table = np.concatenate([sincos_1d(rows, width // 2), sincos_1d(cols, width // 2)], axis=-1)
    if class_token:
        table = np.concatenate([np.zeros((1, width)), table], axis=0)
    return table.astype(np.float32)


def relative_position_embedding(geometry: jnp.ndarray, width: int, grid: int) -> jnp.ndarray:
    """Embedding of every view-2 patch in view 1's frame: geometry (N, 6) -> (N, grid*grid, 2*width).

    geometry rows are [di, dj, dh, dw, rflip, dj_flip] (siim_jax.data.views.GEOMETRY_FIELDS). A view-2 patch
    (r, c) lies at gh = dh*(r+0.5) + di*g - 0.5 and gw = dw*(c+0.5) + dj*g - 0.5 (mirrored:
    gw = -dw*(c+0.5) + dj_flip*g - 0.5) in view-1 patch units (`views.view2_patch_grid_coordinates`); scale
    terms use 10*ln(dh), 10*ln(dw).
    """
    if width % 4:
        raise ValueError(f"decoder width {width} must be a multiple of 4")
    geometry = jnp.asarray(geometry, jnp.float32)
    gh, gw = view2_patch_grid_coordinates(geometry, grid, xp=jnp)
    dh, dw = geometry[:, 2, None], geometry[:, 3, None]
    num = gh.shape[1]
    log_h = jnp.broadcast_to(10.0 * jnp.log(dh), (dh.shape[0], num))
    log_w = jnp.broadcast_to(10.0 * jnp.log(dw), (dw.shape[0], num))
    half = width // 2
    return jnp.concatenate(
        [sincos_1d(gh, half), sincos_1d(gw, half), sincos_1d(log_h, half), sincos_1d(log_w, half)], axis=-1)
