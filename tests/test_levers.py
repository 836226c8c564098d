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


def test_matmul_flops_counts_every_layer_of_a_scan_and_each_conv():
    from dreamvla_jax.training.metrics import matmul_flops

    w = jax.ShapeDtypeStruct((6, 32, 32), np.float32)  # 6 stacked layers
    x = jax.ShapeDtypeStruct((4, 32), np.float32)

    def stack(w, x):
        return jax.lax.scan(lambda h, wi: (h @ wi, None), x, w)[0]

    assert matmul_flops(jax.make_jaxpr(stack)(w, x)) == 6 * 2 * 4 * 32 * 32
    # Forward + backward of the stack: 3x the forward's matmuls (one for the output, two for the gradients).
    grad = jax.make_jaxpr(jax.grad(lambda w, x: stack(w, x).sum()))(w, x)
    assert matmul_flops(grad) == 3 * 6 * 2 * 4 * 32 * 32
    # A 3x3 convolution, 8 -> 16 channels, 10x10 output: 2 * outputs * (3 * 3 * 8) per output.
    img = jax.ShapeDtypeStruct((2, 8, 10, 10), np.float32)
    ker = jax.ShapeDtypeStruct((16, 8, 3, 3), np.float32)
    conv = jax.make_jaxpr(lambda a, b: jax.lax.conv(a, b, (1, 1), 'SAME'))(img, ker)
    assert matmul_flops(conv) == 2 * (2 * 16 * 10 * 10) * (3 * 3 * 8)


def test_cudnn_padding_to_even_lengths_keeps_the_attention():
    from dreamvla_jax.models.layers import pad_to_even

    rs = np.random.RandomState(0)
    q, k, v = (rs.normal(size=(2, n, 3, 8)).astype(np.float32) for n in (5, 7, 7))
    mask = rs.rand(2, 3, 5, 7) > 0.3
    mask[..., 0] = True  # every query sees a key
    ref = jax.nn.dot_product_attention(q, k, v, mask=mask)
    pq, pk, pv, pmask = pad_to_even(q, k, v, mask)
    assert pq.shape[1] == 6 and pk.shape[1] == 8 and pmask.shape == (2, 3, 6, 8)
    assert not pmask[..., :, -1].any() and pmask[..., -1, :7].all()
    out = jax.nn.dot_product_attention(pq, pk, pv, mask=pmask)[:, :5]
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-6, atol=1e-6)


def test_benchmark_variants_join_with_plus_and_refuse_unknown_or_cudnn_on_cpu():
    from dreamvla_jax.benchmark import _check_backend, apply_variant
    from dreamvla_jax.cli import UsageError

    c = apply_variant(load_config('debug'), 'bf16+cudnn+no_attn_dropout')
    assert (c.model.dtype, c.model.attention_impl, c.model.backbone.attn_dropout) == ('bfloat16', 'cudnn', 0.0)
    with pytest.raises(UsageError, match="unknown variant 'fast' in 'bf16\\+fast'"):
        apply_variant(load_config('debug'), 'bf16+fast')
    with pytest.raises(UsageError, match='needs an NVIDIA GPU'):
        _check_backend(['fp32', 'bf16+cudnn'], '--compare')
