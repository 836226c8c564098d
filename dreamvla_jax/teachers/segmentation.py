"""The simulator's stand-in for SAM: object-class maps (``seg_static`` / ``seg_gripper``) as feature maps.

A pretrained SAM image encoder marks every object as a region of its own; randomly initialised SAM weights
(the only ones offline) do not. Datasets collected on the built-in tabletop store the simulator's object
classes per pixel, and ``python -m dreamvla_jax.teachers --sam segmentation`` turns them into the SAM field:
per cell of the ``grid x grid`` map, the square root of each object class's share of the cell's pixels in
channel ``class id``; the background classes (0 = nothing, 1 = the table) and SAM's other channels stay 0.

Only objects carry a target: a background cell's target is the zero vector, whose cosine with any prediction
is 0, so it adds a constant to the SAM dream's cosine loss and no gradient (``loss_sam`` then has a floor near
the share of background cells, ~0.6 on the tabletop). With the table as a class, a cell's target is mostly
"table" and predicting the average map is nearly free: on the tabletop (1800 demonstrations, step 4000 of
8000) the image tokens then located the button with held-out R^2 0.40 / 0.42 (``eval --probe``), as without
the stand-in; objects only, 0.93 / 0.87 (and the task-free pink block 0.86 / 0.73 instead of 0.02 / 0.17).
The square root makes a small object count: the button's cap covers ~10-20% of a cell.
"""

from __future__ import annotations

import numpy as np

CHANNELS = 256  # SAM's feature width: the store's field keeps its shape whatever the source
BACKGROUND = (0, 1)  # class ids without a target: nothing, and the supporting surface (tabletop: the table)


class SegmentationTeacher:
    """``teacher(seg [N, H, W] uint8, grid) -> float16 [N, grid, grid, 256]`` (see the module docstring)."""

    frame_key = 'seg'  # reads seg_static / seg_gripper instead of rgb_static / rgb_gripper
    info = {'source': 'dataset segmentation (seg_static, seg_gripper)', 'random_init': False,
            'encoding': 'sqrt of class shares per cell, channel = class id; background classes 0, 1 zero'}

    def __call__(self, seg: np.ndarray, grid: int) -> np.ndarray:
        seg = np.asarray(seg)
        if seg.ndim != 3 or seg.dtype != np.uint8:
            raise ValueError(f"segmentation maps must be uint8 [N, H, W], got {seg.dtype} {seg.shape}")
        out = np.sqrt(class_shares(seg, grid, CHANNELS))
        out[..., list(BACKGROUND)] = 0.0
        return out.astype(np.float16)


def class_shares(seg: np.ndarray, grid: int, channels: int) -> np.ndarray:
    """Share of each class's pixels in each cell of a ``grid x grid`` partition (area-weighted when the size
    is not a multiple of ``grid``: a pixel straddling two cells counts in both by its overlap)."""
    n, h, w = seg.shape
    rows, cols = _overlap(h, grid), _overlap(w, grid)          # [grid, H], [grid, W] pixel weights
    out = np.zeros((n, grid, grid, channels), np.float32)
    for c in np.unique(seg):
        if c >= channels:
            raise ValueError(f"class id {c} does not fit {channels} channels")
        mask = (seg == c).astype(np.float32)
        out[..., c] = np.einsum('gh,nhw,kw->ngk', rows, mask, cols)
    return out / (h / grid) / (w / grid)


def _overlap(size: int, grid: int) -> np.ndarray:
    """``[grid, size]``: how much of pixel j lies in cell i, when [0, size) is split into ``grid`` equal cells."""
    edges = np.arange(grid + 1) * (size / grid)
    lo, hi = edges[:-1, None], edges[1:, None]
    j = np.arange(size)[None]
    return np.clip(np.minimum(hi, j + 1) - np.maximum(lo, j), 0.0, 1.0).astype(np.float32)
