"""CALVIN protocol (chains, reset states, instructions, metrics) and the chain runner end to end.

Reference values were produced by running calvin's own ``multistep_sequences.py`` /
``get_env_state_for_initial_condition`` (mees/calvin @ fa03f01) on this machine.
"""

import functools
import json
from collections import Counter

import numpy as np
import pytest

from dreamvla_jax.envs import calvin_protocol as cp
from dreamvla_jax.evaluation import suites
from dreamvla_jax.evaluation.rollout import EnvPool, Episode, run_episodes

# calvin's get_sequences(12): (led, lightbulb, slider, drawer, red, blue, pink, grasped) and the chain.
REF_12 = [
    ((0, 0, 'right', 'closed', 'slider_right', 'table', 'table', 0),
     ('rotate_blue_block_right', 'lift_blue_block_table', 'place_in_slider',
      'turn_on_lightbulb', 'open_drawer')),
    ((0, 0, 'right', 'closed', 'slider_left', 'slider_right', 'table', 0),
     ('open_drawer', 'lift_red_block_slider', 'place_in_drawer',
      'move_slider_left', 'push_pink_block_right')),
    ((0, 0, 'right', 'closed', 'table', 'slider_left', 'table', 0),
     ('move_slider_left', 'open_drawer', 'turn_on_lightbulb',
      'rotate_red_block_right', 'lift_pink_block_table')),
    ((0, 0, 'right', 'closed', 'slider_left', 'table', 'slider_right', 0),
     ('open_drawer', 'push_blue_block_left', 'move_slider_left',
      'turn_on_lightbulb', 'lift_pink_block_slider')),
    ((0, 0, 'right', 'closed', 'table', 'slider_right', 'table', 0),
     ('turn_on_led', 'push_pink_block_left', 'lift_pink_block_table',
      'stack_block', 'move_slider_left')),
    ((0, 0, 'right', 'closed', 'slider_right', 'slider_left', 'table', 0),
     ('lift_blue_block_slider', 'place_in_slider', 'turn_on_led',
      'open_drawer', 'rotate_pink_block_right')),
    ((0, 0, 'right', 'closed', 'table', 'table', 'slider_left', 0),
     ('push_blue_block_right', 'open_drawer', 'turn_on_led',
      'lift_blue_block_table', 'place_in_drawer')),
    ((0, 0, 'right', 'closed', 'slider_right', 'table', 'slider_left', 0),
     ('push_blue_block_left', 'lift_blue_block_table', 'place_in_slider',
      'open_drawer', 'move_slider_left')),
    ((0, 0, 'right', 'closed', 'slider_left', 'table', 'table', 0),
     ('lift_blue_block_table', 'place_in_slider', 'turn_on_lightbulb',
      'push_pink_block_right', 'open_drawer')),
    ((0, 0, 'right', 'closed', 'table', 'slider_right', 'slider_left', 0),
     ('push_red_block_left', 'open_drawer', 'lift_pink_block_slider',
      'place_in_drawer', 'lift_red_block_table')),
    ((0, 0, 'right', 'closed', 'table', 'table', 'slider_right', 0),
     ('open_drawer', 'turn_on_lightbulb', 'move_slider_left',
      'rotate_red_block_left', 'lift_red_block_table')),
    ((0, 0, 'right', 'closed', 'table', 'slider_left', 'slider_right', 0),
     ('open_drawer', 'turn_on_led', 'rotate_red_block_left',
      'lift_blue_block_slider', 'place_in_drawer')),
]
# calvin's scene_obs for REF_12[0]'s state (red in the right cabinet half, blue and pink on the table).
REF_SCENE_0 = np.array([
    0, 0, 0, 0, 0, 0, 0.070341633, 0.0924044687, 0.460990009, 0, 0, 1.3504500541956677,
    0.229995412, -0.11999514, 0.45999001, 0, 0, 1.6744300690748037,
    0.0500000896, -0.120000177, 0.459990009, 0, 0, 1.2621920173965673])


def test_fnv1_32_matches_pyhash_test_vectors():
    assert cp.fnv1_32(b'test') == 3698262380
    assert cp.fnv1_32('test') == 3910690890


def test_sequences_match_calvin_for_12_chains():
    got = cp.get_sequences(12, use_cache=False)
    assert [(tuple(s.values()), c) for s, c in got] == REF_12
    assert all(list(s) == list(cp.STATE_KEYS) for s, _ in got)


