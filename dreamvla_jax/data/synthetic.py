"""Small synthetic datasets in the real CALVIN format (tests, benchmarks, CPU demos).

Each episode shows a static textured background with a textured square moving a few pixels per frame on
the static camera, and a slowly panning texture on the gripper camera; depth, robot state and actions are
plausible but meaningless. Everything goes through ``CalvinWriter``: no private format.

  python -m dreamvla_jax.data.synthetic runs/debug_data     # writes runs/debug_data/{training,validation}
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import cv2
import numpy as np

from dreamvla_jax.data.calvin import CalvinWriter


def texture(h: int, w: int, rng: np.random.Generator, cell: int = 4) -> np.ndarray:
    """uint8 [h, w, 3] blocky random texture (trackable, compressible)."""
    t = rng.integers(0, 256, (h // cell + 1, w // cell + 1, 3)).astype(np.uint8)
    t = cv2.resize(t, ((w // cell + 1) * cell, (h // cell + 1) * cell), interpolation=cv2.INTER_NEAREST)
    return cv2.GaussianBlur(t[:h, :w], (3, 3), 0)


def moving_square(n: int, size: int, rng: np.random.Generator, *, square: int, speed: float,
                  start: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [n, size, size, 3] frames of a textured square moving ``speed`` px/frame to the right over a
    static texture, and the square's top-left corners int [n, 2] (x, y)."""
    bg = texture(size, size, rng)
    sq = texture(square, square, rng)
    x0, y0 = start if start is not None else (size // 8, size // 4)
    frames, corners = [], []
    for k in range(n):
        x = int(round(x0 + speed * k)) % max(1, size - square)
        f = bg.copy()
        f[y0:y0 + square, x:x + square] = sq
        frames.append(f)
        corners.append((x, y0))
    return np.stack(frames), np.asarray(corners)


def episode_frames(n: int, rng: np.random.Generator, *, static_size: int = 200, gripper_size: int = 84,
                   depth: bool = True, speed: float = 3.0) -> dict[str, np.ndarray]:
    """CALVIN per-frame keys for an episode of ``n`` frames."""
    static, corners = moving_square(n, static_size, rng, square=static_size // 4, speed=speed)
    big = texture(gripper_size * 2, gripper_size * 2, rng)
    offsets = [k % gripper_size for k in range(n)]
    gripper = np.stack([big[o:o + gripper_size, :gripper_size] for o in offsets])
    tcp = np.cumsum(rng.normal(0, 0.005, (n, 6)), axis=0) + np.array([0.0, -0.2, 0.5, 3.1, 0.0, 1.5])
    grip = np.where(np.arange(n) % 20 < 10, 1.0, -1.0)
    robot_obs = np.concatenate([tcp, np.full((n, 1), 0.07), rng.normal(0, 0.5, (n, 7)), grip[:, None]], 1)
    actions = np.concatenate([np.roll(tcp, -1, 0), grip[:, None]], 1)
    rel = np.concatenate([np.clip(rng.normal(0, 0.5, (n, 6)), -1, 1), grip[:, None]], 1)
    out = {'rgb_static': static, 'rgb_gripper': gripper, 'robot_obs': robot_obs, 'actions': actions,
           'rel_actions': rel, 'scene_obs': rng.normal(0, 0.1, (n, 24))}
    if depth:
        yy = np.linspace(1.0, 2.0, static_size, dtype=np.float32)[:, None]
        ds = np.repeat((yy + np.zeros((1, static_size), np.float32))[None], n, 0)
        for k, (x, y) in enumerate(corners):
            ds[k, y:y + static_size // 4, x:x + static_size // 4] -= 0.3
        out['depth_static'] = ds
        out['depth_gripper'] = np.full((n, gripper_size, gripper_size), 0.2, np.float32) + \
            np.linspace(0, 0.1, gripper_size, dtype=np.float32)[None, None, :]
    return out


def write_split(split_dir: str | os.PathLike, episodes: Sequence[tuple[int, Sequence[tuple]]], *,
                seed: int = 0, depth: bool = True, start_id: int = 0, speed: float = 3.0) -> CalvinWriter:
    """Writes a split: ``episodes`` = [(length, [(start, end_incl, task, instruction), ...]), ...]."""
    rng = np.random.default_rng(seed)
    w = CalvinWriter(split_dir, start_id=start_id)
    for n, anns in episodes:
        w.add_episode(episode_frames(n, rng, depth=depth, speed=speed), anns)
    w.close()
    return w


def default_episodes(num: int = 3, length: int = 40, window: int = 24) -> list[tuple[int, list[tuple]]]:
    """``num`` episodes of ``length`` frames with two overlapping annotations each."""
    tasks = [('open_drawer', 'pull the handle to open the drawer'),
             ('move_slider_left', 'push the sliding door to the left side'),
             ('turn_on_led', 'press the button to turn on the led light')]
    eps = []
    for i in range(num):
        t1, t2 = tasks[i % 3], tasks[(i + 1) % 3]
        a = min(window, length) - 1
        eps.append((length, [(0, a, *t1), (length - 1 - a, length - 1, *t2)]))
    return eps


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog='python -m dreamvla_jax.data.synthetic',
                                description='Writes a small synthetic dataset in the CALVIN format.')
    p.add_argument('out', help='dataset root; training/ and validation/ are created in it')
    p.add_argument('--episodes', type=int, default=4, help='episodes per split')
    p.add_argument('--length', type=int, default=64, help='frames per episode')
    p.add_argument('--window', type=int, default=40, help='frames per language annotation')
    p.add_argument('--no-depth', action='store_true', help='omit depth (teachers then add pseudo-depth)')
    a = p.parse_args(argv)
    for i, split in enumerate(('training', 'validation')):
        write_split(os.path.join(a.out, split), default_episodes(a.episodes, a.length, a.window), seed=i,
                    depth=not a.no_depth)
    print(f'wrote {a.out}/training and {a.out}/validation: {a.episodes} episodes x {a.length} frames each')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
