"""CALVIN reader/writer: round trip, on-disk layout against CALVIN.md, window indexing, clear errors."""

import numpy as np
import pytest
import yaml

from dreamvla_jax.data import synthetic
from dreamvla_jax.data.calvin import CalvinDataset, CalvinWriter, frame_name
from dreamvla_jax.data.errors import DataError

ANN = [
    # episode 0 (frames 0..29): two overlapping annotations
    [(0, 15, 'open_drawer', 'pull the handle to open the drawer'),
     (10, 29, 'turn_on_led', 'press the button to turn on the led light')],
    # episode 1 (frames 30..41): one annotation exactly W + 1 long, one shorter than W
    [(1, 6, 'push_red_block_left', 'go push the red block left'),
     (0, 3, 'lift_red_block_table', 'grasp and lift the red block')],
    # episode 2 (frames 42..61)
    [(2, 19, 'move_slider_left', 'push the sliding door to the left side')],
]
LENGTHS = [30, 12, 20]


@pytest.fixture(scope='module')
def split(tmp_path_factory):
    root = tmp_path_factory.mktemp('calvin') / 'training'
    rng = np.random.default_rng(0)
    w = CalvinWriter(root)
    frames = []
    for n, anns in zip(LENGTHS, ANN, strict=True):
        f = synthetic.episode_frames(n, rng)
        frames.append(f)
        w.add_episode(f, anns)
    w.close()
    return root, frames


def test_round_trip(split):
    root, frames = split
    ds = CalvinDataset(root)
    np.testing.assert_array_equal(ds.episodes, [[0, 29], [30, 41], [42, 61]])
    assert ds.num_frames == 62 and ds.has_depth
    for ep, (f, start) in enumerate(zip(frames, (0, 30, 42), strict=True)):
        for i in (0, len(f['rgb_static']) - 1):
            got = ds.frame(start + i)
            assert ds.episode_of(start + i) == ep
            assert set(got) == {'rgb_static', 'rgb_gripper', 'depth_static', 'depth_gripper', 'actions',
                                'rel_actions', 'robot_obs', 'scene_obs'}
            for k, v in got.items():
                np.testing.assert_array_equal(v, f[k][i].astype(v.dtype))
            assert got['robot_obs'].dtype == np.float32  # vectors are cast on read
    assert [a.start for a in ds.annotations] == [0, 10, 31, 30, 44]
    assert [a.end for a in ds.annotations] == [15, 29, 36, 33, 61]
    assert ds.annotations[2].instruction == 'go push the red block left'
    assert ds.annotations[2].task == 'push_red_block_left'


def test_documented_layout(split):
    """Raw files as CALVIN.md section 1 documents them, read without our reader."""
    root, _ = split
    names = sorted(p.name for p in root.glob('episode_*.npz'))
    assert names == [frame_name(i) for i in range(62)] and names[7] == 'episode_0000007.npz'
    with np.load(root / 'episode_0000031.npz') as npz:
        expect = {'rgb_static': ((200, 200, 3), np.uint8), 'rgb_gripper': ((84, 84, 3), np.uint8),
                  'depth_static': ((200, 200), np.float32), 'depth_gripper': ((84, 84), np.float32),
                  'actions': ((7,), np.float64), 'rel_actions': ((7,), np.float64),
                  'robot_obs': ((15,), np.float64), 'scene_obs': ((24,), np.float64)}
        assert set(npz.files) == set(expect)
        for k, (shape, dtype) in expect.items():
            assert npz[k].shape == shape and npz[k].dtype == dtype, k
    ids = np.load(root / 'ep_start_end_ids.npy')
    assert ids.shape == (3, 2) and np.issubdtype(ids.dtype, np.integer)
    np.testing.assert_array_equal(np.load(root / 'ep_lens.npy'), LENGTHS)
    scene = np.load(root / 'scene_info.npy', allow_pickle=True).item()
    assert scene == {'calvin_scene_D': [0, 61]}
    lang = np.load(root / 'lang_annotations' / 'auto_lang_ann.npy', allow_pickle=True).item()
    assert set(lang) == {'language', 'info'}
    assert lang['language']['ann'][0] == 'pull the handle to open the drawer'
    assert lang['language']['task'][-1] == 'move_slider_left'
    assert lang['language']['emb'].shape == (5, 1, 384) and lang['language']['emb'].dtype == np.float32
    assert lang['info']['episodes'] == [] and lang['info']['indx'][1] == (10, 29)
    stats = yaml.safe_load((root / 'statistics.yaml').read_text())
    assert len(stats['robot_obs'][0]['mean']) == 15 and len(stats['scene_obs'][0]['std']) == 24
    assert stats['robot_obs'][0]['_target_'].endswith('NormalizeVector')
    assert len(stats['act_min_bound']) == 7 and stats['act_max_bound'][6] == 1.0


