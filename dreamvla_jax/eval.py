r"""Evaluate a DreamVLA checkpoint: CALVIN chains, the built-in tabletop tasks, or offline dataset metrics.

  python -m dreamvla_jax.eval --config configs/calvin.py --checkpoint runs/calvin --env calvin \
      --calvin-root /data/task_ABC_D [--num-sequences 1000] [--workers 4] [--save-media runs/calvin/media]
  python -m dreamvla_jax.eval --config configs/calvin.py:debug --checkpoint runs/demo --env tabletop \
      --episodes-per-task 20 --baselines --data runs/demo_data
  python -m dreamvla_jax.eval --config configs/calvin.py --checkpoint runs/calvin --env offline \
      --calvin-root /data/task_ABC_D --split validation [--probe]

Results go to ``--out`` (default ``<checkpoint>/eval_<env>``) as ``results.json`` and are printed as a
table. The logic lives in ``dreamvla_jax.evaluation``; this file only wires flags to it.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

from dreamvla_jax import distributed
from dreamvla_jax.cli import UsageError, apply_overrides, friendly_errors, load_config
from dreamvla_jax.envs import calvin_protocol as cp

ENVS = ('calvin', 'tabletop', 'offline')
POLICIES = ('model', 'random', 'mean_action')


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog='python -m dreamvla_jax.eval', description=__doc__.split('\n')[0])
    p.add_argument('--config', help='config file[:preset], e.g. configs/calvin.py:debug')
    p.add_argument('--checkpoint', help='training workdir, checkpoint or converted official checkpoint')
    p.add_argument('--env', choices=ENVS, default='calvin')
    p.add_argument('--policy', choices=POLICIES, default='model',
                   help='what to evaluate (the baselines need no checkpoint)')
    p.add_argument('--calvin-root', '--data', dest='calvin_root',
                   help='CALVIN-format dataset root (holds training/, validation/): the CALVIN env config, '
                        'the mean-action baseline\'s data, the offline split')
    p.add_argument('--num-sequences', type=int, default=cp.NUM_SEQUENCES,
                   help='CALVIN chains, the first N of the official 1000')
    p.add_argument('--episodes-per-task', type=int, default=20, help='tabletop episodes per task')
    p.add_argument('--tasks', nargs='*', help='tabletop tasks (default: all)')
    p.add_argument('--max-steps', type=int,
                   help=f'steps per subtask (default: CALVIN {cp.EP_LEN}, tabletop 150)')
    p.add_argument('--workers', type=int, default=0, help='environment processes (0/1: in-process)')
    p.add_argument('--baselines', action='store_true', help='tabletop: also evaluate random and mean-action')
    p.add_argument('--probe', action='store_true',
                   help="tabletop: also correlate the policy's first action with the offset to each task's "
                        "object over the same start scenes (results.json 'probe'; ~0 = it does not localise it), "
                        "and (--policy model) regress each object's position from the image tokens over "
                        "--probe-scenes seeded scenes (results.json 'feature_probe', held-out R^2; ~0 = the "
                        "images' tokens do not carry it); offline: that regression on --probe-scenes evenly "
                        "spaced frames of --split against scene_obs (block positions, door/drawer/button/switch/"
                        "light states)")
    p.add_argument('--probe-scenes', type=int, default=600,
                   help='scenes (tabletop) or dataset frames (offline) of the feature probe (default 600)')
    p.add_argument('--execute', choices=('first', 'chunk', 'ensemble'), help='default: config.eval.execute')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--split', default='validation', help='offline: dataset split')
    p.add_argument('--max-batches', type=int, help='offline: stop after this many batches')
    p.add_argument('--batch-size', type=int, default=8, help='offline batch size')
    p.add_argument('--out', help='results folder (default <checkpoint>/eval_<env>)')
    p.add_argument('--save-media', help='write rollout videos and dream panels here')
    p.add_argument('--media-episodes', type=int, default=8, help='episodes recorded with --save-media')
    p.add_argument('--media-format', choices=('mp4', 'gif'), default='mp4')
    p.add_argument('--panel-every', type=int, default=20, help='dream panel every N steps (0: none)')
    p.add_argument('--no-progress', action='store_true')
    distributed.add_argparse_flags(p)  # --coordinator, --num-processes, --process-id
    p.epilog = 'Any config field can be overridden as in train: --config.data.features=DIR --config.eval.execute=chunk'
    args, rest = p.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith('--config.')]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")
    args.config_overrides = rest
    return args


def make_policy(args, config, kind: str, num_envs: int):
    """The evaluated policy: the model from ``--checkpoint`` or a baseline."""
    from dreamvla_jax.evaluation import baselines

    if kind == 'random':
        return baselines.RandomPolicy(num_envs=num_envs, seed=args.seed)
    if kind == 'mean_action':
        if not args.calvin_root:
            raise UsageError('the mean-action baseline needs --calvin-root (a dataset with training/)')
        return baselines.MeanActionPolicy.from_dataset(Path(args.calvin_root) / 'training', num_envs=num_envs)
    if config is None or not args.checkpoint:
        raise UsageError('--policy model needs --config and --checkpoint')
    if not Path(args.checkpoint).exists():
        raise UsageError(f'--checkpoint {args.checkpoint} does not exist')
    from dreamvla_jax.policy import Policy

    execute = args.execute or config.eval.get('execute', 'first')
    return Policy.from_checkpoint(config, args.checkpoint, num_envs=num_envs, seed=args.seed, execute=execute)


def make_env_factory(args):
    """A picklable zero-argument env factory for the worker processes."""
    if args.env == 'calvin':
        from dreamvla_jax.envs import calvin_env_adapter as adapter

        if not adapter.calvin_env_available():
            raise UsageError(adapter.INSTALL_HINT)
        return functools.partial(adapter.make_calvin_env, args.calvin_root)
    from dreamvla_jax.envs.tabletop import make_env

    return make_env


def make_recorder(args, config):
    if not args.save_media:
        return None
    from dreamvla_jax.evaluation.media import RolloutRecorder

    future = config.data.future if config is not None else 3
    return RolloutRecorder(args.save_media, max_episodes=args.media_episodes, video_format=args.media_format,
                           panel_every=args.panel_every, future=future)


def run_rollouts(args, config) -> tuple[dict, str]:
    from dreamvla_jax.evaluation import suites
    from dreamvla_jax.evaluation.rollout import EnvPool

    k = max(1, args.workers)
    recorder = make_recorder(args, config)
    progress = not args.no_progress
    with EnvPool(make_env_factory(args), args.workers) as pool:
        if args.env == 'calvin':
            if not 1 <= args.num_sequences <= cp.NUM_SEQUENCES:
                raise UsageError(f'--num-sequences must be in 1..{cp.NUM_SEQUENCES}')
            # Chains are a prefix of the official 1000, so a short run evaluates the official first chains.
            official = cp.get_sequences(cp.NUM_SEQUENCES)
            episodes = suites.calvin_episodes(args.num_sequences, sequences=official)
            result = suites.evaluate_calvin(make_policy(args, config, args.policy, k), pool, episodes,
                                            max_steps=args.max_steps or cp.EP_LEN, progress=progress,
                                            recorder=recorder)
            return result, suites.format_calvin(result)
        from dreamvla_jax.envs.tabletop import TASK_INSTRUCTIONS, TASK_NAMES

        tasks = args.tasks or TASK_NAMES
        unknown = sorted(set(tasks) - set(TASK_NAMES))
        if unknown:
            raise UsageError(f'--tasks: unknown tabletop tasks {unknown}; choose from {TASK_NAMES}')
        episodes = suites.tabletop_episodes(tasks, args.episodes_per_task, TASK_INSTRUCTIONS, seed=args.seed)
        run = functools.partial(suites.evaluate_tabletop, pool=pool, episodes=episodes,
                                max_steps=args.max_steps or 150, progress=progress)
        policy = make_policy(args, config, args.policy, k)
        result = run(policy, recorder=recorder)
        table = {args.policy: result}
        text = ''
        if args.probe:
            from dreamvla_jax.evaluation import probe

            env = make_env_factory(args)()
            one = policy if k == 1 else make_policy(args, config, args.policy, 1)  # the probes step one env
            try:
                result['probe'] = probe.localisation_probe(one, env, episodes)
                text = '\n' + probe.format_probe(result['probe'])
                if args.policy == 'model':  # the baselines have no image tokens
                    result['feature_probe'] = probe.feature_probe(one.frame_features, env, tasks,
                                                                  scenes=args.probe_scenes, seed=args.seed)
                    text += '\n' + probe.format_feature_probe(result['feature_probe'])
            finally:
                env.close()
        if args.baselines:
            result['baselines'] = {}
            for kind in ('random', 'mean_action'):
                if kind != args.policy and (kind != 'mean_action' or args.calvin_root):
                    result['baselines'][kind] = run(make_policy(args, config, kind, k))
                    table[kind] = result['baselines'][kind]
        return result, suites.format_tabletop(table) + text


def run_offline(args, config) -> tuple[dict, str]:
    from dreamvla_jax.data import pipeline, preprocess
    from dreamvla_jax.evaluation import offline

    if config is None or not args.checkpoint:
        raise UsageError('--env offline needs --config and --checkpoint')
    try:
        from dreamvla_jax.policy import make_offline_predict
    except ImportError as e:
        raise UsageError('offline evaluation needs dreamvla_jax.policy.make_offline_predict(config, '
                         'checkpoint), which this version lacks') from e
    if args.calvin_root:
        config.data.root = args.calvin_root
    from dreamvla_jax.training.checkpoint import load_model_state

    model = load_model_state(config, args.checkpoint)  # read once: the predictions and the probe share it
    predict = make_offline_predict(config, args.checkpoint, model=model)
    batches = pipeline.make_batches(config, args.split, num_epochs=1, batch_size=args.batch_size,
                                    shuffle=False)
    m = config.model
    stream = (preprocess.preprocess(b, config) for b in batches)
    first = {}

    def predict_and_keep(batch):
        pred = predict(batch)
        if not first:
            first.update(batch=batch, pred=pred)
        return pred

    result = offline.evaluate_offline(stream, predict_and_keep, history=m.history, chunk=m.action.chunk,
                                      future=config.data.future, patch=m.vision.patch, cameras=m.cameras,
                                      arm_dim=m.action.arm_dim, max_batches=args.max_batches,
                                      progress=not args.no_progress)
    if args.save_media and first:
        from dreamvla_jax.evaluation.media import dream_panel, save_png

        rows = len(next(v for k, v in first['pred'].items() if k.startswith('dream_')))
        for j in range(min(args.media_episodes, rows)):
            p, t = offline.panel_inputs(first['batch'], first['pred'], j, history=m.history,
                                        future=config.data.future, cameras=m.cameras)
            save_png(Path(args.save_media) / f'offline_panel_{j:03d}.png', dream_panel(p, t, m.cameras))
    table = offline.format_offline(result)
    if args.probe:
        from dreamvla_jax.data.calvin import CalvinDataset
        from dreamvla_jax.evaluation import probe
        from dreamvla_jax.policy import Policy

        root = Path(config.data.root)  # a tabletop collection (collect.json) has its own scene_obs layout
        targets = probe.TABLETOP_SCENE_TARGETS if (root / 'collect.json').exists() else probe.CALVIN_SCENE_TARGETS
        policy = Policy(config, model, num_envs=1, seed=args.seed)
        try:
            result['feature_probe'] = probe.dataset_feature_probe(
                policy.frame_features, CalvinDataset(root / args.split), frames=args.probe_scenes, targets=targets,
                progress=not args.no_progress)
        except ValueError as e:
            raise UsageError(str(e)) from e
        table += '\n' + probe.format_feature_probe(result['feature_probe'])
    return result, table


@friendly_errors
def main(argv=None) -> dict:
    args = parse_args(argv)
    distributed.initialize(args.coordinator, args.num_processes, args.process_id)  # before any device use
    config = load_config(args.config) if args.config else None
    if args.config_overrides:
        if config is None:
            raise UsageError('--config.* overrides need --config')
        apply_overrides(config, args.config_overrides)
    if args.workers < 0:
        raise UsageError('--workers must be >= 0')
    if args.probe and args.env not in ('tabletop', 'offline'):
        raise UsageError(f'--probe needs --env tabletop or --env offline (objects\' positions), not --env {args.env}')
    if args.probe and args.probe_scenes < 20:
        raise UsageError(f'--probe-scenes must be >= 20 (a held-out R^2 needs them), not {args.probe_scenes}')
    out = Path(args.out or Path(args.checkpoint or '.') / f'eval_{args.env}')
    result, table = run_offline(args, config) if args.env == 'offline' else run_rollouts(args, config)
    result['env'], result['policy'] = args.env, args.policy
    if not distributed.is_main_process():
        return result  # every process evaluates the same episodes; process 0 alone reports
    out.mkdir(parents=True, exist_ok=True)
    (out / 'results.json').write_text(json.dumps(result, indent=2, default=float))
    print(table)
    print(f'results: {out / "results.json"}', file=sys.stderr)
    return result


if __name__ == '__main__':
    main()
