"""The block attention mask as a truth table (SPEC section 3)."""

import numpy as np
from conftest import load_config

from dreamvla_jax import masks
from dreamvla_jax.masks import ACTION, CONTEXT, DREAM, TokenGroup


def test_toy_three_timestep_mask_matches_hand_written_table():
    # Per timestep: 2 context tokens (a, b), 2 dream queries (d, e), 1 action query (x).
    groups = [TokenGroup('ctx', 2, CONTEXT), TokenGroup('dream', 2, DREAM), TokenGroup('act', 1, ACTION)]
    roles, times = masks.layout(groups, 3)
    got = masks.attention_mask(roles, times).astype(int)
    # Rows = queries, columns = keys; tokens a b d e x per timestep, timesteps 0, 1, 2.
    expected = np.array([
        # t=0            t=1            t=2
        [1, 1, 0, 0, 0,  0, 0, 0, 0, 0,  0, 0, 0, 0, 0],  # a0
        [1, 1, 0, 0, 0,  0, 0, 0, 0, 0,  0, 0, 0, 0, 0],  # b0
        [1, 1, 0, 0, 0,  0, 0, 0, 0, 0,  0, 0, 0, 0, 0],  # d0
        [1, 1, 0, 0, 0,  0, 0, 0, 0, 0,  0, 0, 0, 0, 0],  # e0
        [1, 1, 1, 1, 0,  0, 0, 0, 0, 0,  0, 0, 0, 0, 0],  # x0
        [1, 1, 0, 0, 0,  1, 1, 0, 0, 0,  0, 0, 0, 0, 0],  # a1
        [1, 1, 0, 0, 0,  1, 1, 0, 0, 0,  0, 0, 0, 0, 0],  # b1
        [1, 1, 0, 0, 0,  1, 1, 0, 0, 0,  0, 0, 0, 0, 0],  # d1
        [1, 1, 0, 0, 0,  1, 1, 0, 0, 0,  0, 0, 0, 0, 0],  # e1
        [1, 1, 0, 0, 0,  1, 1, 1, 1, 0,  0, 0, 0, 0, 0],  # x1
        [1, 1, 0, 0, 0,  1, 1, 0, 0, 0,  1, 1, 0, 0, 0],  # a2
        [1, 1, 0, 0, 0,  1, 1, 0, 0, 0,  1, 1, 0, 0, 0],  # b2
        [1, 1, 0, 0, 0,  1, 1, 0, 0, 0,  1, 1, 0, 0, 0],  # d2
        [1, 1, 0, 0, 0,  1, 1, 0, 0, 0,  1, 1, 0, 0, 0],  # e2
        [1, 1, 0, 0, 0,  1, 1, 0, 0, 0,  1, 1, 1, 1, 0],  # x2
    ])
    np.testing.assert_array_equal(got, expected)


def test_default_layout_offsets_and_size():
    cfg = load_config('default').model
    groups = masks.timestep_groups(cfg)
    sl = masks.group_slices(groups)
    assert sum(g.size for g in groups) == 93
    assert (sl['text'], sl['state']) == (slice(0, 1), slice(1, 2))
    assert (sl['latents_static'], sl['latents_gripper']) == (slice(2, 18), slice(18, 34))
    assert (sl['cls_static'], sl['cls_gripper']) == (slice(34, 35), slice(35, 36))
    assert (sl['dream_rgb'], sl['dream_depth'], sl['dream_sam']) == (slice(36, 54), slice(54, 72), slice(72, 90))
    assert sl['action'] == slice(90, 93)
    roles, times = masks.layout(groups, 10)
    m = masks.attention_mask(roles, times)
    assert m.shape == (930, 930)
    # Action query of t=4 sees all 54 dream queries of t=4 and nothing of t=5.
    row = m[93 * 4 + 90]
    assert row[93 * 4 + 36: 93 * 4 + 90].all() and not row[93 * 4 + 90:].any()
    assert row[93 * 3: 93 * 3 + 36].all() and not row[93 * 3 + 36: 93 * 4].any()


def test_paper_layout_puts_dino_between_depth_and_sam():
    cfg = load_config('paper').model
    sl = masks.group_slices(masks.timestep_groups(cfg))
    assert [sl[k] for k in ('dream_rgb', 'dream_depth', 'dream_dino', 'dream_sam', 'action')] == [
        slice(36, 52), slice(52, 68), slice(68, 84), slice(84, 100), slice(100, 103)]


def test_fast_layout_is_the_training_mask_without_past_queries():
    """Dropping the query tokens of past timesteps keeps every remaining entry of the mask."""
    cfg = load_config('default').model
    groups = masks.timestep_groups(cfg)
    full_roles, full_times = masks.layout(groups, 4)
    full = masks.attention_mask(full_roles, full_times)
    keep = (full_roles == CONTEXT) | (full_times == 3)
    fast = masks.attention_mask(*masks.layout(groups, 4, queries_at=(3,)))
    assert fast.shape == (36 * 4 + 57,) * 2
    np.testing.assert_array_equal(fast, full[np.ix_(keep, keep)])
    # ... and no kept token attended to a dropped one in the full layout.
    assert not full[np.ix_(keep, ~keep)].any()
