"""convert_weights, HF part (issue 4): parity with transformers, the exactly-once contract, clear errors.

Reference models are randomly initialised transformers PyTorch models saved with ``save_pretrained``
(nothing is downloaded). The fast parity test uses the real widths (CLIP ViT-B/32 text, MAE ViT-B/16,
GPT-2 Medium) with 2 layers; ``test_full_depth_parity`` (slow) uses every layer.
"""

import json
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import ROOT, load_config
from flax import nnx
from safetensors.numpy import load_file, save_file

from dreamvla_jax import convert_weights
from dreamvla_jax.convert import clip, gpt2, mae
from dreamvla_jax.convert.common import ConvertError
from dreamvla_jax.convert.pretrained import load_metadata, load_pretrained, merge_into
from dreamvla_jax.models.mae_vit import MAEViT

TOL = 1e-5
transformers.logging.set_verbosity_error()


# ---------------------------------------------------------------------------------------------- builders

def _clip_text_kw(t):
    return dict(vocab_size=t.vocab_size, max_position_embeddings=t.context, hidden_size=t.width,
                num_hidden_layers=t.layers, num_attention_heads=t.heads, intermediate_size=t.mlp,
                layer_norm_eps=t.ln_eps, hidden_act='quick_gelu')


def make_clip(path, t, *, with_vision=True):
    """CLIPModel (text tower per ``t`` plus a small image tower the converter must skip), or a
    CLIPTextModelWithProjection when ``with_vision`` is False."""
    torch.manual_seed(0)
    if with_vision:
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      image_size=32, patch_size=16)
        model = transformers.CLIPModel(transformers.CLIPConfig(
            text_config=_clip_text_kw(t), vision_config=vision, projection_dim=t.proj_dim))
    else:
        model = transformers.CLIPTextModelWithProjection(
            transformers.CLIPTextConfig(projection_dim=t.proj_dim, **_clip_text_kw(t)))
    model.save_pretrained(path)
    return path


def make_mae(path, v, *, pretraining=True, eps=None):
    """ViTMAEForPreTraining (encoder per ``v`` plus a tiny decoder to skip) or ViTMAEModel."""
    torch.manual_seed(1)
    kw = dict(hidden_size=v.width, num_hidden_layers=v.layers, num_attention_heads=v.heads,
              intermediate_size=v.mlp, image_size=v.image_size, patch_size=v.patch, hidden_act='gelu',
              layer_norm_eps=v.ln_eps if eps is None else eps, qkv_bias=True,
              decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
              decoder_intermediate_size=32)
    cls = transformers.ViTMAEForPreTraining if pretraining else transformers.ViTMAEModel
    model = cls(transformers.ViTMAEConfig(**kw))
    emb = (model.vit if pretraining else model).embeddings
    # transformers 5 skips the sin-cos init of a freshly built model (the table stays zero); a real
    # checkpoint holds the table, so rebuild it with HF's own code before saving.
    emb.patch_embeddings.projection._is_hf_initialized = False
    emb.initialize_weights()
    assert emb.position_embeddings.abs().max() > 0.5
    # Perturb the CLS token and LayerNorm affine so those mappings are exercised (HF inits them to 0 / 1).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if 'layernorm' in name or 'cls_token' in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return path


def make_gpt2(path, m, *, lm_head=False, dtype=torch.float32):
    torch.manual_seed(2)
    b = m.backbone
    conf = transformers.GPT2Config(n_embd=m.hidden, n_layer=b.layers, n_head=b.heads, n_inner=b.mlp,
                                   layer_norm_epsilon=b.ln_eps, activation_function='gelu_new')
    model = (transformers.GPT2LMHeadModel if lm_head else transformers.GPT2Model)(conf)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if 'ln_' in name or name.endswith('bias'):
                p.add_(0.1 * torch.randn_like(p))
    model.to(dtype).save_pretrained(path)
    return path


def fast_config():
    """Default (real-width) config with 2 layers per tower and an fp32 vision encoder."""
    c = load_config('default')
    c.model.text.layers = 2
    c.model.vision.layers = 2
    c.model.backbone.layers = 2
    return c


@pytest.fixture(scope='module')
def real_width(tmp_path_factory):
    c = fast_config()
    d = tmp_path_factory.mktemp('hf_real_width')
    return c, {'clip': make_clip(d / 'clip', c.model.text), 'mae': make_mae(d / 'mae', c.model.vision),
               'gpt2': make_gpt2(d / 'gpt2', c.model)}


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """Debug-preset folders in the other accepted layouts (text model with projection, bare ViTMAEModel,
    GPT2LMHeadModel with its ``transformer.`` prefix)."""
    c = load_config('debug')
    d = tmp_path_factory.mktemp('hf_tiny')
    return c, {'clip': make_clip(d / 'clip', c.model.text, with_vision=False),
               'mae': make_mae(d / 'mae', c.model.vision, pretraining=False),
               'gpt2': make_gpt2(d / 'gpt2', c.model, lm_head=True)}


