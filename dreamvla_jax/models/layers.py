"""Building blocks shared by every model family: linears, attention, pre-LN blocks, layer stacks.

Conventions:
  * Linear kernels are stored ``[in, out]`` (PyTorch ``nn.Linear`` stores ``[out, in]``; the
    converters in ``dreamvla_jax.convert`` spell out the transposes).
  * Fused ``qkv`` projections order their outputs ``[q | k | v]``, each ``[heads, head_dim]``
    (timm's ``qkv`` and GPT-2's ``c_attn`` use the same order).
  * Randomness for dropout is passed explicitly as ``rng`` (``None`` = deterministic), so compiled
    functions stay pure and the scanned layer stacks get one key per layer.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),
    'gelu_tanh': lambda x: jax.nn.gelu(x, approximate=True),
    'quick_gelu': lambda x: x * jax.nn.sigmoid(1.702 * x),
    'relu': jax.nn.relu,
    'none': lambda x: x,
}

REMAT_POLICIES = {
    'full': None,  # save nothing: recompute the whole layer in the backward pass
    'dots_saveable': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    'nothing_saveable': jax.checkpoint_policies.nothing_saveable,
}


def dtype_of(name: str):
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}") from None


def linear(din: int, dout: int, *, rngs: nnx.Rngs, bias: bool = True, dtype=jnp.float32,
           param_dtype=jnp.float32, init: str = 'xavier') -> nnx.Linear:
    """``nn.Linear`` with the official init: xavier-uniform weight, zero bias (``init='normal'``:
    N(0, 0.02), the HF GPT-2 / CLIP default)."""
    kernel_init = (nnx.initializers.xavier_uniform() if init == 'xavier'
                   else nnx.initializers.normal(0.02))
    return nnx.Linear(din, dout, use_bias=bias, kernel_init=kernel_init,
                      bias_init=nnx.initializers.zeros_init(), dtype=dtype,
                      param_dtype=param_dtype, rngs=rngs)


def layer_norm(dim: int, eps: float, *, rngs: nnx.Rngs, affine: bool = True, dtype=jnp.float32,
               param_dtype=jnp.float32) -> nnx.LayerNorm:
    return nnx.LayerNorm(dim, epsilon=eps, use_bias=affine, use_scale=affine, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Inverted dropout; the identity when ``rng`` is None or ``rate`` is 0."""
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def split_rng(rng: jax.Array | None, n: int):
    return (None,) * n if rng is None else tuple(jax.random.split(rng, n))


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None, *,
              dropout_rate: float = 0.0, rng: jax.Array | None = None,
              implementation: str | None = None) -> jax.Array:
    """Scaled dot-product attention.

    Args:
      q: ``[B, Tq, H, D]``; k, v: ``[B, Tk, H, D]``.
      mask: boolean, broadcastable to ``[B, H, Tq, Tk]`` (True = may attend), or None.
      dropout_rate, rng: dropout on the attention probabilities (training only). With dropout the
        probabilities must be materialised, so that path is explicit; otherwise
        ``jax.nn.dot_product_attention``.
      implementation: None/'xla', or 'cudnn' (cuDNN flash attention on an NVIDIA GPU) for bf16/fp16
        inputs; cuDNN takes no fp32, so fp32 attention (e.g. a module kept in fp32) stays on XLA's.
    Returns:
      ``[B, Tq, H, D]``.
    """
    if rng is None or dropout_rate == 0.0:
        if mask is not None:
            mask = jnp.broadcast_to(mask, (q.shape[0], q.shape[2], q.shape[1], k.shape[1]))
        impl = None if implementation in (None, 'xla') else implementation
        if impl == 'cudnn' and q.dtype not in (jnp.bfloat16, jnp.float16):
            impl = None
        if impl == 'cudnn' and (q.shape[1] % 2 or k.shape[1] % 2):
            # JAX 0.10-0.11 pass cuDNN an empty bias even without a mask, so its "even lengths with a bias"
            # rule refuses every odd-length attention under a gradient: pad to even lengths.
            tq = q.shape[1]
            if mask is None:
                mask = jnp.ones((q.shape[0], q.shape[2], q.shape[1], k.shape[1]), bool)
            q, k, v, mask = pad_to_even(q, k, v, mask)
            return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)[:, :tq]
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)
    scale = 1.0 / np.sqrt(q.shape[-1])
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    probs = dropout(probs, dropout_rate, rng)
    return jnp.einsum('bhqk,bkhd->bqhd', probs, v)


def pad_to_even(q, k, v, mask):
    """Pads odd query/key lengths by one (cuDNN's attention needs even lengths when training): the
    padded key is masked out for every query; the padded query attends to every real key, and its output is
    sliced off by the caller. ``mask`` is ``[B, H, Tq, Tk]``."""
    pq, pk = q.shape[1] % 2, k.shape[1] % 2
    pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n), (0, 0), (0, 0)))
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, 0), (0, pk)), constant_values=False)
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pq), (0, 0)), constant_values=True)
    if pk:
        mask = mask.at[:, :, :, -1].set(False)
    return pad(q, pq), pad(k, pk), pad(v, pk), mask


