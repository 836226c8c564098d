"""Benchmarks: ``python -m dreamvla_jax.benchmark <subcommand> [--config FILE[:preset]] [--json]``.

Subcommands (dispatch table ``COMMANDS``):
  train  train-step time (steps queued back to back as the training loop runs them; ``step_s_synced``: the
         median with a sync after every step), windows/s, model FLOPs per step (matmul FLOPs of the
         step's jaxpr, no remat; ``metrics.matmul_flops``), MFU and memory, for each variant of ``--compare``
         (levers: fp32, bf16, remat_full, remat_dots, no_donate, cudnn, no_attn_dropout, unroll; ``a+b`` joins
         levers) with ratios against the first; ``--abstract`` only compiles the step from abstract inputs
         and prints the per-device memory estimate (full size on a CPU); ``--profile DIR`` traces 3
         steps per variant and reports device milliseconds per module, forward and backward
         (``training.profile``).
  infer  policy latency per control step and per action chunk, full recomputation (official) vs the
         exact fast path, at batch 1 and batch N, with the window already sliding (``--variant bf16``...).
  env    built-in tabletop simulator steps per second with both cameras.
  data   input-pipeline throughput (windows/s) with 0, 1 and 2 Grain workers, and the bytes of one batch,
         for the config's shapes (default: the debug and default presets). Without ``--data`` it writes a
         small synthetic CALVIN-format dataset and a feature store (tiny random teachers) to a temp dir.

  python -m dreamvla_jax.benchmark train --config configs/calvin.py:mid --compare fp32,bf16,remat_full
  python -m dreamvla_jax.benchmark train --config configs/calvin.py --abstract
  python -m dreamvla_jax.benchmark infer --config configs/calvin.py --json
  python -m dreamvla_jax.benchmark env
  python -m dreamvla_jax.benchmark data
  python -m dreamvla_jax.benchmark data --config configs/calvin.py:default \
      --data /data/task_ABC_D --features /data/abc_features --json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dreamvla_jax import distributed
from dreamvla_jax.cli import UsageError, friendly_errors, load_config

# Config changes of each performance lever (``--compare``).
VARIANTS = {
    'fp32': {},
    'bf16': {'model.dtype': 'bfloat16'},
    'remat_full': {'model.backbone.remat': 'full', 'model.dit.remat': 'full'},
    'remat_dots': {'model.backbone.remat': 'dots_saveable', 'model.dit.remat': 'dots_saveable'},
    'no_donate': {},
    'cudnn': {'model.attention_impl': 'cudnn'},
    'no_attn_dropout': {'model.backbone.attn_dropout': 0.0},
    'unroll': {'model.unroll_layers': True},
}


def apply_variant(config, name: str, flag: str = '--compare'):
    """``config`` with a variant's changes; ``a+b`` applies both (e.g. ``bf16+cudnn``: cuDNN attention
    takes half precision only, and the backbone's attention dropout keeps its attention unfused)."""
    c = config.copy_and_resolve_references()
    for part in name.split('+'):
        if part not in VARIANTS:
            raise UsageError(f"{flag}: unknown variant {part!r} in {name!r}; choose from {', '.join(VARIANTS)} "
                             "(join several with '+')")
        for key, value in VARIANTS[part].items():
            node = c
            *parents, leaf = key.split('.')
            for p in parents:
                node = node[p]
            node[leaf] = value
    return c


def _check_backend(names, flag: str) -> None:
    """cuDNN attention exists on NVIDIA GPUs only: refuse it elsewhere in one sentence."""
    import jax

    if any('cudnn' in n.split('+') for n in names) and jax.default_backend() != 'gpu':
        raise UsageError(f"{flag}: the cudnn variant needs an NVIDIA GPU; this JAX backend is "
                         f"{jax.default_backend()!r}.")