def test_reset_state_matches_calvin():
    state = dict(zip(cp.STATE_KEYS, REF_12[0][0], strict=True))
    assert cp.condition_seed(state) == 1866175178
    robot_obs, scene_obs = cp.reset_state(state)
    np.testing.assert_array_equal(scene_obs, REF_SCENE_0)
    np.testing.assert_allclose(robot_obs[:3], [0.02586889, -0.2313129, 0.5712808])
    assert robot_obs[14] == 1.0


def test_reset_state_layout_follows_symbolic_state():
    state = dict(led=1, lightbulb=1, slider='left', drawer='open', red_block='slider_left',
                 blue_block='table', pink_block='slider_right', grasped=0)
    _, s = cp.reset_state(state)
    assert (s[0], s[1], s[3], s[4], s[5]) == (0.28, 0.22, 0.088, 1, 1)
    np.testing.assert_allclose(s[6:9], [-0.240851662, 0.0924044687, 0.460990009])   # left cabinet half
    np.testing.assert_allclose(s[18:21], [0.070341633, 0.0924044687, 0.460990009])  # right half
    assert s[13] < -0.1                                      # blue on a table slot
    for yaw in s[[11, 17, 23]]:
        assert np.pi / 2 - np.pi / 8 <= yaw <= np.pi / 2 + np.pi / 8
    np.testing.assert_array_equal(cp.reset_state(state)[1], s)  # deterministic


def test_symbolic_world_and_instructions():
    assert len(cp.initial_conditions()) == 192
    assert len(cp.TASK_NAMES) == 34 and set(cp.VALIDATION_INSTRUCTIONS) == set(cp.TASK_NAMES)
    assert set(cp.TASK_CATEGORIES) == set(cp.TASK_NAMES)
    assert cp.VALIDATION_INSTRUCTIONS['lift_pink_block_drawer'] == 'Take the pink block from the drawer'
    assert cp.VALIDATION_INSTRUCTIONS['push_red_block_left'] == 'go push the red block left'
    s = dict(zip(cp.STATE_KEYS, REF_12[0][0], strict=True))
    assert cp.check_sequence(s, REF_12[0][1])
    assert not cp.check_sequence(s, ('close_drawer',))                    # drawer is closed
    assert not cp.check_sequence(s, ('open_drawer', 'close_drawer'))      # same category twice
    # Two blocks on the table: stacking the grasped one is ambiguous (two outcomes) -> rejected.
    s2 = dict(s, red_block='table')
    assert not cp.check_sequence(s2, ('lift_red_block_table', 'stack_block'))
    assert cp.check_sequence(s, ('lift_blue_block_table', 'stack_block'))  # only pink left on the table


def test_count_success_and_summary_as_calvin():
    results = [5, 1, 0, 3, 2]
    assert cp.count_success(results) == pytest.approx([0.8, 0.6, 0.4, 0.2, 0.2])
    chains = [('a', 'b', 'c', 'd', 'e'), ('a', 'c', 'x', 'y', 'z'), ('b', 'a', 'c', 'd', 'e'),
              ('a', 'b', 'c', 'd', 'e'), ('c', 'a', 'b', 'd', 'e')]
    s = cp.summarize(results, chains)
    assert s['avg_seq_len'] == pytest.approx(2.2)
    # a: reached in chains 0, 1, 3, 4 (chain 2 failed at its first task, b) -> 4 of 4.
    assert s['task_info']['a'] == {'success': 4, 'total': 4, 'success_rate': 1.0}
    # b: done in chains 0 and 3, failed in chains 2 and 4 -> 2 of 4.
    assert s['task_info']['b'] == {'success': 2, 'total': 4, 'success_rate': 0.5}
    assert s['task_info']['c']['success'] == 3 and s['task_info']['c']['total'] == 4
    assert s['task_info']['d'] == {'success': 1, 'total': 2, 'success_rate': 0.5}
    assert 'x' not in s['task_info']   # chain 1 failed at c, never reached x


@pytest.mark.slow
def test_official_1000_chains(tmp_path):
    seqs = cp.get_sequences(1000, cache_dir=tmp_path)
    assert len(seqs) == 1000
    assert seqs[0][1] == ('rotate_blue_block_right', 'move_slider_right', 'lift_red_block_slider',
                          'place_in_slider', 'turn_off_lightbulb')
    first = Counter(c[0] for _, c in seqs)
    assert [first[t] for t in ('open_drawer', 'move_slider_right', 'move_slider_left', 'turn_on_led',
                               'turn_off_led')] == [115, 87, 64, 56, 54]
    assert not {'place_in_slider', 'place_in_drawer', 'stack_block', 'unstack_block'} & set(first)
    assert all(cp.check_sequence(s, c) for s, c in seqs)
    # The cache returns the same chains (and is what a second run reads).
    assert cp.get_sequences(1000, cache_dir=tmp_path) == seqs
    assert len(list(tmp_path.glob('calvin_sequences_*.json'))) == 1


