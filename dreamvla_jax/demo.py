r"""The main job on the embedded default, end to end on 2 CPU cores: ``make demo``.

  python -m dreamvla_jax.demo --workdir runs/demo [--minutes M] [--episodes N] [--quick]

Stages (each skipped when its output exists, so a rerun continues where the last one stopped):
  1. collect   scripted demonstrations on the built-in pybullet tabletop -> ``<workdir>/data`` (CALVIN format)
  2. teachers  motion tracks (OpenCV LK), simulator depth, the simulator's object masks in place of SAM
               (``--sam segmentation``) -> ``<workdir>/data/features``
  3. train     ``configs/tabletop.py`` on 8 fake CPU devices for at most ``--minutes`` -> ``<workdir>/train``
  4. evaluate  closed loop on the 6 tabletop tasks: the policy, a random and a mean-action baseline on the
               same seeded scenes -> ``<workdir>/eval`` (results, rollout videos, dream panels)
  5. report    ``<workdir>/report.json`` (public keys below), ``report.md`` / ``report.html`` with the loss
               curves (PNG), a rollout video and dream panels

``report.json``: ``{"tasks": {name: {"success", "random", "mean_action", "episodes"}}, "mean_success"}``
(success rates in [0, 1]; ``episodes`` per task and policy). Every stage runs as its own process: the
training one needs ``XLA_FLAGS`` set before JAX is imported, and a crash names the stage that failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / 'configs' / 'tabletop.py'
FAKE_DEVICES = 8
TASK_KEYS = ('success', 'random', 'mean_action', 'episodes')


# 900 demonstrations, not 300: the policy is limited by how many scenes it has seen (same preset and
# budget: 300 -> 25-32% mean success, 900 -> 42-48%); collecting them and running the teachers costs ~8 min.
# 1800 demonstrations and 8000 steps reach 78% but take ~70 min (README, "Honest status").
DEFAULT_EPISODES = 900
DEFAULT_MINUTES = 26.0  # training bound: the preset's 4000-step cosine schedule at ~0.39 s/step


@dataclass(frozen=True)
class Plan:
    """What the demo runs (``estimate_minutes`` gives its rough duration per stage)."""

    episodes: int            # training demonstrations (tasks cycled)
    val_episodes: int        # validation demonstrations (not used by the demo's closed-loop evaluation)
    preset: str              # configs/tabletop.py preset
    steps: int               # training steps (0: the preset's)
    minutes: float           # training wall-clock bound (0: none)
    eval_episodes: int       # evaluation episodes per task and policy
    max_steps: int           # evaluation steps per episode
    media_episodes: int      # evaluation episodes recorded as videos with dream panels
    workers: int             # simulator processes (collection, evaluation)
    perturb: float           # DART noise of the scripted experts (collect --perturb)


def make_plan(args) -> Plan:
    if args.quick:
        return Plan(episodes=args.episodes or 6, val_episodes=0, preset='quick', steps=args.steps or 0,
                    minutes=args.minutes or 0.0, eval_episodes=args.eval_episodes or 1, max_steps=20,
                    media_episodes=1, workers=args.workers, perturb=args.perturb)
    return Plan(episodes=args.episodes or DEFAULT_EPISODES, val_episodes=6, preset='default', steps=args.steps or 0,
                minutes=args.minutes if args.minutes is not None else DEFAULT_MINUTES,
                eval_episodes=args.eval_episodes or 10, max_steps=120, media_episodes=2, workers=args.workers,
                perturb=args.perturb)


def estimate_minutes(plan: Plan) -> dict[str, float]:
    """Rough stage durations on 2 CPU cores, measured: 900 demonstrations collected in 4.5 min and their
    teacher targets in 3.2 min; training is bounded by ``plan.minutes`` (+ start-up and compile)."""
    if plan.preset == 'quick':
        return {'collect': 0.3, 'teachers': 0.5, 'train': 1.0, 'evaluate': 0.7, 'report': 0.1}
    return {'collect': 1.5 * plan.episodes / 300, 'teachers': 1.1 * plan.episodes / 300,
            'train': plan.minutes + 1.5, 'evaluate': 3.0 * plan.eval_episodes / 10, 'report': 0.2}


# ----------------------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------------------

def _run(cmd: list[str], stage: str, env: dict | None = None) -> None:
    """Runs one stage's command, its own progress bar on our terminal; a failure names the stage."""
    print('  $ ' + ' '.join(cmd), flush=True)
    full_env = {**os.environ, **(env or {})}
    rc = subprocess.call(cmd, env=full_env, cwd=ROOT)
    if rc != 0:
        raise SystemExit(f"demo: stage '{stage}' failed (exit {rc}); fix it and rerun the same command "
                         f"to continue from this stage.")