def _median_time(fn, steps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def _memory(compiled) -> dict:
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - backend without memory analysis
        return {}
    if m is None:
        return {}
    fields = ('argument_size_in_bytes', 'output_size_in_bytes', 'temp_size_in_bytes',
              'generated_code_size_in_bytes', 'alias_size_in_bytes')
    out = {f: int(getattr(m, f, 0) or 0) for f in fields}
    out['peak_estimate_bytes'] = (out['argument_size_in_bytes'] + out['output_size_in_bytes']
                                  + out['temp_size_in_bytes'] - out['alias_size_in_bytes'])
    return out


def _model_flops(config, mesh, state, frozen, batch) -> list[tuple[str, float]]:
    """Matmul FLOPs of one train step's math over all devices (``metrics.matmul_terms`` of its jaxpr: one
    ``(name stack, FLOPs)`` per matmul), for MFU: traced without rematerialisation (recomputation is not model
    work) and with XLA attention (the same math as a cuDNN call, whose inside a jaxpr does not show)."""
    from dreamvla_jax.training import metrics
    from dreamvla_jax.training import state as state_lib

    c = config.copy_and_resolve_references()
    c.model.attention_impl = 'xla'
    c.model.backbone.remat = c.model.dit.remat = 'none'
    trainer = state_lib.make_trainer(c, mesh, steps_per_epoch=100, total_steps=1000)
    return metrics.matmul_terms(trainer.step_fn.trace(state, frozen, batch).jaxpr)


def bench_train(args) -> dict:
    """Train-step benchmark of each ``--compare`` variant (ratios against the first)."""
    if args.profile:  # XLA:GPU command buffers (CUDA graphs) would hide which HLO op each kernel belongs to
        os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_gpu_enable_command_buffer=').strip()
    import jax

    from dreamvla_jax import sharding as shd
    from dreamvla_jax.data.fake_batch import fake_batch
    from dreamvla_jax.training import metrics
    from dreamvla_jax.training import state as state_lib

    base = load_config(args.config)
    if not args.compare:
        args.compare = ['fp32', 'bf16'] if args.abstract else ['fp32', 'bf16', 'remat_full', 'remat_dots', 'no_donate']
    if not args.abstract:
        _check_backend(args.compare, '--compare')
    results = {'config': args.config, 'device': jax.devices()[0].device_kind, 'devices': jax.device_count(),
               'variants': {}}
    for name in args.compare:
        config = apply_variant(base, name)
        if args.batch:
            config.train.batch_size = args.batch
        try:
            distributed.check_global_batch(config.train.batch_size)
        except ValueError as e:
            raise UsageError(f"{e} (or pass --batch)") from e
        mesh = shd.make_mesh(config)
        batch = fake_batch(config, config.train.batch_size)
        trainer = state_lib.make_trainer(config, mesh, steps_per_epoch=100, total_steps=1000,
                                         donate='no_donate' not in name.split('+'))
        t0 = time.perf_counter()
        with jax.set_mesh(mesh):
            abs_state, abs_frozen = jax.eval_shape(lambda c=config, tx=trainer.tx: state_lib.init_state(c, tx))
            if args.abstract:
                from dreamvla_jax.training.checkpoint import abstract_with_shardings

                state = abstract_with_shardings(abs_state, trainer.state_shardings)
                frozen = abstract_with_shardings(abs_frozen, trainer.frozen_shardings)
                gb = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=trainer.batch_sharding),
                                  batch)
            else:
                state, frozen = state_lib.create_state(trainer)
                gb = shd.global_batch(batch, trainer.batch_sharding)
            compiled = trainer.step_fn.lower(state, frozen, gb).compile()
            compile_s = time.perf_counter() - t0
            terms = _model_flops(config, mesh, state, frozen, gb)
            row = {'compile_s': compile_s, 'model_flops_per_step': sum(f for _, f in terms),
                   'flops_per_step': metrics.compiled_flops(compiled),
                   'memory': _memory(compiled), 'batch': config.train.batch_size}
            if not args.abstract:
                holder = {'s': state}

                def step():
                    holder['s'], m = compiled(holder['s'], frozen, gb)
                    jax.block_until_ready(m['loss'])

                def pipelined(n):  # as the training loop runs: the next step is queued before this one ends
                    pending = None
                    for _ in range(n):
                        holder['s'], m = compiled(holder['s'], frozen, gb)
                        if pending is not None:
                            jax.block_until_ready(pending['loss'])
                        pending = m
                    jax.block_until_ready(pending['loss'])

                step()
                row['step_s'] = _median_time(lambda: pipelined(args.steps), 3, warmup=0) / args.steps
                row['step_s_synced'] = _median_time(step, args.steps)
                row['windows_per_s'] = config.train.batch_size / row['step_s']
                per_device = row['model_flops_per_step'] and row['model_flops_per_step'] / jax.device_count()
                row['mfu'] = metrics.mfu(per_device, row['step_s'], jax.devices())
                stats = jax.devices()[0].memory_stats() or {}
                row['peak_device_bytes'] = stats.get('peak_bytes_in_use')
                if args.profile:  # after the timing: tracing slows the steps it records
                    from dreamvla_jax.training import profile

                    try:
                        logdir = os.path.join(args.profile, name.replace('+', '_'))
                        row['profile'] = profile.profile_step(lambda: pipelined(3), 3, logdir,
                                                              compiled.as_text(), terms, calls=1)
                    except Exception as e:  # a profiler that cannot start (no CUPTI) keeps the timings
                        row['profile'] = {'error': f'{type(e).__name__}: {e}'}
        results['variants'][name] = row
        # One line per variant as it finishes (stderr), so a run cut short still reports what it measured.
        print(f"[benchmark train] {name}: " + json.dumps(row), file=sys.stderr, flush=True)
        gc.collect()
    first = results['variants'][args.compare[0]]
    for row in results['variants'].values():
        if 'step_s' in row and 'step_s' in first:
            row['speedup_vs_' + args.compare[0]] = first['step_s'] / row['step_s']
    return results