# ---------------------------------------------------------------------------------------------- parity

def test_real_width_parity(real_width):
    c, dirs = real_width
    results = {}
    for name, module, section in (('clip', clip, c.model.text), ('mae', mae, c.model.vision),
                                  ('gpt2', gpt2, c.model)):
        converted = module.convert(dirs[name], section)
        results[name] = module.verify(dirs[name], converted.params, section)
    print('max abs diffs (real widths, 2 layers):', results)
    for name, diffs in results.items():
        for key, d in diffs.items():
            assert d <= TOL, f'{name} {key}: {d}'


def test_skipped_tensors_are_reported_by_name(real_width):
    c, dirs = real_width
    text = clip.convert(dirs['clip'], c.model.text)
    assert 'logit_scale' in text.skipped and 'visual_projection.weight' in text.skipped
    assert all(k.startswith(('vision_model.', 'visual_projection', 'logit_scale')) for k in text.skipped)
    assert 'text_projection.weight' in text.used and 'text_model.final_layer_norm.weight' in text.used
    vision = mae.convert(dirs['mae'], c.model.vision)
    assert vision.skipped and all(k.startswith(('vit.decoder.', 'decoder.')) for k in vision.skipped)
    assert 'vit.embeddings.position_embeddings' in vision.used  # consumed by the sin-cos check
    back = gpt2.convert(dirs['gpt2'], c.model)
    assert back.skipped == ['wpe.weight', 'wte.weight']
    # 12 tensors per layer + ln_f, each used once.
    assert len(back.used) == 12 * c.model.backbone.layers + 2


def test_mapping_is_sensitive(real_width):
    """Swapping q and k in the fused kernel must break parity: the check is not vacuous."""
    c, dirs = real_width
    params = mae.convert(dirs['mae'], c.model.vision).params
    kernel = params['blocks']['layers']['attn']['qkv']['kernel']
    w = c.model.vision.width
    params['blocks']['layers']['attn']['qkv']['kernel'] = np.concatenate(
        [kernel[..., w:2 * w], kernel[..., :w], kernel[..., 2 * w:]], axis=-1)
    assert max(mae.verify(dirs['mae'], params, c.model.vision).values()) > 1e-3


# ---------------------------------------------------------------------------------------------- CLI

def _cli(argv, capsys):
    rc = convert_weights.main([*argv, '--no-progress'])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_converts_verifies_and_train_can_merge(tiny, tmp_path, capsys):
    c, dirs = tiny
    out = tmp_path / 'pretrained'
    rc, stdout, err = _cli(['--clip', str(dirs['clip']), '--mae', str(dirs['mae']),
                            '--gpt2', str(dirs['gpt2']), '--out', str(out),
                            '--config', str(ROOT / 'configs/calvin.py:debug'), '--verify'], capsys)
    assert rc == 0, err
    assert stdout.count(': ok') == 3, stdout
    loaded = load_pretrained(out)
    assert set(loaded) == {'text_encoder', 'vision_encoder', 'backbone'}
    ref = gpt2.convert(dirs['gpt2'], c.model).params
    np.testing.assert_array_equal(loaded['backbone']['blocks']['layers']['attn']['qkv']['kernel'],
                                  ref['blocks']['layers']['attn']['qkv']['kernel'])
    meta = load_metadata(out)
    assert meta['parts']['backbone']['architectures'] == ['GPT2LMHeadModel']
    assert meta['parts']['backbone']['tensors_skipped'] == ['transformer.wpe.weight',
                                                            'transformer.wte.weight']

    # merge_into: cast to the target dtype (bf16 vision encoder), and refuse mismatched trees.
    vcfg = c.model.vision.copy_and_resolve_references()
    vcfg.param_dtype = 'bfloat16'
    target = {'vision_encoder': nnx.state(nnx.eval_shape(lambda: MAEViT(vcfg, rngs=nnx.Rngs(0))),
                                          nnx.Param).to_pure_dict(), 'other': {'w': np.zeros(3)}}
    merged = merge_into(target, {'vision_encoder': loaded['vision_encoder']})
    assert merged['other'] is target['other']
    assert {str(x.dtype) for x in jax.tree.leaves(merged['vision_encoder'])} == {'bfloat16'}
    np.testing.assert_allclose(np.asarray(merged['vision_encoder']['norm']['scale'], np.float32),
                               loaded['vision_encoder']['norm']['scale'], rtol=1e-2)
    bad = jax.tree.map(lambda x: x, loaded['vision_encoder'])
    bad['norm']['scale'] = bad['norm']['scale'][:-1]
    with pytest.raises(ConvertError, match=r"'norm\.scale' has shape \[31\] but the model expects \[32\]"):
        merge_into(target, {'vision_encoder': bad})
    del bad['norm']['scale']
    with pytest.raises(ConvertError, match=r'missing \[.norm\.scale.\]'):
        merge_into(target, {'vision_encoder': bad})
    with pytest.raises(ConvertError, match="part 'backbone'"):
        merge_into(target, {'backbone': loaded['backbone']})


