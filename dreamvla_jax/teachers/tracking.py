"""Point tracking for the dynamic-region masks (SPEC section 5).

For frame j the ``grid x grid`` lattice of ``data.motion.grid_points`` (at the model image size) is followed
through frames j, j+1, ..., min(j + gap, episode end); the stored value is the total displacement.

- ``LKTracker``: OpenCV pyramidal Lucas-Kanade, chained frame to frame (each step is a small motion, which
  LK handles far better than one jump over ``gap`` frames). Works offline, no weights.
- ``CoTracker``: Meta's CoTracker (the official choice) when the user has the ``cotracker`` package and
  points to its checkpoint (``--cotracker PATH``). Not exercised by the tests (not installable offline).
"""

from __future__ import annotations

import cv2
import numpy as np

from dreamvla_jax.data.errors import DataError
from dreamvla_jax.data.motion import grid_points


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """[H, W, C] -> [size, size, C] (area filter when shrinking, bilinear when enlarging)."""
    interp = cv2.INTER_AREA if image.shape[0] > size else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interp)


class LKTracker:
    """Pyramidal Lucas-Kanade tracker of a fixed point grid."""

    name = 'opencv-lk'

    def __init__(self, image_size: int, grid: int, levels: int = 2):
        self.image_size = int(image_size)
        self.grid = int(grid)
        self.levels = levels
        # 11 px windows at 224, scaled with the image (odd, >= 5): per-frame steps are small, and on a
        # moving square this tracks as exactly as 21 px windows at a quarter of the cost.
        win = max(5, int(round(11 * self.image_size / 224)) | 1)
        self.win = (win, win)
        self.points = grid_points(self.image_size, self.grid)  # [G*G, 2] (x, y)
        self.criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 30, 0.01)

    @property
    def info(self) -> dict:
        return {'method': self.name, 'opencv': cv2.__version__, 'window': self.win[0], 'levels': self.levels}

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """uint8 [H, W, 3] -> uint8 [S, S] grey image at the model image size."""
        return cv2.cvtColor(resize(image, self.image_size), cv2.COLOR_RGB2GRAY)

    def track(self, frames: list[np.ndarray]) -> np.ndarray:
        """``prepare``d frames [j .. j+k] -> float32 [G*G, 2] displacement of the grid from first to last."""
        p0 = self.points.reshape(-1, 1, 2).astype(np.float32)
        p = p0.copy()
        for a, b in zip(frames[:-1], frames[1:], strict=True):
            nxt, status, _ = cv2.calcOpticalFlowPyrLK(a, b, p, None, winSize=self.win, maxLevel=self.levels,
                                                      criteria=self.criteria)
            ok = status.reshape(-1, 1, 1).astype(bool)
            # A lost point keeps its last position (counts as static from there on) instead of jumping.
            p = np.where(ok, nxt, p).astype(np.float32)
        return (p - p0).reshape(-1, 2)


class CoTracker:
    """CoTracker (offline predictor) on the same grid; needs the ``cotracker`` package and a checkpoint."""

    name = 'cotracker'

    def __init__(self, image_size: int, grid: int, checkpoint: str, device: str | None = None):
        try:
            import torch
            from cotracker.predictor import CoTrackerPredictor
        except ImportError as e:
            raise DataError("--cotracker was given but the `cotracker` package is not installed "
                            f"({e}); install it or drop --cotracker to use OpenCV Lucas-Kanade.") from e
        self.torch = torch
        self.image_size = int(image_size)
        self.grid = int(grid)
        self.device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
        self.model = CoTrackerPredictor(checkpoint=checkpoint).to(self.device).eval()
        pts = grid_points(self.image_size, self.grid)
        self.queries = torch.from_numpy(
            np.concatenate([np.zeros((len(pts), 1), np.float32), pts], axis=1))[None].to(self.device)
        self.checkpoint = checkpoint

    @property
    def info(self) -> dict:
        return {'method': self.name, 'checkpoint': self.checkpoint}

    def prepare(self, image: np.ndarray) -> np.ndarray:
        return resize(image, self.image_size)

    def track(self, frames: list[np.ndarray]) -> np.ndarray:
        if len(frames) == 1:
            return np.zeros((self.grid * self.grid, 2), np.float32)
        torch = self.torch
        video = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2)[None].float().to(self.device)
        with torch.no_grad():
            tracks, _ = self.model(video, queries=self.queries)  # [1, T, N, 2]
        return (tracks[0, -1] - self.queries[0, :, 1:]).cpu().numpy().astype(np.float32)


def build_tracker(image_size: int, grid: int, cotracker: str | None = None, device: str | None = None):
    if cotracker:
        return CoTracker(image_size, grid, cotracker, device)
    return LKTracker(image_size, grid)
