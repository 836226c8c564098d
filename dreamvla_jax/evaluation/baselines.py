"""Reference policies with the ``Policy`` interface, evaluated by the same code as the model.

They put a trained policy's success rate in context: a random policy shows how often a task completes
by chance (e.g. a push) and the mean-action policy how far the average motion of the demonstrations gets
without looking at anything.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


class RandomPolicy:
    """Uniform relative arm actions in [-1, 1]; the gripper command is redrawn every ``gripper_hold`` steps
    (a per-step coin flip would never close the gripper long enough to hold anything)."""

    def __init__(self, num_envs: int = 1, seed: int = 0, gripper_hold: int = 10):
        self.num_envs = num_envs
        self.gripper_hold = max(1, int(gripper_hold))
        self.rng = np.random.default_rng(seed)
        self.t = np.zeros(num_envs, np.int64)
        self.gripper = np.ones(num_envs)

    def reset(self, env_index: int | None = None) -> None:
        idx = slice(None) if env_index is None else env_index
        self.t[idx] = 0

    def step(self, observations: list[dict], instructions: list[str]) -> np.ndarray:
        if len(observations) != self.num_envs:
            raise ValueError(f"built for {self.num_envs} environments, got {len(observations)} observations")
        redraw = self.t % self.gripper_hold == 0
        self.gripper = np.where(redraw, self.rng.choice([-1.0, 1.0], self.num_envs), self.gripper)
        self.t += 1
        arm = self.rng.uniform(-1.0, 1.0, (self.num_envs, 6))
        return np.concatenate([arm, self.gripper[:, None]], axis=1)


class MeanActionPolicy:
    """Always the mean relative action of the demonstrations (gripper: the sign of its mean)."""

    def __init__(self, mean_action: np.ndarray, num_envs: int = 1):
        mean_action = np.asarray(mean_action, np.float64).reshape(7)
        self.action = mean_action.copy()
        self.action[6] = 1.0 if mean_action[6] > 0 else -1.0
        self.num_envs = num_envs

    @classmethod
    def from_dataset(cls, split_dir: str | os.PathLike, num_envs: int = 1, max_frames: int = 5000
                     ) -> 'MeanActionPolicy':
        """Mean ``rel_actions`` over the annotated frames of a CALVIN-format split (at most ``max_frames``,
        evenly spaced, so a 500 GB split costs seconds)."""
        from dreamvla_jax.data.calvin import CalvinDataset

        ds = CalvinDataset(Path(split_dir))
        ids = ds.annotated_frames()
        if len(ids) == 0:
            ids = ds.frame_ids()
        if len(ids) > max_frames:
            ids = ids[np.linspace(0, len(ids) - 1, max_frames).astype(np.int64)]
        actions = np.stack([ds.frame(int(i), ['rel_actions'])['rel_actions'] for i in ids])
        return cls(actions.mean(0), num_envs=num_envs)

    def reset(self, env_index: int | None = None) -> None:
        pass

    def step(self, observations: list[dict], instructions: list[str]) -> np.ndarray:
        return np.repeat(self.action[None], len(observations), axis=0)