class FusedAttention(nnx.Module):
    """Multi-head self-attention with a fused ``qkv`` projection and an output projection."""

    def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs, qkv_bias: bool = True,
                 dropout: float = 0.0, init: str = 'xavier', dtype=jnp.float32,
                 param_dtype=jnp.float32, implementation: str = 'xla'):
        if width % heads:
            raise ValueError(f"attention width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.dropout_rate = dropout
        self.implementation = implementation
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, init=init)
        self.qkv = linear(width, 3 * width, bias=qkv_bias, **kw)
        self.proj = linear(width, width, **kw)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None,
                 rng: jax.Array | None = None) -> jax.Array:
        b, t, w = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, w // self.heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        out = attention(q, k, v, mask, dropout_rate=self.dropout_rate, rng=rng,
                        implementation=self.implementation)
        return self.proj(out.reshape(b, t, w))

    def cached(self, x: jax.Array, k_cache: jax.Array, v_cache: jax.Array, write_at: jax.Array,
               n_write: int, mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Attention of new tokens over a key/value cache (inference only, no dropout).

        Args:
          x: ``[B, n, W]`` new tokens; the keys/values of the first ``n_write`` are written into the
            cache at position ``write_at[b]`` of each example, the rest are appended after the cache.
          k_cache, v_cache: ``[B, Tc, H, D]``.
          mask: boolean, broadcastable to ``[B, H, n, Tc + n - n_write]``.
        Returns:
          ``(out [B, n, W], k_cache, v_cache)`` with the new entries written.
        """
        b, t, w = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, w // self.heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        put = jax.vmap(lambda c, new, i: jax.lax.dynamic_update_slice_in_dim(c, new, i, axis=0))
        k_cache = put(k_cache, k[:, :n_write].astype(k_cache.dtype), write_at)
        v_cache = put(v_cache, v[:, :n_write].astype(v_cache.dtype), write_at)
        keys = jnp.concatenate([k_cache.astype(k.dtype), k[:, n_write:]], axis=1)
        values = jnp.concatenate([v_cache.astype(v.dtype), v[:, n_write:]], axis=1)
        out = attention(q, keys, values, mask, implementation=self.implementation)
        return self.proj(out.reshape(b, t, w)), k_cache, v_cache


class Mlp(nnx.Module):
    def __init__(self, width: int, hidden: int, act: str, *, rngs: nnx.Rngs, bias: bool = True,
                 init: str = 'xavier', dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, init=init, bias=bias)
        self.fc1 = linear(width, hidden, **kw)
        self.fc2 = linear(hidden, width, **kw)
        self.act = act

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(ACTIVATIONS[self.act](self.fc1(x)))


class Block(nnx.Module):
    """Pre-LN transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``.

    One class serves CLIP text, MAE, GPT-2, the dream decoders and the DiT; they differ only in
    activation, LayerNorm affinity/eps, init and dropout.
    """

    def __init__(self, width: int, heads: int, mlp: int, *, rngs: nnx.Rngs, act: str = 'gelu',
                 ln_eps: float = 1e-5, ln_affine: bool = True, qkv_bias: bool = True,
                 dropout: float = 0.0, attn_dropout: float | None = None, init: str = 'xavier',
                 dtype=jnp.float32, param_dtype=jnp.float32, implementation: str = 'xla'):
        """``dropout`` applies to both residual branches; ``attn_dropout`` (default: ``dropout``) to
        the attention probabilities, which forces the explicit (non-fused) attention path in training."""
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.ln1 = layer_norm(width, ln_eps, affine=ln_affine, **kw)
        self.attn = FusedAttention(width, heads, qkv_bias=qkv_bias,
                                   dropout=dropout if attn_dropout is None else attn_dropout, init=init,
                                   implementation=implementation, **kw)
        self.ln2 = layer_norm(width, ln_eps, affine=ln_affine, **kw)
        self.mlp = Mlp(width, mlp, act, init=init, **kw)
        self.dropout_rate = dropout

    def __call__(self, x: jax.Array, mask: jax.Array | None = None,
                 rng: jax.Array | None = None) -> jax.Array:
        r_attn, r_res1, r_res2 = split_rng(rng, 3)
        x = x + dropout(self.attn(self.ln1(x), mask, r_attn), self.dropout_rate, r_res1)
        return x + dropout(self.mlp(self.ln2(x)), self.dropout_rate, r_res2)

    def cached(self, x, k_cache, v_cache, write_at, n_write, mask):
        """The block on new tokens with a key/value cache (see ``FusedAttention.cached``)."""
        a, k_cache, v_cache = self.attn.cached(self.ln1(x), k_cache, v_cache, write_at, n_write, mask)
        x = x + a
        return x + self.mlp(self.ln2(x)), k_cache, v_cache


_UNROLL = contextvars.ContextVar('dreamvla_unroll_layers', default=False)


@contextlib.contextmanager
def unrolled_layers(on: bool = True):
    """Within this context (at trace time), layer stacks unroll their ``lax.scan`` (``config.model.unroll_layers``,
    set by the train step): each layer's activations are written where they are computed instead of copied into
    the scan's stacked buffers (measured on an H100 at full size: 37 ms of a 213 ms step went to those copies),
    at the price of a compile time that grows with depth."""
    token = _UNROLL.set(bool(on))
    try:
        yield
    finally:
        _UNROLL.reset(token)


def _unroll_scans() -> bool:
    """Unroll the layer scans inside ``unrolled_layers`` and on a multi-device CPU backend (fake devices);
    keep ``lax.scan`` elsewhere.

    XLA:CPU runs each device's program with a concurrent thunk executor that does not order a collective
    inside a while loop (a sharded layer's all-gather) against one outside it, so two devices can wait in
    different collectives forever (seen: 7 fake devices in an all-to-all, 1 in the scan's all-gather, on a
    loaded 2-core machine). Without a while loop every collective is ordered. GPUs and TPUs, and CPU
    programs outside a multi-device mesh (``jax.set_mesh``, as training and the benchmarks use), keep the
    scan, whose compile time does not grow with depth.
    """
    return _UNROLL.get() or (jax.default_backend() == 'cpu' and jax.sharding.get_abstract_mesh().size > 1)


class Stack(nnx.Module):
    """``num_layers`` identical layers created with ``nnx.vmap`` and applied with ``lax.scan`` (unrolled
    inside a multi-device CPU mesh, see ``_unroll_scans``).

    Parameters carry a leading layer axis, so init and compile time do not grow with depth.
    ``remat`` names a rematerialisation policy for each layer ('none', 'full', 'dots_saveable').
    """

    def __init__(self, make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int, *,
                 rngs: nnx.Rngs, remat: str = 'none'):
        @nnx.split_rngs(splits=num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(r: nnx.Rngs):
            return make_layer(r)

        self.layers = create(rngs)
        self.num_layers = num_layers
        if remat != 'none' and remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {remat!r}; use none or one of {sorted(REMAT_POLICIES)}")
        self.remat = remat

    def _scan(self, step, x: jax.Array, xs: tuple, *, remat: bool = False):
        """``lax.scan`` of ``step(layer, h, *per_layer) -> (h, out)`` over the stacked layers and ``xs``
        (each with a leading layer axis); ``remat`` applies the stack's rematerialisation policy."""
        graphdef, state = nnx.split(self.layers)

        def body(h, per_layer):
            layer_state, *rest = per_layer
            return step(nnx.merge(graphdef, layer_state), h, *rest)

        if remat and self.remat != 'none':
            body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
        return jax.lax.scan(body, x, (state, *xs), unroll=_unroll_scans())

    def __call__(self, x: jax.Array, *args, rng: jax.Array | None = None) -> jax.Array:
        """Applies ``layer(x, *args, rng=key)`` for each layer in turn (one dropout key per layer)."""
        keys = None if rng is None else jax.random.split(rng, self.num_layers)
        x, _ = self._scan(lambda layer, h, key: (layer(h, *args, rng=key), None), x, (keys,), remat=True)
        return x

    def cached(self, x: jax.Array, k_cache: jax.Array, v_cache: jax.Array, *args):
        """``layer.cached(x, k, v, *args)`` for each layer; caches carry the layer axis ``[L, B, Tc, H, D]``.
        Returns ``(x, k_cache, v_cache)``."""
        def step(layer, h, kc, vc):
            h, kc, vc = layer.cached(h, kc, vc, *args)
            return h, (kc, vc)

        x, (k_cache, v_cache) = self._scan(step, x, (k_cache, v_cache))
        return x, k_cache, v_cache


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """MAE's 1-D sin-cos embedding: ``[sin(pos * w) | cos(pos * w)]``, ``w_i = 1 / 10000^(2i/dim)``."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding width {dim} must be even")
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.outer(pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, rows: int, cols: int) -> np.ndarray:
    """MAE's fixed 2-D sin-cos table ``[rows * cols, dim]`` (row-major): the first half of the
    channels encodes the column index, the second half the row index (as MAE's meshgrid does)."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding width {dim} must be divisible by 4")
    col, row = np.meshgrid(np.arange(cols, dtype=np.float64), np.arange(rows, dtype=np.float64))
    return np.concatenate([sincos_1d(dim // 2, col), sincos_1d(dim // 2, row)], axis=1).astype(np.float32)
