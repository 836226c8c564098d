"""Each loss against a value computed by hand on small fixed inputs."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from dreamvla_jax import losses


def test_masked_mse_hand_value_and_all_zero_mask():
    pred = jnp.array([[[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]]])    # [1, L=3, C=2]
    target = jnp.array([[[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]]])
    mask = jnp.array([[1.0, 0.0, 1.0]])
    # masked differences: (1, 2), (0, 0), (-5, -5) -> squares 1+4+0+0+25+25 = 55 over 6 elements
    assert float(losses.masked_mse(pred, target, mask)) == pytest.approx(55 / 6)
    zero = losses.masked_mse(pred, target, jnp.zeros_like(mask))
    assert float(zero) == 0.0 and not np.isnan(float(zero))


def test_silog_hand_value():
    pred = jnp.array([1.0, 2.0, 4.0])
    target = jnp.array([2.0, 2.0, 1.0])
    d = np.log(np.array([2.0, 2.0, 1.0]) + 1e-6) - np.log(np.array([1.0, 2.0, 4.0]) + 1e-6)
    expected = math.sqrt(np.mean(d ** 2) - 0.5 * np.mean(d) ** 2)
    assert float(losses.silog(pred, target, 0.5)) == pytest.approx(expected, rel=1e-5)
    # log(2) and -log(4): mean(d^2) = (ln2^2 + 4 ln2^2)/3, mean(d) = -ln2/3
    l2 = math.log(2)
    assert expected == pytest.approx(math.sqrt(5 * l2 ** 2 / 3 - 0.5 * (l2 / 3) ** 2), rel=1e-5)
    assert float(losses.silog(target, target)) == pytest.approx(0.0, abs=1e-3)


def test_cosine_loss_hand_value():
    pred = jnp.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    target = jnp.array([[1.0, 0.0], [1.0, 0.0], [0.0, -1.0]])
    # cosines 1, 1/sqrt(2), -1 -> mean(1 - cos) = (0 + (1 - 0.70711) + 2) / 3
    assert float(losses.cosine_loss(pred, target)) == pytest.approx((1 - 1 / math.sqrt(2) + 2) / 3, rel=1e-6)


def test_action_mse():
    assert float(losses.mse(jnp.array([1.0, 3.0]), jnp.array([0.0, 0.0]))) == pytest.approx(5.0)


def test_patchify_order_and_patch_normalisation():
    img = jnp.arange(4 * 4 * 3, dtype=jnp.float32).reshape(1, 4, 4, 3)
    p = losses.patchify(img, 2)
    assert p.shape == (1, 4, 12)
    # patch (row 0, col 1): pixels (0,2), (0,3), (1,2), (1,3), channels innermost
    expected = np.concatenate([np.asarray(img[0, r, c]) for r in (0, 1) for c in (2, 3)])
    np.testing.assert_array_equal(p[0, 1], expected)
    n = losses.normalize_patches(p)
    x = np.asarray(p[0, 1])
    np.testing.assert_allclose(n[0, 1], (x - x.mean()) / np.sqrt(x.var(ddof=1) + 1e-6), rtol=1e-5)


def test_pool_grid_averages_blocks_and_checks_divisibility():
    x = np.arange(2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3)     # [N, h, w, C]
    pooled = losses.pool_grid(x, (2, 2))
    assert pooled.shape == (2, 2, 2, 3)
    # top-right 2x2 block of example 1, channel 2: rows 0-1, cols 2-3
    assert pooled[1, 0, 1, 2] == pytest.approx(x[1, 0:2, 2:4, 2].mean())
    np.testing.assert_allclose(np.asarray(losses.pool_grid(jnp.asarray(x), (2, 2))), pooled, rtol=1e-6)
    assert losses.pool_grid(x, (4, 4)) is x
    with pytest.raises(ValueError, match='must divide'):
        losses.pool_grid(x, (3, 3))
