"""The assembled model: parameter counts (SPEC section 10), shapes, dtypes, sharding parity."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, load_config
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from dreamvla_jax.data import fake_batch, preprocess
from dreamvla_jax.models import dreamvla
from dreamvla_jax.summary import summarize

SPEC_COUNTS = {
    'text_encoder': 63_428_096, 'vision_encoder': 85_647_360, 'resampler': 18_902_016,
    'backbone': 302_311_424, 'decoder_rgb': 27_032_320, 'decoder_depth': 26_507_520,
    'decoder_sam': 26_507_520, 'action_head': 86_609_927,
}
SPEC_SMALL_PARTS = 5_854_208  # text_projector + state + image projectors + queries + timestep emb + LN


def close(a, b, rel=1e-3):
    return abs(a - b) <= rel * b


def test_default_counts_match_spec():
    s = summarize(load_config('default'))
    for name, n in SPEC_COUNTS.items():
        assert close(s['modules'][name]['params'], n), name
    small = sum(m['params'] for k, m in s['modules'].items() if k not in SPEC_COUNTS)
    assert close(small, SPEC_SMALL_PARTS)
    assert close(s['trainable'], 493_724_935) and close(s['total'], 642_800_391)
    assert not s['modules']['text_encoder']['trainable'] and not s['modules']['vision_encoder']['trainable']
    assert 'decoder_dino' not in s['modules']  # disabled head: no parameters at all


def test_paper_preset_counts():
    s = summarize(load_config('paper'))
    assert close(s['trainable'], 520_767_495)
    assert close(s['modules']['decoder_dino']['params'], 27_032_320)


def test_summary_cli_json():
    out = subprocess.run([sys.executable, '-m', 'dreamvla_jax.summary', '--config', 'configs/calvin.py', '--json'],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    s = json.loads(out)
    assert set(s) == {'modules', 'total', 'trainable'}
    assert s['modules']['backbone'] == {'params': 302_311_424, 'trainable': True}
    assert s['total'] == 642_800_391 and s['trainable'] == 493_724_935


def test_summary_cli_bad_preset_is_one_sentence():
    r = subprocess.run([sys.executable, '-m', 'dreamvla_jax.summary', '--config', 'configs/calvin.py:nope'],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count('\n') == 0 and 'unknown preset' in r.stderr and 'Traceback' not in r.stderr


def module_outputs(model, inputs, s):
    """Every top-level module's output for a batch (used for the shape tables)."""
    cfg = model.cfg
    out = {}
    pooled, aux = model.text_encoder(inputs['text_tokens'])
    out['text_encoder'] = pooled
    out['text_projector'] = model.text_projector(pooled)
    imgs = inputs['rgb_static'][:, :s]
    flat = imgs.reshape((-1,) + imgs.shape[2:])
    tokens = model.vision_encoder(flat)
    out['vision_encoder'] = tokens
    out['resampler'] = model.resampler(tokens[:, 1:].astype(jnp.float32))
    out['state_encoder'] = model.state_encoder(inputs['robot_obs'][:, :s])
    ctx = model.encode(inputs)
    out['context'] = ctx
    bo = model.backbone_forward(ctx)
    out.update(bo)
    b = ctx.shape[0]
    for name in ('rgb', 'depth', 'dino', 'sam'):
        if hasattr(model, f'decoder_{name}'):
            dream = bo[f'dream_{name}'].reshape(b * s, -1, cfg.hidden)
            out[f'decoder_{name}'] = getattr(model, f'decoder_{name}')(dream)
    cond = bo['action'].reshape(b * s, cfg.action.chunk, -1)
    out['action_head'] = model.action_head(jnp.zeros((b * s, cfg.action.chunk, 7)), jnp.zeros(b * s, jnp.int32), cond)
    return out


