"""Teacher precompute: teacher shapes, store format and manifest, kill/resume equality, CLI errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dreamvla_jax.data import store as store_lib
from dreamvla_jax.data import synthetic
from dreamvla_jax.data.calvin import CalvinDataset
from dreamvla_jax.data.errors import DataError
from dreamvla_jax.teachers import __main__ as cli
from dreamvla_jax.teachers import precompute

ROOT = Path(__file__).resolve().parents[1]
TINY = ['--random-init', '--teacher-scale', 'tiny', '--no-progress']


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp('teachers')
    # 2 episodes x 24 frames, annotations 0..15 and 8..23 of each: all 48 frames are annotated.
    synthetic.write_split(root / 'training', synthetic.default_episodes(num=2, length=24, window=16))
    return root


def _args(data, out, *extra):
    return ['--data', str(data), '--out', str(out), '--teachers', 'motion,sam', '--shard-size', '8',
            '--batch-size', '4', *TINY, *extra]


def read_store(path):
    """shard name -> list of (frame id, fields) decoded with the raw ArrayRecord reader."""
    from array_record.python.array_record_module import ArrayRecordReader

    manifest = json.loads((Path(path) / 'manifest.json').read_text())
    out = {}
    for name in manifest['shards']:
        r = ArrayRecordReader(str(Path(path) / name))
        out[name] = [store_lib.decode_record(b) for b in r.read_all()]
        r.close()
    return out


def test_tiny_teachers_have_real_output_shapes():
    from dreamvla_jax.teachers.models import build_teacher

    images = np.random.default_rng(0).integers(0, 256, (2, 84, 84, 3), dtype=np.uint8)
    sam = build_teacher('sam', random_init=True, scale='tiny')
    dino = build_teacher('dino', random_init=True, scale='tiny')
    depth = build_teacher('depth', random_init=True, scale='tiny')
    assert sam(images).shape == (2, 16, 16, 256) and sam(images).dtype == np.float16
    assert dino(images).shape == (2, 16, 16, 768) and dino(images).dtype == np.float16
    assert depth(images).shape == (2, 84, 84)
    # Same seed, same weights: what makes a resumed run reproduce the interrupted one.
    np.testing.assert_array_equal(sam(images), build_teacher('sam', random_init=True, scale='tiny')(images))
    assert sam.info['random_init'] and sam.info['architecture'] == 'SamVisionModel'
    with pytest.raises(DataError, match='--sam'):
        build_teacher('sam')


def test_base_teachers_are_vit_b():
    from dreamvla_jax.teachers.models import build_teacher

    # Random ViT-B teachers: the published parameter counts of SAM ViT-B's image encoder, DINOv2-B/14 and
    # Depth-Anything-V2-Base (construction only; a forward pass at 1024 px takes seconds on a CPU).
    counts = {name: build_teacher(name, random_init=True).info['parameters']
              for name in ('sam', 'dino', 'depth')}
    assert counts == {'sam': 89_670_912, 'dino': 86_580_480, 'depth': 97_470_785}


def test_store_contents_and_manifest(data, tmp_path):
    out = tmp_path / 'store'
    assert cli.main(_args(data, out, '--teachers', 'motion,depth,sam')) == 0
    m = json.loads((out / 'manifest.json').read_text())
    ds = CalvinDataset(data / 'training')
    assert m['complete'] and m['random_init']
    assert m['dataset']['fingerprint'] == ds.fingerprint() and m['dataset']['num_frames'] == 48
    assert m['teachers']['sam']['random_init'] and m['teachers']['sam']['scale'] == 'tiny'
    assert m['teachers']['sam']['model']['architecture'] == 'SamVisionModel'
    assert m['teachers']['depth']['source'].startswith('dataset')   # CALVIN has depth: not recomputed
    assert m['teachers']['motion']['method'] == 'opencv-lk'
    assert m['config'] == {'image_size': 224, 'grid': 28, 'gap': 5, 'cameras': ['static', 'gripper']}
    assert m['fields'] == {'tracks': {'shape': [2, 784, 2], 'dtype': 'float16'},
                           'sam': {'shape': [2, 16, 16, 256], 'dtype': 'float16'}}
    assert m['shards'] == [f'shard-0000{i}-of-00006.array_record' for i in range(6)]
    assert m['versions']['torch'] and m['versions']['transformers']
    np.testing.assert_array_equal(np.load(out / 'frames.npy'), ds.annotated_frames())
    records = read_store(out)
    frames = [f for shard in records.values() for f, _ in shard]
    np.testing.assert_array_equal(frames, ds.annotated_frames())
    # Tracks: the static square moves 3 px/frame at 200 px = 3.36 px/frame at 224, 5 frames per track
    # (fewer at the episode end, where the track stops at the last frame).
    fid, rec = records[m['shards'][0]][0]
    speed = np.linalg.norm(rec['tracks'][0].astype(np.float32), axis=-1)
    assert abs(np.max(speed) - 5 * 3 * 224 / 200) < 1.0 and np.median(speed) < 0.1
    last_id, last = records[m['shards'][-1]][-1]
    assert last_id == ds.episodes[-1, 1] and not last['tracks'].any()   # frame j + 0 at the episode end
    store = store_lib.FeatureStore(out, fingerprint=ds.fingerprint())
    np.testing.assert_array_equal(store.get(fid)['sam'], rec['sam'])


def test_feature_grid_stores_the_pooled_map(data, tmp_path):
    """``--feature-grid 8`` keeps SAM / DINOv2 average-pooled to 8x8: the 16x16 store's maps, pooled (4x less
    disk)."""
    full, pooled = tmp_path / 'full', tmp_path / 'pooled'
    assert cli.main(_args(data, full, '--teachers', 'sam,dinov2')) == 0
    assert cli.main(_args(data, pooled, '--teachers', 'sam,dinov2', '--feature-grid', '8')) == 0
    m = json.loads((pooled / 'manifest.json').read_text())
    assert m['fields'] == {'sam': {'shape': [2, 8, 8, 256], 'dtype': 'float16'},
                           'dino': {'shape': [2, 8, 8, 768], 'dtype': 'float16'}}
    a, b = store_lib.FeatureStore(full), store_lib.FeatureStore(pooled)
    for fid in (0, 13, 47):
        for name, dim in (('sam', 256), ('dino', 768)):
            want = a.get(fid)[name].astype(np.float32).reshape(2, 8, 2, 8, 2, dim).mean(axis=(2, 4))
            np.testing.assert_allclose(b.get(fid)[name].astype(np.float32), want, rtol=2e-3, atol=2e-3)
    # With --config the store keeps the grid the config's SAM head decodes (the tabletop preset: 8x8).
    opts = cli.options_from_args(cli.parse_args(['--data', 'd', '--out', 'o', '--config', 'configs/tabletop.py']))
    assert (opts.sam_grid, opts.dino_grid) == (8, 16)
    opts = cli.options_from_args(cli.parse_args(['--data', 'd', '--out', 'o', '--config', 'configs/calvin.py']))
    assert (opts.sam_grid, opts.dino_grid) == (16, 16)


def test_segmentation_stands_in_for_sam(tmp_path):
    """``--sam segmentation``: the SAM field is the square root of each object class's share of every cell (the
    background classes 0 and 1 zero), read from the frames' seg_static / seg_gripper (the tabletop collect's
    object classes), at the config's grid."""
    from dreamvla_jax.data.calvin import CalvinWriter
    from dreamvla_jax.teachers.segmentation import class_shares

    rng = np.random.default_rng(0)
    frames = synthetic.episode_frames(12, rng, depth=False)
    seg_s = np.zeros((12, 200, 200), np.uint8)
    seg_s[:, :, 100:] = 3                       # right half: class 3
    seg_s[:, 0:25, 0:5] = 9                     # a small object: 5 of the 25 columns of cell (0, 0) at 8x8
    seg_g = rng.integers(0, 11, (12, 84, 84)).astype(np.uint8)   # 84 px: cells straddle pixels
    w = CalvinWriter(tmp_path / 'd' / 'training')
    w.add_episode({**frames, 'seg_static': seg_s, 'seg_gripper': seg_g}, [(0, 11, 't', 'x')])
    w.close()
    out = tmp_path / 'store'
    assert cli.main(['--data', str(tmp_path / 'd'), '--out', str(out), '--teachers', 'sam', '--sam', 'segmentation',
                     '--feature-grid', '8', '--no-progress']) == 0
    m = json.loads((out / 'manifest.json').read_text())
    assert m['teachers']['sam']['source'].startswith('dataset segmentation') and not m['random_init']
    assert m['fields'] == {'sam': {'shape': [2, 8, 8, 256], 'dtype': 'float16'}}
    sam = store_lib.FeatureStore(out).get(5)['sam'].astype(np.float32)
    static = sam[0]
    np.testing.assert_allclose(static[0, 0, 9], np.sqrt(0.2), atol=1e-3)   # the small object's share, rooted
    np.testing.assert_allclose(static[3, 5, 3], 1.0, atol=1e-3)            # right half: class 3 only
    assert not static[3, 2].any()                                            # left half: background, no target
    assert not static[..., [0, 1, 2]].any() and not static[..., 10:].any()
    # Gripper camera: each object class's share per cell (area-weighted at 84 / 8 = 10.5 px), background zeroed.
    g = sam[1] ** 2
    shares = (seg_g[5, :21, :21, None] == np.arange(11)).mean((0, 1))    # cells (0,0)+(0,1)+(1,0)+(1,1) = 21 px
    np.testing.assert_allclose(g[:2, :2, 2:11].mean((0, 1)), shares[2:], atol=5e-3)
    background = class_shares((seg_g[5:6] <= 1).astype(np.uint8), 8, 2)[0, ..., 1]
    np.testing.assert_allclose(g.sum(-1), 1.0 - background, atol=5e-3)
    # A dataset without segmentation keys is refused in one sentence.
    with pytest.raises(DataError, match='no seg_static / seg_gripper'):
        precompute.run(precompute.Options(data=str(_no_seg(tmp_path)), out=str(tmp_path / 'x'), teachers=('sam',),
                                          sam='segmentation', progress=False))


