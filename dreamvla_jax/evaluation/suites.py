"""The two rollout benchmarks on top of ``rollout.run_episodes``: CALVIN's long-horizon chains and the
built-in tabletop tasks. Both return JSON-ready dicts; ``format_*`` turn them into printed tables."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from dreamvla_jax.envs import calvin_protocol as cp
from dreamvla_jax.evaluation.rollout import EnvPool, Episode, run_episodes


def calvin_episodes(num_sequences: int = cp.NUM_SEQUENCES, *, sequences=None) -> list[Episode]:
    """The official chains as episodes: reset state from the symbolic start, validation instructions."""
    sequences = cp.get_sequences(num_sequences) if sequences is None else sequences
    out = []
    for i, (state, chain) in enumerate(sequences[:num_sequences]):
        robot_obs, scene_obs = cp.reset_state(state)
        out.append(Episode(i, tuple(chain), tuple(cp.VALIDATION_INSTRUCTIONS[t] for t in chain),
                           dict(robot_obs=robot_obs, scene_obs=scene_obs)))
    return out


def _hooks(recorder, policy) -> dict:
    if recorder is None:
        return {}
    return dict(on_step=recorder.on_step, on_subtask_start=recorder.on_subtask_start,
                on_policy_step=lambda o, i, s: recorder.on_policy_step(policy, o, i, s))


def _chain(*callbacks):
    callbacks = [c for c in callbacks if c is not None]
    return lambda *args: [c(*args) for c in callbacks]


def evaluate_calvin(policy, pool: EnvPool, episodes: Sequence[Episode], *, max_steps: int = cp.EP_LEN,
                    progress: bool = True, recorder=None) -> dict:
    """Runs the chains and returns calvin's numbers plus every chain's outcome.

    Returns ``{'num_sequences', 'avg_seq_len', 'chain_sr': {1..5: rate}, 'task_info': {task: {success,
    total, success_rate}}, 'sequences': [{'tasks': [...], 'completed': n}]}``.
    """
    done: list[int] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(episodes), desc='CALVIN chains', dynamic_ncols=True)

    def on_end(ep, n):
        done.append(n)
        if bar is not None:
            # calvin's progress line: running success rate at each chain length
            bar.set_description(' '.join(f'{k}/5: {v * 100:.1f}% |' for k, v in
                                         enumerate(cp.count_success(done), 1)))
            bar.update(1)

    hooks = _hooks(recorder, policy)
    try:
        results = run_episodes(policy, pool, episodes, max_steps=max_steps,
                               on_episode_end=_chain(on_end, recorder and recorder.on_episode_end), **hooks)
    finally:
        if bar is not None:
            bar.close()
    out = cp.summarize(results, [ep.subtasks for ep in episodes])
    out['max_steps'] = max_steps
    out['sequences'] = [{'tasks': list(ep.subtasks), 'completed': n} for ep, n in zip(episodes, results,
                                                                                      strict=True)]
    return out


def format_calvin(result: dict) -> str:
    """calvin's printout as a table: success at chain lengths 1..5, average length, per-task success."""
    steps = result.get('max_steps', cp.EP_LEN)
    lines = [f"CALVIN: {result['num_sequences']} chains, {steps} steps per subtask",
             '  chain length | ' + ' | '.join(f'{k:>6}' for k in result['chain_sr']),
             '  success      | ' + ' | '.join(f'{v * 100:5.1f}%' for v in result['chain_sr'].values()),
             f"  average successful length: {result['avg_seq_len']:.3f}", '  per task:']
    for task, info in sorted(result['task_info'].items(), key=lambda kv: -kv[1]['success_rate']):
        rate = info['success_rate'] * 100
        lines.append(f"    {task:<26} {info['success']:>4} / {info['total']:<4} {rate:5.1f}%")
    return '\n'.join(lines)


def tabletop_episodes(tasks: Sequence[str], episodes_per_task: int, instructions: dict[str, str], *,
                      seed: int = 0, sample_scene: Callable[[str, int], np.ndarray] | None = None
                      ) -> list[Episode]:
    """``episodes_per_task`` seeded one-task episodes per task.

    Seeds come from their own ``SeedSequence`` stream (key 99), disjoint from the demo collector's, so the
    evaluation scenes are not the training scenes.
    """
    if sample_scene is None:
        from dreamvla_jax.envs.tabletop import sample_scene_obs as sample_scene
    out = []
    for k, task in enumerate(tasks):
        for e in range(episodes_per_task):
            s = int(np.random.SeedSequence([seed, 99, k, e]).generate_state(1)[0])
            out.append(Episode(len(out), (task,), (instructions[task],),
                               dict(robot_obs=None, scene_obs=sample_scene(task, s))))
    return out


def evaluate_tabletop(policy, pool: EnvPool, episodes: Sequence[Episode], *, max_steps: int,
                      progress: bool = True, recorder=None) -> dict:
    """Per-task success over the episodes: ``{'tasks': {name: {'success', 'episodes'}}, 'mean_success'}``."""
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(episodes), desc='tabletop episodes', dynamic_ncols=True)
    on_end = (lambda ep, n: bar.update(1)) if bar is not None else None
    try:
        results = run_episodes(policy, pool, episodes, max_steps=max_steps,
                               on_episode_end=_chain(on_end, recorder and recorder.on_episode_end),
                               **_hooks(recorder, policy))
    finally:
        if bar is not None:
            bar.close()
    per_task: dict[str, list[int]] = {}
    for ep, n in zip(episodes, results, strict=True):
        per_task.setdefault(ep.subtasks[0], []).append(n)
    tasks = {t: {'success': float(np.mean(v)), 'episodes': len(v)} for t, v in per_task.items()}
    return {'tasks': tasks, 'mean_success': float(np.mean([v['success'] for v in tasks.values()])),
            'max_steps': max_steps}


def format_tabletop(results: dict[str, dict]) -> str:
    """A table with one column per evaluated policy (``{'policy': result, 'random': ..., ...}``)."""
    names = list(results)
    tasks = list(next(iter(results.values()))['tasks'])
    width = max(12, *(len(n) for n in names))
    lines = ['  ' + f"{'task':<26}" + ''.join(f'{n:>{width}}' for n in names)]
    for t in tasks:
        lines.append('  ' + f'{t:<26}' + ''.join(f"{results[n]['tasks'][t]['success'] * 100:>{width - 1}.1f}%"
                                                  for n in names))
    lines.append('  ' + f"{'mean':<26}" + ''.join(f"{results[n]['mean_success'] * 100:>{width - 1}.1f}%"
                                                   for n in names))
    return '\n'.join(lines)