def expected_shapes(cfg, b):
    m = cfg.model
    s, h, n_img = m.history, m.hidden, b * m.history
    grid = (m.vision.image_size // m.vision.patch) ** 2
    dreams = {'rgb', 'depth', 'sam'} | ({'dino'} if m.dream.dino.enabled else set())
    shapes = {
        'text_encoder': (b, m.text.proj_dim), 'text_projector': (b, h),
        'vision_encoder': (n_img, 1 + grid, m.vision.width), 'resampler': (n_img, m.resampler.latents, m.vision.width),
        'state_encoder': (b, s, h), 'context': (b, s, 4 + 2 * m.resampler.latents, h),
        'action': (b, s, m.action.chunk, h), 'action_head': (b * s, m.action.chunk, 7),
    }
    for k in dreams:
        hd = m.dream[k]
        shapes[f'dream_{k}'] = (b, s, hd.queries_per_camera * 2, h)
        shapes[f'decoder_{k}'] = (b * s, 2, int(np.prod(hd.mask_grid)), hd.out_dim)
    return shapes


def _inputs(cfg, b):
    raw = fake_batch.fake_batch(cfg, b)
    return {k: jnp.asarray(v) for k, v in preprocess.preprocess(raw, cfg).items()}


def test_debug_module_shapes_and_dtypes():
    cfg = load_config('debug')
    graphdef, state = nnx.split(dreamvla.DreamVLA(cfg, rngs=nnx.Rngs(0)))
    out = jax.jit(lambda st, x: module_outputs(nnx.merge(graphdef, st), x, cfg.model.history))(
        state, _inputs(cfg, 2))
    exp = expected_shapes(cfg, 2)
    assert set(exp) <= set(out)
    for k, shape in exp.items():
        assert out[k].shape == shape, k
        assert out[k].dtype == jnp.float32, k


@pytest.mark.parametrize('preset', ['default', 'paper'])
def test_full_size_module_shapes_abstractly(preset):
    cfg = load_config(preset)
    b = 1
    raw = fake_batch.fake_batch(cfg, b)
    abstract_in = jax.eval_shape(lambda r: preprocess.preprocess(r, cfg), raw)
    graphdef, state = nnx.split(dreamvla.abstract_model(cfg))
    out = jax.eval_shape(lambda st, x: module_outputs(nnx.merge(graphdef, st), x, cfg.model.history),
                         state, abstract_in)
    exp = expected_shapes(cfg, b)
    for k, shape in exp.items():
        assert out[k].shape == shape, k
    assert out['vision_encoder'].dtype == jnp.bfloat16  # frozen MAE runs in bf16 (official)
    assert out['resampler'].dtype == jnp.float32 and out['action_head'].dtype == jnp.float32
    assert out['decoder_depth'].shape == (10, 2, 196, 256) and out['decoder_sam'].shape == (10, 2, 256, 256)


def test_sam_official_zero_init_flag():
    cfg = load_config('debug')
    cfg.model.decoder.sam_official_zero_init = True
    model = dreamvla.DreamVLA(cfg, rngs=nnx.Rngs(0))
    assert not np.any(np.asarray(model.decoder_sam.mask_token[...]))
    assert np.any(np.asarray(model.decoder_rgb.mask_token[...]))
    from dreamvla_jax.models.decoders import position_table
    assert not position_table(*model.decoder_sam.pos_key).any() and position_table(*model.decoder_rgb.pos_key).any()


def test_inconsistent_config_is_one_clear_error():
    cfg = load_config('debug')
    cfg.model.dream.rgb.mask_grid = (3, 3)
    with pytest.raises(ValueError, match=r'config.model.dream.rgb.mask_grid'):
        dreamvla.DreamVLA(cfg, rngs=nnx.Rngs(0))


def test_frozen_filter_selects_exactly_the_encoders():
    cfg = load_config('debug')
    model = dreamvla.abstract_model(cfg)
    frozen = nnx.state(model, dreamvla.frozen_filter(cfg))
    assert set(frozen.keys()) == {'text_encoder', 'vision_encoder'}
    trainable = nnx.state(model, dreamvla.trainable_filter(cfg))
    assert 'text_encoder' not in trainable and 'backbone' in trainable


def _loss_and_grad(cfg, graphdef, params, rest, batch, rng):
    def f(p):
        model = nnx.merge(graphdef, p, rest)
        return model.compute_loss(preprocess.preprocess(batch, cfg, rng), rng)
    (loss, aux), grads = jax.value_and_grad(f, has_aux=True)(params)
    return aux, grads


def test_sharded_forward_loss_grad_equals_single_device():
    cfg = load_config('debug')
    model = dreamvla.DreamVLA(cfg, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, dreamvla.trainable_filter(cfg), ...)
    batch = fake_batch.fake_batch(cfg, 8)
    rng = jax.random.key(1)
    fn = lambda p, r, b, k: _loss_and_grad(cfg, graphdef, p, r, b, k)
    aux1, g1 = jax.jit(fn)(params, rest, batch, rng)

    assert jax.device_count() == 8
    mesh = jax.make_mesh((8,), ('data',), axis_types=(AxisType.Auto,))
    repl = NamedSharding(mesh, P())
    data = NamedSharding(mesh, P('data'))
    batch_sh = jax.tree.map(lambda x: data, batch)
    with jax.set_mesh(mesh):
        sharded = jax.device_put(batch, batch_sh)
        assert len(sharded['rgb_static'].sharding.device_set) == 8
        aux8, g8 = jax.jit(fn, in_shardings=(repl, repl, batch_sh, repl))(params, rest, sharded, rng)
    for k in aux1:
        np.testing.assert_allclose(aux8[k], aux1[k], rtol=1e-5, atol=1e-6, err_msg=k)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g8)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def test_sample_actions_shapes_and_env_decoding():
    cfg = load_config('debug')
    graphdef, state = nnx.split(dreamvla.DreamVLA(cfg, rngs=nnx.Rngs(0)))
    inputs = _inputs(cfg, 3)

    @jax.jit
    def sample(st, x, rng):
        model = nnx.merge(graphdef, st)
        return model.sample_actions(x, rng), model.sample_actions(x, rng, newest_only=True)

    raw, newest = sample(state, inputs, jax.random.key(0))
    assert raw.shape == (3, cfg.model.history, cfg.model.action.chunk, 7)
    assert newest.shape == (3, 1, cfg.model.action.chunk, 7)
    env = dreamvla.to_env_actions(jnp.array([[0.1, -0.2, 0.3, 0.0, 0.5, -0.9, 0.7], [0, 0, 0, 0, 0, 0, 0.2]]))
    np.testing.assert_allclose(env[:, 6], [1.0, -1.0])
    np.testing.assert_allclose(env[0, :6], [0.1, -0.2, 0.3, 0.0, 0.5, -0.9])