# ------------------------------------------------------------------------------------------------------
# Chain runner against a fake calvin_env: scripted success steps per (episode, subtask)
# ------------------------------------------------------------------------------------------------------

class ScriptedOracle:
    """Task k of a chain succeeds after ``script[episode][k]`` steps of that subtask (None: never)."""

    def __init__(self, script):
        self.script = script

    def get_task_info_for_set(self, start_info, end_info, task_filter):
        (task,) = task_filter
        chain = end_info['chain']
        need = self.script[end_info['episode']][chain.index(task)]
        done = need is not None and end_info['t'] - start_info['t'] >= need
        return {task} if done else set()


class FakeCalvinEnv:
    """calvin_env's interface; ``scene_obs[0]`` carries the episode id, ``scene_obs[1:6]`` the chain."""

    def __init__(self, script, chains):
        self.tasks = ScriptedOracle(script)
        self.chains = chains
        self.task_names = sorted({t for c in chains for t in c})
        self.instructions = {t: f'do {t}' for t in self.task_names}
        self.episode, self.t, self.resets = -1, 0, 0

    def reset(self, robot_obs=None, scene_obs=None, seed=None):
        self.episode, self.t = int(scene_obs[0]), 0
        self.resets += 1
        return self.get_obs()

    def step(self, action):
        action = np.asarray(action)
        assert action.shape == (7,)
        assert int(round(action[0])) == self.episode  # the row of the batched policy meant for this env
        self.t += 1
        return self.get_obs(), 0.0, False, self.get_info()

    def get_obs(self):
        img = np.full((8, 8, 3), self.episode % 256, np.uint8)
        return {'rgb_obs': {'rgb_static': img, 'rgb_gripper': img},
                'depth_obs': {'depth_static': np.ones((8, 8), np.float32),
                              'depth_gripper': np.ones((8, 8), np.float32)},
                'robot_obs': np.array([self.episode, self.t, self.resets], np.float64),
                'scene_obs': np.zeros(24)}

    def get_info(self):
        return {'episode': self.episode, 't': self.t, 'chain': self.chains[self.episode]}

    def close(self):
        pass


class FakePolicy:
    """Returns, for every row, an action whose x component is the episode id seen in that row's obs."""

    def __init__(self, num_envs):
        self.num_envs = num_envs
        self.resets = []
        self.calls = 0

    def reset(self, env_index=None):
        self.resets.append(env_index)

    def step(self, observations, instructions):
        assert len(observations) == len(instructions) == self.num_envs
        self.calls += 1
        a = np.zeros((self.num_envs, 7))
        a[:, 0] = [o['robot_obs'][0] for o in observations]
        a[:, 6] = 1.0
        return a

    def dream(self, observations, instructions):
        n = len(observations)
        rng = np.random.default_rng(self.calls)
        return {'rgb': rng.normal(size=(n, 2, 16, 12)), 'depth': rng.uniform(0.5, 2, (n, 2, 16, 4)),
                'sam': rng.normal(size=(n, 2, 16, 8))}


TASKS5 = ('open_drawer', 'turn_on_led', 'move_slider_left', 'lift_red_block_table', 'stack_block')
CHAINS = [TASKS5, TASKS5[::-1], TASKS5, ('turn_on_led',) + TASKS5[:1] + TASKS5[2:], TASKS5]
MAX_STEPS = 10
# Steps each subtask takes; None = never; 11 > MAX_STEPS = too late; exactly MAX_STEPS still counts.
SCRIPT = {0: [2, 3, 1, 4, 2], 1: [3, None, 1, 1, 1], 2: [None] * 5, 3: [1, 1, 1, 11, 1],
          4: [10, 10, None, 1, 1]}
EXPECTED = [5, 1, 0, 3, 2]


def fake_env_factory():
    return FakeCalvinEnv(SCRIPT, CHAINS)


def fake_episodes():
    out = []
    for i, chain in enumerate(CHAINS):
        scene = np.zeros(24)
        scene[0] = i
        out.append(Episode(i, chain, tuple(f'do {t}' for t in chain), dict(robot_obs=None, scene_obs=scene)))
    return out


