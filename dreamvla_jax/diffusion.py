"""Diffusion for the action head: beta schedules, noising, DDIM sampling, classifier-free guidance.

Conventions follow diffusers' DDPM/DDIM schedulers as used by the official code: ``T`` training
steps, epsilon prediction, DDIM "leading" timestep spacing (``0, T/n, ..., T - T/n``), eta 0, the
final step going to alpha_bar = 1 (``set_alpha_to_one``), no clipping of the predicted sample.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def betas(schedule: str, steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """``[steps]`` float64 betas for 'linear' or 'squaredcos_cap_v2'."""
    if schedule == 'linear':
        return np.linspace(beta_start, beta_end, steps, dtype=np.float64)
    if schedule == 'squaredcos_cap_v2':
        def alpha_bar(s):
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.array([min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999)
                         for i in range(steps)], dtype=np.float64)
    raise ValueError(f"config.diffusion.schedule: unknown schedule {schedule!r}; "
                     "use 'linear' or 'squaredcos_cap_v2'")


def alphas_cumprod(cfg) -> np.ndarray:
    """``[T]`` alpha_bar of ``config.diffusion``."""
    return np.cumprod(1.0 - betas(cfg.schedule, cfg.train_steps, cfg.beta_start, cfg.beta_end))


def add_noise(x0: jax.Array, noise: jax.Array, t: jax.Array, abar: np.ndarray) -> jax.Array:
    """``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` with per-sample ``t`` ``[N]``."""
    a = jnp.asarray(abar, jnp.float32)[t].reshape((-1,) + (1,) * (x0.ndim - 1))
    return jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * noise


def training_example(rng: jax.Array, x0: jax.Array, cfg) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The repeated-noise training target.

    Each sample of ``x0`` ``[N, ...]`` is repeated ``cfg.repeats`` times (sample-major), each copy
    with independent noise and timestep ``t ~ U{0..T-1}``. Returns ``(noisy, noise, t)`` with leading
    dimension ``N * repeats``; the loss is ``mean((eps_hat - noise)^2)``.
    """
    x = jnp.repeat(x0, cfg.repeats, axis=0)
    k_noise, k_t = jax.random.split(rng)
    noise = jax.random.normal(k_noise, x.shape, x.dtype)
    t = jax.random.randint(k_t, (x.shape[0],), 0, cfg.train_steps)
    return add_noise(x, noise, t, alphas_cumprod(cfg)), noise, t


def ddim_timesteps(train_steps: int, sample_steps: int) -> np.ndarray:
    """Descending DDIM timesteps, e.g. 100/10 -> ``[90, 80, ..., 0]``."""
    if not 1 <= sample_steps <= train_steps:
        raise ValueError(f"config.diffusion.sample_steps must be in [1, {train_steps}], got {sample_steps}")
    stride = train_steps // sample_steps
    return (np.arange(sample_steps) * stride)[::-1].astype(np.int32)


def ddim_sample(eps_fn: Callable[[jax.Array, jax.Array], jax.Array], x_T: jax.Array, cfg,
                sample_steps: int | None = None) -> jax.Array:
    """Deterministic DDIM (eta 0) from ``x_T`` with ``eps_fn(x_t, t[N]) -> eps``, one ``lax.scan``."""
    steps = sample_steps or cfg.sample_steps
    ts = ddim_timesteps(cfg.train_steps, steps)
    abar = alphas_cumprod(cfg)
    stride = cfg.train_steps // steps
    prev = ts - stride
    a_t = abar[ts]
    a_prev = np.where(prev >= 0, abar[np.maximum(prev, 0)], 1.0)

    def step(x, xs):
        t, at, ap = xs
        eps = eps_fn(x, jnp.full((x.shape[0],), t, jnp.int32)).astype(jnp.float32)
        x0 = (x - jnp.sqrt(1.0 - at) * eps) / jnp.sqrt(at)
        return jnp.sqrt(ap) * x0 + jnp.sqrt(1.0 - ap) * eps, None

    xs = (jnp.asarray(ts), jnp.asarray(a_t, jnp.float32), jnp.asarray(a_prev, jnp.float32))
    x, _ = jax.lax.scan(step, x_T.astype(jnp.float32), xs)
    return x


def guided(eps_cond_uncond: Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]],
           scale: float) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """Classifier-free guidance: ``eps = eps_u + scale * (eps_c - eps_u)``."""
    def eps_fn(x, t):
        eps_c, eps_u = eps_cond_uncond(x, t)
        return eps_u + scale * (eps_c - eps_u)
    return eps_fn