@pytest.mark.parametrize('tower', ['text_encoder', 'vision_encoder'])
def test_tower_trains_only_when_not_frozen(tower):
    """Frozen (official): no gradient reaches CLIP / the MAE ViT. Left out of ``model.freeze`` (tabletop): it
    trains (a stop_gradient that ignored ``model.freeze`` once kept the tabletop's vision tower at random init)."""
    grads = {}
    for freeze in (('text_encoder', 'vision_encoder'), tuple(t for t in ('text_encoder', 'vision_encoder')
                                                            if t != tower)):
        cfg = load_config('debug')
        cfg.model.freeze = freeze
        model = dreamvla.DreamVLA(cfg, rngs=nnx.Rngs(0))
        params = nnx.state(model, nnx.All(nnx.Param, nnx.PathContains(tower)))
        graphdef, _, rest = nnx.split(model, nnx.All(nnx.Param, nnx.PathContains(tower)), ...)
        batch = fake_batch.fake_batch(cfg, 2)
        _, g = jax.jit(lambda p, r, b, k: _loss_and_grad(cfg, graphdef, p, r, b, k))(
            params, rest, batch, jax.random.key(0))
        grads[len(freeze)] = min(float(jnp.abs(x).max()) for x in jax.tree.leaves(g))
    assert grads[2] == 0.0
    assert grads[1] > 0.0      # every parameter of the tower gets a gradient
    assert tower in nnx.state(dreamvla.abstract_model(cfg), dreamvla.trainable_filter(cfg))


