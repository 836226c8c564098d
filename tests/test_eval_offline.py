"""Offline metrics against hand-computed values, baselines, and the eval command line on the tabletop."""

import json

import numpy as np
import pytest

from dreamvla_jax.evaluation import baselines, offline

B, S, CHUNK, FUT, P, IMG = 2, 3, 2, 1, 4, 8   # 8x8 images, 4-px patches -> L = 4
W = S + FUT + CHUNK
KW = dict(history=S, chunk=CHUNK, future=FUT, patch=P, cameras=('static', 'gripper'))


def make_batch(seed=0):
    rng = np.random.default_rng(seed)
    rel = rng.uniform(-1, 1, (B, W, 7)).astype(np.float32)
    rel[..., 6] = rng.choice([-1.0, 1.0], (B, W))
    batch = {'rel_actions': rel, 'motion_mask': (rng.uniform(size=(B, S, 2, 4)) > 0.5).astype(np.float32),
             'sam': rng.normal(size=(B, S, 2, 2, 2, 5)).astype(np.float32)}
    for cam in ('static', 'gripper'):
        batch[f'rgb_{cam}'] = rng.normal(size=(B, W, IMG, IMG, 3)).astype(np.float32)
        batch[f'depth_{cam}'] = rng.uniform(0.5, 2.0, (B, W, IMG, IMG)).astype(np.float32)
    return batch


def perfect(batch):
    """Predictions equal to the targets, built independently of offline.py's helpers."""
    idx = np.arange(S)[:, None] + np.arange(CHUNK)[None]
    a = batch['rel_actions'][:, idx].copy()
    a[..., 6] = (a[..., 6] + 1) / 2
    out = {'actions': a}
    rgb, depth = [], []
    for cam in ('static', 'gripper'):
        x = batch[f'rgb_{cam}'][:, FUT:FUT + S].reshape(B * S, 2, P, 2, P, 3).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(B * S, 4, P * P * 3)
        rgb.append((x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True, ddof=1) + 1e-6))
        d = batch[f'depth_{cam}'][:, FUT:FUT + S].reshape(B * S, 2, P, 2, P).transpose(0, 1, 3, 2, 4)
        depth.append(d.reshape(B * S, 4, P * P))
    out['dream_rgb'] = np.stack(rgb, 1)
    out['dream_depth'] = np.stack(depth, 1)
    out['dream_sam'] = batch['sam'].reshape(B * S, 2, 4, 5).copy()
    return out


def test_perfect_predictions_score_perfectly():
    batch = make_batch()
    r = offline.evaluate_offline([batch], perfect, **KW)
    assert r['batches'] == 1
    np.testing.assert_allclose(r['action_mse_per_dim'], np.zeros(7), atol=1e-12)
    assert r['gripper_accuracy'] == 1.0
    assert r['rgb_masked_mse'] == pytest.approx(0, abs=1e-10)
    assert r['depth_absrel'] == pytest.approx(0, abs=1e-7) and r['depth_delta1'] == 1.0
    assert r['sam_cosine'] == pytest.approx(1.0)
    assert 'dino_cosine' not in r


def test_hand_computed_errors():
    batch = make_batch()

    def predict(b):
        p = perfect(b)
        p['actions'][..., 0] += 0.1                       # x off by 0.1 -> MSE 0.01 on dim 0 only
        p['actions'][:, :, :, 6] = 1 - p['actions'][:, :, :, 6]
        p['actions'][0, :, :, 6] = 1 - p['actions'][0, :, :, 6]   # gripper wrong on example 1 only -> 50 %
        p['dream_depth'][:, 0] *= 2.0                     # static: AbsRel 1, delta1 0
        p['dream_depth'][:, 1] *= 1.2                     # gripper: AbsRel 0.2, delta1 1
        p['dream_sam'][:, 1] *= -1                        # gripper features opposite: cosine -1
        p['dream_rgb'] = p['dream_rgb'] + 1.0             # +1 everywhere: masked MSE = mean(mask)
        return p

    r = offline.evaluate_offline([batch], predict, **KW)
    # gripper: half of the {0, 1} predictions flipped -> squared error 1 on half of them
    np.testing.assert_allclose(r['action_mse_per_dim'], [0.01, 0, 0, 0, 0, 0, 0.5], atol=1e-6)
    assert r['action_mse_arm'] == pytest.approx(0.01 / 6, rel=1e-4)
    assert r['gripper_accuracy'] == 0.5
    assert r['depth_absrel/static'] == pytest.approx(1.0, rel=1e-5)
    assert r['depth_delta1/static'] == 0.0
    assert r['depth_absrel/gripper'] == pytest.approx(0.2, rel=1e-4)
    assert r['depth_delta1/gripper'] == 1.0
    assert r['depth_absrel'] == pytest.approx(0.6, rel=1e-4)
    assert r['sam_cosine/static'] == pytest.approx(1.0) and r['sam_cosine/gripper'] == pytest.approx(-1.0)
    mask = batch['motion_mask']
    assert r['rgb_masked_mse/static'] == pytest.approx(mask[:, :, 0].mean(), rel=1e-5)
    assert r['rgb_masked_mse'] == pytest.approx(mask.mean(), rel=1e-5)
    assert 'gripper accuracy' in offline.format_offline(r)