def _device_env() -> dict:
    """The training mesh's 8 fake CPU devices (set before JAX starts in the child). Evaluation gets them
    too: its checkpoint restore reads the saved 8-device sharding and fails on another device count."""
    flags = os.environ.get('XLA_FLAGS', '') + f' --xla_force_host_platform_device_count={FAKE_DEVICES}'
    return {'XLA_FLAGS': flags.strip(), 'JAX_PLATFORMS': 'cpu'}


def stage_collect(plan: Plan, work: Path) -> None:
    data = work / 'data'
    if (data / 'collect.json').exists():
        print('  done already (data/collect.json exists)')
        return
    for split in ('training', 'validation'):  # a killed collection leaves partial splits: start again
        shutil.rmtree(data / split, ignore_errors=True)
    _run([sys.executable, '-m', 'dreamvla_jax.envs.collect', '--out', str(data), '--episodes',
          str(plan.episodes), '--val-episodes', str(plan.val_episodes), '--workers', str(plan.workers),
          '--perturb', str(plan.perturb)],
         'collect')


def _config_spec(plan: Plan) -> str:
    return f'{CONFIG}:{plan.preset}'


def stage_teachers(plan: Plan, work: Path) -> None:
    store = work / 'data' / 'features'
    manifest = store / 'manifest.json'
    if manifest.exists() and json.loads(manifest.read_text()).get('complete'):
        print('  done already (data/features/manifest.json is complete)')
        return
    # The store resumes by itself: finished shards are kept.
    # The SAM dream's target: the collected object masks (random-init SAM weights mark no object; see
    # teachers/segmentation.py). --random-init covers the other teachers should the config enable them.
    _run([sys.executable, '-m', 'dreamvla_jax.teachers', '--data', str(work / 'data'), '--out', str(store),
          '--config', _config_spec(plan), '--sam', 'segmentation', '--random-init', '--teacher-scale', 'tiny'],
         'teachers')


def stage_train(plan: Plan, work: Path) -> None:
    out = work / 'train'
    marker = out / 'demo_train.json'
    if marker.exists():
        print('  done already (train/demo_train.json exists)')
        return
    cmd = [sys.executable, '-m', 'dreamvla_jax.train', f'--config={_config_spec(plan)}', f'--workdir={out}',
           f'--config.data.root={work / "data"}', f'--config.data.features={work / "data" / "features"}']
    if plan.steps:
        cmd.append(f'--config.train.steps={plan.steps}')
    if plan.minutes:
        cmd.append(f'--config.train.time_limit_s={plan.minutes * 60:.0f}')
    t0 = time.perf_counter()
    _run(cmd, 'train', env=_device_env())
    # A run stopped by the time limit counts as done too: rerunning the demo must not train again.
    marker.write_text(json.dumps({'seconds': time.perf_counter() - t0, 'minutes_limit': plan.minutes}))


