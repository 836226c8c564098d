"""DiT-B diffusion action head, conditioned by tokens (no adaLN).

Sequence of ``2 * chunk`` tokens: the action-query outputs (``Linear hidden -> dit.hidden``) with the
diffusion-timestep embedding added, then the noisy actions (``Linear action_dim -> dit.hidden``);
a learned position table; full attention; pre-LN blocks without LayerNorm affine; final LN (no
affine) -> Linear to the action dimension; the last ``chunk`` tokens are the predicted noise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dreamvla_jax.models import layers


def timestep_features(t: jax.Array, dim: int, max_period: float) -> jax.Array:
    """DiT's sinusoidal features ``[cos | sin]`` of integer timesteps ``t`` ``[N]`` -> ``[N, dim]``."""
    half = dim // 2
    freqs = jnp.exp(-jnp.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class DiT(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs):
        """``cfg`` is ``config.model`` (reads ``dit``, ``action``, ``hidden``)."""
        c, a = cfg.dit, cfg.action
        dtype, param_dtype = layers.dtype_of(cfg.dtype), layers.dtype_of(cfg.param_dtype)
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.chunk, self.freq_dim, self.max_period = a.chunk, c.time_freq_dim, c.max_period
        self.cond_proj = layers.linear(cfg.hidden, c.hidden, **kw)
        self.t_fc1 = layers.linear(c.time_freq_dim, c.hidden, **kw)
        self.t_fc2 = layers.linear(c.hidden, c.hidden, **kw)
        self.x_embed = layers.linear(a.dim, c.hidden, **kw)
        self.pos_embed = nnx.Param(0.02 * jax.random.normal(rngs.params(), (2 * a.chunk, c.hidden), param_dtype))
        # Learned "no condition" token for classifier-free guidance (replaces each condition token).
        self.uncondition = nnx.Param(0.02 * jax.random.normal(rngs.params(), (cfg.hidden,), param_dtype))
        self.blocks = layers.Stack(
            lambda r: layers.Block(c.hidden, c.heads, c.mlp, rngs=r, act='gelu_tanh', ln_eps=c.ln_eps,
                                   ln_affine=False, dtype=dtype, param_dtype=param_dtype,
                                   implementation=cfg.attention_impl),
            c.layers, rngs=rngs, remat=c.remat)
        self.final_norm = layers.layer_norm(c.hidden, c.ln_eps, affine=False, **kw)
        self.final = layers.linear(c.hidden, a.dim, **kw)

    def __call__(self, x: jax.Array, t: jax.Array, cond: jax.Array) -> jax.Array:
        """x ``[N, chunk, action_dim]`` noisy actions, t ``[N]`` int, cond ``[N, chunk, hidden]``
        -> predicted noise ``[N, chunk, action_dim]``."""
        temb = self.t_fc2(jax.nn.silu(self.t_fc1(timestep_features(t, self.freq_dim, self.max_period))))
        c = self.cond_proj(cond) + temb[:, None]
        h = jnp.concatenate([c, self.x_embed(x)], axis=1) + self.pos_embed[...].astype(c.dtype)
        h = self.blocks(h)
        return self.final(self.final_norm(h))[:, self.chunk:]
