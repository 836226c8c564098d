"""The tabletop localisation probe: correlation of the first action with the offset to the task's object."""

import json

import numpy as np
import pytest

from dreamvla_jax.envs.tabletop import TASK_INSTRUCTIONS, TabletopEnv
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
    assert json.loads((tmp_path / 'results.json').read_text())['probe'].keys() == {'press_button', 'lift_red_block'}


def test_probe_outside_the_tabletop_is_one_clear_error(capsys):
    from dreamvla_jax import eval as eval_cli

    with pytest.raises(SystemExit) as e:
        eval_cli.main(['--env', 'offline', '--probe'])
    assert e.value.code == 2
    assert '--probe needs --env tabletop' in capsys.readouterr().err
