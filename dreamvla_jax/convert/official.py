"""Official PyTorch checkpoints -> our DreamVLA parameters (issue 4, official part).

Two sources, both PyTorch state dicts saved from a DDP wrapper (every key starts with ``module.``; a
training checkpoint wraps them in ``model_state_dict``), holding the trainable parameters only
(SPEC section 11):
  * ``dreamvla``: the official DreamVLA CALVIN checkpoint (``official_state_dict_keys.txt``);
  * ``seer``: the Seer-Large pre-training checkpoint the official fine-tune starts from
    (``seer_state_dict_keys.txt``). As the official ``--reset_obs_token --reset_action_decoder``
    fine-tune does, its image-prediction queries and MLP action head are dropped; its timestep
    embedding is truncated to our history. What DreamVLA adds (RGB/depth/SAM queries, the depth and
    SAM decoders, the DiT) is not in the source and stays at its initialisation (reported by name).

The tables below are ``common.Rule`` rows ("our dotted path <- official name, transform") applied by
``common.apply_rules``, which enforces the exactly-once contract. Layout facts used by the transforms:
``nn.Linear`` weights are ``[out, in]`` (transposed); the GPT-2 backbone uses HF ``Conv1D`` (``[in,
out]``, fused ``c_attn``: the GPT-2 table of ``convert.gpt2`` is reused); decoder and DiT blocks are timm
blocks whose fused ``qkv`` is already ``[q | k | v]``; query tokens are ``[1, 1, n, D]``; the timestep
embedding is ``[1, S, 1, D]``; resampler layers are ``layers.<i>.0`` (attention) and ``layers.<i>.1`` (a
``Sequential(LayerNorm, Linear, GELU, Linear)``, hence indices 0, 1, 3). The attention mask and the
decoders' fixed sin-cos tables are not parameters of ours (skipped by name if a checkpoint holds them).

The converted checkpoint is an Orbax composite, like ``convert.pretrained`` writes, told apart by its
metadata ``format``:
  ``params``:   ``{top-level module: pure dict}`` in the layout of ``nnx.state(model, nnx.Param)``
                (stacked layers on a leading axis) for every module the source fills, plus
                ``text_encoder`` / ``vision_encoder`` when ``--clip`` / ``--mae`` were given;
  ``metadata``: ``{'format', 'format_version', 'kind', 'source', 'config', 'tensors_used',
                'skipped': {name: reason}, 'initialised': [dotted paths], 'parts': {...}}``.
``load_official_into`` places it into an initialised model's parameter states (training
``--config.init.official``, evaluation ``--checkpoint``).

Also here: ``convert_mae_pth`` for the original MAE ``mae_pretrain_vit_base.pth`` (timm names), so
``convert_weights --mae`` takes that file as well as an HF folder. The original OpenAI CLIP
``ViT-B-32.pt`` (a TorchScript archive) is not supported: convert CLIP from its HF folder.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from dreamvla_jax.convert import gpt2
from dreamvla_jax.convert.common import (
    Converted,
    ConvertError,
    Rule,
    SourceFolder,
    _read_torch,
    apply_rules,
    conv_patch_kernel,
    flatten,
    rule,
    transpose,
    unflatten,
)

KINDS = ('dreamvla', 'seer')
LABELS = {'dreamvla': 'a DreamVLA checkpoint', 'seer': 'a Seer(-Large) checkpoint'}
FORMAT = 'dreamvla_jax.official'
FORMAT_VERSION = 1
PREFIXES = ('module.', '')
ANCHOR = 'transformer_backbone.ln_f.weight'
ENCODERS = ('text_encoder', 'vision_encoder')  # frozen, never in the official checkpoints


# ----------------------------------------------------------------------------------------------------------
# Transforms beyond common's (each raises ValueError on a wrong shape, which apply_rules reports as a
# shape mismatch naming the key and both shapes).


def tokens(x: np.ndarray) -> np.ndarray:
    """Query table ``[1, 1, n, D]`` -> ``[n, D]``."""
    if x.ndim != 4 or x.shape[:2] != (1, 1):
        raise ValueError(f'expected [1, 1, n, D], got {list(x.shape)}')
    return x[0, 0]


def vector(x: np.ndarray) -> np.ndarray:
    """``[1, D]`` (the DiT's ``uncondition``, shaped like one condition token) -> ``[D]``."""
    if x.ndim != 2 or x.shape[0] != 1:
        raise ValueError(f'expected [1, D], got {list(x.shape)}')
    return x[0]


def timestep_table(x: np.ndarray) -> np.ndarray:
    """Timestep embedding ``[1, S, 1, D]`` -> ``[S, D]``."""
    if x.ndim != 4 or x.shape[0] != 1 or x.shape[2] != 1:
        raise ValueError(f'expected [1, S, 1, D], got {list(x.shape)}')
    return x[0, :, 0]


def first_timesteps(n: int) -> Callable[[np.ndarray], np.ndarray]:
    """``[1, S, 1, D]`` -> the first ``n`` rows ``[n, D]``: Seer-Large was pre-trained with a longer
    history, and the official fine-tune keeps the first ``sequence_length`` rows."""

    def fn(x: np.ndarray) -> np.ndarray:
        table = timestep_table(x)
        if table.shape[0] < n:
            raise ValueError(f'{table.shape[0]} timesteps < {n}')
        return table[:n]

    fn.__name__ = f'first_timesteps({n})'
    return fn


# ----------------------------------------------------------------------------------------------------------
# Row builders: one official module -> its rows (kept small so the tables below read name to name).


def linear(target: str, source: str, *, bias: bool = True, layers: int | None = None) -> list[Rule]:
    """``nn.Linear``: ``weight [out, in]`` -> ``kernel [in, out]``, ``bias`` as is."""
    rows = [rule(f'{target}.kernel', f'{source}.weight', transpose, layers=layers)]
    if bias:
        rows.append(rule(f'{target}.bias', f'{source}.bias', layers=layers))
    return rows


def layer_norm(target: str, source: str, *, layers: int | None = None) -> list[Rule]:
    return [rule(f'{target}.scale', f'{source}.weight', layers=layers),
            rule(f'{target}.bias', f'{source}.bias', layers=layers)]


def timm_blocks(target: str, source: str, layers: int, *, ln_affine: bool = True) -> list[Rule]:
    """timm ``Block``s ``<source>.{i}`` -> our stacked ``layers.Block`` (``qkv`` already q | k | v)."""
    s = source + '.{i}.'
    rows = []
    if ln_affine:
        rows += layer_norm(f'{target}.ln1', s + 'norm1', layers=layers)
        rows += layer_norm(f'{target}.ln2', s + 'norm2', layers=layers)
    rows += linear(f'{target}.attn.qkv', s + 'attn.qkv', layers=layers)
    rows += linear(f'{target}.attn.proj', s + 'attn.proj', layers=layers)
    rows += linear(f'{target}.mlp.fc1', s + 'mlp.fc1', layers=layers)
    rows += linear(f'{target}.mlp.fc2', s + 'mlp.fc2', layers=layers)
    return rows


@dataclasses.dataclass(frozen=True)
class DreamNames:
    """The official attribute names of one dream head (``models/dreamvla_model.py``)."""
    tokens: str
    mask_token: str
    proj: str
    blocks: str
    norm: str
    head: str


DREAM_NAMES = {
    'rgb': DreamNames('obs_tokens', 'mask_token', 'image_decoder_obs_pred_projector', 'image_decoder',
                      'image_decoder_norm', 'image_decoder_pred'),
    'depth': DreamNames('depth_tokens', 'depth_mask_token', 'depth_decoder_obs_pred_projector',
                        'depth_decoder', 'depth_decoder_norm', 'depth_decoder_pred'),
    'dino': DreamNames('dino_feat_tokens', 'dino_mask_token', 'dino_decoder_obs_pred_projector',
                       'dino_feat_decoder', 'dino_decoder_norm', 'dino_decoder_pred'),
    'sam': DreamNames('sam_feat_tokens', 'sam_mask_token', 'sam_decoder_obs_pred_projector',
                      'sam_feat_decoder', 'sam_decoder_norm', 'sam_decoder_pred'),
}


def _enabled_dreams(model_cfg) -> list[str]:
    from dreamvla_jax import masks

    return masks.enabled_dreams(model_cfg)


# ----------------------------------------------------------------------------------------------------------
# The tables.


def rules(config, kind: str) -> list[Rule]:
    """The name-to-name table for ``kind`` ('dreamvla' | 'seer') and our ``config`` (layer counts,
    enabled dream heads and history come from it)."""
    if kind not in KINDS:
        raise ValueError(f'kind must be one of {KINDS}, got {kind!r}')
    m = config.model
    cams = list(m.cameras)
    if cams != ['static', 'gripper']:  # the official projectors are named primary / wrist
        raise ConvertError(f"official checkpoints have a static and a wrist camera; config.model.cameras is "
                           f"{tuple(cams)}.")
    P = 'perceiver_resampler.layers.{i}.'
    n_res = m.resampler.layers
    rows = [
        # target (our pure-dict path)             <- official name (after 'module.')       transform
        *linear('text_projector',                    'text_projector'),
        *linear('state_encoder.arm',                 'arm_state_encoder'),
        *linear('state_encoder.gripper',             'gripper_state_encoder'),
        *linear('state_encoder.out',                 'state_projector'),     # input [arm | gripper]
        *linear('image_projectors.latents_static',   'image_primary_projector'),
        *linear('image_projectors.latents_gripper',  'image_wrist_projector'),
        *linear('image_projectors.cls_static',       'cls_token_primary_projector'),
        *linear('image_projectors.cls_gripper',      'cls_token_wrist_projector'),
        rule('timestep_embedding',                   'transformer_backbone_position_embedding',
             timestep_table if kind == 'dreamvla' else first_timesteps(m.history)),
        *layer_norm('embedding_ln',                  'embedding_layer_norm'),
        rule('queries.action',                       'action_pred_token',                   tokens),
        # Perceiver resampler: layers.<i>.0 = attention, layers.<i>.1 = Sequential(LN, Linear, GELU, Linear).
        rule('resampler.latents',                    'perceiver_resampler.latents'),
        *layer_norm('resampler.layers.layers.norm_media',   P + '0.norm_media',   layers=n_res),
        *layer_norm('resampler.layers.layers.norm_latents', P + '0.norm_latents', layers=n_res),
        *linear('resampler.layers.layers.to_q',      P + '0.to_q',   bias=False, layers=n_res),
        *linear('resampler.layers.layers.to_kv',     P + '0.to_kv',  bias=False, layers=n_res),  # [k | v]
        *linear('resampler.layers.layers.to_out',    P + '0.to_out', bias=False, layers=n_res),
        *layer_norm('resampler.layers.layers.ff_norm',      P + '1.0',            layers=n_res),
        *linear('resampler.layers.layers.ff.fc1',    P + '1.1',      bias=False, layers=n_res),
        *linear('resampler.layers.layers.ff.fc2',    P + '1.3',      bias=False, layers=n_res),
        *layer_norm('resampler.norm',                'perceiver_resampler.norm'),
    ]
    # GPT-2 backbone: the HF table (Conv1D, no transposes) under the official attribute name.
    rows += [Rule(f'backbone.{r.target}', tuple(f'transformer_backbone.{s}' for s in r.sources), r.fn,
                  m.backbone.layers) for r in gpt2.RULES]
    # Dream heads. Seer has only the RGB decoder; its queries are dropped (16 per camera, not ours).
    for name in _enabled_dreams(m):
        if kind == 'seer' and name != 'rgb':
            continue
        n, t = DREAM_NAMES[name], f'decoder_{name}'
        if kind == 'dreamvla':
            rows.append(rule(f'queries.{name}', n.tokens, tokens))      # first 9 static, next 9 wrist
        rows += [*linear(f'{t}.proj', n.proj),
                 rule(f'{t}.mask_token', n.mask_token),                 # [1, 1, W]
                 *timm_blocks(f'{t}.blocks.layers', n.blocks, m.decoder.layers),
                 *layer_norm(f'{t}.norm', n.norm),
                 *linear(f'{t}.head', n.head)]
    if kind == 'dreamvla':
        D = 'action_model.net.'
        rows += [
            # DiT-B: sequence [condition tokens + t | noisy actions], as ours.
            *linear('action_head.cond_proj',         D + 'z_embedder.linear'),
            rule('action_head.uncondition',          D + 'z_embedder.uncondition',          vector),
            *linear('action_head.t_fc1',             D + 't_embedder.mlp.0'),
            *linear('action_head.t_fc2',             D + 't_embedder.mlp.2'),     # mlp.1 is the SiLU
            *linear('action_head.x_embed',           D + 'x_embedder.linear'),
            rule('action_head.pos_embed',            D + 'positional_embedding'),             # [6, H]
            *timm_blocks('action_head.blocks.layers', D + 'blocks', m.dit.layers, ln_affine=False),
            *linear('action_head.final',             D + 'final_layer.linear'),  # its norm has no affine
        ]
    return rows


UNUSED = 'built by the official model but never used in its forward pass'
COMMON_SKIP = [
    (r'action_pose_encoder\.(weight|bias)', UNUSED),
    (r'action_gripper_position_encoder\.(weight|bias)', UNUSED),
    (r'action_projector\.(weight|bias)', UNUSED),
    (r'recon_(state|arm_state|gripper_state)_decoder\.\d+\.(weight|bias)', 'state-reconstruction head; '
     + UNUSED),
    # Not in the released files (trainable parameters only), but in a full state dict:
    (r'attention_mask', 'fixed block mask: ours is rebuilt from the token-group rules'),
    (r'\w+_decoder_position_embedding', 'fixed sin-cos table: recomputed by our decoders'),
    (r'(vision_encoder|clip_model)\..*', 'frozen encoder: convert it from its own file with --mae / --clip'),
]
SKIP = {
    'dreamvla': COMMON_SKIP + [
        (r'action_model\.net\.history_embedder\.linear\.(weight|bias)',
         'DiT action-history embedder; unused (no past actions)'),
    ],
    'seer': COMMON_SKIP + [
        (r'obs_tokens', "Seer's image-prediction queries (16 per camera); the official fine-tune resets "
         'them (--reset_obs_token)'),
        (r'(action|arm_action|gripper_action)_decoder\.\d+\.(weight|bias)',
         "Seer's MLP action head; the DiT replaces it (--reset_action_decoder)"),
    ],
}


# Caveats written into the metadata and printed by the CLI.
NOTES = {
    'dreamvla': ['The official SAM decoder was trained with an all-zero position table (an official bug, '
                 'SPEC section 4): to keep training it consistently, fine-tune with '
                 '--config.model.decoder.sam_official_zero_init=True. Acting does not use the decoders.'],
    'seer': ["Seer-Large's RGB decoder was trained with 16 queries per camera on a 4x4 sin-cos grid; ours "
             'has 9 on a 3x3 grid: its weights load and the query part of the fixed table differs, as in the '
             'official fine-tune.',
             'The DiT, the depth/SAM decoders and all dream queries keep their initialisation: fine-tune '
             'before acting.'],
}


def not_in_source(config, kind: str, targets: Iterable[str]) -> list[str]:
    """Our parameters a ``kind`` checkpoint does not hold (they keep their initialisation).

    Seer: every dream query table (its own are dropped), every dream decoder but RGB, the DiT."""
    if kind == 'dreamvla':
        return []
    dreams = _enabled_dreams(config.model)
    prefixes = ([f'queries.{n}' for n in dreams] + [f'decoder_{n}' for n in dreams if n != 'rgb']
                + ['action_head'])
    return sorted(t for t in targets if any(t == p or t.startswith(p + '.') for p in prefixes))


def target_shapes(config) -> dict[str, tuple]:
    """``{dotted path: shape}`` of every parameter outside the frozen encoders, built abstractly."""
    from flax import nnx

    from dreamvla_jax.models import dreamvla

    model = dreamvla.abstract_model(config)
    pure = nnx.state(model, nnx.Param).to_pure_dict()
    return {k: tuple(v.shape) for k, v in flatten(pure).items() if k.split('.')[0] not in ENCODERS}


# ----------------------------------------------------------------------------------------------------------
# Converting.


@dataclasses.dataclass
class OfficialConverted:
    kind: str
    params: dict                 # {top-level module: nested dict of float32 numpy arrays}
    used: list[str]              # source names consumed (as in the file)
    skipped: dict[str, str]      # source name -> why it is not used
    initialised: list[str]       # our dotted paths the source does not hold


def detect_kind(names: Iterable[str]) -> str | None:
    """'dreamvla' (a DiT ``action_model``), 'seer' (an MLP ``action_decoder`` and no depth/SAM/DINO
    queries), or None when the names are neither."""
    names = {n[len('module.'):] if n.startswith('module.') else n for n in names}
    if ANCHOR not in names:
        return None
    if any(n.startswith('action_model.') for n in names):
        return 'dreamvla'
    dreams = {DREAM_NAMES[d].tokens for d in ('depth', 'dino', 'sam')}
    if 'action_decoder.0.weight' in names and not names & dreams:
        return 'seer'
    return None


def _check_kind(names: Iterable[str], kind: str, where: str) -> None:
    found = detect_kind(names)
    if found == kind:
        return
    flag = {'dreamvla': '--dreamvla', 'seer': '--seer'}
    if found is None:
        raise ConvertError(f"{where} is neither a DreamVLA nor a Seer checkpoint (it has no "
                           f"'module.{ANCHOR}', or neither a DiT 'action_model' nor Seer's "
                           "'action_decoder' without dream queries).")
    why = ("it has Seer's MLP action_decoder and no DiT action_model" if found == 'seer'
           else 'it has the DiT action_model that Seer lacks')
    raise ConvertError(f"{where} is {LABELS[found]} ({why}): convert it with {flag[found]}, "
                       f"not {flag[kind]}.")


def convert_state_dict(tensors: dict[str, np.ndarray], config, kind: str, *, source: str = '<state dict>',
                       progress: bool = False) -> OfficialConverted:
    """Maps an official state dict (numpy arrays by official name) onto our ``config``'s parameters."""
    if kind not in KINDS:
        raise ValueError(f'kind must be one of {KINDS}, got {kind!r}')
    _check_kind(tensors, kind, source)
    shapes = target_shapes(config)
    initialised = not_in_source(config, kind, shapes)
    targets = {k: v for k, v in shapes.items() if k not in set(initialised)}
    src = SourceFolder(Path(source), {}, tensors, [Path(source)])
    conv = apply_rules(src, 'the DreamVLA model', rules(config, kind), SKIP[kind], PREFIXES, ANCHOR, 0,
                       targets, progress=progress)
    skipped = {}
    for name in conv.skipped:
        stripped = name[len('module.'):] if name.startswith('module.') else name
        skipped[name] = next(reason for pattern, reason in SKIP[kind] if re.fullmatch(pattern, stripped))
    return OfficialConverted(kind, conv.params, conv.used, skipped, initialised)


def convert(path: str | Path, config, kind: str, *, progress: bool = False,
            trust_pickle: bool = False) -> OfficialConverted:
    """Reads an official ``.pth`` (a state dict, or a training checkpoint with ``model_state_dict``)
    and converts it (``convert_state_dict``).

    ``trust_pickle`` lets torch unpickle arbitrary objects (only for files from a trusted source that
    ``weights_only`` loading refuses, e.g. ones holding argparse namespaces)."""
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"--{kind}: checkpoint {path} does not exist.")
    tensors = _read_torch(path, weights_only=not trust_pickle)
    return convert_state_dict(tensors, config, kind, source=str(path), progress=progress)


