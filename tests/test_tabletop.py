"""The built-in pybullet tabletop: interface, conventions, determinism, oracles, experts, demo collection."""

import numpy as np
import pytest

from dreamvla_jax.envs import base
from dreamvla_jax.envs.experts import run_expert_episode
from dreamvla_jax.envs.tabletop import (
    BLOCK_HALF,
    SCENE_OBS_DIM,
    SCENE_OBS_LABELS,
    SEGMENT_CLASSES,
    TASK_INSTRUCTIONS,
    TASK_NAMES,
    TabletopEnv,
    benchmark_env,
    block_slice,
    sample_scene_obs,
    task_success,
)

NOOP = np.array([0, 0, 0, 0, 0, 0, 1.0])


@pytest.fixture(scope='module')
def env():
    e = TabletopEnv()
    yield e
    e.close()


@pytest.fixture(scope='module')
def fast_env():
    e = TabletopEnv(render=False)
    yield e
    e.close()


def _flat(obs):
    return {'robot_obs': obs['robot_obs'], 'scene_obs': obs['scene_obs'],
            **obs['rgb_obs'], **obs['depth_obs']}


def test_obs_layout_matches_calvin(env):
    obs = env.reset(seed=0, task='lift_red_block')
    assert set(obs) == {'rgb_obs', 'depth_obs', 'robot_obs', 'scene_obs'}
    expected = {'rgb_static': ((200, 200, 3), np.uint8), 'rgb_gripper': ((84, 84, 3), np.uint8),
                'depth_static': ((200, 200), np.float32), 'depth_gripper': ((84, 84), np.float32),
                'robot_obs': ((15,), np.float32), 'scene_obs': ((24,), np.float32)}
    flat = _flat(obs)
    assert set(flat) == set(expected)
    for k, (shape, dtype) in expected.items():
        assert flat[k].shape == shape and flat[k].dtype == dtype, k
    # Metric depth: the table is 0.7-1.6 m from the static camera; the gripper camera is ~0.33 m above it.
    assert 0.5 < flat['depth_static'].min() < flat['depth_static'].max() <= 2.0 + 1e-5
    assert 0.2 < np.median(flat['depth_gripper']) < 0.45
    assert flat['rgb_static'].std() > 10  # a real picture, not a blank frame
    r = obs['robot_obs']
    np.testing.assert_allclose(r[:3], [0.45, 0.0, 0.22], atol=2e-3)   # home TCP
    np.testing.assert_allclose(r[3:6], 0.0, atol=1e-3)                # gripper pointing down = euler 0
    assert r[6] == pytest.approx(0.08, abs=1e-3) and r[14] == 1.0      # open
    assert len(SCENE_OBS_LABELS) == SCENE_OBS_DIM == 24
    red = obs['scene_obs'][block_slice('red')]
    assert red[2] == pytest.approx(BLOCK_HALF, abs=1e-4)


def test_interface(env):
    assert isinstance(env, base.Env) and isinstance(env.tasks, base.TaskOracle)
    assert env.task_names == list(env.instructions) == TASK_NAMES and 4 <= len(TASK_NAMES) <= 6
    assert len(set(TASK_INSTRUCTIONS.values())) == len(TASK_NAMES)
    robot_obs, scene_obs = env.sample_task_state('press_button', 3)
    assert robot_obs.shape == (15,) and scene_obs.shape == (24,)