def test_cli_verify_fails_above_tolerance(tiny, tmp_path, capsys):
    _, dirs = tiny
    rc, stdout, err = _cli(['--gpt2', str(dirs['gpt2']), '--out', str(tmp_path / 'o'), '--verify',
                            '--config', str(ROOT / 'configs/calvin.py:debug'), '--tolerance', '0'], capsys)
    assert rc == 1 and 'FAIL' in stdout and 'verification failed' in err


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_tensors(folder, fn):
    f = folder / 'model.safetensors'
    tensors = load_file(str(f))
    fn(tensors)
    save_file(tensors, str(f))


def _error(argv, capsys):
    rc, _, err = _cli(argv, capsys)
    assert rc == 2, err
    assert 'Traceback' not in err and err.startswith('error: ') and err.count('\n') == 1, err
    return err


def test_bad_inputs_are_one_clear_sentence(tiny, tmp_path, capsys):
    c, dirs = tiny
    base = ['--out', str(tmp_path / 'o'), '--config', str(ROOT / 'configs/calvin.py:debug')]

    err = _error(['--mae', str(tmp_path / 'nope'), *base], capsys)
    assert 'does not exist' in err and 'nope' in err

    err = _error(['--clip', str(dirs['gpt2']), *base], capsys)
    assert "model_type 'gpt2'" in err and '--clip expects a CLIP model' in err

    trunc = _copy(dirs['mae'], tmp_path / 'trunc')
    data = (trunc / 'model.safetensors').read_bytes()
    (trunc / 'model.safetensors').write_bytes(data[:len(data) // 2])
    err = _error(['--mae', str(trunc), *base], capsys)
    assert 'truncated' in err and str(trunc / 'model.safetensors') in err

    shape = _copy(dirs['gpt2'], tmp_path / 'shape')
    wrong = np.zeros((64, 100), np.float32)
    _edit_tensors(shape, lambda t: t.update({'transformer.h.1.mlp.c_fc.weight': wrong}))
    err = _error(['--gpt2', str(shape), *base], capsys)
    assert "'transformer.h.1.mlp.c_fc.weight' [64, 100]" in err
    assert "'blocks.layers.mlp.fc1.kernel' [64, 128]" in err

    missing = _copy(dirs['gpt2'], tmp_path / 'missing')
    _edit_tensors(missing, lambda t: t.pop('transformer.h.0.ln_2.bias'))
    err = _error(['--gpt2', str(missing), *base], capsys)
    assert 'missing' in err and 'h.0.ln_2.bias' in err

    extra = _copy(dirs['gpt2'], tmp_path / 'extra')
    _edit_tensors(extra, lambda t: t.update({'transformer.h.0.attn.rotary': np.zeros(3, np.float32)}))
    err = _error(['--gpt2', str(extra), *base], capsys)
    assert 'no place in backbone' in err and 'transformer.h.0.attn.rotary' in err

    foreign = tmp_path / 'foreign'
    foreign.mkdir()
    shutil.copy(dirs['mae'] / 'config.json', foreign / 'config.json')
    shutil.copy(dirs['gpt2'] / 'model.safetensors', foreign / 'model.safetensors')
    err = _error(['--mae', str(foreign), *base], capsys)
    assert "has no tensor named 'vit.embeddings.cls_token'" in err

    # A GPT-2 small folder for the GPT-2 Medium (default) config: fails on config.json, before the weights.
    small = tmp_path / 'gpt2_small'
    small.mkdir()
    (small / 'config.json').write_text(json.dumps({'model_type': 'gpt2', 'n_embd': 768, 'n_layer': 12,
                                                   'n_head': 12}))
    (small / 'model.safetensors').write_bytes(b'not read')
    err = _error(['--gpt2', str(small), '--out', str(tmp_path / 'o')], capsys)
    assert 'n_embd = 768' in err and 'model.hidden = 1024' in err and str(small) in err

    text_only = tmp_path / 'clip_text_model'
    transformers.CLIPTextModel(transformers.CLIPTextConfig(**_clip_text_kw(c.model.text))).save_pretrained(
        text_only)
    err = _error(['--clip', str(text_only), *base], capsys)
    assert 'no text_projection' in err


def test_mae_eps_and_learned_position_table(tiny, tmp_path):
    c, dirs = tiny
    v = c.model.vision
    hf_eps = make_mae(tmp_path / 'eps', v, eps=1e-12)  # what facebook/vit-mae-base's config.json says
    with pytest.raises(ConvertError, match='--allow-eps-mismatch'):
        mae.convert(hf_eps, v)
    # Compatible weights: with the flag the features differ only slightly from the folder's own model.
    assert max(mae.verify(hf_eps, mae.convert(hf_eps, v, check_eps=False).params, v).values()) < 1e-3

    learned = _copy(dirs['mae'], tmp_path / 'learned')
    _edit_tensors(learned, lambda t: t.update(
        {'embeddings.position_embeddings': np.random.default_rng(0).normal(
            size=t['embeddings.position_embeddings'].shape).astype(np.float32)}))
    with pytest.raises(ConvertError, match='not the fixed 2-D sin-cos table'):
        mae.convert(learned, v)


def test_bf16_sharded_and_pytorch_bin(tiny, tmp_path):
    c, dirs = tiny
    ref = gpt2.convert(dirs['gpt2'], c.model).params
    bf16 = make_gpt2(tmp_path / 'bf16', c.model, lm_head=True, dtype=torch.bfloat16)
    low = gpt2.convert(bf16, c.model).params
    k = ['blocks', 'layers', 'mlp', 'fc1', 'kernel']
    a, b = ref, low
    for key in k:
        a, b = a[key], b[key]
    assert b.dtype == np.float32
    np.testing.assert_allclose(b, np.asarray(jnp.asarray(a).astype(jnp.bfloat16).astype(jnp.float32)))

    pt = tmp_path / 'bin'
    pt.mkdir()
    shutil.copy(dirs['gpt2'] / 'config.json', pt / 'config.json')
    tensors = load_file(str(dirs['gpt2'] / 'model.safetensors'))
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, pt / 'pytorch_model.bin')
    from_bin = gpt2.convert(pt, c.model).params
    jax.tree.map(np.testing.assert_array_equal, from_bin, ref)

    sharded = tmp_path / 'sharded'
    model = transformers.GPT2LMHeadModel.from_pretrained(dirs['gpt2'])
    model.save_pretrained(sharded, max_shard_size='100KB')
    assert len(list(sharded.glob('model-*.safetensors'))) > 1
    jax.tree.map(np.testing.assert_array_equal, gpt2.convert(sharded, c.model).params, ref)


def test_cli_entry_point_exits_2_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, '-m', 'dreamvla_jax.convert_weights',
                           '--gpt2', str(tmp_path / 'x'), '--out', str(tmp_path / 'o'), '--no-progress'],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    assert proc.stderr.strip() == f"error: --gpt2: folder {tmp_path / 'x'} does not exist."


