"""Scripted experts for the tabletop tasks: waypoints + gripper commands -> 7-d relative actions.

An expert reads the object poses once from ``env.get_info()`` (privileged state, as scripted demonstrators
do), plans a list of phases, and then emits calvin_env relative actions through the ordinary ``env.step``.
It keeps its own copy of the env's internal target pose (it knows what it commanded), so it never overshoots
because of the arm's tracking lag. Seeded noise varies speed, approach heights and grasp offsets and jitters
the cruising part of every move, so demonstrations of one task are not identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dreamvla_jax.envs.base import MAX_REL_POS
from dreamvla_jax.envs.tabletop import (
    BLOCK_HALF,
    BUTTON_CAP_TOP,
    TASK_NAMES,
    TCP_BOUNDS_HI,
    TCP_BOUNDS_LO,
)

OPEN, CLOSE = 1.0, -1.0
GRASP_Z = BLOCK_HALF - 0.002     # pads just below the block centre: a firm, level grasp
PUSH_Z = 0.022
PUSH_CLEARANCE = 0.058           # TCP-to-block-centre distance when the closed fingers touch the block side


@dataclass
class Move:
    """Drive the TCP to ``pos`` with the gripper commanded to ``gripper``."""
    pos: np.ndarray
    gripper: float
    tol: float = 0.012           # how close the measured TCP must get before the next phase
    speed: float = 1.0           # fraction of the maximal step (0.02 m) per action


@dataclass
class Grip:
    """Hold the position and command ``gripper`` for ``steps`` steps (fingers need ~5 steps to travel)."""
    gripper: float
    steps: int


class ScriptedExpert:
    """A per-episode expert for one task: ``act(obs) -> rel_action[7]``.

    Args:
      env: the tabletop env, already reset to the episode's start state.
      task: one of ``TASK_NAMES``.
      seed: seeds the variations (speed, offsets, jitter).
      noise: std of the Gaussian jitter added to the position part of every action (in action units).
    """

    max_phase_steps = 40         # a phase that cannot finish (blocked arm) is abandoned rather than looping

    def __init__(self, env, task: str, seed: int | None = None, noise: float = 0.05):
        if task not in TASK_NAMES:
            raise KeyError(f'unknown task {task!r}; known: {TASK_NAMES}')
        self.env, self.task, self.noise = env, task, noise
        self.rng = np.random.default_rng(seed)
        info = env.get_info()
        # The env's target pose starts at the measured TCP on reset; from then on we integrate our commands.
        self.target = np.asarray(info['target_pos'], np.float64).copy()
        self._target_before = self.target    # the target before the last action (see ``executed``)
        self.speed = self.rng.uniform(0.8, 1.0)
        self.phases = self._plan(info)
        self.phase = 0
        self.phase_steps = 0
        self.gripper = OPEN

    # ------------------------------------------------------------------ planning

    def _jitter(self, scale):
        return self.rng.uniform(-scale, scale, 2)

    def _grasp_phases(self, xy, hover):
        xy = xy + self._jitter(0.004)
        return [
            Move(np.r_[xy, hover], OPEN, tol=0.02),
            Move(np.r_[xy, GRASP_Z + self.rng.uniform(0.0, 0.004)], OPEN, tol=0.008, speed=0.7),
            Grip(CLOSE, int(self.rng.integers(6, 9))),
        ]

    def _plan(self, info):
        objs = info['objects']
        hover = self.rng.uniform(0.10, 0.14)
        if self.task.startswith('lift_'):
            xy = objs[self.task.split('_')[1]]['pos'][:2]
            return self._grasp_phases(xy, hover) + [
                Move(np.r_[xy, GRASP_Z + 0.12], CLOSE, speed=0.6)]
        if self.task.startswith('push_'):
            color = self.task.split('_')[1]
            sign = -1.0 if self.task.endswith('left') else 1.0
            xy = objs[color]['pos'][:2] + np.array([self.rng.uniform(-0.006, 0.006), 0.0])
            start = xy - np.array([0.0, sign * (PUSH_CLEARANCE + self.rng.uniform(0.0, 0.01))])
            end = xy + np.array([0.0, sign * (PUSH_CLEARANCE + 0.075)])
            return [
                Move(np.r_[start, hover], CLOSE, tol=0.02),
                Move(np.r_[start, PUSH_Z], CLOSE, tol=0.008, speed=0.7),
                Move(np.r_[end, PUSH_Z], CLOSE, tol=0.01, speed=0.6),
                Move(np.r_[end, hover], CLOSE),
            ]
        if self.task in ('place_red_block_in_area', 'stack_red_block_on_blue'):
            xy = objs['red']['pos'][:2]
            if self.task == 'place_red_block_in_area':
                goal_xy, release_z = info['zone'] + self._jitter(0.01), GRASP_Z + 0.01
            else:
                goal_xy = objs['blue']['pos'][:2] + self._jitter(0.003)
                release_z = GRASP_Z + 2 * BLOCK_HALF + 0.008
            return self._grasp_phases(xy, hover) + [
                Move(np.r_[xy, GRASP_Z + 0.06], CLOSE, tol=0.03),
                Move(np.r_[goal_xy, hover], CLOSE, tol=0.015),
                Move(np.r_[goal_xy, release_z], CLOSE, tol=0.006, speed=0.6),
                Grip(OPEN, int(self.rng.integers(5, 8))),
                Move(np.r_[goal_xy, release_z + 0.08], OPEN),
            ]
        if self.task == 'press_button':
            xy = info['button'] + self._jitter(0.005)
            return [
                Move(np.r_[xy, hover], CLOSE, tol=0.02),
                Move(np.r_[xy, BUTTON_CAP_TOP - 0.018], CLOSE, tol=0.006, speed=0.6),
                Move(np.r_[xy, hover], CLOSE),
            ]
        raise KeyError(self.task)

    # ------------------------------------------------------------------ acting

    @property
    def done(self) -> bool:
        """All phases finished (the collector stops earlier, at the oracle's success)."""
        return self.phase >= len(self.phases)

    def act(self, obs) -> np.ndarray:
        """The next 7-d relative action; position noise included, orientation held at the start value."""
        tcp = np.asarray(obs['robot_obs'][:3], np.float64)
        action = np.zeros(7)
        while not self.done:
            ph = self.phases[self.phase]
            if isinstance(ph, Grip):
                if self.phase_steps < ph.steps:
                    self.gripper = ph.gripper
                    break
            else:
                self.gripper = ph.gripper
                reached = (np.linalg.norm(ph.pos - self.target) < 1e-3
                           and np.linalg.norm(ph.pos - tcp) < ph.tol)
                if not reached and self.phase_steps < self.max_phase_steps:
                    delta = (ph.pos - self.target) / MAX_REL_POS
                    limit = ph.speed * self.speed
                    peak = np.abs(delta).max()
                    if peak > limit:
                        # Jitter only while cruising: the last step lands exactly, so phases end on time.
                        action[:3] = delta * (limit / peak) + self.rng.normal(0.0, self.noise, 3)
                    else:
                        action[:3] = delta
                    break
            self.phase += 1
            self.phase_steps = 0
        action[:3] = np.clip(action[:3], -1.0, 1.0)
        action[6] = self.gripper
        self._target_before = self.target
        self.executed(action)
        self.phase_steps += 1
        return action

    @property
    def moving(self) -> bool:
        """The current phase is a move (not a gripper hold): a perturbation there is corrected by the plan."""
        return not self.done and isinstance(self.phases[self.phase], Move)

    def executed(self, action) -> None:
        """Record that ``action`` (not necessarily the one ``act`` returned) was sent to the env: mirror the
        env's target update (including its workspace clipping) so our copy of the target stays exact."""
        self.target = np.clip(self._target_before + np.asarray(action[:3]) * MAX_REL_POS,
                              TCP_BOUNDS_LO, TCP_BOUNDS_HI)


def run_expert_episode(env, task: str, seed: int, max_steps: int = 120, extra_steps: int = 3,
                       noise: float = 0.05, perturb: float = 0.0, perturb_prob: float = 0.3,
                       record: bool = True):
    """Reset ``env`` to a seeded start state for ``task`` and roll out its expert until success.

    The episode continues for ``extra_steps`` after the oracle first reports success (so the final frames
    show the finished task), and gives up after ``max_steps``.

    ``perturb`` > 0 injects noise DART-style (Laskey et al., 2017): with probability ``perturb_prob`` a step
    of a move phase *executes* the expert's action plus Gaussian noise of std ``perturb`` on the position
    part, while the *recorded* action stays the expert's own. The expert corrects from where the arm really
    went, so the demonstrations show recoveries from the small drifts a learned policy makes in closed loop.

    Returns:
      dict with ``success`` (bool), ``steps`` (actions taken), ``success_step`` (index of the first
      successful step or None) and, if ``record``, ``obs`` (T+1 observations), ``actions`` (T expert actions,
      the labels) and ``executed`` (the T actions sent to the env; equal to ``actions`` without ``perturb``).
    """
    obs = env.reset(seed=seed, task=task)
    expert = ScriptedExpert(env, task, seed=seed, noise=noise)
    kick = np.random.default_rng(None if seed is None else (seed, 1))
    start_info = env.get_info()
    observations, actions, executed = [obs], [], []
    success_step = None
    for t in range(max_steps):
        action = expert.act(obs)
        sent = action
        if perturb > 0 and expert.moving and kick.random() < perturb_prob:
            sent = action.copy()
            sent[:3] = np.clip(action[:3] + kick.normal(0.0, perturb, 3), -1.0, 1.0)
            expert.executed(sent)
        obs, _, _, info = env.step(sent)
        if record:
            observations.append(obs)
            actions.append(action)
            executed.append(sent)
        if success_step is None and env.tasks.get_task_info_for_set(start_info, info, {task}):
            success_step = t
        if success_step is not None and t >= success_step + extra_steps:
            break
    out = {'success': success_step is not None, 'steps': t + 1, 'success_step': success_step}
    if record:
        out.update(obs=observations, actions=actions, executed=executed)
    return out