def test_windows_match_hand_computed_list(split):
    ds = CalvinDataset(split[0])
    # history 3 + future 2 = W 5; starts in range(start, end + 1 - W) per annotation (SPEC section 8).
    expect = ([(0, s) for s in range(0, 11)]        # ann 0: frames 0..15 -> starts 0..10
              + [(1, s) for s in range(10, 25)]     # ann 1: frames 10..29 -> starts 10..24
              + [(2, 31)]                           # ann 2: frames 31..36 (6 = W + 1) -> start 31
              + []                                  # ann 3: frames 30..33, shorter than W
              + [(4, s) for s in range(44, 57)])    # ann 4: frames 44..61 -> starts 44..56
    np.testing.assert_array_equal(ds.windows(3, 2), expect)
    assert ds.windows(3, 2).dtype == np.int64
    np.testing.assert_array_equal(ds.annotated_frames(),
                                  np.concatenate([np.arange(0, 30), np.arange(30, 37), np.arange(44, 62)]))


def test_corrupt_and_missing_files_name_the_file(split, tmp_path):
    root, _ = split
    import shutil

    bad = tmp_path / 'training'
    shutil.copytree(root, bad)
    path = bad / 'episode_0000033.npz'
    path.write_bytes(path.read_bytes()[:500])
    ds = CalvinDataset(bad)
    with pytest.raises(DataError, match=r'corrupt \(episode 1, frame 33, file .*episode_0000033\.npz\)'):
        ds.frame(33)
    (bad / 'episode_0000034.npz').unlink()
    with pytest.raises(DataError, match='missing.*episode_0000034.npz'):
        ds.frame(34)
    with pytest.raises(DataError, match="no key 'rgb_tactile'.*episode_0000035.npz"):
        ds.frame(35, ['rgb_static', 'rgb_tactile'])
    np.savez_compressed(bad / 'episode_0000036.npz', rgb_static=np.zeros((200, 200), np.uint8))
    with pytest.raises(DataError, match="'rgb_static' has shape .*episode_0000036.npz"):
        ds.frame(36)
    (bad / 'ep_start_end_ids.npy').write_bytes(b'garbage')
    with pytest.raises(DataError, match='ep_start_end_ids.npy'):
        CalvinDataset(bad)


def test_annotation_outside_episode_is_rejected(tmp_path):
    rng = np.random.default_rng(1)
    w = CalvinWriter(tmp_path / 's')
    w.add_episode(synthetic.episode_frames(6, rng, depth=False), [(0, 5, 't', 'x')])
    with pytest.raises(DataError, match='inside the episode'):
        w.add_episode(synthetic.episode_frames(4, rng, depth=False), [(2, 4, 't', 'x')])
    w.close()
    ds = CalvinDataset(tmp_path / 's')
    assert not ds.has_depth and ds.image_shapes() == {'rgb_static': (200, 200, 3), 'rgb_gripper': (84, 84, 3)}
    # A file edited by hand so that an annotation crosses into no episode.
    lang = np.load(tmp_path / 's' / 'lang_annotations' / 'auto_lang_ann.npy', allow_pickle=True).item()
    lang['info']['indx'] = [(3, 9)]
    np.save(tmp_path / 's' / 'lang_annotations' / 'auto_lang_ann.npy', lang, allow_pickle=True)
    with pytest.raises(DataError, match='auto_lang_ann.npy: annotation 0'):
        CalvinDataset(tmp_path / 's')


def test_writer_validates_inputs(tmp_path):
    rng = np.random.default_rng(2)
    f = synthetic.episode_frames(3, rng)
    w = CalvinWriter(tmp_path / 'a')
    with pytest.raises(DataError, match="'rel_actions'"):
        w.add_episode({k: v for k, v in f.items() if k != 'rel_actions'})
    with pytest.raises(DataError, match="'rgb_static' must be uint8"):
        w.add_episode({**f, 'rgb_static': f['rgb_static'].astype(np.float32)})
    with pytest.raises(DataError, match="'robot_obs' has shape"):
        w.add_episode({**f, 'robot_obs': f['robot_obs'][:, :8]})
    with pytest.raises(DataError, match='same non-zero length'):
        w.add_episode({**f, 'actions': f['actions'][:2]})
    w.add_episode(f)
    w.close()
    with pytest.raises(DataError, match='already holds episode files'):
        CalvinWriter(tmp_path / 'a')