def stage_evaluate(plan: Plan, work: Path) -> None:
    out = work / 'eval'
    if (out / 'results.json').exists():
        print('  done already (eval/results.json exists)')
        return
    shutil.rmtree(out / 'media', ignore_errors=True)  # half-written media of a killed run
    _run([sys.executable, '-m', 'dreamvla_jax.eval', '--config', _config_spec(plan),
          '--checkpoint', str(work / 'train'), '--env', 'tabletop', '--episodes-per-task',
          str(plan.eval_episodes), '--max-steps', str(plan.max_steps), '--baselines', '--data',
          str(work / 'data'), '--workers', str(plan.workers), '--out', str(out), '--save-media',
          str(out / 'media'), '--media-episodes', str(plan.media_episodes), '--panel-every',
          str(max(1, plan.max_steps // 4))], 'evaluate', env=_device_env())


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------

def success_table(results: dict) -> dict:
    """``eval`` results -> the public report: per task the policy's and both baselines' success rates."""
    base = results.get('baselines', {})
    tasks = {}
    for name, r in results['tasks'].items():
        tasks[name] = {'success': float(r['success']),
                       'random': float(base['random']['tasks'][name]['success']),
                       'mean_action': float(base['mean_action']['tasks'][name]['success']),
                       'episodes': int(r['episodes'])}
    return {'tasks': tasks, 'mean_success': float(results['mean_success'])}


def plot_losses(metrics: list[dict], path: Path) -> Path:
    """Total and per-term training losses against the step (log scale), as a PNG."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    keys = ['loss'] + sorted(k for k in metrics[0] if k.startswith('loss_')) if metrics else ['loss']
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    steps = [m['step'] for m in metrics]
    for k in keys:
        vals = [m.get(k) for m in metrics]
        if all(v is not None and v > 0 for v in vals):
            axes[0].plot(steps, vals, label=k, lw=1.2 if k == 'loss' else 0.9)
    axes[0].set(xlabel='step', ylabel='loss', yscale='log', title='training losses')
    axes[0].legend(fontsize=7)
    if metrics and 'lr' in metrics[0]:
        axes[1].plot(steps, [m['lr'] for m in metrics], color='tab:gray')
        axes[1].set(xlabel='step', ylabel='learning rate', title='schedule')
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pick_media(media: Path) -> tuple[Path | None, list[Path]]:
    """One rollout video (a successful episode when there is one) and the dream panels."""
    videos = sorted(p for p in media.glob('episode_*.*') if p.suffix in ('.mp4', '.gif'))
    wins = [v for v in videos if '_1of1' in v.stem]
    panels = sorted(media.glob('episode_*/panel_*.png'))
    return (wins or videos or [None])[0], panels


def write_pages(work: Path, report: dict, curves: Path, video: Path | None, panels: list[Path],
                info: dict) -> tuple[Path, Path]:
    """``report.md`` and ``report.html`` beside ``report.json`` (relative links, so the folder can move)."""
    rel = lambda p: os.path.relpath(p, work)  # noqa: E731
    rows = [(t, v['success'], v['random'], v['mean_action'], v['episodes'])
            for t, v in report['tasks'].items()]
    mean = {k: sum(v[k] for v in report['tasks'].values()) / max(len(report['tasks']), 1)
            for k in ('random', 'mean_action')}
    md = ['# DreamVLA tabletop demo', '',
          f"Closed-loop success on the built-in pybullet tabletop ({info.get('episodes_per_task')} seeded "
          'episodes per task, the same scenes for every policy).', '',
          '| task | policy | random | mean action | episodes |', '|---|---|---|---|---|']
    md += [f'| {t} | {s:.0%} | {r:.0%} | {m:.0%} | {e} |' for t, s, r, m, e in rows]
    md += [f"| **mean** | **{report['mean_success']:.0%}** | {mean['random']:.0%} | "
           f"{mean['mean_action']:.0%} | |", '']
    md += [f'- {k}: {v}' for k, v in info.items()]
    md += ['', '## Training losses', '', f'![losses]({rel(curves)})', '']
    if video is not None:
        md += ['## Rollout', '', f'[{video.name}]({rel(video)})', '']
    if panels:
        md += ['## Dream panels (prediction | target, 3 steps ahead)', '']
        md += [f'![{p.name}]({rel(p)})' for p in panels[:6]] + ['']
    md_path = work / 'report.md'
    md_path.write_text('\n'.join(md))

    cells = ''.join(f'<tr><td>{t}</td><td><b>{s:.0%}</b></td><td>{r:.0%}</td><td>{m:.0%}</td>'
                    f'<td>{e}</td></tr>' for t, s, r, m, e in rows)
    html = ['<!doctype html><meta charset="utf-8"><title>DreamVLA tabletop demo</title>',
            '<style>body{font-family:sans-serif;max-width:960px;margin:2em auto}td,th{padding:2px 10px}'
            'img{max-width:100%}</style>', '<h1>DreamVLA tabletop demo</h1>',
            '<table><tr><th>task</th><th>policy</th><th>random</th><th>mean action</th><th>episodes</th></tr>'
            f"{cells}<tr><th>mean</th><th>{report['mean_success']:.0%}</th><th>{mean['random']:.0%}</th>"
            f"<th>{mean['mean_action']:.0%}</th><th></th></tr></table>",
            '<ul>' + ''.join(f'<li>{k}: {v}</li>' for k, v in info.items()) + '</ul>',
            f'<h2>Training losses</h2><img src="{rel(curves)}">']
    if video is not None:
        tag = (f'<video src="{rel(video)}" controls loop></video>' if video.suffix == '.mp4'
               else f'<img src="{rel(video)}">')
        html.append(f'<h2>Rollout</h2>{tag}<p><a href="{rel(video)}">{video.name}</a></p>')
    if panels:
        html.append('<h2>Dream panels</h2>' + ''.join(f'<img src="{rel(p)}">' for p in panels[:6]))
    html_path = work / 'report.html'
    html_path.write_text('\n'.join(html))
    return md_path, html_path


def stage_report(plan: Plan, work: Path, timings: dict) -> dict:
    from dreamvla_jax.cli import load_config
    from dreamvla_jax.training.metrics import read_metrics

    config = load_config(_config_spec(plan))

    results = json.loads((work / 'eval' / 'results.json').read_text())
    report = success_table(results)
    (work / 'report.json').write_text(json.dumps(report, indent=2))
    metrics = read_metrics(work / 'train')
    curves = plot_losses(metrics, work / 'losses.png')
    video, panels = _pick_media(work / 'eval' / 'media')
    info = {'config': f'configs/tabletop.py:{plan.preset}', 'demonstrations': plan.episodes,
            'expert DART noise': plan.perturb,
            'training steps': metrics[-1]['step'] if metrics else 0,
            'final loss': f"{metrics[-1]['loss']:.4f}" if metrics else 'n/a',
            'episodes_per_task': plan.eval_episodes, 'action execution': config.eval.execute,
            **{f'{k} (min)': f'{v / 60:.1f}' for k, v in timings.items()}}
    md, html = write_pages(work, report, curves, video, panels, info)
    print(f'  wrote {work / "report.json"}, {md.name}, {html.name}, {curves.name}')
    return report


# ----------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------

STAGES = (('collect', stage_collect), ('teachers', stage_teachers), ('train', stage_train),
          ('evaluate', stage_evaluate))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog='python -m dreamvla_jax.demo', description=__doc__.split('\n')[0],
        epilog="Rerun the same command to continue; delete a stage's output to redo it.")
    p.add_argument('--workdir', default='runs/demo', help='everything goes here (default runs/demo)')
    p.add_argument('--minutes', type=float, default=None,
                   help=f'training wall-clock bound (default {DEFAULT_MINUTES:g})')
    p.add_argument('--episodes', type=int, default=None,
                   help=f'demonstrations to collect (default {DEFAULT_EPISODES})')
    p.add_argument('--steps', type=int, default=None, help='training steps (default: the preset\'s)')
    p.add_argument('--eval-episodes', type=int, default=None,
                   help='evaluation episodes per task (default 10)')
    p.add_argument('--workers', type=int, default=2, help='simulator processes (default 2)')
    p.add_argument('--perturb', type=float, default=0.3,
                   help='DART noise of the scripted experts, in action units (default 0.3; 0: off)')
    p.add_argument('--quick', action='store_true', help='a tiny run (minutes) that exercises every stage')
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    plan = make_plan(args)
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    est = estimate_minutes(plan)
    print(f"DreamVLA demo in {work} ({'quick' if args.quick else 'full'} run, about {sum(est.values()):.0f} "
          'min on 2 CPU cores):\n'
          f"  1. collect   {plan.episodes} scripted demonstrations on the pybullet tabletop "
          f"(~{est['collect']:.0f} min)\n"
          f"  2. teachers  motion tracks, depth, object masks as SAM targets (~{est['teachers']:.0f} min)\n"
          f"  3. train     configs/tabletop.py:{plan.preset} on {FAKE_DEVICES} fake CPU devices"
          f"{f' for at most {plan.minutes:g} min' if plan.minutes else ''} (~{est['train']:.0f} min)\n"
          f"  4. evaluate  policy vs random vs mean-action, {plan.eval_episodes} episodes x 6 tasks "
          f"(~{est['evaluate']:.0f} min)\n"
          f"  5. report    {work / 'report.json'} and report.html / report.md\n"
          'Finished stages are skipped, so rerunning this command continues an interrupted demo.', flush=True)
    timings_path = work / 'timings.json'
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    for k, (name, fn) in enumerate(STAGES, 1):
        print(f'\n[{k}/5] {name}', flush=True)
        t0 = time.perf_counter()
        fn(plan, work)
        if name not in timings or time.perf_counter() - t0 > 5:  # a skipped stage keeps its first timing
            timings[name] = time.perf_counter() - t0
            timings_path.write_text(json.dumps(timings, indent=2))
    print('\n[5/5] report', flush=True)
    report = stage_report(plan, work, timings)
    width = max(len(t) for t in report['tasks'])
    print(f"\n  {'task':<{width}}  policy  random  mean_action")
    for t, v in report['tasks'].items():
        print(f"  {t:<{width}}  {v['success']:6.0%}  {v['random']:6.0%}  {v['mean_action']:11.0%}")
    print(f"  {'mean':<{width}}  {report['mean_success']:6.0%}\n\nReport: {work / 'report.html'}")
    return report


if __name__ == '__main__':
    main()