def _no_seg(tmp_path):
    root = tmp_path / 'plain'
    synthetic.write_split(root / 'training', [(12, [(0, 11, 't', 'x')])], depth=False)
    return root


def test_pseudo_depth_and_dino(tmp_path):
    synthetic.write_split(tmp_path / 'nodepth', [(8, [(0, 7, 't', 'do it')])], depth=False)
    out = tmp_path / 'store'
    assert cli.main(['--data', str(tmp_path / 'nodepth'), '--out', str(out), '--teachers', 'depth,dinov2',
                     *TINY]) == 0
    m = json.loads((out / 'manifest.json').read_text())
    assert m['fields'] == {'depth_static': {'shape': [200, 200], 'dtype': 'float16'},
                           'depth_gripper': {'shape': [84, 84], 'dtype': 'float16'},
                           'dino': {'shape': [2, 16, 16, 768], 'dtype': 'float16'}}
    assert m['teachers']['depth']['model']['architecture'] == 'DepthAnythingForDepthEstimation'
    assert m['teachers']['dinov2']['model']['architecture'] == 'Dinov2Model'
    rec = store_lib.FeatureStore(out).get(3)
    assert rec['depth_static'].shape == (200, 200) and rec['depth_gripper'].dtype == np.float16
    assert rec['dino'].shape == (2, 16, 16, 768) and np.isfinite(rec['dino'].astype(np.float32)).all()
    assert np.abs(rec['dino'][0].astype(np.float32) - rec['dino'][1]).max() > 0   # two different cameras


