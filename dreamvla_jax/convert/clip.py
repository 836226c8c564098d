"""HF CLIP text tower (``CLIPModel`` / ``CLIPTextModelWithProjection`` files) -> ``clip_text.CLIPText``.

Source names are those in the saved files (``text_model.`` prefix stripped). ``{i}`` is the layer index;
per-layer targets are stacked on a leading layer axis. PyTorch ``nn.Linear`` stores ``[out, in]``: every
linear is transposed; CLIP's separate q/k/v projections are concatenated into our fused ``qkv``
(``[in, 3 * out]``, order q | k | v), which still uses each source tensor exactly once.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dreamvla_jax.convert.common import (
    Converted,
    ConvertError,
    SourceFolder,
    abstract_param_shapes,
    apply_rules,
    check_fields,
    check_model_type,
    fused_qkv_bias,
    fused_qkv_kernel,
    read_config,
    read_folder,
    reference_libs,
    rule,
    transpose,
    with_params,
)

PART = 'text_encoder'
FLAG = 'clip'
MODEL_TYPES = ('clip', 'clip_text_model')
PREFIXES = ('text_model.', '')
ANCHOR = 'embeddings.token_embedding.weight'

L = 'encoder.layers.{i}.'
RULES = [
    # target (CLIPText param path)        <- source tensor(s)                                  transform
    rule('token_embedding.embedding',        'embeddings.token_embedding.weight'),             # [V, W]
    rule('position_embedding',               'embeddings.position_embedding.weight'),          # [77, W]
    rule('blocks.layers.ln1.scale',          L + 'layer_norm1.weight'),
    rule('blocks.layers.ln1.bias',           L + 'layer_norm1.bias'),
    rule('blocks.layers.attn.qkv.kernel',    [L + 'self_attn.q_proj.weight', L + 'self_attn.k_proj.weight',
                                              L + 'self_attn.v_proj.weight'], fused_qkv_kernel),
    rule('blocks.layers.attn.qkv.bias',      [L + 'self_attn.q_proj.bias', L + 'self_attn.k_proj.bias',
                                              L + 'self_attn.v_proj.bias'], fused_qkv_bias),
    rule('blocks.layers.attn.proj.kernel',   L + 'self_attn.out_proj.weight', transpose),
    rule('blocks.layers.attn.proj.bias',     L + 'self_attn.out_proj.bias'),
    rule('blocks.layers.ln2.scale',          L + 'layer_norm2.weight'),
    rule('blocks.layers.ln2.bias',           L + 'layer_norm2.bias'),
    rule('blocks.layers.mlp.fc1.kernel',     L + 'mlp.fc1.weight', transpose),
    rule('blocks.layers.mlp.fc1.bias',       L + 'mlp.fc1.bias'),
    rule('blocks.layers.mlp.fc2.kernel',     L + 'mlp.fc2.weight', transpose),
    rule('blocks.layers.mlp.fc2.bias',       L + 'mlp.fc2.bias'),
    rule('ln_final.scale',                   'final_layer_norm.weight'),
    rule('ln_final.bias',                    'final_layer_norm.bias'),
    rule('text_projection.kernel',           'text_projection.weight', transpose),             # no bias
]
del L

SKIP = [
    (r'vision_model\..*', "CLIPModel's image tower (DreamVLA encodes images with MAE)"),
    (r'visual_projection\.weight', "CLIPModel's image projection"),
    (r'logit_scale', "CLIPModel's contrastive temperature"),
    (r'embeddings\.position_ids', 'an index buffer older transformers versions saved'),
]


def build(cfg):
    """``cfg`` = ``config.model.text``; returns a constructor for ``CLIPText``."""
    from flax import nnx

    from dreamvla_jax.models.clip_text import CLIPText

    return lambda: CLIPText(cfg, rngs=nnx.Rngs(0))


def check_config(src: SourceFolder, cfg, *, check_eps: bool = True) -> None:
    """Model type, architecture and every shape-defining field against ``config.model.text``."""
    model_type = check_model_type(src, FLAG, MODEL_TYPES, 'a CLIP model')
    hf = src.config
    if model_type == 'clip':
        text, proj = hf.get('text_config', {}), hf.get('projection_dim', 512)
    else:
        if 'CLIPTextModel' in hf.get('architectures', []):
            raise ConvertError(f"--clip: {src.path} holds a CLIPTextModel, which has no text_projection; "
                               "save a CLIPModel or a CLIPTextModelWithProjection instead.")
        text, proj = hf, hf.get('projection_dim', 512)
    # HF defaults for fields a config.json may omit (CLIPTextConfig()).
    get = lambda k, d: text.get(k, d)
    checks = [
        ('vocab_size', get('vocab_size', 49408), 'model.text.vocab_size', cfg.vocab_size),
        ('max_position_embeddings', get('max_position_embeddings', 77), 'model.text.context', cfg.context),
        ('hidden_size', get('hidden_size', 512), 'model.text.width', cfg.width),
        ('num_hidden_layers', get('num_hidden_layers', 12), 'model.text.layers', cfg.layers),
        ('num_attention_heads', get('num_attention_heads', 8), 'model.text.heads', cfg.heads),
        ('intermediate_size', get('intermediate_size', 2048), 'model.text.mlp', cfg.mlp),
        ('projection_dim', proj, 'model.text.proj_dim', cfg.proj_dim),
        ('hidden_act', get('hidden_act', 'quick_gelu'), 'the CLIPText activation', 'quick_gelu'),
    ]
    if check_eps:
        checks.append(('layer_norm_eps', get('layer_norm_eps', 1e-5), 'model.text.ln_eps', float(cfg.ln_eps)))
    check_fields(src.path, checks)


def convert(folder: str | Path, cfg, *, progress: bool = False, check_eps: bool = True) -> Converted:
    """Reads a CLIP folder and returns ``CLIPText`` params (float32 numpy, stacked layers)."""
    src = read_folder(folder, FLAG, lambda s: check_config(s, cfg, check_eps=check_eps))
    return apply_rules(src, PART, RULES, SKIP, PREFIXES, ANCHOR, cfg.layers,
                       abstract_param_shapes(build(cfg)), progress=progress)


def verify(folder: str | Path, params: dict, cfg, *, batch: int = 2, seed: int = 0) -> dict[str, float]:
    """Max abs differences between ``CLIPText`` and transformers on random tokens (fp32).

    Each row holds random ids below the EOT id, then EOT (49407 in the CLIP vocabulary, the largest id,
    which is what our argmax pooling relies on) and zero padding. Returns ``{'pooled', 'tokens'}``.
    """
    import jax.numpy as jnp
    torch, transformers = reference_libs()

    hf_cfg = read_config(folder)
    eot = cfg.vocab_size - 1
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, eot, size=(batch, cfg.context)).astype(np.int64)
    for b, end in enumerate(np.linspace(cfg.context // 3, cfg.context - 1, batch).astype(int)):
        tokens[b, end], tokens[b, end + 1:] = eot, 0
    ids = torch.from_numpy(tokens)
    with torch.no_grad():
        if hf_cfg['model_type'] == 'clip':
            ref = transformers.CLIPModel.from_pretrained(folder, dtype=torch.float32).eval()
            out = ref.text_model(input_ids=ids)
            ref_pooled, ref_tokens = ref.text_projection(out.pooler_output), out.last_hidden_state
        else:
            ref = transformers.CLIPTextModelWithProjection.from_pretrained(folder, dtype=torch.float32).eval()
            out = ref(input_ids=ids)
            ref_pooled, ref_tokens = out.text_embeds, out.last_hidden_state
    cfg32 = cfg.copy_and_resolve_references()
    cfg32.dtype = 'float32'
    pooled, aux = with_params(build(cfg32), params)(jnp.asarray(tokens, jnp.int32))
    return {'pooled': float(np.abs(np.asarray(pooled) - ref_pooled.numpy()).max()),
            'tokens': float(np.abs(np.asarray(aux['tokens']) - ref_tokens.numpy()).max())}

