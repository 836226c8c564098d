"""Grain pipeline: batch layout and contents, seeded shuffle, process sharding, workers, Orbax-restored
iterator state in a new process, and one clear error per broken input."""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import load_config

from dreamvla_jax.data import pipeline, synthetic
from dreamvla_jax.data.calvin import CalvinDataset
from dreamvla_jax.data.errors import DataError
from dreamvla_jax.data.motion import mask_from_config
from dreamvla_jax.data.store import FeatureStore
from dreamvla_jax.data.tokenizer import load_tokenizer
from dreamvla_jax.teachers import precompute

ROOT = Path(__file__).resolve().parents[1]


def _store(root, out, config, teachers):
    precompute.run(precompute.Options(
        data=str(root), out=str(out), teachers=teachers, image_size=config.model.vision.image_size,
        grid=config.data.motion.grid, gap=config.data.motion.gap, random_init=True, teacher_scale='tiny',
        shard_size=32, progress=False))
    return str(out)


@pytest.fixture(scope='module')
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('pipeline')
    episodes = synthetic.default_episodes(num=3, length=30, window=20)
    synthetic.write_split(tmp / 'calvin' / 'training', episodes)
    synthetic.write_split(tmp / 'other' / 'training', episodes, seed=1)
    debug, default = load_config('debug'), load_config('default')
    stores = {'debug': _store(tmp / 'calvin', tmp / 'feat_debug', debug, ('motion', 'sam')),
              'default': _store(tmp / 'calvin', tmp / 'feat_default', default, ('motion', 'sam', 'dinov2'))}
    return tmp, stores


def config_for(env, preset='debug', **data):
    tmp, stores = env
    c = load_config(preset)
    c.data.root = str(tmp / 'calvin')
    c.data.features = stores['default' if preset in ('default', 'paper') else 'debug']
    c.data.update(data)
    return c


def take(it, n):
    return [next(it) for _ in range(n)]


def test_batch_layout_and_contents(env):
    c = config_for(env)
    it = pipeline.make_iterator(c, process_index=0, process_count=1)
    batch = next(it)
    B, S, W = 8, c.model.history, c.model.history + c.data.future
    expect = {'rgb_static': (np.uint8, (B, W, 200, 200, 3)), 'rgb_gripper': (np.uint8, (B, W, 84, 84, 3)),
              'depth_static': (np.float32, (B, W, 200, 200)), 'depth_gripper': (np.float32, (B, W, 84, 84)),
              'robot_obs': (np.float32, (B, W, 15)), 'rel_actions': (np.float32, (B, W, 7)),
              'text_tokens': (np.int32, (B, 77)), 'motion_mask': (np.float32, (B, S, 2, 16)),
              'sam': (np.float16, (B, S, 2, 16, 16, 256)), 'index': (np.int64, (B,))}
    assert {k: (v.dtype, v.shape) for k, v in batch.items()} == \
        {k: (np.dtype(d), s) for k, (d, s) in expect.items()}
    ds = CalvinDataset(Path(c.data.root) / 'training')
    store = FeatureStore(c.data.features)
    windows = ds.windows(S, c.data.future)
    tok = load_tokenizer(None)
    for b in range(B):
        ann, start = windows[batch['index'][b]]
        for w in range(W):
            frame = ds.frame(start + w)
            for k in ('rgb_static', 'rgb_gripper', 'depth_static', 'depth_gripper', 'robot_obs',
                      'rel_actions'):
                np.testing.assert_array_equal(batch[k][b, w], frame[k], err_msg=k)
        np.testing.assert_array_equal(batch['text_tokens'][b], tok([ds.annotations[ann].instruction])[0])
        for t in range(S):
            np.testing.assert_array_equal(batch['sam'][b, t], store.get(start + t + c.data.future)['sam'])
            np.testing.assert_array_equal(batch['motion_mask'][b, t],
                                          mask_from_config(store.get(start + t)['tracks'], c.data.motion))
    # The synthetic square moves: some motion is found on the static camera, none is invented elsewhere.
    assert batch['motion_mask'][:, :, 0].any() and not batch['motion_mask'].all()
    it.close()


@pytest.mark.parametrize('preset', ['default', 'paper'])
def test_full_size_shapes(env, preset):
    c = config_for(env, preset)
    it = pipeline.make_iterator(c, process_index=0, process_count=1, batch_size=2)
    batch = next(it)
    assert batch['motion_mask'].shape == (2, 10, 2, 196)
    assert batch['rgb_static'].shape == (2, 13, 200, 200, 3)
    assert batch['sam'].shape == (2, 10, 2, 16, 16, 256)
    assert ('dino' in batch) == (preset == 'paper')
    if preset == 'paper':
        assert batch['dino'].shape == (2, 10, 2, 16, 16, 768) and batch['dino'].dtype == np.float16
    it.close()


