"""HF ViT-MAE encoder (``ViTMAEModel`` or ``ViTMAEForPreTraining`` files) -> ``models.mae_vit.MAEViT``.

Source names are those in the saved files (``vit.`` prefix stripped). ``{i}`` is the layer index; per-layer
targets are stacked on a leading layer axis. PyTorch ``nn.Linear`` stores ``[out, in]``: every linear is
transposed; the separate query/key/value projections are concatenated into our fused ``qkv``; the patch
conv ``[out, 3, p, p]`` becomes a linear over (row, col, channel)-flattened patches. The fixed sin-cos
position table is not a parameter of ours: the rule with target ``None`` consumes it by checking that it
equals the table ``MAEViT`` recomputes.
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
    conv_patch_kernel,
    fused_qkv_bias,
    fused_qkv_kernel,
    read_folder,
    reference_libs,
    rule,
    transpose,
    with_params,
)

PART = 'vision_encoder'
FLAG = 'mae'
MODEL_TYPES = ('vit_mae',)
PREFIXES = ('vit.', '')
ANCHOR = 'embeddings.cls_token'


def check_sincos(pos: np.ndarray) -> None:
    """``[1, 1 + g*g, W]``: CLS slot zeros, then MAE's 2-D sin-cos table (what ``MAEViT`` computes)."""
    from dreamvla_jax.models.layers import sincos_2d

    grid = int(round((pos.shape[1] - 1) ** 0.5))
    want = np.concatenate([np.zeros((1, pos.shape[-1]), np.float32), sincos_2d(pos.shape[-1], grid, grid)])
    err = float(np.abs(pos[0] - want).max()) if pos.shape[1:] == want.shape else float('inf')
    # fp16-stored tables differ by ~5e-4; a learned or differently ordered table differs by O(1).
    if err > 2e-3:
        raise ConvertError(f"MAE tensor 'embeddings.position_embeddings' {list(pos.shape)} is not the fixed "
                           f"2-D sin-cos table MAEViT recomputes (max abs difference {err:.3g}); "
                           "a learned position table cannot be loaded.")


L = 'encoder.layer.{i}.'
RULES = [
    # target (MAEViT param path)      <- source tensor(s)                                 transform
    rule('patch_embed.kernel',           'embeddings.patch_embeddings.projection.weight',  conv_patch_kernel),
    rule('patch_embed.bias',             'embeddings.patch_embeddings.projection.bias'),
    rule('cls_token',                    'embeddings.cls_token'),                          # [1, 1, W]
    rule(None,                           'embeddings.position_embeddings',                 check_sincos),
    rule('blocks.layers.ln1.scale',      L + 'layernorm_before.weight'),
    rule('blocks.layers.ln1.bias',       L + 'layernorm_before.bias'),
    rule('blocks.layers.attn.qkv.kernel', [L + 'attention.attention.query.weight',
                                           L + 'attention.attention.key.weight',
                                           L + 'attention.attention.value.weight'],        fused_qkv_kernel),
    rule('blocks.layers.attn.qkv.bias',  [L + 'attention.attention.query.bias',
                                          L + 'attention.attention.key.bias',
                                          L + 'attention.attention.value.bias'],           fused_qkv_bias),
    rule('blocks.layers.attn.proj.kernel', L + 'attention.output.dense.weight',            transpose),
    rule('blocks.layers.attn.proj.bias', L + 'attention.output.dense.bias'),
    rule('blocks.layers.ln2.scale',      L + 'layernorm_after.weight'),
    rule('blocks.layers.ln2.bias',       L + 'layernorm_after.bias'),
    rule('blocks.layers.mlp.fc1.kernel', L + 'intermediate.dense.weight',                  transpose),
    rule('blocks.layers.mlp.fc1.bias',   L + 'intermediate.dense.bias'),
    rule('blocks.layers.mlp.fc2.kernel', L + 'output.dense.weight',                        transpose),
    rule('blocks.layers.mlp.fc2.bias',   L + 'output.dense.bias'),
    rule('norm.scale',                   'layernorm.weight'),
    rule('norm.bias',                    'layernorm.bias'),
]
del L

SKIP = [
    (r'decoder\..*', "ViTMAEForPreTraining's pixel decoder (pre-training only)"),
]