def test_rgb_metric_is_the_training_loss_and_batches_pool_elements():
    import jax.numpy as jnp

    from dreamvla_jax import losses

    b1, b2 = make_batch(1), make_batch(2)
    rng = np.random.default_rng(3)
    preds = {id(b): {'dream_rgb': rng.normal(size=(B * S, 2, 4, 48))} for b in (b1, b2)}
    r = offline.evaluate_offline([b1, b2], lambda b: preds[id(b)], **KW)
    per_batch = []
    for b in (b1, b2):
        img = b['rgb_static'][:, FUT:FUT + S].reshape(B * S, IMG, IMG, 3)
        tgt = losses.normalize_patches(losses.patchify(jnp.asarray(img), P))
        m = jnp.asarray(b['motion_mask'][:, :, 0].reshape(B * S, -1))
        per_batch.append(float(losses.masked_mse(jnp.asarray(preds[id(b)]['dream_rgb'][:, 0]), tgt, m)))
    # Equal-size batches: the pooled element mean is the mean of the per-batch training losses.
    assert r['rgb_masked_mse/static'] == pytest.approx(np.mean(per_batch), rel=1e-5)


def test_max_batches_and_panel_inputs():
    from dreamvla_jax.evaluation.media import dream_panel

    batches = [make_batch(i) for i in range(3)]
    r = offline.evaluate_offline(iter(batches), perfect, max_batches=2, **KW)
    assert r['batches'] == 2
    p, t = offline.panel_inputs(batches[0], perfect(batches[0]), 4, history=S, future=FUT)
    assert p['rgb'].shape == (2, 4, 48) and t['rgb'].shape == (2, IMG, IMG, 3)
    assert t['sam'].shape == (2, 2, 2, 5)
    np.testing.assert_array_equal(t['depth'][0], batches[0]['depth_static'][1, 1 + FUT])
    assert dream_panel(p, t, cell=32).shape == (8 * 32, 64, 3)


def test_baseline_policies(tmp_path):
    from dreamvla_jax.data import synthetic

    rp = baselines.RandomPolicy(num_envs=3, seed=0, gripper_hold=4)
    acts = np.stack([rp.step([{}] * 3, ['x'] * 3) for _ in range(8)])
    assert acts.shape == (8, 3, 7) and np.all(np.abs(acts[..., :6]) <= 1)
    assert set(np.unique(acts[..., 6])) <= {-1.0, 1.0}
    assert np.all(acts[:4, :, 6] == acts[0, :, 6])       # gripper held for 4 steps
    synthetic.write_split(tmp_path / 'training', synthetic.default_episodes(2, 30, 20), seed=0)
    mp = baselines.MeanActionPolicy.from_dataset(tmp_path / 'training', num_envs=2)
    from dreamvla_jax.data.calvin import CalvinDataset

    ds = CalvinDataset(tmp_path / 'training')
    rel = np.stack([ds.frame(int(i), ['rel_actions'])['rel_actions'] for i in ds.annotated_frames()])
    a = mp.step([{}, {}], ['x', 'y'])
    np.testing.assert_allclose(a[0, :6], rel.mean(0)[:6], rtol=1e-5)
    assert a.shape == (2, 7) and a[0, 6] in (-1.0, 1.0)


def test_eval_cli_tabletop_with_baselines(tmp_path, capsys):
    from dreamvla_jax import eval as eval_cli
    from dreamvla_jax.data import synthetic

    synthetic.write_split(tmp_path / 'data' / 'training', synthetic.default_episodes(1, 30, 20), seed=0)
    out = tmp_path / 'out'
    res = eval_cli.main([
        '--env', 'tabletop', '--policy', 'random', '--tasks', 'press_button', 'lift_red_block',
        '--episodes-per-task', '2', '--max-steps', '3', '--baselines', '--no-progress',
        '--calvin-root', str(tmp_path / 'data'), '--out', str(out),
        '--save-media', str(tmp_path / 'media'), '--media-episodes', '1', '--media-format', 'gif'])
    saved = json.loads((out / 'results.json').read_text())
    assert set(saved['tasks']) == {'press_button', 'lift_red_block'}
    assert saved['tasks']['press_button']['episodes'] == 2
    assert 0.0 <= saved['mean_success'] <= 1.0 and saved['mean_success'] == res['mean_success']
    assert set(saved['baselines']) == {'mean_action'}     # random is the evaluated policy itself
    assert 'mean' in capsys.readouterr().out
    assert len(list((tmp_path / 'media').glob('*.gif'))) == 1


def test_eval_cli_errors_are_one_sentence(capsys):
    from dreamvla_jax import eval as eval_cli
    from dreamvla_jax.envs.calvin_env_adapter import calvin_env_available

    if calvin_env_available():
        pytest.skip('calvin_env is installed here')

    with pytest.raises(SystemExit) as e:
        eval_cli.main(['--env', 'calvin', '--policy', 'random', '--num-sequences', '1'])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('error: calvin_env is not installed') and '\n' not in err
