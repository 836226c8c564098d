"""GPT-2 (Medium) transformer blocks without token or position tables.

The backbone receives embeddings (the DreamVLA token sequence) and an explicit block attention mask
(SPEC section 3); GPT-2's own causal mask is not applied. Parameter layout per block (stacked on a
leading layer axis): ``ln1``, ``attn.qkv`` (= HF ``c_attn``, already ``[in, out]`` in HF's Conv1D),
``attn.proj`` (``c_proj``), ``ln2``, ``mlp.fc1`` (``mlp.c_fc``), ``mlp.fc2`` (``mlp.c_proj``); then
``ln_f``.
"""

from __future__ import annotations

import jax
from flax import nnx

from dreamvla_jax.models import layers


class GPT2Blocks(nnx.Module):
    """``[B, T, D]`` embeddings + ``[T, T]`` boolean mask -> ``[B, T, D]`` after ``ln_f``."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        """``cfg`` is ``config.model`` (reads ``hidden``, ``backbone``, ``dtype``, ``param_dtype``)."""
        b = cfg.backbone
        dtype, param_dtype = layers.dtype_of(cfg.dtype), layers.dtype_of(cfg.param_dtype)

        def make_block(r):
            return layers.Block(cfg.hidden, b.heads, b.mlp, rngs=r, act='gelu_tanh', ln_eps=b.ln_eps,
                                dropout=b.dropout, attn_dropout=b.attn_dropout, init='normal', dtype=dtype,
                                param_dtype=param_dtype,
                                implementation=cfg.attention_impl)

        self.blocks = layers.Stack(make_block, b.layers, rngs=rngs, remat=b.remat)
        self.ln_f = layers.layer_norm(cfg.hidden, b.ln_eps, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None,
                 rng: jax.Array | None = None) -> jax.Array:
        return self.ln_f(self.blocks(x, mask, rng=rng))

    def cached(self, x: jax.Array, mask: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
               write_at: jax.Array, n_write: int):
        """Inference on new tokens over cached keys/values of earlier ones (see ``layers.Stack.cached``).
        Returns ``(hidden after ln_f, k_cache, v_cache)``."""
        x, k_cache, v_cache = self.blocks.cached(x, k_cache, v_cache, write_at, n_write, mask)
        return self.ln_f(x), k_cache, v_cache