# ---------------------------------------------------------------------------------------------- slow

@pytest.mark.slow
def test_full_depth_parity(tmp_path):
    """Every layer: CLIP ViT-B/32 text (12), MAE ViT-B/16 (12), GPT-2 Medium (24), through the CLI."""
    c = load_config('default')
    dirs = {'clip': make_clip(tmp_path / 'clip', c.model.text),
            'mae': make_mae(tmp_path / 'mae', c.model.vision),
            'gpt2': make_gpt2(tmp_path / 'gpt2', c.model)}
    args = convert_weights.parse_args(['--clip', str(dirs['clip']), '--mae', str(dirs['mae']),
                                       '--gpt2', str(dirs['gpt2']), '--out', str(tmp_path / 'out'),
                                       '--config', str(ROOT / 'configs/calvin.py'), '--verify',
                                       '--no-progress'])
    diffs = convert_weights.run(args)
    print('max abs diffs (full depth):', diffs)
    assert set(diffs) == {'clip', 'mae', 'gpt2'}
    for name, d in diffs.items():
        for key, value in d.items():
            assert value <= TOL, f'{name} {key}: {value}'
    loaded = load_pretrained(tmp_path / 'out')
    assert loaded['backbone']['blocks']['layers']['attn']['qkv']['kernel'].shape == (24, 1024, 3072)
    assert loaded['vision_encoder']['blocks']['layers']['mlp']['fc1']['kernel'].shape == (12, 768, 3072)
