"""CLIPText and MAEViT: parameter counts (SPEC section 10), shapes, causality, pooling, patch order."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config
from flax import nnx

from dreamvla_jax.models.clip_text import CLIPText
from dreamvla_jax.models.mae_vit import MAEViT, patchify


def _count(module) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


@pytest.mark.parametrize('cls, part, expected', [(CLIPText, 'text', 63_428_096),
                                                 (MAEViT, 'vision', 85_647_360)])
def test_default_param_counts_abstract(cls, part, expected):
    cfg = load_config('default').model[part]
    abstract = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))
    assert _count(abstract) == expected
    # Stacked layers: every block parameter carries the layer axis first.
    for leaf in jax.tree.leaves(nnx.state(abstract.blocks, nnx.Param)):
        assert leaf.shape[0] == cfg.layers


def test_vision_params_are_bf16_by_default():
    cfg = load_config('default').model.vision
    abstract = nnx.eval_shape(lambda: MAEViT(cfg, rngs=nnx.Rngs(0)))
    assert {str(x.dtype) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))} == {'bfloat16'}


def _tokens(rng, b, length, eot_at):
    tok = rng.integers(1, 49000, size=(b, length)).astype(np.int32)
    for i, j in enumerate(eot_at):
        tok[i, j] = 49407
        tok[i, j + 1:] = 0
    return jnp.asarray(tok)


def test_clip_text_shapes_causality_and_eot_pooling():
    cfg = load_config('debug').model.text
    model = CLIPText(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    tok = _tokens(rng, 2, 12, eot_at=(5, 9))
    pooled, aux = model(tok)
    assert pooled.shape == (2, cfg.proj_dim) and aux['tokens'].shape == (2, 12, cfg.width)
    # Pooled output = projection of the EOT position's final token.
    eot = aux['tokens'][jnp.arange(2), jnp.array([5, 9])]
    np.testing.assert_allclose(pooled, eot @ model.text_projection.kernel[...], atol=1e-6)
    # Causal: changing token 7 leaves positions 0..6 untouched and changes position 7.
    tok2 = tok.at[:, 7].set(123)
    _, aux2 = model(tok2)
    np.testing.assert_allclose(aux2['tokens'][:, :7], aux['tokens'][:, :7], atol=1e-6)
    assert np.abs(np.asarray(aux2['tokens'][:, 7] - aux['tokens'][:, 7])).max() > 1e-3
    with pytest.raises(ValueError, match='context'):
        model(jnp.zeros((1, cfg.context + 1), jnp.int32))


def test_patchify_order_matches_conv_weight_layout():
    """A conv [out, C, p, p] transposed (2, 3, 1, 0) is the same map as our linear over patchify()."""
    import torch

    rng = np.random.default_rng(1)
    p, c, out = 4, 3, 5
    img = rng.normal(size=(2, 8, 12, c)).astype(np.float32)
    w = rng.normal(size=(out, c, p, p)).astype(np.float32)
    ref = torch.nn.functional.conv2d(torch.from_numpy(img).permute(0, 3, 1, 2), torch.from_numpy(w),
                                     stride=p)  # [N, out, 2, 3]
    ref = ref.flatten(2).transpose(1, 2).numpy()  # raster order [N, 6, out]
    ours = np.asarray(patchify(jnp.asarray(img), p)) @ w.transpose(2, 3, 1, 0).reshape(-1, out)
    np.testing.assert_allclose(ours, ref, atol=1e-4)


def test_mae_shapes_and_fixed_position_table():
    cfg = load_config('debug').model.vision
    model = MAEViT(cfg, rngs=nnx.Rngs(0))
    imgs = jnp.asarray(np.random.default_rng(2).normal(size=(3, cfg.image_size, cfg.image_size, 3)),
                       jnp.float32)
    out = model(imgs)
    grid = cfg.image_size // cfg.patch
    assert out.shape == (3, 1 + grid * grid, cfg.width)
    # Final LN with unit scale/zero bias: every token has ~zero mean.
    np.testing.assert_allclose(np.asarray(out).mean(-1), 0.0, atol=1e-4)
    # Position information is present: identical patches at different positions give different tokens.
    flat = model(jnp.ones((1, cfg.image_size, cfg.image_size, 3)))
    assert np.abs(np.asarray(flat[0, 1] - flat[0, 2])).max() > 1e-3
    with pytest.raises(ValueError, match='expects'):
        model(jnp.zeros((1, cfg.image_size + cfg.patch, cfg.image_size, 3)))
