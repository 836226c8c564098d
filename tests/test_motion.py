"""Dynamic-region masks (SPEC section 5): grid, pooling, threshold, 8-neighbour dilation, LK on a moving
square."""

import numpy as np
import pytest
from conftest import load_config

from dreamvla_jax.data import motion
from dreamvla_jax.data.errors import DataError
from dreamvla_jax.data.synthetic import moving_square
from dreamvla_jax.teachers.tracking import LKTracker


def test_grid_points_are_cell_centres():
    p = motion.grid_points(224, 28)
    assert p.shape == (784, 2)
    np.testing.assert_allclose(p[0], [4, 4])
    np.testing.assert_allclose(p[1], [12, 4])       # row-major: x varies fastest
    np.testing.assert_allclose(p[28], [4, 12])
    np.testing.assert_allclose(p[-1], [220, 220])


def test_pool_threshold_and_dilation_by_hand():
    grid, pool = 8, 2
    tracks = np.zeros((2, grid * grid, 2), np.float32)
    # Static camera: one point of cell (1, 2) moves 5 px -> cell mean 1.25 > 1.
    tracks[0, 2 * grid + 4] = (3.0, 4.0)
    # Same camera: one point of cell (3, 3) moves 3.9 px -> mean 0.975, not > 1.
    tracks[0, 6 * grid + 6] = (3.9, 0.0)
    # Gripper: all four points of cell (0, 0) move 2 px.
    for y, x in ((0, 0), (0, 1), (1, 0), (1, 1)):
        tracks[1, y * grid + x] = (0.0, 2.0)
    m = motion.motion_mask(tracks, grid=grid, pool=pool, threshold=1.0, dilate=('static',))
    assert m.shape == (2, 16) and m.dtype == np.float32
    static = np.zeros((4, 4))
    static[0:3, 1:4] = 1                              # cell (1, 2) and its 8 neighbours
    np.testing.assert_array_equal(m[0].reshape(4, 4), static)
    gripper = np.zeros((4, 4))
    gripper[0, 0] = 1                                 # gripper is not dilated by default
    np.testing.assert_array_equal(m[1].reshape(4, 4), gripper)
    m2 = motion.motion_mask(tracks, grid=grid, pool=pool, threshold=1.0, dilate=())
    assert m2[0].sum() == 1 and m2[0].reshape(4, 4)[1, 2] == 1
    m3 = motion.motion_mask(tracks, grid=grid, pool=pool, threshold=1.0, dilate=('static', 'gripper'))
    np.testing.assert_array_equal(m3[1].reshape(4, 4)[:2, :2], 1)
    assert m3[1].sum() == 4                           # corner cell: 3 neighbours inside the grid


def test_mask_from_config_batched_shapes():
    cfg = load_config('default').data.motion
    tracks = np.zeros((3, 10, 2, 784, 2), np.float16)
    m = motion.mask_from_config(tracks, cfg)
    assert m.shape == (3, 10, 2, 196) and not m.any()
    with pytest.raises(DataError, match='not divisible by pool 3'):
        motion.motion_mask(tracks[0], grid=28, pool=3, threshold=1.0)
    with pytest.raises(DataError, match="unknown camera 'left'"):
        motion.motion_mask(tracks[0], grid=28, pool=2, threshold=1.0, dilate=('left',))


def _neighbours(mask):
    out = mask.copy()
    for y, x in zip(*np.nonzero(mask), strict=True):
        out[max(0, y - 1):y + 2, max(0, x - 1):x + 2] = 1
    return out


def test_lk_static_camera_mask_on_moving_square():
    """A 56-px textured square moving 3 px/frame right over a static texture, tracked over gap 5."""
    size, grid, pool, gap, speed, square = 224, 28, 2, 5, 3.0, 56
    frames, corners = moving_square(gap + 1, size, np.random.default_rng(0), square=square, speed=speed,
                                    start=(40, 60))
    tracker = LKTracker(size, grid)
    d = tracker.track([tracker.prepare(f) for f in frames])
    # Points on the square moved gap * speed px; background points did not move.
    pts = motion.grid_points(size, grid)
    x0, y0 = corners[0]
    inside = (pts[:, 0] > x0 + 8) & (pts[:, 0] < x0 + square - 8) & (pts[:, 1] > y0 + 8) & \
        (pts[:, 1] < y0 + square - 8)
    np.testing.assert_allclose(d[inside], [[gap * speed, 0.0]] * int(inside.sum()), atol=0.3)
    tracks = np.stack([d, np.zeros_like(d)])
    raw = motion.motion_mask(tracks, grid=grid, pool=pool, threshold=1.0, dilate=()).reshape(2, 14, 14)[0]
    cell = size // (grid // pool)                     # 16 px patches
    covered = np.zeros((14, 14), bool)                # cells fully covered by the square in frame 0
    far = np.ones((14, 14), bool)                     # cells >= 2 cells away from the square's path
    for r in range(14):
        for c in range(14):
            y, x = r * cell, c * cell
            covered[r, c] = x >= x0 and x + cell <= x0 + square and y >= y0 and y + cell <= y0 + square
            x_lo, x_hi = x0 - 2 * cell, corners[-1][0] + square + 2 * cell
            far[r, c] = not (x + cell > x_lo and x < x_hi and y + cell > y0 - 2 * cell
                             and y < y0 + square + 2 * cell)
    assert covered.sum() >= 4 and far.sum() > 100
    assert (raw[covered] == 1).all()
    assert (raw[far] == 0).all()
    dilated = motion.motion_mask(tracks, grid=grid, pool=pool, threshold=1.0,
                                 dilate=('static',)).reshape(2, 14, 14)
    np.testing.assert_array_equal(dilated[0], _neighbours(raw))   # exactly the 8-neighbours added
    np.testing.assert_array_equal(dilated[1], 0)
