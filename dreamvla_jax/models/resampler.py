"""Perceiver resampler (Flamingo style) shared by both cameras.

Per layer: ``latents += attn(q = LN(latents), kv = [LN(media), LN(latents)])`` with bias-free
projections, then ``latents += FF(latents)`` (LN -> Linear -> exact GELU -> Linear, bias-free);
a final LayerNorm. Input is the 196 MAE patch tokens (not CLS); no position information is added.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dreamvla_jax.models import layers


class PerceiverLayer(nnx.Module):
    def __init__(self, width: int, heads: int, head_dim: int, mlp: int, ln_eps: float, *,
                 rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 implementation: str = 'xla'):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        inner = heads * head_dim
        self.heads, self.head_dim, self.implementation = heads, head_dim, implementation
        self.norm_media = layers.layer_norm(width, ln_eps, **kw)
        self.norm_latents = layers.layer_norm(width, ln_eps, **kw)
        self.to_q = layers.linear(width, inner, bias=False, **kw)
        self.to_kv = layers.linear(width, 2 * inner, bias=False, **kw)
        self.to_out = layers.linear(inner, width, bias=False, **kw)
        self.ff = layers.Mlp(width, mlp, 'gelu', bias=False, **kw)
        self.ff_norm = layers.layer_norm(width, ln_eps, **kw)

    def __call__(self, latents: jax.Array, media: jax.Array, rng=None) -> jax.Array:
        """latents ``[N, Q, D]``, media ``[N, M, D]`` -> ``[N, Q, D]``."""
        n, q_len, _ = latents.shape
        x = self.norm_media(media)
        lat = self.norm_latents(latents)
        q = self.to_q(lat).reshape(n, q_len, self.heads, self.head_dim)
        kv = self.to_kv(jnp.concatenate([x, lat], axis=1))
        k, v = jnp.split(kv.reshape(n, -1, 2, self.heads, self.head_dim), 2, axis=2)
        out = layers.attention(q, k[:, :, 0], v[:, :, 0], implementation=self.implementation)
        latents = latents + self.to_out(out.reshape(n, q_len, -1))
        return latents + self.ff(self.ff_norm(latents))


class PerceiverResampler(nnx.Module):
    """``[N, M, D]`` media tokens -> ``[N, latents, D]``."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        """``cfg`` is ``config.model``; the width is the vision encoder's."""
        r, width = cfg.resampler, cfg.vision.width
        dtype, param_dtype = layers.dtype_of(cfg.dtype), layers.dtype_of(cfg.param_dtype)
        self.latents = nnx.Param(jax.random.normal(rngs.params(), (r.latents, width), param_dtype))
        self.layers = layers.Stack(
            lambda rr: PerceiverLayer(width, r.heads, r.head_dim, r.mlp, r.ln_eps, rngs=rr, dtype=dtype,
                                      param_dtype=param_dtype, implementation=cfg.attention_impl),
            r.layers, rngs=rngs)
        self.norm = layers.layer_norm(width, r.ln_eps, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.dtype = dtype

    def __call__(self, media: jax.Array) -> jax.Array:
        latents = jnp.broadcast_to(self.latents[...].astype(self.dtype),
                                   (media.shape[0],) + self.latents[...].shape)
        return self.norm(self.layers(latents, media.astype(self.dtype)))