def _print_train(results: dict) -> None:
    print(f"train step: {results['config']} on {results['devices']} x {results['device']}")
    width = max(11, *(len(n) for n in results['variants']))
    for name, r in results['variants'].items():
        mem = r['memory'].get('peak_estimate_bytes')
        line = f"  {name:{width}s} compile {r['compile_s']:6.1f} s"
        if mem:
            line += f"  memory/device {mem / 2**30:7.2f} GiB"
        if r.get('model_flops_per_step'):
            line += f"  {r['model_flops_per_step'] / 1e12:8.3f} TFLOP/step"
        if 'step_s' in r:
            line += f"  step {r['step_s'] * 1e3:9.1f} ms  {r['windows_per_s']:7.2f} windows/s"
            speed = [v for k, v in r.items() if k.startswith('speedup_vs_')]
            if speed:
                line += f"  x{speed[0]:.2f}"
            if r.get('mfu'):
                line += f"  MFU {100 * r['mfu']:.1f}%"
        print(line)
        prof = r.get('profile')
        if prof and 'error' in prof:
            print(f"    profile: {prof['error']}")
        elif prof:
            print(f"    device time {prof['device_ms_per_step']:.1f} ms/step by module:")
            for scope, ms in prof['by_scope_ms'].items():
                line = f"      {scope:24s} {ms:9.2f} ms  {100 * ms / max(prof['device_ms_per_step'], 1e-9):5.1f}%"
                tf = prof['by_scope_tflop_per_s'].get(scope)
                print(line + (f"  {tf:7.1f} TFLOP/s (matmuls)" if tf else ''))


def bench_infer(args) -> dict:
    """Control-step latency of the policy, full recomputation vs the fast path."""
    import jax

    from dreamvla_jax.models import dreamvla
    from dreamvla_jax.policy import Policy

    _check_backend([args.variant], '--variant')
    config = apply_variant(load_config(args.config), args.variant, '--variant')
    model = dreamvla.init_model(config)
    s = config.model.history
    results = {'config': args.config, 'variant': args.variant, 'device': jax.devices()[0].device_kind, 'history': s,
               'sample_steps': config.diffusion.sample_steps, 'batches': {}}
    rs = np.random.RandomState(0)

    def observation(i):
        return {'rgb_obs': {'rgb_static': rs.randint(0, 256, (200, 200, 3), dtype=np.uint8),
                            'rgb_gripper': rs.randint(0, 256, (84, 84, 3), dtype=np.uint8)},
                'robot_obs': np.concatenate([rs.uniform(-1, 1, 14), [1.0]]).astype(np.float32)}

    for n in args.batch_sizes:
        row = {}
        for mode, fast in (('full', False), ('fast', True)):
            policy = Policy(config, model, num_envs=n, fast=fast)
            obs = [[observation(i) for i in range(n)] for _ in range(s + 2)]
            instr = ['push the blue block to the left'] * n
            for t in range(s):  # fill the window so it slides during the timed steps
                policy.step(obs[t], instr)
            it = iter(range(1 << 30))

            def control_step():
                policy.step(obs[s + next(it) % 2], instr)

            def chunk_only():
                policy.chunks(instr)

            row[mode] = {'ms_per_control_step': 1e3 * _median_time(control_step, args.steps, warmup=1),
                         'ms_per_chunk': 1e3 * _median_time(chunk_only, args.steps, warmup=1)}
            # The other regime: the first S steps of a subtask, while the window fills (compiled above).
            policy.reset()
            t0 = time.perf_counter()
            for t in range(s):
                policy.step(obs[t], instr)
            row[mode]['ms_per_control_step_filling'] = 1e3 * (time.perf_counter() - t0) / s
            if fast:
                # The same regime without the key/value cache (recomputing the frames seen so far).
                plain = Policy(config, model, num_envs=n, fast=True, kv_cache=False)
                for t in range(s):
                    plain.step(obs[t], instr)
                plain.reset()
                t0 = time.perf_counter()
                for t in range(s):
                    plain.step(obs[t], instr)
                row[mode]['ms_per_control_step_filling_no_kv_cache'] = 1e3 * (time.perf_counter() - t0) / s
        row['speedup'] = row['full']['ms_per_control_step'] / row['fast']['ms_per_control_step']
        results['batches'][str(n)] = row
    one = results['batches'][str(args.batch_sizes[0])]
    results['ms_per_control_step'] = {'full': one['full']['ms_per_control_step'],
                                      'fast': one['fast']['ms_per_control_step']}
    return results


