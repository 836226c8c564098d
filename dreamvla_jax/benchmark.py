"""Benchmarks: ``python -m dreamvla_jax.benchmark <subcommand> [--config FILE[:preset]] [--json]``.

Subcommands (dispatch table ``COMMANDS``):
  data   input-pipeline throughput (windows/s) with 0, 1 and 2 Grain workers, and the bytes of one batch,
         for the config's shapes (default: the debug and default presets). Without ``--data`` it writes a
         small synthetic CALVIN-format dataset and a feature store (tiny random teachers) to a temp dir.

  python -m dreamvla_jax.benchmark data
  python -m dreamvla_jax.benchmark data --config configs/calvin.py:default \
      --data /data/task_ABC_D --features /data/abc_features --json
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

from dreamvla_jax.data.errors import DataError


def _configs(spec: str | None):
    from dreamvla_jax.config_file import load_config

    if spec:
        return [(spec, load_config(spec))]
    here = Path(__file__).resolve().parents[1] / 'configs' / 'calvin.py'
    return [(f'{here}:{p}', load_config(f'{here}:{p}')) for p in ('debug', 'default')]


def _synthetic(tmp: Path, config, name: str) -> tuple[str, str]:
    """Synthetic dataset (shared by presets) + a store for this config's image size / grid / heads."""
    from dreamvla_jax.data import synthetic
    from dreamvla_jax.teachers import precompute

    root = tmp / 'calvin'
    if not (root / 'training' / 'ep_start_end_ids.npy').exists():
        synthetic.write_split(root / 'training', synthetic.default_episodes(num=4, length=64, window=40))
    teachers = ['motion']
    if config.model.dream.sam.enabled:
        teachers.append('sam')
    if config.model.dream.dino.enabled:
        teachers.append('dinov2')
    out = tmp / f'features_{name}'
    precompute.run(precompute.Options(
        data=str(root), out=str(out), teachers=tuple(teachers), image_size=config.model.vision.image_size,
        grid=config.data.motion.grid, gap=config.data.motion.gap, random_init=True, teacher_scale='tiny',
        shard_size=64, progress=False))
    return str(root), str(out)


def bench_data(args) -> dict:
    """Windows/s of ``pipeline.make_iterator`` for each worker count, and the batch's bytes."""
    from dreamvla_jax.data import pipeline

    results = {}
    with tempfile.TemporaryDirectory(prefix='dreamvla_bench_') as tmp:
        for spec, config in _configs(args.config):
            name = config.get('preset', spec)
            if args.data:
                config.data.root = args.data
                config.data.features = args.features or config.data.features
            else:
                config.data.root, config.data.features = _synthetic(Path(tmp), config, name)
            source = pipeline.make_source(config)
            row = {'config': spec, 'windows': len(source), 'batch_size': config.train.batch_size,
                   'window_frames': source.window, 'workers': {}}
            for workers in args.workers:
                it = pipeline.make_iterator(config, source=source, process_index=0, process_count=1,
                                            workers=workers)
                t0 = time.perf_counter()
                batch = next(it)  # includes worker start-up
                startup = time.perf_counter() - t0
                row['batch_bytes'] = int(sum(v.nbytes for v in batch.values()))
                row['shapes'] = {k: f'{v.dtype}{list(v.shape)}' for k, v in batch.items()}
                del batch
                t0 = time.perf_counter()
                for _ in range(args.batches):
                    next(it)
                dt = time.perf_counter() - t0
                it.close()
                del it
                gc.collect()  # frees Grain's shared-memory batches before the next run
                row['workers'][workers] = {'windows_per_s': args.batches * config.train.batch_size / dt,
                                           'first_batch_s': startup}
            results[name] = row
            del source
    return results


def _print_data(results: dict) -> None:
    for name, row in results.items():
        print(f"[{name}] {row['config']}: {row['windows']} windows of {row['window_frames']} frames, "
              f"batch {row['batch_size']}, {row['batch_bytes'] / 2**20:.1f} MiB per batch")
        for k, v in row['shapes'].items():
            print(f'    {k:14s} {v}')
        for w, r in row['workers'].items():
            print(f"    workers={w}: {r['windows_per_s']:8.1f} windows/s "
                  f"(first batch {r['first_batch_s']:.2f} s)")


COMMANDS = {
    'data': (bench_data, _print_data),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog='python -m dreamvla_jax.benchmark', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='command', required=True)
    d = sub.add_parser('data', help='input pipeline throughput')
    d.add_argument('--config', default=None, help='configs/calvin.py[:preset] (default: debug and default)')
    d.add_argument('--data', default=None,
                   help='CALVIN dataset root (default: a synthetic one in a temp dir)')
    d.add_argument('--features', default=None, help='feature store (default: config.data.features)')
    d.add_argument('--batches', type=int, default=8, help='timed batches per worker count')
    d.add_argument('--workers', type=lambda s: [int(x) for x in s.split(',')], default=[0, 1, 2],
                   help='comma list of Grain worker counts')
    d.add_argument('--json', action='store_true', help='print one JSON object instead of text')
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    run, show = COMMANDS[args.command]
    try:
        results = run(args)
    except DataError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    if getattr(args, 'json', False):
        print(json.dumps(results, indent=1))
    else:
        show(results)
    return 0


if __name__ == '__main__':
    sys.exit(main())
