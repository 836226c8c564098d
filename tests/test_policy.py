"""Policy: history handling, exact fast inference, batching, execution modes, shared preprocessing."""

import jax
import numpy as np
import pytest
from conftest import load_config

from dreamvla_jax import policy as policy_lib
from dreamvla_jax.data import preprocess
from dreamvla_jax.models import dreamvla


class FakeTokenizer:
    def __call__(self, texts):
        out = np.zeros((len(texts), 77), np.int32)
        for i, t in enumerate(texts):
            ids = [49406] + [1 + (ord(c) % 400) for c in t[:20]] + [49407]
            out[i, :len(ids)] = ids
        return out


def obs(seed):
    rs = np.random.RandomState(seed)
    return {'rgb_obs': {'rgb_static': rs.randint(0, 256, (200, 200, 3), dtype=np.uint8),
                        'rgb_gripper': rs.randint(0, 256, (84, 84, 3), dtype=np.uint8)},
            'depth_obs': {'depth_static': rs.rand(200, 200).astype(np.float32),
                          'depth_gripper': rs.rand(84, 84).astype(np.float32)},
            'robot_obs': np.concatenate([rs.uniform(-1, 1, 14), [rs.choice([-1.0, 1.0])]]).astype(np.float32),
            'scene_obs': np.zeros(24, np.float32)}


@pytest.fixture(scope='module')
def setup():
    cfg = load_config('debug')
    cfg.model.history = 3
    model = dreamvla.init_model(cfg)
    return cfg, model


def make(setup, **kw):
    cfg, model = setup
    return policy_lib.Policy(cfg, model, tokenizer=FakeTokenizer(), **kw)


def test_fast_path_equals_full_recomputation_while_filling_and_sliding(setup):
    fast = make(setup, num_envs=2, fast=True, seed=3)
    full = make(setup, num_envs=2, fast=False, seed=3)
    instr = ['lift the red block', 'press the button']
    for t in range(6):  # history 3: fills (t < 3), then slides; env 1 is reset at t = 2
        if t == 2:
            fast.reset(1)
            full.reset(1)
        o = [obs(10 * t), obs(10 * t + 1)]
        fast.observe(o)
        full.observe(o)
        a, b = fast.chunks(instr), full.chunks(instr)
        assert a.shape == (2, 3, 7)
        # Same noise, same math, different reduction order: equal to float32 rounding (the random
        # debug DiT outputs actions of magnitude ~10, so compare relative to the values).
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_fast_condition_equals_full_backbone(setup):
    """The action-query outputs of the fast layout equal the training layout's at the query step."""
    cfg, model = setup
    rs = np.random.RandomState(0)
    s, d = cfg.model.history, cfg.model.hidden
    ctx = rs.randn(2, s, 4 + 2 * cfg.model.resampler.latents, d).astype(np.float32)
    ctx[:, :, 0] = ctx[:, :1, 0]  # one instruction token for every timestep
    ctx = jax.numpy.asarray(ctx)
    full = model.backbone_forward(ctx)
    for q in range(s):
        fast = policy_lib.fast_action_condition(model, ctx[:, :, 1:], ctx[:, 0, 0], jax.numpy.full((2,), q))
        for key in full:
            diff = np.abs(np.asarray(fast[key][:, 0]) - np.asarray(full[key][:, q])).max()
            assert diff <= 1e-5, (key, q, diff)


def test_history_buffer_shifts(setup):
    p = make(setup, num_envs=1)
    tokens = [np.asarray(p._jit_encode(p.state, policy_lib.observation_batch([obs(i)]))[0][0]) for i in range(5)]
    for i in range(5):
        p.observe([obs(i)])
        assert p.count[0] == i + 1
        frames = np.asarray(p.frames[0])
        if i < 3:  # filling: newest at index i
            np.testing.assert_allclose(frames[i], tokens[i], atol=1e-6)
            np.testing.assert_allclose(frames[0], tokens[0], atol=1e-6)
        else:      # sliding: the last 3 frames in order
            for j in range(3):
                np.testing.assert_allclose(frames[j], tokens[i - 2 + j], atol=1e-6)
    p.reset()
    assert p.count[0] == 0


def test_batch_of_n_equals_n_single_calls(setup):
    batched = make(setup, num_envs=3, seed=5)
    singles = [make(setup, num_envs=1, seed=5) for _ in range(3)]
    instr = ['a', 'bb', 'ccc']
    for t in range(4):
        o = [obs(100 + 3 * t + i) for i in range(3)]
        a = batched.step(o, instr)
        for i in range(3):
            np.testing.assert_allclose(singles[i].step([o[i]], [instr[i]])[0], a[i], rtol=1e-5, atol=1e-5)


def test_first_and_chunk_modes(setup):
    first = make(setup, num_envs=1, seed=1, execute='first')
    chunk = make(setup, num_envs=1, seed=1, execute='chunk')
    probe = make(setup, num_envs=1, seed=1)
    o = obs(7)
    probe.observe([o])
    raw = probe.chunks(['x'])[0]
    expected = np.asarray(dreamvla.to_env_actions(raw))
    np.testing.assert_allclose(first.step([o], ['x'])[0], expected[0], atol=1e-5)
    got = [chunk.step([obs(7 if t == 0 else 50 + t)], ['x'])[0] for t in range(3)]
    np.testing.assert_allclose(np.stack(got), expected, atol=1e-5)   # the whole first chunk, open loop
    assert chunk.calls == 1 and first.calls == 1
    chunk.step([obs(60)], ['x'])
    assert chunk.calls == 2                                           # re-plans after the chunk
    assert set(np.unique(expected[:, 6])) <= {-1.0, 1.0}


