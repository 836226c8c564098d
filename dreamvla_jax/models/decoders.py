"""Dream decoders: from the backbone's dream-query outputs to dense future knowledge.

For one modality (SPEC section 4): Linear -> split per camera -> append ``N_mask`` copies of a learned
mask token -> add a fixed 2-D sin-cos position table (query grid, then mask grid) -> transformer
blocks -> keep the mask tokens -> LayerNorm -> Linear head (+ activation). One decoder serves both
cameras (cameras are folded into the batch).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dreamvla_jax.models import layers


@functools.lru_cache(maxsize=None)
def position_table(width: int, query_grid: tuple, mask_grid: tuple, zeros: bool) -> np.ndarray:
    """Fixed ``[queries + n_mask, width]`` table: sin-cos of the query grid, then of the mask grid."""
    table = np.concatenate([layers.sincos_2d(width, *query_grid), layers.sincos_2d(width, *mask_grid)])
    return np.zeros_like(table) if zeros else table


class DreamDecoder(nnx.Module):
    def __init__(self, cfg, head, *, rngs: nnx.Rngs, official_zero_init: bool = False):
        """``cfg`` = ``config.model``, ``head`` = ``config.model.dream.<name>``.

        ``official_zero_init`` reproduces the official SAM decoder bug (position table and mask
        token both zeros, so it can only predict one spatially constant vector).
        """
        d = cfg.decoder
        dtype, param_dtype = layers.dtype_of(cfg.dtype), layers.dtype_of(cfg.param_dtype)
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.queries = head.queries_per_camera
        self.n_mask = int(np.prod(head.mask_grid))
        self.cameras = len(cfg.cameras)
        self.activation = head.activation
        self.dtype = dtype
        self.proj = layers.linear(cfg.hidden, d.width, **kw)
        init = (jnp.zeros if official_zero_init
                else lambda shape, dt: 0.02 * jax.random.normal(rngs.params(), shape, dt))
        self.mask_token = nnx.Param(init((1, 1, d.width), param_dtype))
        qr, qc = head.query_grid
        if qr * qc != self.queries:
            raise ValueError(f"dream head query_grid {tuple(head.query_grid)} does not hold "
                             f"{self.queries} queries per camera")
        self.pos_key = (d.width, (qr, qc), tuple(head.mask_grid), official_zero_init)
        self.blocks = layers.Stack(
            lambda r: layers.Block(d.width, d.heads, d.mlp, rngs=r, act='gelu', ln_eps=d.ln_eps,
                                   dtype=dtype, param_dtype=param_dtype,
                                   implementation=cfg.attention_impl),
            d.layers, rngs=rngs)
        self.norm = layers.layer_norm(d.width, d.ln_eps, **kw)
        self.head = layers.linear(d.width, head.out_dim, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[N, cameras * queries, hidden]`` -> ``[N, cameras, n_mask, out_dim]``."""
        n = x.shape[0]
        h = self.proj(x).reshape(n * self.cameras, self.queries, -1)
        mask = jnp.broadcast_to(self.mask_token[...].astype(h.dtype), (h.shape[0], self.n_mask, h.shape[-1]))
        h = jnp.concatenate([h, mask], axis=1) + jnp.asarray(position_table(*self.pos_key), h.dtype)
        h = self.blocks(h)[:, self.queries:]
        out = layers.ACTIVATIONS[self.activation](self.head(self.norm(h)))
        return out.reshape(n, self.cameras, self.n_mask, -1)