def test_kill_and_resume_equals_uninterrupted_run(data, tmp_path):
    killed, full = tmp_path / 'killed', tmp_path / 'full'
    env = {**os.environ, precompute.HANG_ENV: '2', 'PYTHONPATH': str(ROOT)}
    cmd = [sys.executable, '-m', 'dreamvla_jax.teachers', *_args(data, killed)]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stderr=subprocess.PIPE)
    marker = killed / '.test_hang'
    while not marker.exists():     # the run reached the middle of shard 2
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert (killed / 'shard-00000-of-00006.array_record').exists()
    assert (killed / 'shard-00001-of-00006.array_record').exists()
    assert not (killed / 'shard-00002-of-00006.array_record').exists()
    assert (killed / 'shard-00002-of-00006.array_record.tmp').exists()     # half written, never read
    with pytest.raises(DataError, match=r'is incomplete \(2/6 shards\)'):
        store_lib.FeatureStore(killed)
    before = (killed / 'shard-00000-of-00006.array_record').stat().st_mtime_ns
    env.pop(precompute.HANG_ENV)
    subprocess.run([sys.executable, '-m', 'dreamvla_jax.teachers', *_args(data, killed)], env=env, cwd=ROOT,
                   check=True)
    assert (killed / 'shard-00000-of-00006.array_record').stat().st_mtime_ns == before   # skipped, not redone
    assert not list(killed.glob('*.tmp'))
    assert cli.main(_args(data, full)) == 0
    a, b = read_store(killed), read_store(full)
    assert list(a) == list(b)
    for name in a:
        assert [f for f, _ in a[name]] == [f for f, _ in b[name]], name
        for (_, ra), (_, rb) in zip(a[name], b[name], strict=True):
            assert ra.keys() == rb.keys()
            for k in ra:
                np.testing.assert_array_equal(ra[k], rb[k], err_msg=f'{name} {k}')
        assert (killed / name).read_bytes() == (full / name).read_bytes(), name
    ma, mb = (json.loads((p / 'manifest.json').read_text()) for p in (killed, full))
    assert ma == mb


def test_cli_errors_are_one_line(data, tmp_path, capsys):
    assert cli.main(['--data', str(data), '--out', str(tmp_path / 'x'), '--teachers', 'sam']) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: teacher sam needs weights: pass --sam PATH') and err.count('\n') == 1
    assert cli.main(['--data', str(tmp_path / 'nowhere'), '--out', str(tmp_path / 'y')]) == 2
    assert 'nowhere' in capsys.readouterr().err
    assert cli.main(['--data', str(data), '--out', str(tmp_path / 'z'), '--teachers', 'motion,flow']) == 2
    assert "unknown teacher 'flow'" in capsys.readouterr().err
    assert cli.main(_args(data, tmp_path / 'g', '--feature-grid', '6')) == 2
    assert capsys.readouterr().err.startswith('error: --feature-grid 6: must divide')
    # Resuming into a store started with other settings is refused (it would mix two kinds of shards).
    out = tmp_path / 's'
    assert cli.main(['--data', str(data), '--out', str(out), '--teachers', 'motion', '--no-progress']) == 0
    assert cli.main(['--data', str(data), '--out', str(out), '--teachers', 'motion', '--gap', '3']) == 2
    assert "different 'teachers'" in capsys.readouterr().err
