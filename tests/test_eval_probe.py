"""The tabletop probes: correlation of the first action with the offset to the task's object (localisation
probe), and held-out R^2 of each object's position regressed from the image tokens (feature probe)."""

import json

import numpy as np
import pytest

from dreamvla_jax.envs.tabletop import SCENE_OBS_LABELS, TASK_INSTRUCTIONS, TabletopEnv
from dreamvla_jax.evaluation import probe, suites

TASKS = ['press_button', 'lift_red_block', 'push_blue_block_left']


class PointingPolicy:
    """First action = offset from the gripper to ``target(task)`` (read from the env), scaled like an action."""

    def __init__(self, env, target):
        self.env, self.target = env, target

    def reset(self):
        pass

    def step(self, observations, instructions):
        task = next(t for t, text in TASK_INSTRUCTIONS.items() if text == instructions[0])
        offset = probe.object_xy(self.env.get_info(), self.target(task)) - observations[0]['robot_obs'][:2]
        return np.r_[offset / 0.02, 0.0, 0.0, 0.0, 0.0, 1.0][None]


@pytest.fixture(scope='module')
def env():
    e = TabletopEnv(render=False)
    yield e
    e.close()


@pytest.fixture(scope='module')
def episodes():
    return suites.tabletop_episodes(TASKS, 8, TASK_INSTRUCTIONS, seed=0)


def test_a_policy_that_points_at_the_object_scores_one(env, episodes):
    result = probe.localisation_probe(PointingPolicy(env, probe.TASK_OBJECT.get), env, episodes)
    assert sorted(result) == sorted(TASKS)
    for task in TASKS:
        assert result[task]['scenes'] == 8
        assert result[task]['corr_x'] == pytest.approx(1.0, abs=1e-9)
        assert result[task]['corr_y'] == pytest.approx(1.0, abs=1e-9)


def test_pointing_at_another_object_is_not_credited(env, episodes):
    # Always the red block: perfect on lift, and on the button task exactly the red-vs-button correlation.
    result = probe.localisation_probe(PointingPolicy(env, lambda task: 'red'), env, episodes)
    assert result['lift_red_block']['corr_x'] == pytest.approx(1.0, abs=1e-9)
    red, button = [], []
    for ep in episodes:
        if ep.subtasks[0] == 'press_button':
            obs = env.reset(**ep.reset_kwargs)
            info = env.get_info()
            red.append(probe.object_xy(info, 'red') - obs['robot_obs'][:2])
            button.append(probe.object_xy(info, 'button') - obs['robot_obs'][:2])
    red, button = np.array(red), np.array(button)
    expected = np.corrcoef(red[:, 0], button[:, 0])[0, 1]
    assert result['press_button']['corr_x'] == pytest.approx(expected, abs=1e-9)
    assert result['press_button']['corr_x'] < 0.9


def test_a_policy_that_ignores_the_scene_scores_nan(env, episodes):
    class Constant:
        def reset(self):
            pass

        def step(self, observations, instructions):
            return np.array([[0.5, -0.2, -0.8, 0.0, 0.0, 0.0, 1.0]])

    result = probe.localisation_probe(Constant(), env, episodes[:8])
    assert np.isnan(result['press_button']['corr_x']) and np.isnan(result['press_button']['corr_y'])
    assert 'nan' in probe.format_probe(result)


def test_eval_cli_writes_the_probe(tmp_path):
    from dreamvla_jax import eval as eval_cli

    result = eval_cli.main(['--env', 'tabletop', '--policy', 'random', '--probe', '--tasks', 'press_button',
                            'lift_red_block', '--episodes-per-task', '3', '--max-steps', '1', '--out',
                            str(tmp_path), '--no-progress'])
    assert {t: r['scenes'] for t, r in result['probe'].items()} == {'press_button': 3, 'lift_red_block': 3}
    assert 'feature_probe' not in result  # a baseline has no image tokens to probe
    assert json.loads((tmp_path / 'results.json').read_text())['probe'].keys() == {'press_button', 'lift_red_block'}


def test_probe_outside_the_tabletop_is_one_clear_error(capsys):
    from dreamvla_jax import eval as eval_cli

    with pytest.raises(SystemExit) as e:
        eval_cli.main(['--env', 'calvin', '--probe'])
    assert e.value.code == 2
    assert '--probe needs --env tabletop or --env offline' in capsys.readouterr().err


def test_probe_scenes_below_twenty_is_one_clear_error(capsys):
    from dreamvla_jax import eval as eval_cli

    with pytest.raises(SystemExit) as e:
        eval_cli.main(['--env', 'tabletop', '--policy', 'random', '--probe', '--probe-scenes', '5'])
    assert e.value.code == 2
    assert '--probe-scenes must be >= 20' in capsys.readouterr().err


