"""convert_weights, official part (issue 4): DreamVLA / Seer-Large ``.pth`` -> our parameters.

Synthetic state dicts carry every key and shape of ``official_state_dict_keys.txt`` /
``seer_state_dict_keys.txt`` (SPEC section 11). Their values are views into one random pool at a
different offset per key, so the full-size dicts (~500 M values) cost no memory, yet every tensor
differs from every other and from its own transpose. ``official_shapes`` rebuilds the key files from a
config (checked against the files for the default config) so the same dicts exist at the debug size,
where the file round trip, the CLI and ``sample_actions`` run.
"""

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import ROOT, load_config
from flax import nnx

from dreamvla_jax import convert_weights, masks
from dreamvla_jax.convert import official
from dreamvla_jax.convert.common import ConvertError, flatten
from dreamvla_jax.convert.pretrained import load_pretrained, save_pretrained
from dreamvla_jax.data import fake_batch, preprocess
from dreamvla_jax.models import dreamvla

# Every key, shape and dtype of the two official checkpoints (copied from the project notes, SPEC section 11).
DATA = Path(__file__).parent / 'data'
KEY_FILES = {'dreamvla': DATA / 'official_state_dict_keys.txt', 'seer': DATA / 'seer_state_dict_keys.txt'}
SEER_OBS_PER_CAMERA = 16  # Seer's image-prediction queries (dropped by the conversion)


# ---------------------------------------------------------------------------------------------- builders

def read_key_file(path) -> dict[str, tuple]:
    out = {}
    for line in open(path):
        name, shape, _ = line.rstrip('\n').split('\t')
        out[name] = tuple(int(x) for x in shape.strip('[]').split(',') if x.strip())
    return out