# ----------------------------------------------------------------------------------------------------------
# The original MAE checkpoint (timm names), for ``convert_weights --mae FILE.pth``.


def check_mae_pos_embed(pos: np.ndarray) -> None:
    """``pos_embed [1, 1 + g*g, W]`` must be MAE's fixed table (CLS slot zeros, then 2-D sin-cos),
    which ``MAEViT`` recomputes."""
    from dreamvla_jax.models.layers import sincos_2d

    grid = int(round((pos.shape[1] - 1) ** 0.5)) if pos.ndim == 3 else 0
    want = np.concatenate([np.zeros((1, pos.shape[-1]), np.float32), sincos_2d(pos.shape[-1], grid, grid)])
    err = float(np.abs(pos[0] - want).max()) if pos.shape[1:] == want.shape else float('inf')
    if err > 2e-3:
        raise ConvertError(f"MAE tensor 'pos_embed' {list(pos.shape)} is not the fixed 2-D sin-cos table "
                           f"MAEViT recomputes (max abs difference {err:.3g}).")


MAE_TIMM_RULES = [
    # target (MAEViT param path)        <- timm name                 transform
    rule('patch_embed.kernel',             'patch_embed.proj.weight',   conv_patch_kernel),
    rule('patch_embed.bias',               'patch_embed.proj.bias'),
    rule('cls_token',                      'cls_token'),                # [1, 1, W]
    rule(None,                             'pos_embed',                 check_mae_pos_embed),
    *timm_blocks('blocks.layers', 'blocks', layers=None),               # the table's layer count
    *layer_norm('norm',                    'norm'),
]
MAE_TIMM_SKIP = [
    (r'mask_token', "MAE pre-training's mask token (decoder side)"),
    (r'decoder_.*', "MAE pre-training's pixel decoder"),
]
MAE_TIMM_ANCHOR = 'patch_embed.proj.weight'


