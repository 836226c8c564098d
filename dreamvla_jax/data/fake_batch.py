"""Random batches in the exact pipeline format, for tests and benchmarks (no files needed)."""

from __future__ import annotations

import numpy as np

CALVIN_SHAPES = {'static': (200, 200), 'gripper': (84, 84)}


def fake_batch(config, batch_size: int, seed: int = 0, shapes: dict | None = None) -> dict[str, np.ndarray]:
    """A host batch shaped like ``data.pipeline``'s output for ``config`` (random contents).

    Keys: rgb_<cam> uint8 [B, W, H, W, 3], depth_<cam> float32 [B, W, H, W], robot_obs [B, W, 15],
    rel_actions [B, W, 7] (gripper +-1), text_tokens int32 [B, 77], motion_mask [B, S, 2, L],
    sam / dino float16 [B, S, 2, h, w, C] when those heads are enabled, index int64 [B].
    """
    rs = np.random.RandomState(seed)
    m = config.model
    s, w = m.history, m.history + config.data.future
    shapes = shapes or CALVIN_SHAPES
    b = {}
    for cam in m.cameras:
        h, wd = shapes[cam]
        b[f'rgb_{cam}'] = rs.randint(0, 256, (batch_size, w, h, wd, 3), dtype=np.uint8)
        b[f'depth_{cam}'] = rs.uniform(0.2, 2.0, (batch_size, w, h, wd)).astype(np.float32)
    obs = rs.uniform(-1, 1, (batch_size, w, 15)).astype(np.float32)
    obs[..., 14] = rs.choice([-1.0, 1.0], (batch_size, w))
    b['robot_obs'] = obs
    act = rs.uniform(-1, 1, (batch_size, w, 7)).astype(np.float32)
    act[..., 6] = rs.choice([-1.0, 1.0], (batch_size, w))
    b['rel_actions'] = act
    tokens = np.zeros((batch_size, m.text.context), np.int32)
    n = rs.randint(3, 12, batch_size)
    for i in range(batch_size):
        tokens[i, 0] = 49406
        tokens[i, 1:n[i]] = rs.randint(1, 49406, n[i] - 1)
        tokens[i, n[i]] = 49407
    b['text_tokens'] = tokens
    grid = m.vision.image_size // m.vision.patch
    b['motion_mask'] = (rs.uniform(size=(batch_size, s, len(m.cameras), grid * grid)) > 0.7).astype(np.float32)
    for name in ('sam', 'dino'):
        head = m.dream[name]
        if head.enabled:
            hh, ww = head.mask_grid
            b[name] = rs.randn(batch_size, s, len(m.cameras), hh, ww, head.out_dim).astype(np.float16)
    b['index'] = np.arange(batch_size, dtype=np.int64)
    return b
