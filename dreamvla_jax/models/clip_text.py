"""CLIP ViT-B/32 text tower (frozen instruction encoder, SPEC section 2).

Causal pre-LN transformer with quick-GELU, a final LayerNorm, pooling at the end-of-text token and a
bias-free ``text_projection``. Parameter layout (layers stacked on a leading axis by ``layers.Stack``):
``token_embedding.embedding [V, W]``, ``position_embedding [C, W]``, ``blocks.layers.{ln1, attn.qkv,
attn.proj, ln2, mlp.fc1, mlp.fc2}``, ``ln_final``, ``text_projection.kernel [W, P]``. The converter
``dreamvla_jax.convert.clip`` maps HF ``CLIPModel`` / ``CLIPTextModelWithProjection`` files onto it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dreamvla_jax.models import layers


class CLIPText(nnx.Module):
    """``int32 [B, L]`` token ids (``L <= context``) -> pooled ``[B, proj_dim]`` and ``aux``."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        """``cfg`` is ``config.model.text`` (vocab_size, context, width, layers, heads, mlp, proj_dim,
        ln_eps, dtype). Init follows HF CLIP (N(0, 0.02)); it is replaced by pretrained weights."""
        dtype = layers.dtype_of(cfg.dtype)
        self.context = cfg.context
        self.token_embedding = nnx.Embed(cfg.vocab_size, cfg.width, dtype=dtype, param_dtype=dtype,
                                         embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.position_embedding = nnx.Param(
            nnx.initializers.normal(0.01)(rngs.params(), (cfg.context, cfg.width), dtype))

        def make_block(r):
            return layers.Block(cfg.width, cfg.heads, cfg.mlp, rngs=r, act='quick_gelu', ln_eps=cfg.ln_eps,
                                init='normal', dtype=dtype, param_dtype=dtype)

        self.blocks = layers.Stack(make_block, cfg.layers, rngs=rngs)
        self.ln_final = layers.layer_norm(cfg.width, cfg.ln_eps, rngs=rngs, dtype=dtype, param_dtype=dtype)
        self.text_projection = layers.linear(cfg.width, cfg.proj_dim, bias=False, init='normal', rngs=rngs,
                                             dtype=dtype, param_dtype=dtype)

    def __call__(self, tokens: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Args:
          tokens: ``int32 [B, L]``; the end-of-text token must be the largest id in each row (true for
            the CLIP BPE vocabulary, whose EOT is 49407), because pooling reads the argmax position.
        Returns:
          pooled ``[B, proj_dim]`` (EOT token after ``ln_final``, projected) and
          ``{'tokens': [B, L, width]}`` (every token after ``ln_final``).
        """
        b, length = tokens.shape
        if length > self.context:
            raise ValueError(f"CLIPText got {length} tokens; the context holds {self.context}")
        x = self.token_embedding(tokens) + self.position_embedding[...][:length]
        causal = jnp.tril(jnp.ones((length, length), dtype=bool))
        x = self.ln_final(self.blocks(x, causal))
        pooled = x[jnp.arange(b), jnp.argmax(tokens, axis=-1)]
        return self.text_projection(pooled), {'tokens': x}