def convert_mae_pth(path: str | Path, vision_cfg, *, progress: bool = False) -> Converted:
    """Original MAE ``mae_pretrain_vit_base.pth`` (``{'model': state dict}``, timm names) -> ``MAEViT``
    params (float32 numpy, stacked layers)."""
    from dreamvla_jax.convert import mae
    from dreamvla_jax.convert.common import abstract_param_shapes

    path = Path(path)
    src = SourceFolder(path, {}, _read_torch(path), [path])
    return apply_rules(src, 'vision_encoder', MAE_TIMM_RULES, MAE_TIMM_SKIP, ('',), MAE_TIMM_ANCHOR,
                       vision_cfg.layers, abstract_param_shapes(mae.build(vision_cfg)), progress=progress)


# ----------------------------------------------------------------------------------------------------------
# The converted checkpoint.


def save_converted(out: str | Path, params: dict[str, dict], metadata: dict[str, Any]) -> Path:
    """Writes ``params`` ``{top-level module: nested numpy dict}`` and ``metadata`` (must hold
    ``kind``) as an Orbax checkpoint at ``out``."""
    import orbax.checkpoint as ocp

    from dreamvla_jax.convert.pretrained import _checkpointer

    if metadata.get('kind') not in KINDS:
        raise ValueError(f"metadata['kind'] must be one of {KINDS}")
    out = Path(out).absolute()
    meta = {'format': FORMAT, 'format_version': FORMAT_VERSION, **metadata}
    _checkpointer().save(out, ocp.args.Composite(params=ocp.args.StandardSave(params),
                                                 metadata=ocp.args.JsonSave(meta)), force=True)
    return out