def _indices(config, **kw):
    it = pipeline.make_iterator(config, **kw)
    out = np.concatenate([b['index'] for b in it])
    it.close()
    return out


def test_seeded_shuffle_and_epochs(env):
    c = config_for(env)
    n = len(pipeline.make_source(c))
    one = _indices(c, process_index=0, process_count=1, num_epochs=1)
    assert len(one) == (n // 8) * 8 and len(set(one.tolist())) == len(one)          # no repeats in an epoch
    np.testing.assert_array_equal(one, _indices(c, process_index=0, process_count=1, num_epochs=1))
    assert not np.array_equal(one, np.sort(one))                                    # shuffled
    assert not np.array_equal(one, _indices(c, process_index=0, process_count=1, num_epochs=1, seed=1))
    two = _indices(c, process_index=0, process_count=1, num_epochs=2)
    assert sorted(two[:n].tolist()) == list(range(n))                                # epoch 1 = all windows
    assert not np.array_equal(two[:n], two[n:2 * n])                                 # reshuffled


def test_task_balanced_sampling():
    """``data.balance_tasks``: a task with 3x fewer windows is drawn as often as the others (seeded, and the
    same stream however it is cut into processes); off, tasks come in proportion to their windows."""
    from types import SimpleNamespace

    from dreamvla_jax.data.calvin import Annotation

    anns = [Annotation(0, 0, 'long', 'a'), Annotation(0, 0, 'long', 'b'), Annotation(0, 0, 'short', 'c')]
    ann_of = np.repeat([0, 1, 2], [30, 30, 20])                      # 60 'long' windows, 20 'short'

    class Source:
        ds = SimpleNamespace(annotations=anns, root='fake')
        windows = np.stack([ann_of, np.arange(len(ann_of))], 1)

        def __len__(self):
            return len(self.windows)

        def __getitem__(self, i):
            return {'index': np.int64(i)}

    def draws(balance, pi=0, pc=1, n=60):
        c = load_config('debug')
        c.data.balance_tasks = balance
        it = pipeline.make_batches(c, source=Source(), process_index=pi, process_count=pc, batch_size=4)
        return np.concatenate([it[k]['index'] for k in range(n)])

    for balance, share in ((True, 0.5), (False, 0.25)):
        idx = draws(balance)
        assert abs(np.mean(ann_of[idx] == 2) - share) < 0.05, (balance, np.mean(ann_of[idx] == 2))
    idx = draws(True)
    np.testing.assert_array_equal(idx, draws(True))                                 # seeded
    # 80 draws: 40 of the 60 'long' windows (no repeat inside a task's epoch), all 20 'short' ones twice.
    assert len(set(idx[:80].tolist())) == 60 and not np.array_equal(idx[:80:2], np.sort(idx[:80:2]))
    two = np.stack([draws(True, p, 2, 30).reshape(30, 4) for p in (0, 1)], 1).reshape(-1)
    np.testing.assert_array_equal(two, idx)                                          # same global stream


def test_process_sharding(env):
    c = config_for(env)
    n = len(pipeline.make_source(c))
    parts = [_indices(c, process_index=p, process_count=2, num_epochs=1) for p in range(2)]
    assert len(parts[0]) == len(parts[1]) == ((n // 2) // 4) * 4                      # batch 8 / 2 processes
    assert not set(parts[0].tolist()) & set(parts[1].tolist())
    with pytest.raises(DataError, match='not divisible by the 3 processes'):
        pipeline.make_iterator(c, process_index=0, process_count=3)


RESTORE_SCRIPT = textwrap.dedent('''
    import sys
    import numpy as np
    sys.path.insert(0, sys.argv[1] + '/configs')
    import calvin
    from dreamvla_jax.data import pipeline

    if __name__ == '__main__':
        c = calvin.get_config('debug')
        c.data.root, c.data.features, ckpt, out = sys.argv[2:6]
        it = pipeline.make_iterator(c, process_index=0, process_count=1, workers=2)
        it = pipeline.restore_iterator(it, ckpt)
        batches = [next(it) for _ in range(3)]
        np.savez(out, **{f'{i}/{k}': v for i, b in enumerate(batches) for k, v in b.items()})
        it.close()
        del it, batches
''')


def test_iterator_state_restores_in_new_process_with_workers(env, tmp_path):
    c = config_for(env)
    it = pipeline.make_iterator(c, process_index=0, process_count=1)
    take(it, 2)
    pipeline.save_iterator(it, tmp_path / 'ckpt')
    state = it.get_state()
    assert state == {'version': 1, 'next_batch': 2}     # JSON-able (the train loop saves it with JsonSave)
    ref = take(it, 3)
    it.close()
    again = pipeline.make_iterator(c, process_index=0, process_count=1)
    again.set_state(json.loads(json.dumps(state)))
    np.testing.assert_array_equal(next(again)['index'], ref[0]['index'])
    again.close()
    script = tmp_path / 'restore.py'
    script.write_text(RESTORE_SCRIPT)
    subprocess.run([sys.executable, str(script), str(ROOT), c.data.root, c.data.features,
                    str(tmp_path / 'ckpt'), str(tmp_path / 'next.npz')], check=True, cwd=ROOT,
                   env={'PYTHONPATH': str(ROOT), 'PATH': '/usr/bin:/bin', 'JAX_PLATFORMS': 'cpu'})
    got = np.load(tmp_path / 'next.npz')
    for i, batch in enumerate(ref):
        for k, v in batch.items():
            np.testing.assert_array_equal(got[f'{i}/{k}'], v, err_msg=f'batch {i} {k}')


def _copy(env, tmp_path):
    tmp, stores = env
    root = tmp_path / 'calvin'
    shutil.copytree(tmp / 'calvin', root)
    store = tmp_path / 'feat'
    shutil.copytree(stores['debug'], store)
    return root, store


def test_corrupt_episode_file_names_it(env, tmp_path):
    root, store = _copy(env, tmp_path)
    path = root / 'training' / 'episode_0000012.npz'   # inside the first episode, not a boundary frame
    path.write_bytes(path.read_bytes()[:1000])
    c = config_for(env, root=str(root), features=str(store), shuffle=False)
    it = pipeline.make_iterator(c, process_index=0, process_count=1, batch_size=1)
    with pytest.raises(DataError, match=r'corrupt \(episode 0, frame 12, file .*episode_0000012\.npz\)'):
        take(it, 20)
    it.close()
    # With skip_corrupt the windows touching frame 12 are replaced by the next readable ones, and counted.
    c.data.skip_corrupt = True
    source = pipeline.make_source(c)
    it = pipeline.make_iterator(c, source=source, process_index=0, process_count=1, batch_size=1,
                                num_epochs=1)
    idx = np.concatenate([b['index'] for b in it])
    windows = source.windows
    touching = [i for i, (_, s) in enumerate(windows) if s <= 12 < s + source.window]
    assert touching and not set(touching) & set(idx.tolist()) and len(idx) == len(windows)


def test_missing_feature_shard_names_it(env, tmp_path):
    root, store = _copy(env, tmp_path)
    (store / 'shard-00001-of-00003.array_record').unlink()
    c = config_for(env, root=str(root), features=str(store))
    with pytest.raises(DataError, match=r'feature shard .*shard-00001-of-00003\.array_record is missing'):
        pipeline.make_iterator(c, process_index=0, process_count=1)


def test_store_of_another_dataset_names_it(env):
    tmp, stores = env
    c = config_for(env, root=str(tmp / 'other'))
    with pytest.raises(DataError, match=rf'feature store {stores["debug"]} was computed from another'):
        pipeline.make_iterator(c, process_index=0, process_count=1)


def test_store_with_other_motion_settings_is_refused(env):
    c = config_for(env)
    c.data.motion.gap = 3
    with pytest.raises(DataError, match='computed with gap 5 but the config asks for 3'):
        pipeline.make_iterator(c, process_index=0, process_count=1)
    c = config_for(env, 'paper')
    c.data.features = env[1]['debug']                 # no DINOv2 field, and image size 32
    with pytest.raises(DataError, match='image_size 32'):
        pipeline.make_iterator(c, process_index=0, process_count=1)


def test_store_coarser_than_a_feature_head_is_refused(env, tmp_path):
    tmp, _ = env
    c = config_for(env)
    c.data.features = str(tmp_path / 'coarse')
    precompute.run(precompute.Options(
        data=str(tmp / 'calvin'), out=c.data.features, teachers=('motion', 'sam'), image_size=32,
        grid=c.data.motion.grid, gap=c.data.motion.gap, random_init=True, teacher_scale='tiny', sam_grid=4,
        shard_size=32, progress=False))
    with pytest.raises(DataError, match=r'keeps sam at 4x4, which config.model.dream.sam.mask_grid \(16, 16\)'):
        pipeline.make_iterator(c, process_index=0, process_count=1)
    c.model.dream.sam.mask_grid = (2, 2)              # a head decoding a coarser grid reads it, pooled
    batch = next(pipeline.make_iterator(c, process_index=0, process_count=1))
    assert batch['sam'].shape[3:] == (4, 4, 256)