def official_shapes(cfg, kind, *, history=None) -> dict[str, tuple]:
    """Every key and shape an official ``kind`` checkpoint of ``cfg``'s size holds (with ``module.``)."""
    m = cfg.model
    D, V, W, H = m.hidden, m.vision.width, m.decoder.width, m.dit.hidden
    r, inner, chunk = m.resampler, m.resampler.heads * m.resampler.head_dim, m.action.chunk
    sh = {}

    def lin(name, i, o, bias=True):
        sh[f'{name}.weight'] = (o, i)
        if bias:
            sh[f'{name}.bias'] = (o,)

    def ln(name, d):
        sh[f'{name}.weight'] = sh[f'{name}.bias'] = (d,)

    def timm(name, n, d, mlp, affine=True):
        for i in range(n):
            if affine:
                ln(f'{name}.{i}.norm1', d)
                ln(f'{name}.{i}.norm2', d)
            lin(f'{name}.{i}.attn.qkv', d, 3 * d)
            lin(f'{name}.{i}.attn.proj', d, d)
            lin(f'{name}.{i}.mlp.fc1', d, mlp)
            lin(f'{name}.{i}.mlp.fc2', mlp, d)

    sh['action_pred_token'] = (1, 1, chunk, D)
    dreams = masks.enabled_dreams(m) if kind == 'dreamvla' else ['rgb']
    if kind == 'dreamvla':
        for d in dreams:
            sh[official.DREAM_NAMES[d].tokens] = (1, 1, 2 * m.dream[d].queries_per_camera, D)
    else:
        sh['obs_tokens'] = (1, 1, 2 * SEER_OBS_PER_CAMERA, D)
    sh['transformer_backbone_position_embedding'] = (1, history or m.history, 1, D)
    lin('text_projector', m.text.proj_dim, D)
    lin('arm_state_encoder', 6, D)
    lin('gripper_state_encoder', 2, D)
    lin('state_projector', 2 * D, D)
    lin('action_pose_encoder', 6, D)
    lin('action_gripper_position_encoder', 2, D)
    lin('action_projector', 2 * D, D)
    sh['perceiver_resampler.latents'] = (r.latents, V)
    for i in range(r.layers):
        p = f'perceiver_resampler.layers.{i}.'
        ln(p + '0.norm_media', V)
        ln(p + '0.norm_latents', V)
        lin(p + '0.to_q', V, inner, bias=False)
        lin(p + '0.to_kv', V, 2 * inner, bias=False)
        lin(p + '0.to_out', inner, V, bias=False)
        ln(p + '1.0', V)
        lin(p + '1.1', V, r.mlp, bias=False)
        lin(p + '1.3', r.mlp, V, bias=False)
    ln('perceiver_resampler.norm', V)
    for name in ('image_primary_projector', 'cls_token_primary_projector', 'image_wrist_projector',
                 'cls_token_wrist_projector'):
        lin(name, V, D)
    ln('embedding_layer_norm', D)
    b = m.backbone
    for i in range(b.layers):  # HF Conv1D: weights stored [in, out]
        p = f'transformer_backbone.h.{i}.'
        ln(p + 'ln_1', D)
        ln(p + 'ln_2', D)
        sh[p + 'attn.c_attn.weight'], sh[p + 'attn.c_attn.bias'] = (D, 3 * D), (3 * D,)
        sh[p + 'attn.c_proj.weight'], sh[p + 'attn.c_proj.bias'] = (D, D), (D,)
        sh[p + 'mlp.c_fc.weight'], sh[p + 'mlp.c_fc.bias'] = (D, b.mlp), (b.mlp,)
        sh[p + 'mlp.c_proj.weight'], sh[p + 'mlp.c_proj.bias'] = (b.mlp, D), (D,)
    ln('transformer_backbone.ln_f', D)
    heads = [('recon_state_decoder', 'recon_arm_state_decoder', 'recon_gripper_state_decoder')]
    if kind == 'seer':
        heads.append(('action_decoder', 'arm_action_decoder', 'gripper_action_decoder'))
    for mlp, arm, grip in heads:
        lin(f'{mlp}.0', D, D // 2)
        lin(f'{mlp}.2', D // 2, D // 2)
        lin(f'{arm}.0', D // 2, 6)
        lin(f'{grip}.0', D // 2, 1)
    for d in dreams:
        n = official.DREAM_NAMES[d]
        sh[n.mask_token] = (1, 1, W)
        lin(n.proj, D, W)
        timm(n.blocks, m.decoder.layers, W, m.decoder.mlp)
        ln(n.norm, W)
        lin(n.head, W, m.dream[d].out_dim)
    if kind == 'dreamvla':
        a = 'action_model.net.'
        sh[a + 'positional_embedding'] = (2 * chunk, H)
        lin(a + 'history_embedder.linear', m.action.dim, H)
        lin(a + 'x_embedder.linear', m.action.dim, H)
        lin(a + 't_embedder.mlp.0', m.dit.time_freq_dim, H)
        lin(a + 't_embedder.mlp.2', H, H)
        sh[a + 'z_embedder.uncondition'] = (1, D)
        lin(a + 'z_embedder.linear', D, H)
        timm(a + 'blocks', m.dit.layers, H, m.dit.mlp, affine=False)
        lin(a + 'final_layer.linear', H, m.action.dim)
    return {f'module.{k}': v for k, v in sh.items()}


_POOL = np.random.default_rng(0).standard_normal(4096 * 1024 + 4099, dtype=np.float32)


def synthetic(shapes: dict[str, tuple]) -> dict[str, np.ndarray]:
    """Read-only views into one random pool, at a different offset per key (no memory, all distinct)."""
    out = {}
    for i, (name, shape) in enumerate(shapes.items()):
        n, off = int(np.prod(shape)), (i * 7919) % 4099
        out[name] = _POOL[off:off + n].reshape(shape)
    return out


def save_pth(path, sd, wrap=True):
    tensors = {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}
    # Official training checkpoints wrap the state dict next to the optimizer state.
    torch.save({'model_state_dict': tensors, 'epoch': 3} if wrap else tensors, path)
    return path


# ---------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope='module')
def default_cfg():
    return load_config('default')


@pytest.fixture(scope='module')
def full_dreamvla(default_cfg):
    sd = synthetic(read_key_file(KEY_FILES['dreamvla']))
    return sd, official.convert_state_dict(sd, default_cfg, 'dreamvla')


@pytest.fixture
def full_seer(default_cfg):  # one user: freed right after it
    sd = synthetic(read_key_file(KEY_FILES['seer']))
    return sd, official.convert_state_dict(sd, default_cfg, 'seer')


# ---------------------------------------------------------------------------------------------- tests

@pytest.mark.parametrize('kind', ['dreamvla', 'seer'])
def test_key_files_are_the_official_layout_of_the_default_config(default_cfg, kind):
    """Keeps ``official_shapes`` (used for the debug-size dicts) honest against the real key lists."""
    assert official_shapes(default_cfg, kind) == read_key_file(KEY_FILES[kind])


T = np.transpose
SAME = np.asarray
TOK = lambda x: x[0, 0]  # [1, 1, n, D] -> [n, D]

# (our path, layer index or None, official name after 'module.', expected transform): at least one tensor
# of every module, every transform and every official naming scheme (Linear, Conv1D, timm, Sequential).
SPOT = [
    ('text_projector.kernel', None, 'text_projector.weight', T),
    ('text_projector.bias', None, 'text_projector.bias', SAME),
    ('state_encoder.arm.kernel', None, 'arm_state_encoder.weight', T),
    ('state_encoder.gripper.kernel', None, 'gripper_state_encoder.weight', T),
    ('state_encoder.out.kernel', None, 'state_projector.weight', T),
    ('state_encoder.out.bias', None, 'state_projector.bias', SAME),
    ('image_projectors.latents_static.kernel', None, 'image_primary_projector.weight', T),
    ('image_projectors.latents_gripper.kernel', None, 'image_wrist_projector.weight', T),
    ('image_projectors.cls_static.kernel', None, 'cls_token_primary_projector.weight', T),
    ('image_projectors.cls_gripper.bias', None, 'cls_token_wrist_projector.bias', SAME),
    ('queries.action', None, 'action_pred_token', TOK),
    ('queries.rgb', None, 'obs_tokens', TOK),
    ('queries.depth', None, 'depth_tokens', TOK),
    ('queries.sam', None, 'sam_feat_tokens', TOK),
    ('timestep_embedding', None, 'transformer_backbone_position_embedding', lambda x: x[0, :, 0]),
    ('embedding_ln.scale', None, 'embedding_layer_norm.weight', SAME),
    ('embedding_ln.bias', None, 'embedding_layer_norm.bias', SAME),
    ('resampler.latents', None, 'perceiver_resampler.latents', SAME),
    ('resampler.layers.layers.norm_media.bias', 1, 'perceiver_resampler.layers.1.0.norm_media.bias', SAME),
    ('resampler.layers.layers.norm_latents.scale', 2, 'perceiver_resampler.layers.2.0.norm_latents.weight',
     SAME),
    ('resampler.layers.layers.to_q.kernel', 1, 'perceiver_resampler.layers.1.0.to_q.weight', T),
    ('resampler.layers.layers.to_kv.kernel', 2, 'perceiver_resampler.layers.2.0.to_kv.weight', T),
    ('resampler.layers.layers.to_out.kernel', 0, 'perceiver_resampler.layers.0.0.to_out.weight', T),
    ('resampler.layers.layers.ff_norm.scale', 1, 'perceiver_resampler.layers.1.1.0.weight', SAME),
    ('resampler.layers.layers.ff.fc1.kernel', 0, 'perceiver_resampler.layers.0.1.1.weight', T),
    ('resampler.layers.layers.ff.fc2.kernel', 2, 'perceiver_resampler.layers.2.1.3.weight', T),
    ('resampler.norm.bias', None, 'perceiver_resampler.norm.bias', SAME),
    ('backbone.blocks.layers.ln1.scale', 3, 'transformer_backbone.h.3.ln_1.weight', SAME),
    ('backbone.blocks.layers.attn.qkv.kernel', 5, 'transformer_backbone.h.5.attn.c_attn.weight', SAME),
    ('backbone.blocks.layers.attn.qkv.bias', 6, 'transformer_backbone.h.6.attn.c_attn.bias', SAME),
    ('backbone.blocks.layers.attn.proj.kernel', 23, 'transformer_backbone.h.23.attn.c_proj.weight', SAME),
    ('backbone.blocks.layers.ln2.bias', 7, 'transformer_backbone.h.7.ln_2.bias', SAME),
    ('backbone.blocks.layers.mlp.fc1.kernel', 0, 'transformer_backbone.h.0.mlp.c_fc.weight', SAME),
    ('backbone.blocks.layers.mlp.fc2.kernel', 12, 'transformer_backbone.h.12.mlp.c_proj.weight', SAME),
    ('backbone.ln_f.scale', None, 'transformer_backbone.ln_f.weight', SAME),
    ('decoder_rgb.proj.kernel', None, 'image_decoder_obs_pred_projector.weight', T),
    ('decoder_rgb.mask_token', None, 'mask_token', SAME),
    ('decoder_rgb.blocks.layers.ln1.scale', 1, 'image_decoder.1.norm1.weight', SAME),
    ('decoder_rgb.blocks.layers.attn.qkv.kernel', 1, 'image_decoder.1.attn.qkv.weight', T),
    ('decoder_rgb.blocks.layers.mlp.fc2.kernel', 0, 'image_decoder.0.mlp.fc2.weight', T),
    ('decoder_rgb.norm.scale', None, 'image_decoder_norm.weight', SAME),
    ('decoder_rgb.head.kernel', None, 'image_decoder_pred.weight', T),
    ('decoder_depth.proj.bias', None, 'depth_decoder_obs_pred_projector.bias', SAME),
    ('decoder_depth.mask_token', None, 'depth_mask_token', SAME),
    ('decoder_depth.blocks.layers.attn.proj.kernel', 0, 'depth_decoder.0.attn.proj.weight', T),
    ('decoder_depth.blocks.layers.ln2.bias', 1, 'depth_decoder.1.norm2.bias', SAME),
    ('decoder_depth.norm.bias', None, 'depth_decoder_norm.bias', SAME),
    ('decoder_depth.head.kernel', None, 'depth_decoder_pred.weight', T),
    ('decoder_sam.proj.kernel', None, 'sam_decoder_obs_pred_projector.weight', T),
    ('decoder_sam.mask_token', None, 'sam_mask_token', SAME),
    ('decoder_sam.blocks.layers.attn.qkv.bias', 0, 'sam_feat_decoder.0.attn.qkv.bias', SAME),
    ('decoder_sam.blocks.layers.mlp.fc1.kernel', 1, 'sam_feat_decoder.1.mlp.fc1.weight', T),
    ('decoder_sam.norm.scale', None, 'sam_decoder_norm.weight', SAME),
    ('decoder_sam.head.bias', None, 'sam_decoder_pred.bias', SAME),
    ('action_head.cond_proj.kernel', None, 'action_model.net.z_embedder.linear.weight', T),
    ('action_head.uncondition', None, 'action_model.net.z_embedder.uncondition', lambda x: x[0]),
    ('action_head.t_fc1.kernel', None, 'action_model.net.t_embedder.mlp.0.weight', T),
    ('action_head.t_fc2.bias', None, 'action_model.net.t_embedder.mlp.2.bias', SAME),
    ('action_head.x_embed.kernel', None, 'action_model.net.x_embedder.linear.weight', T),
    ('action_head.pos_embed', None, 'action_model.net.positional_embedding', SAME),
    ('action_head.blocks.layers.attn.qkv.kernel', 11, 'action_model.net.blocks.11.attn.qkv.weight', T),
    ('action_head.blocks.layers.mlp.fc2.kernel', 4, 'action_model.net.blocks.4.mlp.fc2.weight', T),
    ('action_head.final.kernel', None, 'action_model.net.final_layer.linear.weight', T),
    ('action_head.final.bias', None, 'action_model.net.final_layer.linear.bias', SAME),
]


def _check_spot(flat, sd, rows):
    for target, layer, source, fn in rows:
        got = flat[target] if layer is None else flat[target][layer]
        np.testing.assert_array_equal(got, fn(sd['module.' + source]), err_msg=target)


def test_full_size_dreamvla_exactly_once_and_values(full_dreamvla, default_cfg):
    sd, conv = full_dreamvla
    flat = flatten(conv.params)
    targets = official.target_shapes(default_cfg)
    # Every parameter (outside the frozen encoders) filled, with its shape; every source key used once
    # or skipped by a named rule.
    assert {k: v.shape for k, v in flat.items()} == targets
    assert sorted(conv.used + list(conv.skipped)) == sorted(sd)
    assert not set(conv.used) & set(conv.skipped)
    assert conv.initialised == []
    skipped_modules = {k.split('.')[1] for k in conv.skipped}
    assert skipped_modules == {'action_pose_encoder', 'action_gripper_position_encoder', 'action_projector',
                               'recon_state_decoder', 'recon_arm_state_decoder',
                               'recon_gripper_state_decoder', 'action_model'}
    assert [k for k in conv.skipped if k.startswith('module.action_model')] == [
        'module.action_model.net.history_embedder.linear.bias',
        'module.action_model.net.history_embedder.linear.weight']
    assert all(v.dtype == np.float32 for v in flat.values())
    assert {t.split('.')[0] for t, *_ in SPOT} == set(conv.params)  # every module spot-checked
    _check_spot(flat, sd, SPOT)
    # Fusion semantics: timm qkv rows [q; k; v] -> our columns [q | k | v]; the resampler's to_kv [k; v].
    w = sd['module.image_decoder.0.attn.qkv.weight']
    d = w.shape[1]
    np.testing.assert_array_equal(flat['decoder_rgb.blocks.layers.attn.qkv.kernel'][0][:, d:2 * d],
                                  w[d:2 * d].T)
    kv = sd['module.perceiver_resampler.layers.0.0.to_kv.weight']
    np.testing.assert_array_equal(flat['resampler.layers.layers.to_kv.kernel'][0][:, :kv.shape[0] // 2],
                                  kv[:kv.shape[0] // 2].T)


def test_full_size_seer_drops_and_initialises_by_name(full_seer, default_cfg):
    sd, conv = full_seer
    flat = flatten(conv.params)
    targets = official.target_shapes(default_cfg)
    assert sorted(conv.used + list(conv.skipped)) == sorted(sd)
    assert set(flat) | set(conv.initialised) == set(targets) and not set(flat) & set(conv.initialised)
    assert {k.split('.')[0] if k.split('.')[0] != 'queries' else k for k in conv.initialised} == {
        'queries.rgb', 'queries.depth', 'queries.sam', 'decoder_depth', 'decoder_sam', 'action_head'}
    assert set(conv.params) == {'text_projector', 'state_encoder', 'image_projectors', 'queries',
                                'timestep_embedding', 'embedding_ln', 'resampler', 'backbone', 'decoder_rgb'}
    assert set(conv.params['queries']) == {'action'}
    assert 'module.obs_tokens' in conv.skipped and 'module.action_decoder.0.weight' in conv.skipped
    assert 'reset_obs_token' in conv.skipped['module.obs_tokens']
    seer_rows = [r for r in SPOT if r[0].split('.')[0] in conv.params and r[0] != 'queries.rgb'
                 and r[0] in flat and r[2] in {k[len('module.'):] for k in sd}]
    assert len(seer_rows) > 30
    _check_spot(flat, sd, seer_rows)
    assert 'not in source (initialised): ' in official.summary(conv)


def test_seer_timestep_embedding_is_truncated():
    cfg = load_config('debug')
    shapes = official_shapes(cfg, 'seer', history=cfg.model.history + 4)
    sd = synthetic(shapes)
    conv = official.convert_state_dict(sd, cfg, 'seer')
    table = sd['module.transformer_backbone_position_embedding']
    np.testing.assert_array_equal(conv.params['timestep_embedding'], table[0, :cfg.model.history, 0])
    # The DreamVLA table is exact: a different history is another config, not something to truncate.
    sd = synthetic(official_shapes(cfg, 'dreamvla', history=cfg.model.history + 4))
    with pytest.raises(ConvertError, match=r"transformer_backbone_position_embedding' \[1, 6, 1, 64\].*"
                                           r"'timestep_embedding' \[2, 64\]"):
        official.convert_state_dict(sd, cfg, 'dreamvla')


def test_wrong_kind_and_foreign_files_are_one_sentence():
    cfg = load_config('debug')
    seer, dvla = synthetic(official_shapes(cfg, 'seer')), synthetic(official_shapes(cfg, 'dreamvla'))
    with pytest.raises(ConvertError, match=r'is a Seer\(-Large\) checkpoint .*convert it with --seer, not '
                                           r'--dreamvla\.$'):
        official.convert_state_dict(seer, cfg, 'dreamvla', source='seer.pth')
    with pytest.raises(ConvertError, match=r'is a DreamVLA checkpoint .*with --dreamvla, not --seer\.$'):
        official.convert_state_dict(dvla, cfg, 'seer', source='dvla.pth')
    gpt2_like = {'transformer.h.0.ln_1.weight': np.zeros(4, np.float32)}
    with pytest.raises(ConvertError, match='neither a DreamVLA nor a Seer checkpoint'):
        official.convert_state_dict(gpt2_like, cfg, 'dreamvla', source='gpt2.bin')
    # Without the DDP prefix it is still recognised (a state dict saved from the bare module).
    bare = {k[len('module.'):]: v for k, v in dvla.items()}
    assert official.convert_state_dict(bare, cfg, 'dreamvla').kind == 'dreamvla'


def test_missing_unexpected_and_shape_errors_name_the_keys():
    cfg = load_config('debug')
    base = synthetic(official_shapes(cfg, 'dreamvla'))
    sd = dict(base)
    del sd['module.depth_decoder.0.mlp.fc1.bias']
    with pytest.raises(ConvertError, match=r'1 tensor\(s\) needed .* missing .*module\.depth_decoder\.0\.mlp'
                                           r'\.fc1\.bias'):
        official.convert_state_dict(sd, cfg, 'dreamvla')
    sd = dict(base, **{'module.dino_feat_tokens': np.zeros((1, 1, 8, 64), np.float32)})
    with pytest.raises(ConvertError, match=r'have no place .*module\.dino_feat_tokens'):
        official.convert_state_dict(sd, cfg, 'dreamvla')
    sd = dict(base, **{'module.state_projector.weight': np.zeros((64, 100), np.float32)})
    with pytest.raises(ConvertError, match=r"shape mismatch: 'module\.state_projector\.weight' \[64, 100\] "
                                           r"cannot fill .*'state_encoder\.out\.kernel' \[128, 64\]"):
        official.convert_state_dict(sd, cfg, 'dreamvla')
    sd = dict(base, **{'module.sam_feat_tokens': np.zeros((1, 1, 10, 64), np.float32)})
    with pytest.raises(ConvertError,
                       match=r"'module\.sam_feat_tokens' \[1, 1, 10, 64\] .*'queries\.sam' \[4, 64\]"):
        official.convert_state_dict(sd, cfg, 'dreamvla')
    # Five-layer GPT-2 in a two-layer config: the extra layers have no place.
    sd = dict(base, **{k.replace('h.1.', 'h.4.'): v for k, v in base.items() if '.h.1.' in k})
    with pytest.raises(ConvertError, match=r'have no place .*transformer_backbone\.h\.4\.'):
        official.convert_state_dict(sd, cfg, 'dreamvla')


def _init_states(cfg, seed=0):
    """Parameter states of a debug-size model, split as the training code splits them, holding random
    numpy values (an initialised model without the cost of compiling its init)."""
    graphdef, params, frozen, rest = nnx.split(dreamvla.abstract_model(cfg), dreamvla.trainable_filter(cfg),
                                               dreamvla.frozen_filter(cfg), ...)
    rng = np.random.default_rng(seed)
    for state in (params, frozen):
        nnx.replace_by_pure_dict(state, jax.tree.map(
            lambda x: (0.02 * rng.standard_normal(x.shape)).astype(x.dtype), state.to_pure_dict()))
    return graphdef, params, frozen, rest


def test_debug_file_round_trip_cli_and_sample_actions(tmp_path):
    """``.pth`` (wrapped like a training checkpoint) -> CLI -> Orbax -> ``load_official_into`` -> the
    model acts, with every converted value in place."""
    cfg = load_config('debug')
    sd = synthetic(official_shapes(cfg, 'dreamvla'))
    pth = save_pth(tmp_path / 'dreamvla.pth', sd)
    out = tmp_path / 'converted'
    assert convert_weights.main(['--dreamvla', str(pth), '--out', str(out), '--config',
                                 str(ROOT / 'configs/calvin.py') + ':debug', '--no-progress']) == 0
    params, meta = official.load_converted(out)
    assert meta['kind'] == 'dreamvla' and meta['format_version'] == official.FORMAT_VERSION
    assert meta['initialised'] == [] and 'module.action_projector.weight' in meta['skipped']
    assert meta['tensors_used'] + len(meta['skipped']) == len(sd)

    graphdef, state, frozen, rest = _init_states(cfg)
    frozen_before = jax.tree.map(np.asarray, frozen.to_pure_dict())
    returned = official.load_official_into(out, state, frozen)
    assert returned['kind'] == 'dreamvla'
    flat = flatten(jax.tree.map(np.asarray, state.to_pure_dict()))
    assert set(flat) == set(flatten(params))
    for k, v in flatten(params).items():
        np.testing.assert_array_equal(flat[k], v, err_msg=k)
    rows = [r for r in SPOT if 'module.' + r[2] in sd]  # the layers the debug size has
    assert len(rows) > 40
    _check_spot(flat, sd, rows)
    # The frozen encoders were not in the checkpoint: untouched.
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, frozen.to_pure_dict()),
                 frozen_before)

    model = nnx.merge(graphdef, state, frozen, rest)
    inputs = {k: jnp.asarray(v) for k, v in preprocess.preprocess(fake_batch.fake_batch(cfg, 2), cfg).items()}
    actions = jax.jit(lambda x, r: model.sample_actions(x, r))(inputs, jax.random.key(0))
    assert actions.shape == (2, cfg.model.history, cfg.model.action.chunk, 7)
    assert bool(jnp.isfinite(actions).all())


def test_seer_round_trip_keeps_the_initialisation_of_what_seer_lacks(tmp_path):
    cfg = load_config('debug')
    sd = synthetic(official_shapes(cfg, 'seer'))
    conv = official.convert_state_dict(sd, cfg, 'seer')
    out = official.save_converted(tmp_path / 'seer', conv.params,
                                  {'kind': 'seer', 'initialised': conv.initialised, 'skipped': conv.skipped})
    _, state, frozen, _ = _init_states(cfg)
    before = flatten(jax.tree.map(np.asarray, state.to_pure_dict()))
    official.load_official_into(out, state, frozen)
    after = flatten(jax.tree.map(np.asarray, state.to_pure_dict()))
    for k in conv.initialised:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)
    np.testing.assert_array_equal(after['queries.action'], sd['module.action_pred_token'][0, 0])
    np.testing.assert_array_equal(after['decoder_rgb.mask_token'], sd['module.mask_token'])
    assert not np.array_equal(after['backbone.ln_f.scale'], before['backbone.ln_f.scale'])
    # Into abstract states (as evaluation may build them): what Seer lacks stays abstract.
    _, state, frozen, _ = nnx.split(dreamvla.abstract_model(cfg), dreamvla.trainable_filter(cfg),
                                    dreamvla.frozen_filter(cfg), ...)
    official.load_official_into(out, state, frozen)
    flat = flatten(state.to_pure_dict())
    assert {k for k, v in flat.items() if isinstance(v, jax.ShapeDtypeStruct)} == set(conv.initialised)


def test_loader_rejects_mismatched_configs_and_layouts(tmp_path):
    cfg = load_config('debug')
    conv = official.convert_state_dict(synthetic(official_shapes(cfg, 'dreamvla')), cfg, 'dreamvla')
    out = official.save_converted(tmp_path / 'dv', conv.params, {'kind': 'dreamvla', 'initialised': []})
    # A model with a DINOv2 head (the paper preset's layout at debug size) is another config.
    paper = load_config('debug')
    paper.model.dream.dino.enabled = True
    abstract = dreamvla.abstract_model(paper)
    _, state, frozen, _ = nnx.split(abstract, dreamvla.trainable_filter(paper), dreamvla.frozen_filter(paper),
                                    ...)
    with pytest.raises(ConvertError, match=r"holds no 'decoder_dino'.*another config"):
        official.load_official_into(out, state, frozen)
    # CLIP/MAE/GPT-2 checkpoints and official conversions are not interchangeable.
    pre = save_pretrained(tmp_path / 'pre', {'backbone': conv.params['backbone']}, {'parts': {}})
    with pytest.raises(ConvertError, match='--config.init.pretrained'):
        official.load_converted(pre)
    with pytest.raises(ConvertError, match='--config.init.official'):
        load_pretrained(out)
    with pytest.raises(ConvertError, match='does not exist'):
        official.load_converted(tmp_path / 'nothing')


def test_cli_wrong_kind_exits_2_with_one_sentence(tmp_path):
    cfg = load_config('debug')
    pth = save_pth(tmp_path / 'seer.pth', synthetic(official_shapes(cfg, 'seer')), wrap=False)
    res = subprocess.run([sys.executable, '-m', 'dreamvla_jax.convert_weights', '--dreamvla', str(pth),
                          '--out', str(tmp_path / 'o'), '--config', 'configs/calvin.py:debug',
                          '--no-progress'],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: ') and '--seer, not --dreamvla' in err[0]
    assert not (tmp_path / 'o').exists()


def test_original_mae_pth_matches_the_hf_route(tmp_path):
    """The timm-named ``mae_pretrain_vit_base.pth`` table gives the same MAEViT params as the HF table."""
    from safetensors.numpy import load_file
    from test_convert_hf import make_mae

    from dreamvla_jax.convert import mae

    v = load_config('debug').model.vision
    hf_dir = make_mae(tmp_path / 'hf', v, pretraining=False)
    hf = mae.convert(hf_dir, v)
    hf_sd = load_file(hf_dir / 'model.safetensors')
    hf_sd = {k.removeprefix('vit.'): val for k, val in hf_sd.items()}
    timm_sd = {'cls_token': hf_sd['embeddings.cls_token'],
               'pos_embed': hf_sd['embeddings.position_embeddings'],
               'patch_embed.proj.weight': hf_sd['embeddings.patch_embeddings.projection.weight'],
               'patch_embed.proj.bias': hf_sd['embeddings.patch_embeddings.projection.bias'],
               'norm.weight': hf_sd['layernorm.weight'], 'norm.bias': hf_sd['layernorm.bias']}
    for i in range(v.layers):
        h, t = f'encoder.layer.{i}.', f'blocks.{i}.'
        for x in ('weight', 'bias'):
            timm_sd[t + f'attn.qkv.{x}'] = np.concatenate([hf_sd[h + f'attention.attention.{n}.{x}']
                                                           for n in ('query', 'key', 'value')])
            timm_sd[t + f'attn.proj.{x}'] = hf_sd[h + f'attention.output.dense.{x}']
            timm_sd[t + f'norm1.{x}'] = hf_sd[h + f'layernorm_before.{x}']
            timm_sd[t + f'norm2.{x}'] = hf_sd[h + f'layernorm_after.{x}']
            timm_sd[t + f'mlp.fc1.{x}'] = hf_sd[h + f'intermediate.dense.{x}']
            timm_sd[t + f'mlp.fc2.{x}'] = hf_sd[h + f'output.dense.{x}']
    pth = tmp_path / 'mae_pretrain_vit_base.pth'
    torch.save({'model': {k: torch.from_numpy(np.array(a)) for k, a in timm_sd.items()}}, pth)
    conv = official.convert_mae_pth(pth, v)
    assert sorted(conv.used) == sorted(timm_sd) and conv.skipped == []
    jax.tree.map(np.testing.assert_array_equal, conv.params, hf.params)
    # ... and the CLI takes the file for --mae.
    out = tmp_path / 'out'
    assert convert_weights.main(['--mae', str(pth), '--out', str(out), '--config',
                                 str(ROOT / 'configs/calvin.py') + ':debug', '--no-progress']) == 0
    jax.tree.map(np.testing.assert_array_equal, load_pretrained(out)['vision_encoder'], hf.params)
    # ... also next to an official checkpoint, whose loader then fills the frozen encoder (cast to its dtype).
    cfg = load_config('debug')
    seer = save_pth(tmp_path / 'seer.pth', synthetic(official_shapes(cfg, 'seer')))
    out = tmp_path / 'out_seer'
    assert convert_weights.main(['--seer', str(seer), '--mae', str(pth), '--out', str(out), '--config',
                                 str(ROOT / 'configs/calvin.py') + ':debug', '--no-progress']) == 0
    params, meta = official.load_converted(out)
    assert meta['kind'] == 'seer' and meta['parts']['vision_encoder']['tensors_used'] == len(timm_sd)
    _, state, frozen, _ = _init_states(cfg)
    official.load_official_into(out, state, frozen)
    got = frozen.to_pure_dict()['vision_encoder']
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b.astype(a.dtype)), got, hf.params)
    bad = dict(timm_sd, pos_embed=np.zeros_like(timm_sd['pos_embed']) + 1)
    torch.save({'model': {k: torch.from_numpy(np.array(a)) for k, a in bad.items()}}, pth)
    with pytest.raises(ConvertError, match="'pos_embed'.*not the fixed 2-D sin-cos table"):
        official.convert_mae_pth(pth, v)


@pytest.mark.slow
def test_full_size_loader_round_trip_into_abstract_states(full_dreamvla, default_cfg, tmp_path):
    """Default config, 2 GB through Orbax into ``jax.eval_shape`` states (no model weights allocated)."""
    sd, conv = full_dreamvla
    out = official.save_converted(tmp_path / 'full', conv.params,
                                  {'kind': 'dreamvla', 'initialised': [], 'skipped': conv.skipped})
    cfg = default_cfg
    _, state, frozen, _ = nnx.split(dreamvla.abstract_model(cfg), dreamvla.trainable_filter(cfg),
                                    dreamvla.frozen_filter(cfg), ...)
    official.load_official_into(out, state, frozen)
    flat = flatten(state.to_pure_dict())
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in flat.values())
    _check_spot(flat, sd, SPOT)
    # The frozen encoders were not in the checkpoint: still abstract.
    assert all(isinstance(v, jax.ShapeDtypeStruct) for v in jax.tree.leaves(frozen.to_pure_dict()))