def load_converted(path: str | Path) -> tuple[dict[str, dict], dict[str, Any]]:
    """``(params, metadata)``: params as host numpy ``{top-level module: nested dict}``."""
    import jax
    import orbax.checkpoint as ocp

    from dreamvla_jax.convert.pretrained import _checkpointer

    path = Path(path).absolute()
    if not path.is_dir():
        raise ConvertError(f"converted official checkpoint {path} does not exist.")
    ckpt = _checkpointer()
    try:
        meta = ckpt.restore(path, ocp.args.Composite(metadata=ocp.args.JsonRestore())).metadata
    except Exception as e:  # orbax raises various types for foreign directories
        raise ConvertError(f"{path} is not a checkpoint written by convert_weights "
                           f"({type(e).__name__}: {e}).") from None
    if meta.get('format') != FORMAT:
        hint = ('it holds CLIP/MAE/GPT-2 weights only: pass it as --config.init.pretrained' if 'parts' in meta
                else 'write one with convert_weights --dreamvla/--seer')
        raise ConvertError(f"{path} is not a converted official DreamVLA/Seer checkpoint; {hint}.")
    if meta.get('format_version') != FORMAT_VERSION:
        raise ConvertError(f"{path} has official-checkpoint format version {meta.get('format_version')!r}; "
                           f"this code reads version {FORMAT_VERSION}: re-run convert_weights.")
    params = ckpt.restore(path, ocp.args.Composite(params=ocp.args.StandardRestore())).params
    return jax.tree.map(np.asarray, params), meta