def _print_infer(results: dict) -> None:
    print(f"policy latency: {results['config']} ({results['variant']}) on {results['device']} "
          f"(history {results['history']}, "
          f"DDIM {results['sample_steps']} + CFG, window sliding)")
    for n, row in results['batches'].items():
        for mode in ('full', 'fast'):
            r = row[mode]
            print(f"  batch {n:>3s} {mode:4s}: {r['ms_per_control_step']:10.1f} ms/control step  "
                  f"{r['ms_per_chunk']:10.1f} ms/chunk  {r['ms_per_control_step_filling']:10.1f} ms/step "
                  "while the window fills")
        print(f"  batch {n:>3s} fast path x{row['speedup']:.2f} faster; while filling "
              f"{row['fast']['ms_per_control_step_filling_no_kv_cache']:.1f} ms/step without the key/value cache")


def bench_env(args) -> dict:
    from dreamvla_jax.envs.tabletop import benchmark_env

    return benchmark_env(steps=args.steps)


def _print_env(results: dict) -> None:
    print('tabletop env: ' + ', '.join(f'{k} {v:.2f}' if isinstance(v, float) else f'{k} {v}'
                                       for k, v in results.items()))


def _configs(spec: str | None):
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
    'train': (bench_train, _print_train),
    'infer': (bench_infer, _print_infer),
    'env': (bench_env, _print_env),
    'data': (bench_data, _print_data),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog='python -m dreamvla_jax.benchmark', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='command', required=True)
    csv = lambda s: [x for x in s.split(',') if x]
    t = sub.add_parser('train', help='train-step speed, FLOPs, MFU and memory per lever')
    t.add_argument('--config', default='configs/calvin.py:mid', help='configs/calvin.py[:preset]')
    t.add_argument('--compare', type=csv, default=None,
                   help=f"comma list of variants, the first is the baseline ({', '.join(VARIANTS)}; join "
                        "levers with '+', e.g. bf16+cudnn+no_attn_dropout); default "
                        "fp32,bf16,remat_full,remat_dots,no_donate (fp32,bf16 with --abstract)")
    t.add_argument('--abstract', action='store_true',
                   help='compile from abstract inputs and print the memory estimate; run nothing')
    t.add_argument('--batch', type=int, default=0, help='global batch (default: config.train.batch_size)')
    t.add_argument('--steps', type=int, default=5,
                   help='steps per timed run (back to back; the median of 3 runs is reported)')
    t.add_argument('--profile', default=None, metavar='DIR',
                   help='trace 3 steps per variant into DIR/<variant> after timing and report device '
                        'milliseconds per module (fwd/bwd) and the costliest HLO ops; turns off XLA:GPU '
                        'command buffers for the whole run, so its timings are without them')
    t.add_argument('--json', action='store_true', help='print one JSON object instead of text')
    i = sub.add_parser('infer', help='policy latency, full recomputation vs fast path')
    i.add_argument('--config', default='configs/calvin.py', help='configs/calvin.py[:preset]')
    i.add_argument('--batch-sizes', type=lambda s: [int(x) for x in csv(s)], default=[1, 8],
                   help='comma list of environment batch sizes (the first is reported as ms_per_control_step)')
    i.add_argument('--steps', type=int, default=3, help='timed control steps (median)')
    i.add_argument('--variant', default='fp32',
                   help="levers the policy runs with, as in train's --compare (e.g. bf16, bf16+cudnn)")
    i.add_argument('--json', action='store_true', help='print one JSON object instead of text')
    e = sub.add_parser('env', help='tabletop simulator steps per second')
    e.add_argument('--steps', type=int, default=100)
    e.add_argument('--json', action='store_true', help='print one JSON object instead of text')
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


@friendly_errors
def main(argv=None) -> int:
    args = parse_args(argv)
    run, show = COMMANDS[args.command]
    results = run(args)
    if getattr(args, 'json', False):
        print(json.dumps(results, indent=1))
    else:
        show(results)
    return 0


if __name__ == '__main__':
    sys.exit(main())
