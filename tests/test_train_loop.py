"""The training entry point on real CALVIN-format data: overfitting, exact resume after kill -9,
SIGTERM checkpoints, bad data flags."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import ROOT

from dreamvla_jax.training import checkpoint as ckpt_lib
from dreamvla_jax.training.metrics import read_metrics


def _env(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # one CPU device: faster steps
    env['JAX_COMPILATION_CACHE_DIR'] = str(tmp_path_factory.getbasetemp() / 'jax_cache')
    env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
    env['PYTHONUNBUFFERED'] = '1'
    return env


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp('tiny')
    py = sys.executable
    subprocess.run([py, '-m', 'dreamvla_jax.data.synthetic', str(root / 'data'), '--episodes', '1',
                    '--length', '16', '--window', '16'], cwd=ROOT, check=True, capture_output=True)
    subprocess.run([py, '-m', 'dreamvla_jax.teachers', '--data', str(root / 'data'), '--out', str(root / 'features'),
                    '--config', 'configs/calvin.py:debug', '--random-init', '--teacher-scale', 'tiny'],
                   cwd=ROOT, check=True, capture_output=True)
    return root


def _cmd(dataset, workdir, *extra):
    return [sys.executable, '-m', 'dreamvla_jax.train', '--config', 'configs/calvin.py:debug',
            '--workdir', str(workdir),
            f'--config.data.root={dataset / "data"}', f'--config.data.features={dataset / "features"}', *extra]


def test_debug_model_overfits_a_small_dataset(dataset, tmp_path, tmp_path_factory):
    # Condition dropout off (its unconditional targets cannot be memorised), a larger LR and 8 noise
    # repeats per sample: the settings of a memorisation check, not of real training.
    cmd = _cmd(dataset, tmp_path / 'run', '--config.train.steps=400', '--config.train.log_every=1',
               '--config.checkpoint.every=0', '--config.model.dit.cfg_dropout=0', '--config.train.lr=3e-3',
               '--config.train.clip=1.0', '--config.diffusion.repeats=8')
    subprocess.run(cmd, cwd=ROOT, env=_env(tmp_path_factory), check=True, capture_output=True)
    losses = [m['loss'] for m in read_metrics(tmp_path / 'run')]
    assert len(losses) == 400
    assert np.mean(losses[-20:]) <= losses[0] / 10, (losses[0], np.mean(losses[-20:]))


def _params(workdir):
    params, frozen, _ = ckpt_lib.load_model_weights(workdir)
    return jax.tree.leaves(params), jax.tree.leaves(frozen)


def _wait_for_step(workdir, step, proc, timeout=300):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f'training exited early: {proc.stderr.read()[-2000:]}')
        ms = read_metrics(workdir) if (Path(workdir) / 'metrics.jsonl').exists() else []
        if ms and ms[-1]['step'] >= step:
            return ms[-1]['step']
        time.sleep(0.05)
    raise AssertionError(f'step {step} not reached')


def test_kill_dash_nine_then_rerun_reproduces_the_uninterrupted_run(dataset, tmp_path, tmp_path_factory):
    env = _env(tmp_path_factory)
    extra = ('--config.train.steps=14', '--config.train.log_every=1', '--config.checkpoint.every=3')
    ref, killed = tmp_path / 'ref', tmp_path / 'killed'
    subprocess.run(_cmd(dataset, ref, *extra), cwd=ROOT, env=env, check=True, capture_output=True)

    kill_at = random.Random(0).randint(4, 11)
    proc = subprocess.Popen(_cmd(dataset, killed, *extra), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_step(killed, kill_at, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt_lib.Checkpointer(killed / 'checkpoints', every=3, keep=3).latest_step() < 14
    subprocess.run(_cmd(dataset, killed, *extra), cwd=ROOT, env=env, check=True, capture_output=True)

    ref_m, got_m = read_metrics(ref), read_metrics(killed)
    assert [m['step'] for m in got_m] == list(range(1, 15))
    for a, b in zip(ref_m, got_m):
        for key in ('loss', 'loss_action', 'loss_rgb', 'loss_depth', 'loss_sam', 'grad_norm', 'lr'):
            assert a[key] == b[key], (a['step'], key)  # bit for bit
    (p_ref, f_ref), (p_got, f_got) = _params(ref), _params(killed)
    for a, b in zip(p_ref + f_ref, p_got + f_got):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sigterm_saves_a_restorable_checkpoint_at_the_current_step(dataset, tmp_path, tmp_path_factory):
    work = tmp_path / 'term'
    proc = subprocess.Popen(_cmd(dataset, work, '--config.train.steps=10000', '--config.train.log_every=1',
                                 '--config.checkpoint.every=0'),
                            cwd=ROOT, env=_env(tmp_path_factory), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _wait_for_step(work, 5, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    last_logged = read_metrics(work)[-1]['step']
    step = ckpt_lib.Checkpointer(work / 'checkpoints', every=0, keep=3).latest_step()
    assert step is not None and step >= last_logged >= 5
    params, frozen, config = ckpt_lib.load_model_weights(work, step)
    assert config['model']['history'] == 2 and 'backbone' in params and 'vision_encoder' in frozen
    assert 'SIGTERM' in out


@pytest.mark.parametrize('flag,value,expect', [
    ('root', '/nonexistent/data', '--config.data.root /nonexistent/data does not exist'),
    ('features', '', '--config.data.features is not set'),
])
def test_bad_data_flags_are_one_sentence(dataset, tmp_path, flag, value, expect):
    cmd = _cmd(dataset, tmp_path / 'bad')
    cmd = [c for c in cmd if not c.startswith(f'--config.data.{flag}=')] + [f'--config.data.{flag}={value}']
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and expect in r.stderr and 'Traceback' not in r.stderr
    assert 'python -m dreamvla_jax.teachers' in r.stderr  # says how to prepare data


def test_checkpoint_from_an_8_device_run_evaluates_in_a_1_device_process(dataset, tmp_path, tmp_path_factory):
    """Train on an 8-device mesh, then run the eval CLI (tabletop, model policy) on one device."""
    env8 = dict(_env(tmp_path_factory), XLA_FLAGS='--xla_force_host_platform_device_count=8')
    work = tmp_path / 'w8'
    subprocess.run(_cmd(dataset, work, '--config.train.steps=2', '--config.checkpoint.every=2'),
                   cwd=ROOT, env=env8, check=True, capture_output=True)
    out = tmp_path / 'eval'
    r = subprocess.run([sys.executable, '-m', 'dreamvla_jax.eval', '--config', 'configs/calvin.py:debug',
                        '--checkpoint', str(work), '--env', 'tabletop', '--tasks', 'press_button',
                        '--episodes-per-task', '2', '--max-steps', '3', '--out', str(out), '--no-progress'],
                       cwd=ROOT, env=_env(tmp_path_factory), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / 'results.json').read_text())
    assert res['tasks']['press_button']['episodes'] == 2
    assert 0.0 <= res['tasks']['press_button']['success'] <= 1.0