def load_official_into(path: str | Path, params_state, frozen_state=None) -> dict[str, Any]:
    """Replaces, in place, the parts of an initialised model that the converted checkpoint holds.

    Args:
      path: a ``convert_weights --dreamvla/--seer`` output.
      params_state: ``nnx.State`` of the trainable parameters (arrays or ``jax.ShapeDtypeStruct``).
      frozen_state: ``nnx.State`` of the frozen parameters (the encoders), or None.
    Returns:
      the checkpoint's metadata.

    Every module the checkpoint holds must match the model exactly (``merge_into``: missing or
    unexpected keys and shapes raise ``ConvertError``; values are cast to the state's dtype and placed
    with its sharding); parameters listed as ``initialised`` keep the state's values; a trainable module
    the checkpoint neither holds nor lists (another config) is an error.
    """
    from flax import nnx

    from dreamvla_jax.convert.pretrained import merge_into

    params, meta = load_converted(path)
    initialised = set(meta.get('initialised', []))
    states = [s for s in (params_state, frozen_state) if s is not None]
    pures = [s.to_pure_dict() for s in states]
    model_parts = set().union(*pures)
    unknown = sorted(set(params) - model_parts)
    if unknown:
        raise ConvertError(f"{path} holds {unknown}, which the model does not have (model modules: "
                           f"{sorted(model_parts)}).")
    for part in pures[0]:
        if part not in params and not any(p == part or p.startswith(part + '.') for p in initialised):
            raise ConvertError(f"{path} ({meta.get('kind')}) holds no {part!r}, which the model has: "
                               "was it converted for another config?")
    for state, pure in zip(states, pures, strict=True):
        # merge_into works on modules (dicts); single-array modules (timestep_embedding) are boxed.
        pure = {k: _box(v) for k, v in pure.items()}
        parts, kept = {}, {}
        for part in params:
            if part not in pure:
                continue
            tree = flatten(_box(params[part]))
            for key, leaf in flatten(pure[part]).items():
                dotted = part if key == _BOX else f'{part}.{key}'
                if dotted in initialised and key not in tree:
                    # A placeholder lets merge_into check the module as a whole; the state's own
                    # value (its initialisation) is put back below.
                    tree[key] = np.zeros(leaf.shape, np.float32)
                    kept[(part, key)] = leaf
            parts[part] = unflatten(tree)
        merged = merge_into(pure, parts)
        for (part, key), leaf in kept.items():
            flat = flatten(merged[part])
            flat[key] = leaf
            merged[part] = unflatten(flat)
        nnx.replace_by_pure_dict(state, {k: _unbox(v) for k, v in merged.items()})
    return meta


_BOX = '__array__'


def _box(tree):
    return tree if isinstance(tree, dict) else {_BOX: tree}


def _unbox(tree):
    return tree[_BOX] if isinstance(tree, dict) and set(tree) == {_BOX} else tree


def summary(conv: OfficialConverted) -> str:
    """One line for the CLI: what was used, skipped by name, and left at its initialisation."""
    groups: dict[str, int] = {}
    for name in conv.skipped:
        key = re.sub(r'\.(\d+\.)*(weight|bias)$', '', name.removeprefix('module.'))
        groups[key] = groups.get(key, 0) + 1
    skipped = ', '.join(f'{k} ({v})' for k, v in sorted(groups.items())) or 'none'
    init: dict[str, int] = {}
    for path in conv.initialised:
        key = path.split('.')[0] if not path.startswith('queries.') else path
        init[key] = init.get(key, 0) + 1
    initialised = ', '.join(f'{k} ({v})' for k, v in init.items()) or 'none'
    return (f"{conv.kind}: {len(conv.used)} tensors -> {len(conv.params)} modules; skipped by name: "
            f"{skipped}; not in source (initialised): {initialised}")
