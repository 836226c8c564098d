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
        self.stem = cfg.get('stem', 'patch')
        if self.stem == 'patch':
            self.patch_embed = layers.linear(cfg.patch * cfg.patch * 3, cfg.width, rngs=rngs, dtype=dtype,
                                             param_dtype=param_dtype)
        elif self.stem == 'conv':
            self.conv_stem = ConvStem(cfg.patch, cfg.width, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        else:
            raise ValueError(f"model.vision.stem must be 'patch' or 'conv', got {self.stem!r}")
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
        if self.stem == 'patch':
            x = self.patch_embed(patchify(images.astype(self.dtype), self.patch))
        else:
            x = self.conv_stem(images.astype(self.dtype)).reshape(n, self.grid * self.grid, self.width)
        x = x + pos
        cls = jnp.broadcast_to(self.cls_token[...].astype(self.dtype), (n, 1, self.width))
        x = jnp.concatenate([cls, x], axis=1)
        return self.norm(self.blocks(x))


class ConvStem(nnx.Module):
    """A convolutional stem in place of the patch embedding (Xiao et al. 2021, "Early convolutions help
    transformers see better"): log2(patch) 3x3 stride-2 convolutions with GELU, channels doubling up to
    ``width``, then a 1x1 projection, giving the same ``grid x grid`` token layout. Optional
    (``model.vision.stem = 'conv'``) for towers trained from scratch on little data (the tabletop preset);
    pretrained MAE weights need the default ``'patch'``."""

    def __init__(self, patch: int, width: int, *, rngs: nnx.Rngs, dtype, param_dtype):
        stages = patch.bit_length() - 1
        if patch != 2 ** stages:
            raise ValueError(f"model.vision.stem='conv' needs a power-of-two patch, got {patch}")
        chans = [max(width // 2 ** (stages - i), 8) for i in range(1, stages + 1)]
        self.convs = nnx.List([
            nnx.Conv(c_in, c_out, (3, 3), strides=(2, 2), padding='SAME', rngs=rngs, dtype=dtype,
                     param_dtype=param_dtype)
            for c_in, c_out in zip([3] + chans[:-1], chans, strict=True)])
        self.proj = layers.linear(chans[-1], width, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, images: jax.Array) -> jax.Array:
        """``[N, H, W, 3]`` -> ``[N, H / patch, W / patch, width]``."""
        x = images
        for conv in self.convs:
            x = jax.nn.gelu(conv(x), approximate=False)
        return self.proj(x)