@pytest.mark.parametrize('workers', [0, 2])
def test_chain_accounting_against_hand_computed_numbers(workers):
    policy = FakePolicy(max(1, workers))
    with EnvPool(fake_env_factory, workers) as pool:
        result = suites.evaluate_calvin(policy, pool, fake_episodes(), max_steps=MAX_STEPS, progress=False)
    assert [s['completed'] for s in result['sequences']] == EXPECTED
    assert result['chain_sr'] == pytest.approx({1: 0.8, 2: 0.6, 3: 0.4, 4: 0.2, 5: 0.2})
    assert result['avg_seq_len'] == pytest.approx(2.2)
    # open_drawer: chain 0 ok, 1 never reached (failed at its 2nd task), 2 fail, 3 ok (2nd), 4 ok.
    assert result['task_info']['open_drawer'] == {'success': 3, 'total': 4, 'success_rate': 0.75}
    assert result['task_info']['stack_block']['total'] == 2   # chain 0 (5th) and chain 1 (1st)
    # policy.reset once per attempted subtask: min(completed + 1, 5) per chain.
    assert len(policy.resets) == sum(min(n + 1, 5) for n in EXPECTED)
    assert None not in policy.resets
    json.dumps(result)


def test_one_reset_per_chain_and_subtasks_continue_the_scene():
    env = fake_env_factory()
    starts = []
    def on_start(k, ep, sub, obs):
        starts.append((ep.index, sub, obs['robot_obs'][1]))

    with EnvPool(lambda: env, 0) as pool:
        run_episodes(FakePolicy(1), pool, fake_episodes(), max_steps=MAX_STEPS, on_subtask_start=on_start)
    assert env.resets == len(CHAINS)
    # Chain 0: subtasks start at the step counts where the previous one succeeded (no reset in between).
    assert [t for ep, _, t in starts if ep == 0] == [0, 2, 5, 6, 10]


def test_idle_slots_are_masked_when_episodes_run_out():
    # 3 slots, 2 episodes: one slot never gets a chain but the policy still sees a full batch.
    eps = fake_episodes()[:2]
    policy = FakePolicy(3)
    pool = EnvPool(fake_env_factory, 0)
    pool.slots = pool.slots + [type(pool.slots[0])(fake_env_factory) for _ in range(2)]
    with pool:
        res = run_episodes(policy, pool, eps, max_steps=MAX_STEPS)
    assert res == EXPECTED[:2]


def test_policy_smaller_than_pool_is_rejected():
    with EnvPool(fake_env_factory, 0) as pool:
        pool.slots.append(type(pool.slots[0])(fake_env_factory))
        with pytest.raises(ValueError, match='built for 1 environments'):
            run_episodes(FakePolicy(1), pool, fake_episodes(), max_steps=2)


def test_calvin_episodes_use_official_states_and_instructions():
    seqs = [(dict(zip(cp.STATE_KEYS, s, strict=True)), c) for s, c in REF_12]
    eps = suites.calvin_episodes(3, sequences=seqs)
    assert len(eps) == 3 and eps[0].subtasks == REF_12[0][1]
    assert eps[0].instructions[0] == 'take the blue block and rotate it to the right'
    np.testing.assert_array_equal(eps[0].reset_kwargs['scene_obs'], REF_SCENE_0)
    assert 'chain length' in suites.format_calvin(cp.summarize([5, 0, 2], [e.subtasks for e in eps]))


def test_worker_errors_reach_the_parent():
    with pytest.raises(ZeroDivisionError):
        EnvPool(functools.partial(divmod, 1, 0), 2)


def test_missing_calvin_env_is_one_clear_sentence(monkeypatch):
    import builtins

    from dreamvla_jax.envs import calvin_env_adapter as adapter

    real_import = builtins.__import__

    def no_calvin(name, *args, **kwargs):
        if name.startswith('calvin_env'):
            raise ImportError("No module named 'calvin_env'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, '__import__', no_calvin)
    assert not adapter.calvin_env_available()
    with pytest.raises(adapter.CalvinEnvMissing, match='git clone --recurse-submodules'):
        adapter.make_calvin_env(None)


def test_calvin_adapter_binarises_and_copies_actions():
    from dreamvla_jax.envs.calvin_env_adapter import CalvinEnv

    class Raw:
        def step(self, action):
            self.got = action.copy()
            action *= 0   # the pinned calvin_env scales the caller's array in place
            return {}, 0, False, {}

    raw = Raw()
    a = np.array([0.5, 0, 0, 0, 0, 0, 0.3])
    CalvinEnv(raw, None).step(a)
    assert raw.got[6] == 1.0 and a[0] == 0.5