def test_seeded_reset_is_deterministic(env):
    actions = np.random.default_rng(0).uniform(-1, 1, (6, 7))

    def rollout():
        out = [_flat(env.reset(seed=11, task='stack_red_block_on_blue'))]
        out += [_flat(env.step(a)[0]) for a in actions]
        return out

    first = rollout()
    env.reset(seed=12)
    env.step(np.ones(7))  # disturb the simulator in between
    second = rollout()
    for a, b in zip(first, second, strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    other = env.reset(seed=13, task='stack_red_block_on_blue')
    assert not np.allclose(other['scene_obs'], first[0]['scene_obs'])
    np.testing.assert_array_equal(sample_scene_obs('lift_red_block', 4),
                                  sample_scene_obs('lift_red_block', 4))


def test_reset_to_given_state(env):
    robot_obs, scene_obs = env.sample_task_state('place_red_block_in_area', 21)
    scene_obs[SCENE_OBS_LABELS.index('light')] = 1.0        # states the sampler never makes
    scene_obs[block_slice('pink')][:2] = [0.3, -0.3]
    obs = env.reset(robot_obs=robot_obs, scene_obs=scene_obs)
    assert env.get_info()['light']
    np.testing.assert_allclose(obs['scene_obs'], scene_obs, atol=1e-5)
    np.testing.assert_allclose(obs['robot_obs'][7:14], robot_obs[7:14], atol=1e-6)


def test_relative_actions_follow_calvin_semantics(env):
    env.reset(seed=0, task='press_button')
    start = env.get_obs()
    action = np.array([1.0, 0, 0, 0, 0, 0, -0.3])
    kept = action.copy()
    for _ in range(5):
        obs, reward, done, info = env.step(action)
    np.testing.assert_array_equal(action, kept)  # the caller's array is never modified
    assert (reward, done) == (0.0, False)
    # 5 x 0.02 m on the target pose; the arm tracks it within a few mm.
    np.testing.assert_allclose(info['target_pos'] - start['robot_obs'][:3], [0.1, 0, 0], atol=1e-6)
    np.testing.assert_allclose(obs['robot_obs'][:3] - start['robot_obs'][:3], [0.1, 0, 0], atol=0.01)
    assert obs['robot_obs'][14] == -1.0 and obs['robot_obs'][6] < 0.02   # gripper binarised and closing
    # The wrist camera moves with the hand: 10 cm lower -> the table is ~10 cm closer.
    before = np.median(obs['depth_obs']['depth_gripper'])
    for _ in range(5):
        obs = env.step(np.array([0, 0, -1.0, 0, 0, 0, -1]))[0]
    assert before - np.median(obs['depth_obs']['depth_gripper']) == pytest.approx(0.1, abs=0.02)
    # Yaw of +1 for 4 steps turns the TCP by 0.2 rad.
    for _ in range(4):
        obs = env.step(np.array([0, 0, 0, 0, 0, 1.0, -1]))[0]
    for _ in range(4):
        obs = env.step(np.array([0, 0, 0, 0, 0, 0, -1]))[0]
    assert obs['robot_obs'][5] == pytest.approx(0.2, abs=0.02)


def test_to_relative_action_matches_calvin():
    robot_obs = np.zeros(15)
    robot_obs[5] = np.pi - 0.01
    actions = np.array([0.01, -0.05, 0.0, 0.0, 0.0, -np.pi + 0.01, -1.0])
    np.testing.assert_allclose(base.to_relative_action(actions, robot_obs), [0.5, -1, 0, 0, 0, 0.4, -1],
                               atol=1e-9)


def test_oracle_needs_the_condition(env):
    env.reset(seed=1, task='lift_red_block')
    start = env.get_info()
    for _ in range(40):
        _, _, _, info = env.step(NOOP)
    assert env.tasks.get_task_info(start, info) == set()  # doing nothing achieves nothing
    rng = np.random.default_rng(0)
    for _ in range(60):
        _, _, _, info = env.step(rng.uniform(-1, 1, 7))
    assert not task_success('lift_red_block', start, info)
    # Lifted but not held by the robot (e.g. resting on something) is not a lift.
    fake = {**info, 'objects': {**info['objects']}}
    fake['objects']['red'] = {**start['objects']['red'], 'pos': start['objects']['red']['pos'] + [0, 0, 0.08],
                              'contact_robot': False, 'on_table': False}
    assert not task_success('lift_red_block', start, fake)
    fake['objects']['red'] = {**fake['objects']['red'], 'contact_robot': True}
    assert task_success('lift_red_block', start, fake)
    # A push of 8 cm is not enough; 11 cm in the instructed direction is (and only that direction).
    blue = start['objects']['blue']
    for dy, left, right in ((-0.08, False, False), (-0.11, True, False), (0.11, False, True)):
        fake['objects']['blue'] = {**blue, 'pos': blue['pos'] + [0, dy, 0], 'on_table': True}
        assert task_success('push_blue_block_left', start, fake) == left
        assert task_success('push_blue_block_right', start, fake) == right
    with pytest.raises(KeyError):
        task_success('open_drawer', start, info)


@pytest.mark.parametrize('task', TASK_NAMES)
def test_expert_solves_task(fast_env, task):
    for seed in (100, 101):
        out = run_expert_episode(fast_env, task, seed, record=False)
        assert out['success'], (task, seed)
        assert 10 <= out['steps'] <= 80


def test_expert_success_rate_20_seeds(fast_env):
    """Acceptance: >= 95% expert success on >= 20 seeded episodes of every task."""
    rates = {}
    for task in TASK_NAMES:
        results = [run_expert_episode(fast_env, task, 1000 + s, record=False) for s in range(20)]
        rates[task] = np.mean([r['success'] for r in results])
    assert all(r >= 0.95 for r in rates.values()), rates


def test_dart_perturbation_records_the_expert_and_still_succeeds(fast_env):
    """DART: perturbed steps execute other actions than the recorded labels; the expert corrects from where the
    arm really went (its copy of the env's target stays exact), so heavy perturbation still solves every task."""
    perturbed = 0
    for task in TASK_NAMES:
        out = run_expert_episode(fast_env, task, 200, perturb=0.3, perturb_prob=0.5)
        assert out['success'], task
        labels, sent = np.stack(out['actions']), np.stack(out['executed'])
        np.testing.assert_array_equal(labels[:, 3:], sent[:, 3:])      # orientation and gripper untouched
        differ = np.any(labels[:, :3] != sent[:, :3], axis=1)
        perturbed += differ.sum()
        assert np.abs(sent[:, :3]).max() <= 1.0
        # Only move phases are perturbed: while the gripper closes or opens the arm holds still.
        assert not np.any(differ[1:] & (labels[1:, 6] != labels[:-1, 6]))
    assert perturbed >= 30
    clean = run_expert_episode(fast_env, 'lift_red_block', 200)
    np.testing.assert_array_equal(np.stack(clean['actions']), np.stack(clean['executed']))


def test_collect_writes_calvin_dataset_that_replays(tmp_path, env):
    from dreamvla_jax.data.calvin import CalvinDataset
    from dreamvla_jax.envs.collect import collect, main

    with pytest.raises(SystemExit) as e:
        main(['--help'])
    assert e.value.code == 0
    tasks = ['lift_red_block', 'push_blue_block_right', 'press_button']
    summary = collect(tmp_path, episodes=3, val_episodes=1, tasks=tasks, seed=7, progress=False)
    assert summary['splits']['training']['episodes'] == 3 and not summary['failed_slots']
    train = CalvinDataset(tmp_path / 'training')
    val = CalvinDataset(tmp_path / 'validation')
    assert len(train.episodes) == 3 and len(val.episodes) == 1
    assert [a.task for a in train.annotations] == tasks
    for ann, (s, e) in zip(train.annotations, train.episodes, strict=True):
        assert (ann.start, ann.end) == (s, e) and ann.instruction == TASK_INSTRUCTIONS[ann.task]
    assert train.image_shapes() == {'rgb_static': (200, 200, 3), 'rgb_gripper': (84, 84, 3),
                                    'depth_static': (200, 200), 'depth_gripper': (84, 84)}
    # The simulator's object classes (the SAM stand-in): each object's pixels have its colour.
    first = train.frame(int(train.episodes[2, 0]), ['rgb_static', 'seg_static', 'seg_gripper'])
    assert first['seg_static'].shape == (200, 200) and first['seg_static'].dtype == np.uint8
    assert first['seg_gripper'].shape == (84, 84)
    rgb, seg = first['rgb_static'].astype(int), first['seg_static']
    for name in ('red', 'blue', 'pink', 'zone', 'button_cap', 'button_base', 'table'):
        assert (seg == SEGMENT_CLASSES.index(name)).sum() > 30, name
    cap = rgb[seg == SEGMENT_CLASSES.index('button_cap')].mean(0)
    red = rgb[seg == SEGMENT_CLASSES.index('red')].mean(0)
    assert cap[0] > 120 and cap[1] > 120 and cap[2] < 60, cap                 # yellow
    assert red[0] > 120 and red[1] < 60 and red[2] < 60, red
    # Replaying the stored relative actions from the stored first state solves the annotated task again.
    for ann, (s, e) in zip(train.annotations, train.episodes, strict=True):
        frames = [train.frame(i) for i in range(s, e + 1)]
        rel = np.stack([f['rel_actions'] for f in frames])
        assert np.abs(rel[:, :6]).max() <= 1.0 and set(np.unique(rel[:, 6])) <= {-1.0, 1.0}
        robot = np.stack([f['robot_obs'] for f in frames])
        absolute = np.stack([f['actions'] for f in frames])
        np.testing.assert_allclose(absolute[:-1, :6], robot[1:, :6], atol=1e-6)  # actions = next TCP pose
        np.testing.assert_array_equal(absolute[:, 6], rel[:, 6])
        env.reset(robot_obs=frames[0]['robot_obs'], scene_obs=frames[0]['scene_obs'])
        start = env.get_info()
        done = False
        for a in rel:
            info = env.step(a)[3]
            done = done or bool(env.tasks.get_task_info_for_set(start, info, {ann.task}))
        assert done, ann.task



def test_collect_weights_tasks_by_repetition(tmp_path):
    from dreamvla_jax.data.calvin import CalvinDataset
    from dreamvla_jax.envs.collect import collect

    tasks = ['press_button', 'lift_red_block', 'press_button']
    summary = collect(tmp_path, episodes=3, val_episodes=0, tasks=tasks, seed=3, progress=False)
    assert {t: s['episodes'] for t, s in summary['per_task'].items()} == {'press_button': 2, 'lift_red_block': 1}
    assert [a.task for a in CalvinDataset(tmp_path / 'training').annotations] == tasks
    assert not (tmp_path / 'validation').exists()

def test_benchmark_env_reports_rate():
    out = benchmark_env(steps=5)
    assert out['steps'] == 5 and out['hz'] > 0 and out['step_ms'] == pytest.approx(1000 / out['hz'])
