"""The one environment interface that ``eval`` drives: calvin_env's, so CALVIN and the tabletop are swappable.

The shapes follow calvin_env's ``PlayTableSimEnv`` (see the CALVIN notes, sections 1-3):

  obs = env.reset(robot_obs=None, scene_obs=None, seed=None)
  obs = {'rgb_obs':   {'rgb_static': u8[200, 200, 3], 'rgb_gripper': u8[84, 84, 3]},
         'depth_obs': {'depth_static': f32[200, 200], 'depth_gripper': f32[84, 84]},   # metric metres
         'robot_obs': f32[15],   # tcp xyz, tcp euler xyz, gripper width, 7 arm joints, gripper action +-1
         'scene_obs': f32[N]}    # object / articulation state, layout documented by each env
  obs, reward, done, info = env.step(action7)   # relative action (x50 pos, x20 euler), gripper -1/+1
  info = env.get_info(); obs = env.get_obs(); env.close()
  env.tasks.get_task_info_for_set(start_info, end_info, {task}) -> set of completed task names

Environments also expose ``task_names`` (list) and ``instructions`` (task -> sentence); those that can build
their own start states expose ``sample_task_state(task, seed) -> (robot_obs, scene_obs)``.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

# calvin_env's normalisation of relative actions (``to_relative_action`` / ``relative_to_absolute``).
MAX_REL_POS = 0.02   # metres per unit of rel_actions[:3]
MAX_REL_ORN = 0.05   # radians per unit of rel_actions[3:6]

Obs = dict[str, Any]
Info = dict[str, Any]


@runtime_checkable
class TaskOracle(Protocol):
    """calvin_env's ``Tasks``: which of ``task_filter`` became true between two ``get_info()`` snapshots."""

    def get_task_info_for_set(self, start_info: Info, end_info: Info, task_filter: set[str]) -> set[str]:
        ...


@runtime_checkable
class Env(Protocol):
    """What ``eval`` (and the demo collector) may call on an environment."""

    task_names: list[str]
    instructions: dict[str, str]
    tasks: TaskOracle

    def reset(self, robot_obs: np.ndarray | None = None, scene_obs: np.ndarray | None = None,
              seed: int | None = None) -> Obs:
        ...

    def step(self, action: np.ndarray) -> tuple[Obs, float, bool, Info]:
        ...

    def get_obs(self) -> Obs:
        ...

    def get_info(self) -> Info:
        ...

    def close(self) -> None:
        ...


def binarize_gripper(action: np.ndarray) -> np.ndarray:
    """A float copy of a 7-d action, gripper set to +1 (open) or -1 (close) as calvin's wrapper does."""
    action = np.array(action, dtype=np.float64).reshape(-1)
    if action.shape != (7,):
        raise ValueError(f'expected a 7-d relative action, got shape {action.shape}')
    action[6] = 1.0 if action[6] > 0 else -1.0
    return action


def wrap_to_pi(angle):
    """Angles mapped to [-pi, pi), as calvin_env's ``angle_between_angles`` does for euler deltas."""
    return (np.asarray(angle) + np.pi) % (2 * np.pi) - np.pi


def to_relative_action(actions: np.ndarray, robot_obs: np.ndarray) -> np.ndarray:
    """calvin_env's ``to_relative_action``: absolute next-TCP action -> normalised relative action.

    Args:
      actions: ``[..., 7]`` absolute ``[tcp xyz, euler xyz, gripper]``.
      robot_obs: ``[..., 15]`` (only ``[:6]`` is read).
    Returns:
      ``[..., 7]`` with ``[:6]`` clipped to [-1, 1] and the gripper copied.
    """
    actions = np.asarray(actions, dtype=np.float64)
    robot_obs = np.asarray(robot_obs, dtype=np.float64)
    pos = np.clip(actions[..., :3] - robot_obs[..., :3], -MAX_REL_POS, MAX_REL_POS) / MAX_REL_POS
    orn = wrap_to_pi(actions[..., 3:6] - robot_obs[..., 3:6])
    orn = np.clip(orn, -MAX_REL_ORN, MAX_REL_ORN) / MAX_REL_ORN
    return np.concatenate([pos, orn, actions[..., 6:7]], axis=-1)
