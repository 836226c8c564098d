"""Dynamic-region (motion) masks from stored point tracks (SPEC section 5). Pure numpy.

Tracks: for each frame j and camera, the displacement of a ``grid x grid`` lattice of points (centres at
``(k + 0.5) * image_size / grid``, row-major, (x, y) order) from frame j to frame ``min(j + gap, episode
end)``, in pixels of the model image size: float16 ``[2 cameras, grid*grid, 2]``.

Mask: |displacement| per point -> average-pool ``pool x pool`` -> ``> threshold`` -> on cameras listed in
``dilate``, 3x3 max-pool with stride 1 (8-neighbour dilation) -> flatten row-major: ``[2, (grid/pool)^2]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dreamvla_jax.data.errors import DataError

CAMERAS = ('static', 'gripper')


def grid_points(image_size: int, grid: int) -> np.ndarray:
    """float32 [grid*grid, 2]: (x, y) point centres, row-major (y outer, x inner)."""
    c = (np.arange(grid, dtype=np.float32) + 0.5) * (image_size / grid)
    ys, xs = np.meshgrid(c, c, indexing='ij')
    return np.stack([xs.ravel(), ys.ravel()], axis=-1)


def speed_grid(tracks: np.ndarray, grid: int) -> np.ndarray:
    """[..., grid*grid, 2] displacements -> float32 [..., grid, grid] point speeds (Euclidean norm)."""
    tracks = np.asarray(tracks, np.float32)
    if tracks.shape[-2:] != (grid * grid, 2):
        raise DataError(f"tracks have shape {tracks.shape}, expected [..., {grid * grid}, 2] for grid "
                        f"{grid}.")
    speed = np.sqrt(np.sum(np.square(tracks), axis=-1))
    return speed.reshape(*speed.shape[:-1], grid, grid)


def avg_pool(x: np.ndarray, pool: int) -> np.ndarray:
    """[..., H, W] -> [..., H/pool, W/pool] mean over non-overlapping pool x pool cells."""
    h, w = x.shape[-2:]
    if h % pool or w % pool:
        raise DataError(f"motion grid {h}x{w} is not divisible by pool {pool} (config.data.motion).")
    x = x.reshape(*x.shape[:-2], h // pool, pool, w // pool, pool)
    return x.mean(axis=(-3, -1))


def dilate8(mask: np.ndarray) -> np.ndarray:
    """[..., H, W] -> [..., H, W]: 3x3 max-pool, stride 1, 'same' padding (a cell spreads to 8 neighbours)."""
    h, w = mask.shape[-2:]
    pad = [(0, 0)] * (mask.ndim - 2) + [(1, 1), (1, 1)]
    # Padding with the minimum keeps borders unchanged (max-pool with -inf padding).
    p = np.pad(mask, pad, constant_values=np.min(mask) if mask.size else 0)
    out = mask.copy()
    for dy in range(3):
        for dx in range(3):
            out = np.maximum(out, p[..., dy:dy + h, dx:dx + w])
    return out


def motion_mask(tracks: np.ndarray, *, grid: int, pool: int, threshold: float,
                dilate: Sequence[str] = ('static',), cameras: Sequence[str] = CAMERAS) -> np.ndarray:
    """Tracks [..., C, grid*grid, 2] -> float32 mask [..., C, (grid/pool)^2] (camera order ``cameras``)."""
    tracks = np.asarray(tracks, np.float32)
    if tracks.shape[-3] != len(cameras):
        raise DataError(f"tracks have {tracks.shape[-3]} cameras, expected {len(cameras)} ({cameras}).")
    unknown = [c for c in dilate if c not in cameras]
    if unknown:
        raise DataError(f"config.data.motion.dilate names unknown camera {unknown[0]!r}; cameras: {cameras}.")
    cells = (avg_pool(speed_grid(tracks, grid), pool) > threshold).astype(np.float32)  # [..., C, g, g]
    out = cells.copy()
    for ci, cam in enumerate(cameras):
        if cam in dilate:
            out[..., ci, :, :] = dilate8(cells[..., ci, :, :])
    return out.reshape(*out.shape[:-2], -1)


def mask_from_config(tracks: np.ndarray, motion_cfg) -> np.ndarray:
    """``motion_mask`` with the fields of ``config.data.motion`` (grid, pool, threshold, dilate)."""
    return motion_mask(tracks, grid=int(motion_cfg.grid), pool=int(motion_cfg.pool),
                       threshold=float(motion_cfg.threshold), dilate=tuple(motion_cfg.dilate))