def build(cfg):
    """``cfg`` = ``config.model.vision``; returns a constructor for ``MAEViT``."""
    from flax import nnx

    from dreamvla_jax.models.mae_vit import MAEViT

    return lambda: MAEViT(cfg, rngs=nnx.Rngs(0))


def check_config(src: SourceFolder, cfg, *, check_eps: bool = True) -> None:
    check_model_type(src, FLAG, MODEL_TYPES, 'a ViT-MAE model')
    get = lambda k, d: src.config.get(k, d)  # HF ViTMAEConfig() defaults for omitted fields
    check_fields(src.path, [
        ('hidden_size', get('hidden_size', 768), 'model.vision.width', cfg.width),
        ('num_hidden_layers', get('num_hidden_layers', 12), 'model.vision.layers', cfg.layers),
        ('num_attention_heads', get('num_attention_heads', 12), 'model.vision.heads', cfg.heads),
        ('intermediate_size', get('intermediate_size', 3072), 'model.vision.mlp', cfg.mlp),
        ('image_size', get('image_size', 224), 'model.vision.image_size', cfg.image_size),
        ('patch_size', get('patch_size', 16), 'model.vision.patch', cfg.patch),
        ('num_channels', get('num_channels', 3), 'the MAEViT input channels', 3),
        ('hidden_act', get('hidden_act', 'gelu'), 'the MAEViT activation', 'gelu'),
        ('qkv_bias', get('qkv_bias', True), 'the MAEViT qkv bias', True),
    ])
    eps = get('layer_norm_eps', 1e-12)
    if check_eps and not np.isclose(eps, cfg.ln_eps, rtol=1e-9, atol=0):
        # facebook/vit-mae-base says 1e-12 while the original MAE (and DreamVLA) uses 1e-6.
        raise ConvertError(f"{src.path}/config.json has layer_norm_eps = {eps!r} but the target config has "
                           f"model.vision.ln_eps = {cfg.ln_eps!r}; the weights are compatible, so pass "
                           "--allow-eps-mismatch to convert anyway (outputs then differ slightly, ~1e-4, "
                           "from the folder's own model).")


def convert(folder: str | Path, cfg, *, progress: bool = False, check_eps: bool = True) -> Converted:
    """Reads a ViT-MAE folder and returns ``MAEViT`` params (float32 numpy, stacked layers)."""
    src = read_folder(folder, FLAG, lambda s: check_config(s, cfg, check_eps=check_eps))
    return apply_rules(src, PART, RULES, SKIP, PREFIXES, ANCHOR, cfg.layers,
                       abstract_param_shapes(build(cfg)), progress=progress)


def verify(folder: str | Path, params: dict, cfg, *, batch: int = 2, seed: int = 0) -> dict[str, float]:
    """Max abs differences between ``MAEViT`` (run in fp32) and transformers' ``ViTMAEModel``.

    HF shuffles patches even at ``mask_ratio=0``; passing ``noise = arange(P)`` makes its argsort the
    identity, so no patch moves (asserted through ``ids_restore``). Returns ``{'cls', 'patches'}``.
    """
    import jax.numpy as jnp
    torch, transformers = reference_libs()

    rng = np.random.default_rng(seed)
    images = rng.normal(size=(batch, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
    num_patches = (cfg.image_size // cfg.patch) ** 2
    with torch.no_grad():
        ref = transformers.ViTMAEModel.from_pretrained(folder, mask_ratio=0.0, dtype=torch.float32).eval()
        noise = torch.arange(num_patches, dtype=torch.float32).expand(batch, num_patches)
        out = ref(pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2), noise=noise)
    if not torch.equal(out.ids_restore, torch.arange(num_patches).expand(batch, num_patches)):
        raise AssertionError('transformers shuffled the MAE patches despite the identity noise')
    ref_tokens = out.last_hidden_state.numpy()
    cfg32 = cfg.copy_and_resolve_references()
    cfg32.dtype = cfg32.param_dtype = 'float32'
    ours = np.asarray(with_params(build(cfg32), params)(jnp.asarray(images)))
    return {'cls': float(np.abs(ours[:, 0] - ref_tokens[:, 0]).max()),
            'patches': float(np.abs(ours[:, 1:] - ref_tokens[:, 1:]).max())}
