"""Localisation probe (tabletop): does the policy's first action point at the object its instruction names?

For each task, over the evaluation's own seeded start scenes, the Pearson correlation (x and y apart)
between the policy's first arm action and the offset from the gripper to the task's object. The scripted
experts score ~0.95; a policy that does not know where the object is scores ~0. One forward pass per scene,
so it is far cheaper and less noisy than closed-loop success: it is how the tabletop preset's press_button
failure was found (red block 0.94 / 0.97, button -0.23 / 0.24; README, "Honest status").
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dreamvla_jax.evaluation.rollout import Episode

# The object each tabletop task must reach first.
TASK_OBJECT = {
    'lift_red_block': 'red',
    'push_blue_block_left': 'blue',
    'push_blue_block_right': 'blue',
    'place_red_block_in_area': 'red',
    'stack_red_block_on_blue': 'red',
    'press_button': 'button',
}


def object_xy(info: dict, name: str) -> np.ndarray:
    """The table-plane position of ``name`` ('button' or a block colour) in a tabletop ``get_info()``."""
    return np.asarray(info['button'] if name == 'button' else info['objects'][name]['pos'][:2], np.float64)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; NaN when either side is constant (a policy that ignores the scene entirely)."""
    if a.std() < 1e-9 or b.std() < 1e-9:
        return float('nan')
    return float(np.corrcoef(a, b)[0, 1])


def localisation_probe(policy, env, episodes: Sequence[Episode]) -> dict:
    """``{task: {'corr_x', 'corr_y', 'scenes'}}`` over one-task ``episodes`` (``suites.tabletop_episodes``).

    ``policy`` has the evaluation interface (``reset()``, ``step([obs], [instruction]) -> [1, 7]``) for one
    environment; ``env`` is a tabletop env (``reset(**reset_kwargs)``, ``get_info()``).
    """
    actions: dict[str, list] = {}
    offsets: dict[str, list] = {}
    for ep in episodes:
        task = ep.subtasks[0]
        if task not in TASK_OBJECT:
            raise KeyError(f'localisation probe: no target object for task {task!r}; known: {sorted(TASK_OBJECT)}')
        obs = env.reset(**ep.reset_kwargs)
        tcp = np.asarray(obs['robot_obs'][:2], np.float64)
        policy.reset()
        action = np.asarray(policy.step([obs], [ep.instructions[0]]))[0]
        actions.setdefault(task, []).append(action[:2])
        offsets.setdefault(task, []).append(object_xy(env.get_info(), TASK_OBJECT[task]) - tcp)
    out = {}
    for task, acts in actions.items():
        a, d = np.asarray(acts), np.asarray(offsets[task])
        out[task] = {'corr_x': _corr(a[:, 0], d[:, 0]), 'corr_y': _corr(a[:, 1], d[:, 1]), 'scenes': len(acts)}
    return out


def format_probe(result: dict) -> str:
    lines = [f"  {'localisation probe':32s} {'corr x':>7s} {'corr y':>7s}"]
    for task, r in result.items():
        lines.append(f"  {task:32s} {r['corr_x']:7.2f} {r['corr_y']:7.2f}")
    return '\n'.join(lines)
