"""Profile summaries: HLO op -> module scope, forward vs backward, milliseconds per step from a trace."""

import jax
import jax.numpy as jnp
import pytest
from conftest import load_config
from flax import nnx

from dreamvla_jax.data import fake_batch, preprocess
from dreamvla_jax.models import dreamvla
from dreamvla_jax.training import metrics, profile


def test_scope_of_reads_the_outermost_module_and_direction():
    assert profile.scope_of('jit(step)/jvp(backbone)/while/body/dot_general') == 'backbone/fwd'
    assert profile.scope_of('jit(step)/transpose(jvp(decoder_sam))/while/body/mul') == 'decoder_sam/bwd'
    assert profile.scope_of('jit(step)/optimizer/mul') == 'optimizer'
    assert profile.scope_of('jit(step)/jvp(preprocess)/jit(_randint)') == 'preprocess/fwd'
    assert profile.scope_of('jit(step)/reduce_sum') == 'other'
    assert profile.scope_of('') == 'other'


@pytest.fixture(scope='module')
def compiled_text():
    def f(x, w):
        with jax.named_scope('vision_encoder'):
            y = jnp.tanh(x @ w)
        with jax.named_scope('backbone'):
            return jnp.sum(jnp.sin(y @ w.T))

    x = jnp.ones((8, 8))
    return jax.jit(jax.grad(f, argnums=1)).lower(x, x).compile().as_text()


def test_hlo_op_names_map_compiled_instructions_to_scopes(compiled_text):
    names = profile.hlo_op_names(compiled_text)
    scopes = {profile.scope_of(v) for v in names.values()}
    assert {'vision_encoder/fwd', 'backbone/fwd', 'backbone/bwd', 'vision_encoder/bwd'} <= scopes


def test_summarize_sums_device_ops_per_scope_and_step(compiled_text):
    names = profile.hlo_op_names(compiled_text)
    by = {}
    for op, name in names.items():
        by.setdefault(profile.scope_of(name), op)
    fwd, bwd = by['backbone/fwd'], by['backbone/bwd']
    meta = [{'ph': 'M', 'name': 'process_name', 'pid': 1, 'args': {'name': '/device:GPU:0'}},
            {'ph': 'M', 'name': 'process_name', 'pid': 2, 'args': {'name': '/host:CPU'}},
            {'ph': 'M', 'name': 'thread_name', 'pid': 1, 'tid': 7, 'args': {'name': 'XLA Ops'}},
            {'ph': 'M', 'name': 'thread_name', 'pid': 1, 'tid': 8, 'args': {'name': 'Stream #1'}}]
    ops = [{'ph': 'X', 'pid': 1, 'tid': 7, 'name': fwd, 'dur': 300.0},
           {'ph': 'X', 'pid': 1, 'tid': 7, 'name': bwd, 'dur': 500.0},
           {'ph': 'X', 'pid': 1, 'tid': 7, 'name': 'not-in-module', 'dur': 200.0},
           {'ph': 'X', 'pid': 1, 'tid': 8, 'name': 'kernel_of_fwd', 'dur': 290.0, 'args': {'hlo_op': fwd}},
           {'ph': 'X', 'pid': 2, 'tid': 3, 'name': fwd, 'dur': 9999.0}]   # host: never counted
    out = profile.summarize({'traceEvents': meta + ops}, compiled_text, steps=2,
                            flops=[('jvp(backbone)/dot_general', 3e9), ('transpose(jvp(backbone))/x', 1e9)])
    assert out['xla_ops_line'] and out['events'] == 3      # only the XLA Ops line when there is one
    assert out['by_scope_ms'] == pytest.approx({'backbone/fwd': 0.15, 'backbone/bwd': 0.25, 'other': 0.1})
    assert out['device_ms_per_step'] == pytest.approx(0.5)
    assert out['by_scope_tflop_per_s'] == pytest.approx({'backbone/fwd': 20.0, 'backbone/bwd': 4.0})
    assert out['unscoped_ops'] == 1
    # Without an XLA Ops line every kernel counts, named by its hlo_op.
    out = profile.summarize({'traceEvents': meta[:2] + [meta[3]] + ops[3:]}, compiled_text, steps=1)
    assert out['by_scope_ms'] == pytest.approx({'backbone/fwd': 0.29})


def test_matmul_terms_carry_the_scope_forward_and_backward():
    def f(x, w):
        with jax.named_scope('backbone'):
            return jnp.sum(jnp.sin(x @ w))

    x = jnp.ones((4, 8))
    w = jnp.ones((8, 16))
    terms = metrics.matmul_terms(jax.make_jaxpr(jax.grad(f, argnums=1))(x, w))
    by = {}
    for path, flops in terms:
        by[profile.scope_of(path)] = by.get(profile.scope_of(path), 0) + flops
    # forward x @ w: 2*4*16*8; backward for w only: x^T @ g, the same count.
    assert by == {'backbone/fwd': 1024.0, 'backbone/bwd': 1024.0}
    assert metrics.matmul_flops(jax.make_jaxpr(jax.grad(f, argnums=1))(x, w)) == 2048.0


def test_the_model_opens_a_scope_per_module_forward_and_backward():
    cfg = load_config('debug')
    model = dreamvla.init_model(cfg)
    graphdef, params, rest = nnx.split(model, dreamvla.trainable_filter(cfg), ...)
    inputs = preprocess.preprocess(fake_batch.fake_batch(cfg, 2, seed=0), cfg)

    def loss(p):
        return nnx.merge(graphdef, p, rest).compute_loss(inputs, jax.random.key(0))[0]

    text = jax.jit(jax.grad(loss)).lower(params).as_text(debug_info=True)
    expected = {'vision_encoder', 'resampler', 'backbone', 'action_head'}
    expected |= {f'decoder_{n}' for n in ('rgb', 'depth', 'sam', 'dino') if cfg.model.dream[n].enabled}
    for name in expected:
        assert f'jvp({name})' in text, name
        # A frozen tower (the debug preset's MAE) runs forward only: no backward ops under its scope.
        assert (f'transpose(jvp({name}))' in text) == (name not in cfg.model.freeze), name
    assert 'vision_encoder' in cfg.model.freeze
