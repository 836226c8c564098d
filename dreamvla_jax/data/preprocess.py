"""Image preprocessing shared by training and the policy, run on the accelerator (JAX).

Raw frames travel host -> device as uint8 at the dataset's resolution (4x fewer bytes than float
224 images); here they are resized to the model's image size (bicubic for RGB, nearest for depth),
optionally augmented with the official random shift (replicate-pad, integer shift per frame, crop)
and normalised with CLIP's mean/std. The policy calls the same ``preprocess`` with ``rng=None``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

CAMERAS = ('static', 'gripper')


def resize_rgb(images: jax.Array, size: int) -> jax.Array:
    """uint8 ``[..., H, W, 3]`` -> float32 in [0, 1] ``[..., size, size, 3]`` (bicubic)."""
    x = images.astype(jnp.float32) / 255.0
    if x.shape[-3:-1] != (size, size):
        x = jax.image.resize(x, x.shape[:-3] + (size, size, x.shape[-1]), method='bicubic')
    return jnp.clip(x, 0.0, 1.0)


def resize_depth(depth: jax.Array, size: int) -> jax.Array:
    """``[..., H, W]`` -> ``[..., size, size]`` (nearest neighbour, metric values unchanged)."""
    if depth.shape[-2:] == (size, size):
        return depth.astype(jnp.float32)
    h, w = depth.shape[-2:]
    rows = jnp.floor(jnp.arange(size) * (h / size)).astype(jnp.int32)
    cols = jnp.floor(jnp.arange(size) * (w / size)).astype(jnp.int32)
    return depth.astype(jnp.float32)[..., rows[:, None], cols[None, :]]


def shift(x: jax.Array, offsets: jax.Array, pad: int) -> jax.Array:
    """Random-shift augmentation: replicate-pad by ``pad`` and crop at integer ``offsets``.

    x ``[N, H, W, C]``, offsets int ``[N, 2]`` in ``[0, 2 * pad]`` -> ``[N, H, W, C]``.
    """
    if pad == 0:
        return x
    h, w = x.shape[1:3]
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode='edge')
    crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, img.shape[-1]))
    return jax.vmap(crop)(padded, offsets)


def normalize(x: jax.Array, mean, std) -> jax.Array:
    return (x - jnp.asarray(mean, x.dtype)) / jnp.asarray(std, x.dtype)


def preprocess(batch: dict, config, rng: jax.Array | None = None) -> dict:
    """Returns a copy of ``batch`` with model-ready images.

    ``rgb_<cam>`` uint8 ``[B, W, H, W, 3]`` -> float32 ``[B, W, size, size, 3]`` (CLIP-normalised,
    shifted when ``rng`` is given and ``config.data.augment``); ``depth_<cam>`` ``[B, W, H, W]`` ->
    ``[B, W, size, size]`` shifted like its RGB frame (``config.data.align_depth_shift``; False
    reproduces the official independent shift). Other keys pass through.
    """
    size = config.model.vision.image_size
    d = config.data
    out = dict(batch)
    augment = rng is not None and d.augment
    keys = jax.random.split(rng, 2 * len(CAMERAS)) if augment else [None] * (2 * len(CAMERAS))
    for i, cam in enumerate(CAMERAS):
        pad = d.shift_static if cam == 'static' else d.shift_gripper
        rgb = resize_rgb(batch[f'rgb_{cam}'], size)
        lead = rgb.shape[:-3]
        depth = batch.get(f'depth_{cam}')
        if depth is not None:
            depth = resize_depth(depth, size)
        if augment and pad:
            n = rgb.size // (size * size * 3)
            offsets = jax.random.randint(keys[2 * i], (n, 2), 0, 2 * pad + 1)
            rgb = shift(rgb.reshape(n, size, size, 3), offsets, pad).reshape(rgb.shape)
            if depth is not None:
                if not d.align_depth_shift:
                    offsets = jax.random.randint(keys[2 * i + 1], (n, 2), 0, 2 * pad + 1)
                depth = shift(depth.reshape(n, size, size, 1), offsets, pad).reshape(lead + (size, size))
        out[f'rgb_{cam}'] = normalize(rgb, d.mean, d.std)
        if depth is not None:
            out[f'depth_{cam}'] = depth
    return out