def test_conv_stem_keeps_the_token_layout_and_sees_locally():
    """``model.vision.stem='conv'``: same [N, 1 + grid^2, width] tokens as the patch embedding; a pixel change
    reaches only the tokens whose receptive field holds it (before the transformer blocks mix them); the
    checkpoint loader maps the stem's list (Orbax stores its int keys as strings)."""
    from dreamvla_jax.models.mae_vit import MAEViT
    from dreamvla_jax.training.checkpoint import _fill

    cfg = load_config('debug')
    cfg.model.vision.stem = 'conv'
    vit = MAEViT(cfg.model.vision, rngs=nnx.Rngs(0))
    size, grid, width = cfg.model.vision.image_size, cfg.model.vision.image_size // cfg.model.vision.patch, \
        cfg.model.vision.width
    x = jax.random.normal(jax.random.key(0), (2, size, size, 3))
    assert vit(x).shape == (2, 1 + grid * grid, width)
    stem = vit.conv_stem(x)
    assert stem.shape == (2, grid, grid, width)
    y = x.at[:, -1, -1].add(5.0)               # bottom-right pixel
    changed = np.abs(np.asarray(vit.conv_stem(y) - stem)).max(axis=(0, 3)) > 1e-6
    assert changed[-1, -1] and changed.sum() == 1
    pure = nnx.state(vit, nnx.Param).to_pure_dict()
    saved = jax.tree.map(np.asarray, pure)
    saved['conv_stem']['convs'] = {str(k): v for k, v in saved['conv_stem']['convs'].items()}
    target = jax.tree.map(np.zeros_like, pure)
    assert _fill(target, saved, 'ckpt') == []
    jax.tree.map(np.testing.assert_array_equal, target, jax.tree.map(np.asarray, pure))
    cfg.model.vision.stem = 'nope'
    with pytest.raises(ValueError, match="stem must be 'patch' or 'conv'"):
        MAEViT(cfg.model.vision, rngs=nnx.Rngs(0))


def test_rgb_static_weight_extends_the_rgb_dream_loss_to_the_whole_frame():
    import ml_collections

    cfg = load_config('debug')
    model = dreamvla.init_model(cfg)
    batch = _inputs(cfg, 2)
    ones = dict(batch, motion_mask=jnp.ones_like(batch['motion_mask']))

    def rgb(inputs, static):
        model.loss_cfg = ml_collections.FrozenConfigDict(dict(cfg.loss.to_dict(), rgb_static=static))
        return float(model.compute_loss(inputs, jax.random.key(0), train=False)[1]['loss_rgb'])

    assert cfg.loss.rgb_static == 0.0  # official: dynamic regions only
    assert 0.1 < float(batch['motion_mask'].mean()) < 0.9  # some patches static, some dynamic
    lo, mid, hi, whole = rgb(batch, 0.0), rgb(batch, 0.5), rgb(batch, 1.0), rgb(ones, 0.0)
    # Weight 1: masked + unmasked squared errors make the whole frame's, whatever the mask.
    np.testing.assert_allclose(hi, whole, rtol=1e-5)
    # Weight 0 (official) counts only the masked patches; 0.5 sits in between, linearly.
    assert lo < mid < hi
    np.testing.assert_allclose(mid, (lo + hi) / 2, rtol=1e-5)
    # With nothing static, the weight changes nothing.
    np.testing.assert_allclose(rgb(ones, 0.7), whole, rtol=1e-6)
