"""Scripted demonstrations on the built-in tabletop, written as a CALVIN dataset (training + validation).

  python -m dreamvla_jax.envs.collect --out data/tabletop --episodes 300 --workers 2

Each episode is one task from a seeded reset until the oracle reports success (plus a few frames), stored as
one CALVIN episode with one language annotation covering all of it. Tasks are cycled over the episodes, so
the splits are balanced. Episodes whose expert fails (rare) are redrawn with the next seed of the same slot,
so the output is a function of the arguments and does not depend on --workers.

Frame contents follow calvin_env's renderer: ``rel_actions[t]`` is the relative action sent to ``env.step`` at
frame t (so replaying them through the env reproduces the episode exactly) and ``actions[t]`` the absolute
TCP pose of frame t+1 with that action's gripper command. Each frame also holds ``seg_static`` /
``seg_gripper`` (uint8 object classes, ``tabletop.SEGMENT_CLASSES``; CALVIN readers ignore keys they do not
know) unless ``--no-segmentation``: the teachers' simulator stand-in for SAM (``--sam segmentation``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dreamvla_jax.data.calvin import CalvinWriter
from dreamvla_jax.envs.experts import run_expert_episode
from dreamvla_jax.envs.tabletop import TASK_INSTRUCTIONS, TASK_NAMES, TabletopEnv

SPLIT_IDS = {'training': 0, 'validation': 1}
MAX_ATTEMPTS = 10

_WORKER_ENV: TabletopEnv | None = None


def episode_seed(seed: int, split: str, index: int, attempt: int) -> int:
    """A 32-bit seed for one episode slot; independent streams per (seed, split, slot, attempt)."""
    return int(np.random.SeedSequence([seed, SPLIT_IDS[split], index, attempt]).generate_state(1)[0])


def episode_frames(obs_list, actions) -> dict[str, np.ndarray]:
    """CALVIN per-frame arrays [T, ...] from T+1 observations and the T actions taken between them."""
    t = len(actions)
    obs_list = obs_list[:t + 1]
    rel = np.asarray(actions, np.float64).reshape(t, 7)
    robot = np.stack([o['robot_obs'] for o in obs_list]).astype(np.float64)
    # calvin_env: "action is robot state of next frame" -> next TCP pose + this frame's gripper command.
    absolute = np.concatenate([robot[1:, :6], rel[:, 6:7]], axis=1)
    frames = {
        'rgb_static': np.stack([o['rgb_obs']['rgb_static'] for o in obs_list[:t]]),
        'rgb_gripper': np.stack([o['rgb_obs']['rgb_gripper'] for o in obs_list[:t]]),
        'depth_static': np.stack([o['depth_obs']['depth_static'] for o in obs_list[:t]]),
        'depth_gripper': np.stack([o['depth_obs']['depth_gripper'] for o in obs_list[:t]]),
        'robot_obs': robot[:t],
        'scene_obs': np.stack([o['scene_obs'] for o in obs_list[:t]]).astype(np.float64),
        'rel_actions': rel,
        'actions': absolute,
    }
    if 'seg_obs' in obs_list[0]:
        for key in ('seg_static', 'seg_gripper'):
            frames[key] = np.stack([o['seg_obs'][key] for o in obs_list[:t]])
    return frames


def collect_episode(task: str, seed: int, split: str, index: int, max_steps: int = 120,
                    extra_steps: int = 3, noise: float = 0.05, perturb: float = 0.0,
                    env: TabletopEnv | None = None, segmentation: bool = True) -> dict:
    """One successful demo for slot ``index`` (tries up to ``MAX_ATTEMPTS`` seeds).

    Returns ``{'task', 'seed', 'attempts', 'frames' (or None if every attempt failed), 'success_step'}``.
    """
    env = env or _worker_env(segmentation)
    for attempt in range(MAX_ATTEMPTS):
        ep_seed = episode_seed(seed, split, index, attempt)
        out = run_expert_episode(env, task, ep_seed, max_steps=max_steps, extra_steps=extra_steps,
                                 noise=noise, perturb=perturb)
        if out['success']:
            return {'task': task, 'seed': ep_seed, 'attempts': attempt + 1,
                    'success_step': out['success_step'], 'frames': episode_frames(out['obs'], out['actions'])}
    return {'task': task, 'seed': None, 'attempts': MAX_ATTEMPTS, 'success_step': None, 'frames': None}


def _worker_env(segmentation: bool = True) -> TabletopEnv:
    global _WORKER_ENV
    if _WORKER_ENV is None or _WORKER_ENV.segmentation != segmentation:
        if _WORKER_ENV is not None:
            _WORKER_ENV.close()  # one simulator per worker
        _WORKER_ENV = TabletopEnv(render=True, segmentation=segmentation)
    return _WORKER_ENV


def _collect_job(job):
    return collect_episode(**job)


def collect(out: str | Path, episodes: int, val_episodes: int, tasks=None, seed: int = 0, workers: int = 1,
            max_steps: int = 120, noise: float = 0.05, perturb: float = 0.0, progress: bool = True,
            segmentation: bool = True) -> dict:
    """Writes the ``out/training`` and ``out/validation`` CALVIN splits; returns (and saves) a summary.

    Episode ``i`` of a split runs task ``tasks[i % len(tasks)]``.
    """
    tasks = list(tasks or TASK_NAMES)
    unknown = sorted(set(tasks) - set(TASK_NAMES))
    if unknown:
        raise ValueError(f'unknown tasks {unknown}; known: {TASK_NAMES}')
    out = Path(out)
    sizes = {'training': episodes, 'validation': val_episodes}
    jobs = [dict(task=tasks[i % len(tasks)], seed=seed, split=split, index=i, max_steps=max_steps,
                 noise=noise, perturb=perturb, segmentation=segmentation)
            for split, n in sizes.items() for i in range(n)]
    writers = {s: CalvinWriter(out / s) for s, n in sizes.items() if n}
    summary = {'seed': seed, 'noise': noise, 'perturb': perturb, 'tasks': tasks, 'segmentation': segmentation,
               'splits': {s: {'episodes': 0, 'frames': 0} for s in writers},
               'per_task': {t: {'episodes': 0, 'attempts': 0, 'mean_len': 0.0} for t in tasks},
               'failed_slots': []}
    pool = mp.get_context('spawn').Pool(workers) if workers > 1 else None
    results = pool.imap(_collect_job, jobs) if pool else map(_collect_job, jobs)
    try:
        progress_bar = tqdm(zip(jobs, results, strict=True), total=len(jobs), desc='demos',
                            disable=not progress)
        for job, res in progress_bar:
            stats = summary['per_task'][job['task']]
            stats['attempts'] += res['attempts']
            if res['frames'] is None:
                summary['failed_slots'].append((job['split'], job['index'], job['task']))
                continue
            t = len(res['frames']['rel_actions'])
            writers[job['split']].add_episode(
                res['frames'], [(0, t - 1, job['task'], TASK_INSTRUCTIONS[job['task']])])
            stats['mean_len'] += (t - stats['mean_len']) / (stats['episodes'] + 1)
            stats['episodes'] += 1
            summary['splits'][job['split']]['episodes'] += 1
            summary['splits'][job['split']]['frames'] += t
    finally:
        if pool:
            pool.close()
            pool.join()
    for w in writers.values():
        w.close()
    for stats in summary['per_task'].values():
        stats['expert_success_rate'] = stats['episodes'] / max(stats['attempts'], 1)
    (out / 'collect.json').write_text(json.dumps(summary, indent=2))
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog='python -m dreamvla_jax.envs.collect',
        description='Collect scripted demonstrations on the built-in pybullet tabletop as a CALVIN dataset '
                    '(OUT/training, OUT/validation).')
    parser.add_argument('--out', required=True, help='output folder (training/ and validation/ must be new)')
    parser.add_argument('--episodes', type=int, required=True, help='training episodes (tasks cycled)')
    parser.add_argument('--val-episodes', type=int, default=None,
                        help='validation episodes (default: max(1, episodes // 10))')
    parser.add_argument('--tasks', nargs='+', default=None, choices=TASK_NAMES,
                        help='tasks (default: all); episodes cycle through the list, so a task named twice gets '
                             'twice the episodes (e.g. ... press_button press_button)')
    parser.add_argument('--seed', type=int, default=0, help='base seed; output is a function of it')
    parser.add_argument('--workers', type=int, default=1, help='parallel simulator processes')
    parser.add_argument('--max-steps', type=int, default=120, help='give an expert attempt up after this')
    parser.add_argument('--noise', type=float, default=0.05, help='expert action jitter (action units)')
    parser.add_argument('--perturb', type=float, default=0.0,
                        help='DART noise: std (action units) of perturbations executed on 30%% of move steps '
                             'while the expert\'s own action is recorded (0: off)')
    parser.add_argument('--no-segmentation', action='store_true',
                        help='do not store the seg_static / seg_gripper object classes (the SAM stand-in)')
    args = parser.parse_args(argv)
    val = max(1, args.episodes // 10) if args.val_episodes is None else args.val_episodes
    summary = collect(args.out, args.episodes, val, tasks=args.tasks, seed=args.seed, workers=args.workers,
                      max_steps=args.max_steps, noise=args.noise, perturb=args.perturb,
                      segmentation=not args.no_segmentation)
    for task, s in summary['per_task'].items():
        print(f"{task:28s} episodes {s['episodes']:4d}  mean length {s['mean_len']:5.1f}  "
              f"expert success {s['expert_success_rate']:.1%}")
    if summary['failed_slots']:
        print(f"warning: {len(summary['failed_slots'])} slots had no successful attempt: "
              f"{summary['failed_slots']}")
    print(f'wrote {args.out}/training and {args.out}/validation ({summary["splits"]})')


if __name__ == '__main__':
    main()