def test_ensemble_mode_averages_overlapping_chunks(setup):
    p = make(setup, num_envs=1, execute='ensemble')
    p.ensemble[0] = [(1, np.full((3, 7), 1.0))]
    out = p._ensemble(np.full((1, 3, 7), 3.0))
    w = np.exp(-0.01 * np.arange(2))
    np.testing.assert_allclose(out[0], (w[0] * 1.0 + w[1] * 3.0) / w.sum())


def test_policy_uses_the_training_preprocessing():
    from dreamvla_jax.training import state as train_state

    assert policy_lib.preprocess.preprocess is preprocess.preprocess
    assert train_state.preprocess.preprocess is preprocess.preprocess


def test_deterministic_given_seed(setup):
    a = make(setup, num_envs=1, seed=9).step([obs(1)], ['x'])
    b = make(setup, num_envs=1, seed=9).step([obs(1)], ['x'])
    np.testing.assert_array_equal(a, b)


def test_dream_outputs_match_decoders_on_the_training_layout(setup):
    cfg, model = setup
    p = make(setup, num_envs=2)
    o = [obs(1), obs(2)]
    p.step(o, ['a', 'b'])
    d = p.dream(o, ['a', 'b'])
    assert set(d) == {'rgb', 'depth', 'sam'}
    assert d['rgb'].shape == (2, 2, 16, 192) and d['sam'].shape == (2, 2, 256, 256)
    assert (d['depth'] >= 0).all()  # ReLU head
    assert p.count.tolist() == [1, 1]  # dream() does not append


def test_kv_cache_while_filling_equals_recomputation(setup):
    """The first S steps reuse earlier frames' keys/values; the chunks equal the recomputing fast path
    and full recomputation, and the cache is used exactly while the window fills (and after a reset)."""
    s = setup[0].model.history
    cached = make(setup, num_envs=1, fast=True, seed=5)
    plain = make(setup, num_envs=1, fast=True, kv_cache=False, seed=5)
    full = make(setup, num_envs=1, fast=False, seed=5)
    instr = ['stack the blocks']
    for t in range(2 * s + 2):
        if t == s + 2:  # a new subtask: the cache fills again
            for p in (cached, plain, full):
                p.reset()
        o = [obs(100 + t)]
        for p in (cached, plain, full):
            p.observe(o)
        a, b, c = cached.chunks(instr), plain.chunks(instr), full.chunks(instr)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5)
    assert cached.kv_steps == 2 * s and plain.kv_steps == 0


def test_cached_condition_equals_fast_condition(setup):
    cfg, model = setup
    rs = np.random.RandomState(1)
    s, d = cfg.model.history, cfg.model.hidden
    frames = jax.numpy.asarray(rs.randn(2, s, 3 + 2 * cfg.model.resampler.latents, d).astype(np.float32))
    text = jax.numpy.asarray(rs.randn(2, d).astype(np.float32))
    n_ctx = frames.shape[2] + 1
    shape = (cfg.model.backbone.layers, 2, s * n_ctx, cfg.model.backbone.heads,
             d // cfg.model.backbone.heads)
    k, v = jax.numpy.zeros(shape), jax.numpy.zeros(shape)
    for t in range(s):
        step = jax.numpy.full((2,), t)
        out, k, v = policy_lib.cached_action_condition(model, frames[:, t], text, step, k, v)
        ref = policy_lib.fast_action_condition(model, frames[:, :t + 1], text, step)
        for key in ref:
            diff = np.abs(np.asarray(out[key]) - np.asarray(ref[key])).max()
            assert diff <= 1e-5, (key, t, diff)


def test_frame_features_are_the_image_tokens_the_backbone_sees(setup):
    cfg, _ = setup
    pol = make(setup, num_envs=2)
    feats = pol.frame_features([obs(5), obs(6)])
    cams, latents, hidden = len(cfg.model.cameras), cfg.model.resampler.latents, cfg.model.hidden
    assert feats.shape == (2, cams * (latents + 1) * hidden)
    # The same numbers as the policy's cached context tokens (state, latents per camera, CLS per camera).
    tokens, _ = pol._jit_encode(pol.state, policy_lib.observation_batch([obs(5), obs(6)], cfg.model.cameras))
    tokens = np.asarray(tokens)
    expected = np.concatenate(
        [np.concatenate([tokens[:, 1 + i * latents:1 + (i + 1) * latents].reshape(2, -1),
                         tokens[:, 1 + cams * latents + i]], axis=1) for i in range(cams)], axis=1)
    np.testing.assert_allclose(feats, expected, rtol=1e-5, atol=1e-6)
    # Per observation (batch-independent) and stateless: the history is untouched.
    np.testing.assert_allclose(pol.frame_features([obs(6)])[0], feats[1], rtol=1e-5, atol=1e-5)
    assert pol.frames is None and pol.count.tolist() == [0, 0]
    assert not np.allclose(feats[0], feats[1])
