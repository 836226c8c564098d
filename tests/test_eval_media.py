"""Videos, dream panels and the rollout recorder."""

import cv2
import numpy as np
import pytest
from PIL import Image
from test_eval_calvin import MAX_STEPS, FakePolicy, fake_env_factory, fake_episodes

from dreamvla_jax.evaluation import media, suites
from dreamvla_jax.evaluation.rollout import EnvPool


def _frames(n=6, h=40, w=64):
    return [np.full((h, w, 3), 30 * i, np.uint8) for i in range(n)]


@pytest.mark.parametrize('fmt', ['mp4', 'gif'])
def test_write_video_is_non_empty(tmp_path, fmt):
    path = media.write_video(tmp_path / f'v.{fmt}', _frames(), fps=10)
    assert path.stat().st_size > 500
    if fmt == 'gif':
        assert Image.open(path).n_frames == 6
    else:
        cap = cv2.VideoCapture(str(path))
        ok, frame = cap.read()
        assert ok and frame.shape == (40, 64, 3)


def test_overlay_text_draws_on_a_copy():
    img = np.zeros((60, 120, 3), np.uint8)
    out = media.overlay_text(img, 'push the sliding door to the left side')
    assert img.max() == 0 and out.max() == 255 and out.shape == img.shape


def test_unpatchify_inverts_the_loss_patchify():
    from dreamvla_jax import losses

    img = np.random.default_rng(0).normal(size=(1, 32, 32, 3)).astype(np.float32)
    tokens = np.asarray(losses.patchify(img, 8))[0]
    np.testing.assert_array_equal(media.patchify(img[0], 8), tokens)
    np.testing.assert_array_equal(media.unpatchify(tokens, 3), img[0])


def test_pca_rgb_range_and_shared_scale():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(16, 16, 32))
    pa, pb = media.pca_rgb(a, a.copy())
    assert pa.shape == (16, 16, 3) and pa.min() >= 0 and pa.max() <= 1 and pa.std() > 0.1
    np.testing.assert_array_equal(pa, pb)  # same features -> same colours


def test_dream_panel_size_and_value_range(tmp_path):
    rng = np.random.default_rng(0)
    target_rgb = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    pred = {'rgb': rng.normal(size=(2, 16, 8 * 8 * 3)),        # tokens, 4x4 patches of 8 px
            'depth': rng.uniform(0.5, 2.0, (2, 16, 64)),
            'sam': rng.normal(size=(2, 16, 12))}
    target = {'rgb': target_rgb, 'depth': rng.uniform(0.5, 2.0, (2, 32, 32)),
              'sam': rng.normal(size=(2, 4, 4, 12)),
              'motion_mask': (rng.uniform(size=(2, 16)) > 0.5).astype(np.float32)}
    panel = media.dream_panel(pred, target, cell=64)
    assert panel.dtype == np.uint8 and panel.shape == (8 * 64, 2 * 64, 3)  # 3 modalities x 2 cams + 2 dynamic
    assert panel.min() < 40 and panel.max() > 215                          # full range used, not flat
    path = media.save_png(tmp_path / 'p.png', panel)
    back = cv2.imread(str(path))
    assert back.shape == panel.shape and path.stat().st_size > 1000
    # A perfect RGB prediction renders identically to its target cell (same per-patch-normalised scale).
    tokens = media.normalize_patches(media.patchify(target_rgb[0].astype(np.float32) / 255, 8))
    p_img, t_img = media._rgb_pair(tokens, target_rgb[0])
    np.testing.assert_allclose(p_img, t_img, atol=1e-5)


def test_recorder_writes_videos_and_panels(tmp_path):
    rec = media.RolloutRecorder(tmp_path, max_episodes=2, video_format='gif', panel_every=2, future=3)
    policy = FakePolicy(1)
    with EnvPool(fake_env_factory, 0) as pool:
        res = suites.evaluate_calvin(policy, pool, fake_episodes(), max_steps=MAX_STEPS, progress=False,
                                     recorder=rec)
    videos = sorted(tmp_path.glob('*.gif'))
    assert [v.name for v in videos] == ['episode_0000_5of5.gif', 'episode_0001_1of5.gif']
    assert all(v.stat().st_size > 0 for v in videos)
    # Episode 0 has 12 steps + 5 subtask starts = 17 frames.
    assert Image.open(videos[0]).n_frames == sum([2, 3, 1, 4, 2]) + 5
    panels = sorted((tmp_path / 'episode_0000').glob('*.png'))
    assert panels and all(p.stat().st_size > 0 for p in panels)
    assert res['avg_seq_len'] == pytest.approx(2.2)
