"""Train step on the mesh: sharded == single device, FSDP placement, frozen weights, schedules."""

import re

import jax
import numpy as np
import optax
import pytest
from conftest import load_config

from dreamvla_jax import sharding as shd
from dreamvla_jax.data import fake_batch
from dreamvla_jax.training import optimizer
from dreamvla_jax.training import state as state_lib


def _config():
    cfg = load_config('debug')
    cfg.mesh.fsdp_min_bytes = 16 * 1024  # shard the debug model's larger tensors
    return cfg


def _run(cfg, devices, batch, steps=1):
    mesh = shd.make_mesh(cfg, devices=devices)
    trainer = state_lib.make_trainer(cfg, mesh, steps_per_epoch=10, total_steps=100)
    with jax.set_mesh(mesh):
        state, frozen = jax.block_until_ready(state_lib.create_state(trainer))
        frozen0 = jax.tree.map(np.asarray, frozen)
        for _ in range(steps):
            state, metrics = trainer.step_fn(state, frozen, shd.global_batch(batch, trainer.batch_sharding))
        # Finish here: never leave one mesh's programs running while the next mesh's start (XLA:CPU
        # collectives on fake devices have been seen to hang when programs overlap on a loaded machine).
        state, metrics = jax.block_until_ready((state, metrics))
    return state, frozen, frozen0, metrics


@pytest.fixture(scope='module')
def runs():
    cfg = _config()
    batch = fake_batch.fake_batch(cfg, 8, seed=1)
    one = _run(cfg, jax.devices()[:1], batch, steps=1)
    eight = _run(cfg, jax.devices(), batch, steps=1)
    return cfg, one, eight


def test_sharded_step_equals_single_device(runs):
    _, (s1, _, _, m1), (s8, _, _, m8) = runs
    for k in m1:
        np.testing.assert_allclose(np.asarray(m8[k]), np.asarray(m1[k]), rtol=1e-5, atol=1e-6, err_msg=k)
    for a, b in zip(jax.tree.leaves(s1['params']), jax.tree.leaves(s8['params'])):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)
    assert int(s8["step"]) == 1


def test_unrolled_layers_give_the_same_step(runs):
    """config.model.unroll_layers (the GPU lever that avoids the scan's stacked-activation copies) is the same
    math: one step from the same state matches the scanned one."""
    cfg, (s1, _, _, m1), _ = runs
    cfg = cfg.copy_and_resolve_references()
    cfg.model.unroll_layers = True
    su, _, _, mu = _run(cfg, jax.devices()[:1], fake_batch.fake_batch(cfg, 8, seed=1), steps=1)
    for k in m1:
        np.testing.assert_allclose(np.asarray(mu[k]), np.asarray(m1[k]), rtol=1e-5, atol=1e-6, err_msg=k)
    for a, b in zip(jax.tree.leaves(s1['params']), jax.tree.leaves(su['params']), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)


def test_unrolled_layers_leave_no_while_loop():
    cfg = _config()
    mesh = shd.make_mesh(cfg, devices=jax.devices()[:1])
    texts = {}
    for unroll in (False, True):
        cfg.model.unroll_layers = unroll
        trainer = state_lib.make_trainer(cfg, mesh, steps_per_epoch=10, total_steps=100)
        with jax.set_mesh(mesh):
            st, fr = jax.eval_shape(lambda c=cfg, t=trainer.tx: state_lib.init_state(c, t))
            b = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), fake_batch.fake_batch(cfg, 8))
            texts[unroll] = str(trainer.step_fn.trace(st, fr, b).jaxpr)
    # Every layer stack is one scan either way; unrolled, each scan's unroll equals its length (it lowers to
    # straight-line code, no while loop).
    pairs = {k: re.findall(r'length=(\d+)\s+num_carry=\d+\s+num_consts=\d+\s+reverse=\S+\s+'
                           r'unroll=(\d+)', t) for k, t in texts.items()}
    assert len(pairs[False]) == len(pairs[True]) >= 6
    assert all(u == '1' for _, u in pairs[False]) and any(n != '1' for n, _ in pairs[False])
    assert all(n == u for n, u in pairs[True])


