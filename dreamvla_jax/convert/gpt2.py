"""HF GPT-2 (``GPT2Model`` or ``GPT2LMHeadModel`` files) -> ``models.gpt2.GPT2Blocks``.

Source names are those in the saved files (``transformer.`` prefix stripped). ``{i}`` is the layer index;
per-layer targets are stacked on a leading layer axis. GPT-2 uses ``Conv1D``, which stores ``[in, out]``
like our kernels: no transposes. Its ``c_attn`` is already fused in our ``[q | k | v]`` order. The token
and position tables are not part of the backbone (DreamVLA feeds embeddings): skipped by name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dreamvla_jax.convert.common import (
    Converted,
    SourceFolder,
    abstract_param_shapes,
    apply_rules,
    check_fields,
    check_model_type,
    read_folder,
    reference_libs,
    rule,
    with_params,
)

PART = 'backbone'
FLAG = 'gpt2'
MODEL_TYPES = ('gpt2',)
PREFIXES = ('transformer.', '')
ANCHOR = 'ln_f.weight'

L = 'h.{i}.'
RULES = [
    # target (GPT2Blocks param path)      <- source tensor          (Conv1D [in, out]: no transform)
    rule('blocks.layers.ln1.scale',          L + 'ln_1.weight'),
    rule('blocks.layers.ln1.bias',           L + 'ln_1.bias'),
    rule('blocks.layers.attn.qkv.kernel',    L + 'attn.c_attn.weight'),   # [D, 3D], fused q | k | v
    rule('blocks.layers.attn.qkv.bias',      L + 'attn.c_attn.bias'),
    rule('blocks.layers.attn.proj.kernel',   L + 'attn.c_proj.weight'),
    rule('blocks.layers.attn.proj.bias',     L + 'attn.c_proj.bias'),
    rule('blocks.layers.ln2.scale',          L + 'ln_2.weight'),
    rule('blocks.layers.ln2.bias',           L + 'ln_2.bias'),
    rule('blocks.layers.mlp.fc1.kernel',     L + 'mlp.c_fc.weight'),      # [D, 4D]
    rule('blocks.layers.mlp.fc1.bias',       L + 'mlp.c_fc.bias'),
    rule('blocks.layers.mlp.fc2.kernel',     L + 'mlp.c_proj.weight'),    # [4D, D]
    rule('blocks.layers.mlp.fc2.bias',       L + 'mlp.c_proj.bias'),
    rule('ln_f.scale',                       'ln_f.weight'),
    rule('ln_f.bias',                        'ln_f.bias'),
]
del L

SKIP = [
    (r'wte\.weight', 'token table: the backbone receives embeddings'),
    (r'wpe\.weight', 'position table: DreamVLA adds its own timestep embedding'),
    (r'lm_head\.weight', "GPT2LMHeadModel's output head (tied to wte)"),
    (r'h\.\d+\.attn\.(masked_)?bias', 'causal-mask buffers older transformers versions saved'),
]


def build(model_cfg):
    """``model_cfg`` = ``config.model`` (GPT2Blocks reads hidden, backbone, dtypes, attention_impl)."""
    from flax import nnx

    from dreamvla_jax.models.gpt2 import GPT2Blocks

    return lambda: GPT2Blocks(model_cfg, rngs=nnx.Rngs(0))


def check_config(src: SourceFolder, model_cfg, *, check_eps: bool = True) -> None:
    check_model_type(src, FLAG, MODEL_TYPES, 'a GPT-2 model')
    get = lambda k, d: src.config.get(k, d)  # HF GPT2Config() defaults for omitted fields
    b = model_cfg.backbone
    n_embd = get('n_embd', 768)
    act = get('activation_function', 'gelu_new')
    checks = [
        ('n_embd', n_embd, 'model.hidden', model_cfg.hidden),
        ('n_layer', get('n_layer', 12), 'model.backbone.layers', b.layers),
        ('n_head', get('n_head', 12), 'model.backbone.heads', b.heads),
        ('n_inner', get('n_inner', None) or 4 * n_embd, 'model.backbone.mlp', b.mlp),
        # gelu_pytorch_tanh is the same function as gelu_new.
        ('activation_function', 'gelu_new' if act == 'gelu_pytorch_tanh' else act,
         'the GPT2Blocks activation', 'gelu_new'),
        ('scale_attn_by_inverse_layer_idx', get('scale_attn_by_inverse_layer_idx', False),
         'the GPT2Blocks attention scale', False),
        ('add_cross_attention', get('add_cross_attention', False), 'the GPT2Blocks layout', False),
    ]
    if check_eps:
        checks.append(('layer_norm_epsilon', get('layer_norm_epsilon', 1e-5), 'model.backbone.ln_eps',
                       float(b.ln_eps)))
    check_fields(src.path, checks)


def convert(folder: str | Path, model_cfg, *, progress: bool = False, check_eps: bool = True) -> Converted:
    """Reads a GPT-2 folder and returns ``GPT2Blocks`` params (float32 numpy, stacked layers)."""
    src = read_folder(folder, FLAG, lambda s: check_config(s, model_cfg, check_eps=check_eps))
    return apply_rules(src, PART, RULES, SKIP, PREFIXES, ANCHOR, model_cfg.backbone.layers,
                       abstract_param_shapes(build(model_cfg)), progress=progress)


def verify(folder: str | Path, params: dict, model_cfg, *, batch: int = 2, length: int = 16,
           seed: int = 0) -> dict[str, float]:
    """Max abs difference between ``GPT2Blocks`` and transformers' ``GPT2Model`` (fp32, eval mode).

    Both get the same ``inputs_embeds``: HF adds ``wpe`` to them, so its table is zeroed in the reference;
    HF applies its causal mask, so ours gets an explicit causal mask. Returns ``{'hidden'}`` (after ln_f).
    """
    import jax.numpy as jnp
    torch, transformers = reference_libs()

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, length, model_cfg.hidden)).astype(np.float32)
    with torch.no_grad():
        ref = transformers.GPT2Model.from_pretrained(folder, dtype=torch.float32).eval()
        ref.wpe.weight.zero_()
        ref_out = ref(inputs_embeds=torch.from_numpy(x)).last_hidden_state.numpy()
    cfg32 = model_cfg.copy_and_resolve_references()
    cfg32.dtype = cfg32.param_dtype = 'float32'
    causal = jnp.tril(jnp.ones((length, length), bool))
    ours = np.asarray(with_params(build(cfg32), params)(jnp.asarray(x), causal))
    return {'hidden': float(np.abs(ours - ref_out).max())}