def test_ridge_r2_is_one_for_a_linear_signal_zero_for_noise_nan_for_a_constant():
    rs = np.random.RandomState(0)
    x = rs.randn(400, 30)
    linear = x @ rs.randn(30) + 3.0
    noise = rs.randn(400)
    constant = np.full(400, 2.0)
    r2 = probe.ridge_r2(x, np.stack([linear, noise, constant], 1), lam=1e-3)
    assert r2[0] > 0.9999
    assert r2[1] < 0.05  # overfit noise scores below 0 on held-out rows, never above
    assert np.isnan(r2[2])
    # Scored on held-out rows: with more features than fit rows, pure noise is fit exactly yet scores <= ~0.
    assert probe.ridge_r2(rs.randn(400, 600), noise, lam=1e-6)[0] < 0.05
    with pytest.raises(ValueError, match='too few'):
        probe.ridge_r2(x[:3], linear[:3])


def test_feature_probe_credits_features_that_carry_the_scene_and_only_those(env):
    tasks = ['press_button', 'lift_red_block']
    carries = probe.feature_probe(lambda obs: np.stack([o['scene_obs'] for o in obs]), env, tasks, scenes=40,
                                  batch=16, lam=1e-6)
    assert sorted(carries) == sorted(probe.PROBE_OBJECTS)
    for name, r in carries.items():
        assert r['scenes'] == 40
        assert r['r2_x'] > 0.999 and r['r2_y'] > 0.999, name
    # The gripper starts at the home pose: its state says nothing about where the objects are.
    blind = probe.feature_probe(lambda obs: np.stack([o['robot_obs'] for o in obs]), env, tasks, scenes=40)
    for name, r in blind.items():
        assert r['r2_x'] < 0.05 and r['r2_y'] < 0.05, name
    # One object's position only: credited for that object, not for the others.
    bx = SCENE_OBS_LABELS.index('button_x')
    button_only = probe.feature_probe(lambda obs: np.stack([o['scene_obs'][bx:bx + 2] for o in obs]), env, tasks,
                                      scenes=40, lam=1e-6)
    assert button_only['button']['r2_x'] > 0.999
    assert button_only['red']['r2_x'] < 0.5
    assert 'button' in probe.format_feature_probe(button_only)


def test_dataset_feature_probe_reads_scene_obs_of_evenly_spaced_frames(tmp_path):
    from dreamvla_jax.data import synthetic
    from dreamvla_jax.data.calvin import CalvinDataset, CalvinWriter

    rng = np.random.default_rng(0)
    w = CalvinWriter(tmp_path / 'validation')
    for n in (30, 25, 35):  # 90 frames, scene_obs random per frame
        w.add_episode(synthetic.episode_frames(n, rng, static_size=32, gripper_size=16, depth=False))
    w.close()
    ds = CalvinDataset(tmp_path / 'validation')
    seen = []

    def carries(obs):
        seen.extend(o['scene_obs'][0] for o in obs)
        return np.stack([o['scene_obs'] for o in obs])

    r = probe.dataset_feature_probe(carries, ds, frames=45, batch=16, lam=1e-6)
    assert sorted(r) == sorted(probe.CALVIN_SCENE_TARGETS)
    assert {v['frames'] for v in r.values()} == {45}
    # Evenly spaced frames from the first to the last, in frame-id order (the held-out rows are the split's
    # last stretch of play).
    first_value = {float(ds.frame(int(i), ['scene_obs'])['scene_obs'][0]): int(i) for i in ds.frame_ids()}
    ids = [first_value[float(v)] for v in seen]
    assert ids[0] == 0 and ids[-1] == 89 and set(np.diff(ids)) <= {2, 3}
    assert r['red']['r2_x'] > 0.999 and r['pink']['r2_y'] > 0.999 and r['drawer']['r2'] > 0.999
    # The drawer's joint alone: credited for the drawer, not for the blocks or the button.
    drawer = probe.dataset_feature_probe(lambda obs: np.stack([o['scene_obs'][1:2] for o in obs]), ds, frames=90,
                                         lam=1e-6)
    assert drawer['drawer']['r2'] > 0.999
    assert drawer['button']['r2'] < 0.2 and drawer['red']['r2_x'] < 0.2
    assert 'drawer' in probe.format_feature_probe(drawer)
    # The tabletop layout: the button is a position there.
    table = probe.dataset_feature_probe(carries, ds, targets=probe.TABLETOP_SCENE_TARGETS, lam=1e-6)
    assert table['button']['r2_x'] > 0.999 and table['light']['r2'] > 0.999
    with pytest.raises(ValueError, match='needs >= 20'):
        w2 = CalvinWriter(tmp_path / 'tiny')
        w2.add_episode(synthetic.episode_frames(10, rng, static_size=32, gripper_size=16, depth=False))
        w2.close()
        probe.dataset_feature_probe(carries, CalvinDataset(tmp_path / 'tiny'))