def test_large_parameters_are_sharded_over_fsdp(runs):
    _, _, (s8, _, _, _) = runs
    kernel = s8['params']['backbone']['blocks']['layers']['mlp']['fc1']['kernel'][...]
    assert kernel.shape == (2, 64, 128)
    assert not kernel.sharding.is_fully_replicated
    assert kernel.sharding.spec[0] is None          # the scanned layer axis is never split
    assert 'fsdp' in tuple(kernel.sharding.spec)
    # Adam moments follow the parameter layout.
    mu = s8['opt_state'][1][0].mu['backbone']['blocks']['layers']['mlp']['fc1']['kernel'][...]
    assert mu.sharding == kernel.sharding


def test_frozen_weights_are_unchanged_and_have_no_optimizer_state(runs):
    _, (s1, frozen, frozen0, _), _ = runs
    for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(frozen0)):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert set(frozen.to_pure_dict()) == {'text_encoder', 'vision_encoder'}
    opt_paths = {shd.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(s1['opt_state'])}
    assert not any('text_encoder' in p or 'vision_encoder' in p for p in opt_paths)
    assert 'text_encoder' not in s1['params'].to_pure_dict()


def test_official_schedule_warmup_then_cosine():
    cfg = load_config('default')
    sched = optimizer.make_schedule(cfg, steps_per_epoch=100, total_steps=2000)
    assert float(sched(0)) == 0.0
    assert float(sched(50)) == pytest.approx(0.5e-3)
    assert float(sched(100)) == pytest.approx(1e-3)
    assert float(sched(1050)) == pytest.approx(0.5e-3, rel=1e-3)  # half way through the cosine
    assert float(sched(2000)) == pytest.approx(0.0, abs=1e-9)


def test_paper_schedule_warmup_from_one_percent_then_constant():
    cfg = load_config('paper')
    sched = optimizer.make_schedule(cfg, steps_per_epoch=10, total_steps=1000)
    assert float(sched(0)) == pytest.approx(1e-5, rel=1e-5)
    assert float(sched(10)) == pytest.approx(1e-3)
    assert float(sched(999)) == pytest.approx(1e-3)


def test_optimizer_clips_and_decays_every_parameter():
    cfg = load_config('default')
    tx = optimizer.make_optimizer(cfg, optax.constant_schedule(1.0))
    params = {'w': np.ones(3, np.float32), 'ln': np.ones(2, np.float32)}
    grads = {'w': np.full(3, 100.0, np.float32), 'ln': np.zeros(2, np.float32)}
    updates, _ = tx.update(grads, tx.init(params), params)
    # The zero-gradient LayerNorm-like parameter still decays (official: decay on all params).
    np.testing.assert_allclose(np.asarray(updates['ln']), -1e-4 * np.ones(2), rtol=1e-5)


def test_checkpoint_round_trip_with_nothing_frozen(tmp_path):
    """model.freeze = () (the tabletop preset): no 'frozen' item is written (Orbax refuses an empty one),
    and resuming and loading for evaluation still work."""
    from flax import nnx

    from dreamvla_jax.training.checkpoint import Checkpointer, load_model_weights

    cfg = load_config('debug')
    state = {'params': {'w': jax.numpy.arange(3.0)}, 'step': jax.numpy.array(7)}
    ck = Checkpointer(tmp_path / 'checkpoints', every=1, keep=2, async_save=False)
    assert ck.save(7, state, nnx.State({}), {'epoch': 1}, cfg)
    ck.wait()
    assert not (tmp_path / 'checkpoints' / '7' / 'frozen').exists()
    restored, frozen, data = ck.restore(7, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state),
                                        nnx.State({}))
    ck.close()
    np.testing.assert_array_equal(restored['params']['w'], [0.0, 1.0, 2.0])
    assert jax.tree.leaves(frozen) == [] and data == {'epoch': 1}
    params, frozen_weights, config = load_model_weights(tmp_path)
    np.testing.assert_array_equal(params['w'], [0.0, 1.0, 2.0])
    assert frozen_weights == {} and config['model']['history'] == cfg.model.history
    params, _, _ = load_model_weights(tmp_path / 'checkpoints' / '7')  # one step's folder works too
    np.testing.assert_array_equal(params['w'], [0.0, 1.0, 2.0])
    with pytest.raises(FileNotFoundError, match=r'has no step 8 \(it has steps \[7\]\)'):
        load_model_weights(tmp_path, step=8)
