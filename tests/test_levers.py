"""Performance levers keep the math: bf16 compute close to fp32, every remat policy the same gradients."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import ROOT, load_config
from flax import nnx

from dreamvla_jax.data import fake_batch, preprocess
from dreamvla_jax.models import dreamvla


def _loss_and_grads(cfg, state_from=None, batch=None):
    model = dreamvla.init_model(cfg)
    graphdef, params, rest = nnx.split(model, dreamvla.trainable_filter(cfg), ...)
    if state_from is not None:  # same weights as another config (dtypes may differ)
        params = jax.tree.map(lambda a, b: np.asarray(a).astype(b.dtype), state_from, params)

    @jax.jit
    def f(p, r, b):
        def loss(p):
            m = nnx.merge(graphdef, p, r)
            return m.compute_loss(preprocess.preprocess(b, cfg), jax.random.key(0), train=False)
        (l, aux), g = jax.value_and_grad(loss, has_aux=True)(p)
        return aux, g

    aux, grads = f(params, rest, batch)
    return params, aux, grads


@pytest.fixture(scope='module')
def fp32_run():
    cfg = load_config('debug')
    batch = fake_batch.fake_batch(cfg, 2, seed=4)
    params, aux, grads = _loss_and_grads(cfg, batch=batch)
    return cfg, batch, params, aux, grads


def test_bf16_compute_loss_within_tolerance_of_fp32(fp32_run):
    cfg, batch, params, aux32, _ = fp32_run
    cfg16 = load_config('debug')
    cfg16.model.dtype = 'bfloat16'
    _, aux16, grads16 = _loss_and_grads(cfg16, state_from=params, batch=batch)
    # Stated tolerance: 2% relative on every loss term (bf16 has an 8-bit mantissa, ~0.4% per op).
    for k in aux32:
        assert abs(float(aux16[k]) - float(aux32[k])) <= 0.02 * abs(float(aux32[k])) + 1e-4, k
    # master weights stay fp32
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(grads16))


@pytest.mark.parametrize('policy', ['full', 'dots_saveable'])
def test_remat_policies_give_the_same_gradients(fp32_run, policy):
    cfg, batch, params, aux, grads = fp32_run
    cfg_r = load_config('debug')
    cfg_r.model.backbone.remat = policy
    cfg_r.model.dit.remat = policy
    _, aux_r, grads_r = _loss_and_grads(cfg_r, state_from=params, batch=batch)
    np.testing.assert_allclose(float(aux_r['loss']), float(aux['loss']), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)


def test_infer_benchmark_reports_both_paths():
    out = subprocess.run([sys.executable, '-m', 'dreamvla_jax.benchmark', 'infer',
                          '--config', 'configs/calvin.py:debug', '--batch-sizes', '1,2', '--steps', '1', '--json'],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    r = json.loads(out)
    assert set(r['ms_per_control_step']) == {'full', 'fast'}
    assert all(v > 0 for v in r['ms_per_control_step'].values())
    assert set(r['batches']) == {'1', '2'}
