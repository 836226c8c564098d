"""Schedules, the training target and the DDIM sampler against closed forms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config

from dreamvla_jax import diffusion


def test_squaredcos_cap_v2_matches_closed_form():
    b = diffusion.betas('squaredcos_cap_v2', 100)
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    for i in (0, 1, 50, 98, 99):
        assert b[i] == pytest.approx(min(1 - f((i + 1) / 100) / f(i / 100), 0.999), rel=1e-12)
    assert b[-1] == 0.999  # the cap is active at the last step
    np.testing.assert_allclose(np.cumprod(1 - b)[:3], [f(1 / 100) / f(0), f(2 / 100) / f(0), f(3 / 100) / f(0)],
                               rtol=1e-10)


def test_linear_schedule_and_bad_name():
    np.testing.assert_allclose(diffusion.betas('linear', 5, 0.1, 0.5), [0.1, 0.2, 0.3, 0.4, 0.5])
    with pytest.raises(ValueError, match='config.diffusion.schedule'):
        diffusion.betas('cosine', 10)


def test_ddim_timesteps_leading_spacing():
    np.testing.assert_array_equal(diffusion.ddim_timesteps(100, 10), [90, 80, 70, 60, 50, 40, 30, 20, 10, 0])
    np.testing.assert_array_equal(diffusion.ddim_timesteps(100, 4), [75, 50, 25, 0])


def test_training_example_noise_target_is_the_closed_form():
    cfg = load_config('default').diffusion
    x0 = jnp.arange(2 * 3 * 7, dtype=jnp.float32).reshape(2, 3, 7) / 40.0
    noisy, noise, t = diffusion.training_example(jax.random.key(3), x0, cfg)
    assert noisy.shape == (16, 3, 7) and t.shape == (16,)
    abar = diffusion.alphas_cumprod(cfg)
    rep = np.repeat(np.asarray(x0), 8, axis=0)  # sample-major repetition
    expected = np.sqrt(abar[t])[:, None, None] * rep + np.sqrt(1 - abar[t])[:, None, None] * np.asarray(noise)
    np.testing.assert_allclose(noisy, expected, rtol=1e-5, atol=1e-6)
    # Independent noise and timesteps per repeat.
    assert len(set(np.asarray(t).tolist())) > 4
    assert not np.allclose(noise[0], noise[1])


@pytest.mark.parametrize('schedule', ['squaredcos_cap_v2', 'linear'])
def test_ddim_with_exact_eps_reproduces_a_gaussian(schedule):
    """For x0 ~ N(mu, sigma^2), E[eps | x_t] is linear in x_t; DDIM from the matching x_T must
    reproduce mu and sigma (4096 samples, within 2%)."""
    cfg = load_config('default').diffusion
    cfg.schedule = schedule
    abar = diffusion.alphas_cumprod(cfg)
    mu, sigma, steps = 0.7, 0.5, 100

    def eps_fn(x, t):
        a = jnp.asarray(abar, jnp.float32)[t][:, None]
        return jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * mu) / (a * sigma ** 2 + 1 - a)

    z = np.random.RandomState(0).randn(4096, 1)
    z = (z - z.mean()) / z.std()  # exact moments: the test measures the sampler, not Monte Carlo noise
    a_T = abar[diffusion.ddim_timesteps(cfg.train_steps, steps)[0]]
    x_T = np.sqrt(a_T) * mu + np.sqrt(a_T * sigma ** 2 + 1 - a_T) * z
    x = np.asarray(jax.jit(lambda x: diffusion.ddim_sample(eps_fn, x, cfg, steps))(x_T))
    assert abs(x.mean() - mu) < 0.02 * mu
    assert abs(x.std() - sigma) < 0.02 * sigma


def test_guidance_combines_conditional_and_unconditional():
    fn = diffusion.guided(lambda x, t: (x + 1.0, x - 1.0), 1.5)
    np.testing.assert_allclose(fn(jnp.zeros(3), None), -1.0 + 1.5 * 2.0)
