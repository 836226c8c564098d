"""MAE ViT-B/16 image encoder (frozen, bf16 by default; SPEC section 2).

Pre-LN ViT with exact GELU, qkv bias, a CLS token and MAE's fixed 2-D sin-cos position table (computed,
not a parameter; the CLS slot gets zeros). No masking and no patch shuffle: every patch is encoded in
raster order. Parameter layout: ``patch_embed.kernel [p*p*3, W]`` (see ``patchify`` for the flatten
order), ``cls_token [1, 1, W]``, ``blocks.layers.{ln1, attn.qkv, attn.proj, ln2, mlp.fc1, mlp.fc2}``,
``norm``. The converter ``dreamvla_jax.convert.mae`` maps HF ``ViTMAEModel`` files onto it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dreamvla_jax.losses import patchify  # noqa: F401 - the patch layout, re-exported for converters
from dreamvla_jax.models import layers


class MAEViT(nnx.Module):
    """``[N, H, W, 3]`` normalised images -> ``[N, 1 + P, width]`` tokens after the final LN (CLS first)."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        """``cfg`` is ``config.model.vision`` (image_size, patch, width, layers, heads, mlp, ln_eps,
        dtype, param_dtype). Init follows MAE (xavier-uniform linears, N(0, 0.02) CLS); it is replaced
        by pretrained weights."""
        dtype, param_dtype = layers.dtype_of(cfg.dtype), layers.dtype_of(cfg.param_dtype)
        if cfg.image_size % cfg.patch:
            raise ValueError(f"image_size {cfg.image_size} is not divisible by patch {cfg.patch}")
        self.image_size, self.patch, self.width = cfg.image_size, cfg.patch, cfg.width
        self.grid = cfg.image_size // cfg.patch
        self.dtype = dtype
        self.patch_embed = layers.linear(cfg.patch * cfg.patch * 3, cfg.width, rngs=rngs, dtype=dtype,
                                         param_dtype=param_dtype)
        self.cls_token = nnx.Param(
            nnx.initializers.normal(0.02)(rngs.params(), (1, 1, cfg.width), param_dtype))

        def make_block(r):
            return layers.Block(cfg.width, cfg.heads, cfg.mlp, rngs=r, act='gelu', ln_eps=cfg.ln_eps,
                                qkv_bias=True, dtype=dtype, param_dtype=param_dtype)

        self.blocks = layers.Stack(make_block, cfg.layers, rngs=rngs)
        self.norm = layers.layer_norm(cfg.width, cfg.ln_eps, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, images: jax.Array) -> jax.Array:
        """Args:
          images: ``float [N, image_size, image_size, 3]``, already normalised (CLIP mean/std).
        Returns:
          ``[N, 1 + grid**2, width]`` in the compute dtype: CLS, then the patches in raster order.
        """
        n, h, w, _ = images.shape
        if (h, w) != (self.image_size, self.image_size):
            raise ValueError(f"MAEViT expects {self.image_size}x{self.image_size} images, got {h}x{w}")
        # A trace-time constant: the fixed table is not a parameter (SPEC section 10 excludes it).
        pos = jnp.asarray(layers.sincos_2d(self.width, self.grid, self.grid), self.dtype)
        x = self.patch_embed(patchify(images.astype(self.dtype), self.patch)) + pos
        cls = jnp.broadcast_to(self.cls_token[...].astype(self.dtype), (n, 1, self.width))
        x = jnp.concatenate([cls, x], axis=1)
        return self.norm(self.blocks(x))
