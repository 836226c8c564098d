"""Loss terms of DreamVLA (SPEC section 7). All reductions in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def masked_mse(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
    """``mean((mask * pred - mask * target)^2)`` over ALL elements (not over the mask count).

    pred, target ``[..., L, C]``; mask ``[..., L]`` (1 = dynamic patch). An all-zero mask gives 0.
    """
    m = mask[..., None].astype(jnp.float32)
    return jnp.mean(jnp.square(m * pred.astype(jnp.float32) - m * target.astype(jnp.float32)))


def silog(pred: jax.Array, target: jax.Array, lam: float = 0.5, eps: float = 1e-6) -> jax.Array:
    """Scale-invariant log loss ``sqrt(mean(d^2) - lam * mean(d)^2)``, ``d = log(y+eps) - log(p+eps)``,
    over the whole tensor."""
    d = jnp.log(target.astype(jnp.float32) + eps) - jnp.log(pred.astype(jnp.float32) + eps)
    return jnp.sqrt(jnp.maximum(jnp.mean(d * d) - lam * jnp.mean(d) ** 2, 0.0))


def cosine_loss(pred: jax.Array, target: jax.Array, eps: float = 1e-8) -> jax.Array:
    """``mean(1 - cos(pred, target))`` over the channel (last) dimension, per position."""
    p, y = pred.astype(jnp.float32), target.astype(jnp.float32)
    denom = (jnp.maximum(jnp.linalg.norm(p, axis=-1), eps) * jnp.maximum(jnp.linalg.norm(y, axis=-1), eps))
    return jnp.mean(1.0 - jnp.sum(p * y, axis=-1) / denom)


def pool_grid(features, grid):
    """Average-pools feature maps ``[..., h, w, C]`` to ``grid`` = (rows, cols), which must divide (h, w).

    Lets a feature dream head decode a coarser grid than the teacher's (the tabletop preset decodes SAM's
    16x16 map at 8x8). Array methods only: serves jax and numpy arrays alike. Identity when equal.
    """
    *lead, h, w, c = features.shape
    rows, cols = grid
    if (h, w) == (rows, cols):
        return features
    if h % rows or w % cols:
        raise ValueError(f"a dream head's mask_grid {tuple(grid)} must divide the teacher grid {(h, w)}")
    x = features.reshape(*lead, rows, h // rows, cols, w // cols, c)
    return x.mean(axis=(-4, -2))


def mse(pred: jax.Array, target: jax.Array) -> jax.Array:
    return jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)))


def patchify(images, patch: int):
    """``[N, H, W, C]`` -> ``[N, (H/p)*(W/p), p*p*C]``: patches row-major, (row, col, channel) inside.

    Array methods only, so it serves jax and numpy arrays alike (the MAE patch embedding, the RGB/depth
    dream targets, offline metrics and media). A PyTorch conv weight ``[out, C, p, p]`` matches this
    layout after ``transpose(2, 3, 1, 0).reshape(-1, out)``.
    """
    n, h, w, c = images.shape
    if h % patch or w % patch:
        raise ValueError(f"image size {h}x{w} is not divisible by the patch size {patch}")
    x = images.reshape(n, h // patch, patch, w // patch, patch, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(n, (h // patch) * (w // patch), patch * patch * c)


def normalize_patches(patches, eps: float = 1e-6):
    """Per-patch zero mean / unit variance over the last axis (unbiased variance), as MAE's
    ``norm_pix_loss``. Array methods only (jax or numpy)."""
    x = patches.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True, ddof=1)
    return (x - mean) / (var + eps) ** 0.5
