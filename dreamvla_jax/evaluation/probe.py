"""Probes (tabletop): does the policy know where the objects are, and does it act on it?

Localisation probe (``localisation_probe``, the action side). For each task, over the evaluation's own
seeded start scenes, the Pearson correlation (x and y apart) between the policy's first arm action and the
offset from the gripper to the task's object. The scripted
experts score ~0.95; a policy that does not know where the object is scores ~0. One forward pass per scene,
so it is far cheaper and less noisy than closed-loop success: it is how the tabletop preset's press_button
failure was found (red block 0.94 / 0.97, button -0.23 / 0.24; README, "Honest status").

Feature probe (``feature_probe``, the perception side). Over a few hundred seeded scenes, a ridge
regression from the image tokens the backbone sees (``Policy.frame_features``: resampler latents and CLS of
every camera) to each object's table-plane position, scored by R^2 on held-out scenes. ~1 = the images'
tokens carry the position; ~0 = they do not, and no backbone or action head can recover it. It tells a
perception gap from an action gap: on the 78% checkpoint (600 scenes), red block 0.97 / 0.98, blue
0.99 / 0.99, button 0.42 / 0.44, pink (in no task) 0.22 / 0.13; the button is no better placed than by an
untrained tower (~0.5), although the same tower regressed directly on positions learns the button as fast
as the blocks (R^2 0.99 after 300 steps).

Dataset feature probe (``dataset_feature_probe``, ``eval --env offline --probe``): the same regression on
recorded frames of a CALVIN-format split, against ``scene_obs`` (block positions, and the door, drawer,
button, switch and lights' states), for checkpoints trained on CALVIN.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dreamvla_jax.evaluation.rollout import Episode

# The objects whose positions the feature probe regresses (``object_xy`` names).
PROBE_OBJECTS = ('red', 'blue', 'pink', 'button')

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


def ridge_r2(features: np.ndarray, targets: np.ndarray, *, holdout: float = 0.3, lam: float = 10.0) -> np.ndarray:
    """Held-out R^2 ``[K]`` of a ridge regression from ``features`` ``[N, D]`` to ``targets`` ``[N, K]``.

    The first ``1 - holdout`` of the rows fit it (features standardised with their statistics, an intercept,
    L2 penalty ``lam``); the rest score it: ``1 - SSE / SST`` per column, so predicting the held-out mean
    scores 0 and a column without held-out variance is NaN.
    """
    x, y = np.asarray(features, np.float64), np.asarray(targets, np.float64)
    if y.ndim == 1:
        y = y[:, None]
    n = len(x)
    m = int(round((1.0 - holdout) * n))
    if not 2 <= m <= n - 2:
        raise ValueError(f'ridge_r2: {n} rows leave too few to fit ({m}) or to score ({n - m})')
    mu, sd = x[:m].mean(0), x[:m].std(0)
    sd[sd < 1e-8] = 1.0
    z = np.concatenate([(x - mu) / sd, np.ones((n, 1))], axis=1)
    penalty = lam * np.eye(z.shape[1])
    penalty[-1, -1] = 0.0  # the intercept is not shrunk
    w = np.linalg.solve(z[:m].T @ z[:m] + penalty, z[:m].T @ y[:m])
    resid = ((z[m:] @ w - y[m:]) ** 2).sum(0)
    total = ((y[m:] - y[m:].mean(0)) ** 2).sum(0)
    with np.errstate(divide='ignore', invalid='ignore'):
        return np.where(total > 1e-12, 1.0 - resid / np.maximum(total, 1e-300), np.nan)


def _batched(frame_features, observations, batch: int) -> np.ndarray:
    """``frame_features`` over an iterable of observations, ``batch`` at a time: ``[N, D]``."""
    feats, pending = [], []
    for obs in observations:
        pending.append(obs)
        if len(pending) == batch:
            feats.append(np.asarray(frame_features(pending)))
            pending = []
    if pending:
        feats.append(np.asarray(frame_features(pending)))
    return np.concatenate(feats)


def feature_probe(frame_features, env, tasks: Sequence[str], *, scenes: int = 600, seed: int = 0,
                  batch: int = 50, objects: Sequence[str] = PROBE_OBJECTS, lam: float = 10.0) -> dict:
    """``{object: {'r2_x', 'r2_y', 'scenes'}}``: how well the image tokens place each object.

    ``frame_features(observations) -> [N, D]`` (``Policy.frame_features``); ``env`` a rendering tabletop env.
    Scene ``i`` is ``env.reset(seed=seed + i, task=tasks[i % len(tasks)])``; 30% of the scenes are held out;
    ``lam`` is the ridge penalty (``ridge_r2``).
    """
    if scenes < 20:
        raise ValueError(f'feature probe: {scenes} scenes are too few for a held-out R^2 (use >= 20)')
    xy = []

    def observations():
        for i in range(scenes):
            obs = env.reset(seed=seed + i, task=tasks[i % len(tasks)])
            info = env.get_info()
            xy.append(np.concatenate([object_xy(info, o) for o in objects]))
            yield obs

    r2 = ridge_r2(_batched(frame_features, observations(), batch), np.asarray(xy), lam=lam)
    return {o: {'r2_x': float(r2[2 * j]), 'r2_y': float(r2[2 * j + 1]), 'scenes': scenes}
            for j, o in enumerate(objects)}


# ``scene_obs`` entries the dataset probe regresses: name -> (x, y) indices of a position or (i,) of a joint or
# light state. CALVIN's layout (CALVIN.md): door, drawer, button, switch, lightbulb, green LED, then the blocks.
CALVIN_SCENE_TARGETS = {'red': (6, 7), 'blue': (12, 13), 'pink': (18, 19), 'sliding_door': (0,), 'drawer': (1,),
                        'button': (2,), 'switch': (3,), 'lightbulb': (4,), 'green_led': (5,)}
# The built-in tabletop's layout (``envs.tabletop.SCENE_OBS_LABELS``), read when the dataset has collect.json.
TABLETOP_SCENE_TARGETS = {'red': (6, 7), 'blue': (12, 13), 'pink': (18, 19), 'button': (3, 4),
                          'green_area': (0, 1), 'light': (5,)}


def dataset_feature_probe(frame_features, dataset, *, frames: int = 600, targets: dict | None = None,
                          batch: int = 50, lam: float = 10.0, progress: bool = False) -> dict:
    """The feature probe on recorded frames (CALVIN, or any dataset in its format): ``{name: {'r2_x', 'r2_y',
    'frames'}}`` for positions and ``{name: {'r2', 'frames'}}`` for joints and lights (``targets``, default
    ``CALVIN_SCENE_TARGETS``), regressed from ``frame_features(observations) -> [N, D]``.

    ``frames`` evenly spaced frames of ``dataset`` (a ``data.calvin.CalvinDataset``), in frame-id order, so the
    held-out 30% are the split's last stretch of play rather than neighbours of fitted frames. A missing or
    corrupt frame stops it with the file's path (``DataError``).
    """
    from tqdm import tqdm

    targets = CALVIN_SCENE_TARGETS if targets is None else targets
    ids = dataset.frame_ids()
    picked = ids[np.unique(np.linspace(0, len(ids) - 1, min(frames, len(ids))).round().astype(int))]
    if len(picked) < 20:
        raise ValueError(f'feature probe: {dataset.root} has {len(ids)} frames; a held-out R^2 needs >= 20')
    columns = [i for idx in targets.values() for i in idx]
    values = []

    def observations():
        keys = ('rgb_static', 'rgb_gripper', 'robot_obs', 'scene_obs')
        for fid in tqdm(picked, desc='feature probe', disable=not progress, dynamic_ncols=True):
            f = dataset.frame(int(fid), keys)
            values.append(f['scene_obs'][columns])
            yield {'rgb_obs': {'rgb_static': f['rgb_static'], 'rgb_gripper': f['rgb_gripper']},
                   'robot_obs': f['robot_obs'], 'scene_obs': f['scene_obs']}

    r2 = ridge_r2(_batched(frame_features, observations(), batch), np.asarray(values), lam=lam)
    out, j = {}, 0
    for name, idx in targets.items():
        if len(idx) == 2:
            out[name] = {'r2_x': float(r2[j]), 'r2_y': float(r2[j + 1]), 'frames': len(picked)}
        else:
            out[name] = {'r2': float(r2[j]), 'frames': len(picked)}
        j += len(idx)
    return out


def format_feature_probe(result: dict) -> str:
    lines = [f"  {'feature probe (held-out R^2)':32s} {'x':>7s} {'y':>7s}"]
    for name, r in result.items():
        if 'r2' in r:  # a joint or light state (dataset probe)
            lines.append(f"  {name:32s} {r['r2']:7.2f}")
        else:
            lines.append(f"  {name:32s} {r['r2_x']:7.2f} {r['r2_y']:7.2f}")
    return '\n'.join(lines)
