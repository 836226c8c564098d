"""The assembled DreamVLA model: encoders, token sequence, GPT-2 backbone, dream decoders, DiT head.

Public surface (openpi style): ``DreamVLA(config, rngs=...)``, ``model.compute_loss(inputs, rng)``
and ``model.sample_actions(inputs, rng)``; ``trainable_filter``/``frozen_filter`` select parameters
for the optimizer. ``inputs`` is the pipeline batch after ``data.preprocess.preprocess``:

  rgb_static, rgb_gripper    float32 [B, W, size, size, 3]  CLIP-normalised (W = S + future)
  depth_static, depth_gripper float32 [B, W, size, size]    metric depth (dream target)
  robot_obs                  float32 [B, W, 15]
  rel_actions                float32 [B, W, 7]
  text_tokens                int32   [B, 77]   (or text_embedding [B, text.proj_dim], cached)
  motion_mask                float32 [B, S, cameras, L]
  sam / dino                 float   [B, S, cameras, h, w, C]  teacher features of frames t+future

Frames ``0..S-1`` are the observations; frames ``t + future`` are the visual targets of timestep t;
the action chunk of timestep t is ``rel_actions[t : t + chunk]`` (gripper mapped from -1/+1 to 0/1).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from dreamvla_jax import diffusion, losses, masks
from dreamvla_jax.models import layers
from dreamvla_jax.models.clip_text import CLIPText
from dreamvla_jax.models.decoders import DreamDecoder
from dreamvla_jax.models.dit import DiT
from dreamvla_jax.models.gpt2 import GPT2Blocks
from dreamvla_jax.models.mae_vit import MAEViT
from dreamvla_jax.models.resampler import PerceiverResampler

# Top-level module names, in the order `summary` prints them.
MODULES = ('text_encoder', 'vision_encoder', 'resampler', 'backbone', 'decoder_rgb', 'decoder_depth',
           'decoder_dino', 'decoder_sam', 'action_head', 'text_projector', 'state_encoder',
           'image_projectors', 'queries', 'timestep_embedding', 'embedding_ln')


class StateEncoder(nnx.Module):
    """Arm (tcp xyz + euler) and gripper one-hot through separate linears, concatenated, a final
    linear; no activations (SPEC section 2)."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, dtype=layers.dtype_of(cfg.dtype), param_dtype=layers.dtype_of(cfg.param_dtype))
        self.arm_dim = cfg.action.arm_dim
        self.arm = layers.linear(cfg.action.arm_dim, cfg.hidden, **kw)
        self.gripper = layers.linear(2, cfg.hidden, **kw)
        self.out = layers.linear(2 * cfg.hidden, cfg.hidden, **kw)

    def __call__(self, robot_obs: jax.Array) -> jax.Array:
        """``[..., 15]`` CALVIN robot_obs -> ``[..., hidden]``."""
        arm = robot_obs[..., :self.arm_dim]
        # robot_obs[14] is the gripper action (-1 close / +1 open): class 0 if < 1 else 1.
        grip = jax.nn.one_hot((robot_obs[..., 14] >= 1).astype(jnp.int32), 2, dtype=arm.dtype)
        return self.out(jnp.concatenate([self.arm(arm), self.gripper(grip)], axis=-1))


class ImageProjectors(nnx.Module):
    """Linear vision width -> hidden for the resampler latents and the CLS token, per camera."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, dtype=layers.dtype_of(cfg.dtype), param_dtype=layers.dtype_of(cfg.param_dtype))
        for cam in cfg.cameras:
            setattr(self, f'latents_{cam}', layers.linear(cfg.vision.width, cfg.hidden, **kw))
        for cam in cfg.cameras:
            setattr(self, f'cls_{cam}', layers.linear(cfg.vision.width, cfg.hidden, **kw))


class Queries(nnx.Module):
    """Zero-initialised learnable query tokens: one table per enabled dream modality, then actions."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        pd = layers.dtype_of(cfg.param_dtype)
        for name in masks.enabled_dreams(cfg):
            n = cfg.dream[name].queries_per_camera * len(cfg.cameras)
            setattr(self, name, nnx.Param(jnp.zeros((n, cfg.hidden), pd)))
        self.action = nnx.Param(jnp.zeros((cfg.action.chunk, cfg.hidden), pd))


@functools.lru_cache(maxsize=32)
def _mask(cfg: ml_collections.FrozenConfigDict, steps: int, queries_at: tuple[int, ...]) -> np.ndarray:
    roles, times = masks.layout(masks.timestep_groups(cfg), steps, queries_at=queries_at)
    return masks.attention_mask(roles, times)


class DreamVLA(nnx.Module):
    def __init__(self, config, *, rngs: nnx.Rngs):
        """Builds the whole network from ``config`` (reads ``model``, ``diffusion``, ``loss``)."""
        self.cfg = ml_collections.FrozenConfigDict(config.model)
        self.diffusion_cfg = ml_collections.FrozenConfigDict(config.diffusion)
        self.loss_cfg = ml_collections.FrozenConfigDict(config.loss)
        self.future = int(config.data.future)
        cfg = self.cfg
        _check(cfg, self.future)
        dtype, pd = layers.dtype_of(cfg.dtype), layers.dtype_of(cfg.param_dtype)
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=pd)
        self.dtype = dtype

        self.text_encoder = CLIPText(cfg.text, rngs=rngs)
        self.text_projector = layers.linear(cfg.text.proj_dim, cfg.hidden, **kw)
        self.vision_encoder = MAEViT(cfg.vision, rngs=rngs)
        self.resampler = PerceiverResampler(cfg, rngs=rngs)
        self.image_projectors = ImageProjectors(cfg, rngs=rngs)
        self.state_encoder = StateEncoder(cfg, rngs=rngs)
        self.queries = Queries(cfg, rngs=rngs)
        self.timestep_embedding = nnx.Param(0.02 * jax.random.normal(rngs.params(), (cfg.history, cfg.hidden), pd))
        self.embedding_ln = layers.layer_norm(cfg.hidden, cfg.backbone.emb_ln_eps, **kw)
        self.backbone = GPT2Blocks(cfg, rngs=rngs)
        for name in masks.enabled_dreams(cfg):
            zero = name == 'sam' and cfg.decoder.sam_official_zero_init
            setattr(self, f'decoder_{name}', DreamDecoder(cfg, cfg.dream[name], rngs=rngs, official_zero_init=zero))
        self.action_head = DiT(cfg, rngs=rngs)

    # ------------------------------------------------------------------ encoders (per frame)
    def encode_text(self, inputs: dict) -> jax.Array:
        """``[B, hidden]`` from ``text_embedding`` (cached, frozen) or ``text_tokens``.

        The CLIP text tower is frozen (official) unless ``'text_encoder'`` is left out of
        ``config.model.freeze`` (the tabletop preset, which has no pretrained CLIP to start from).
        """
        emb = inputs.get('text_embedding')
        trained = emb is None and 'text_encoder' not in self.cfg.freeze
        if emb is None:
            with jax.named_scope('text_encoder'):
                emb, _ = self.text_encoder(inputs['text_tokens'])
        if not trained:
            emb = jax.lax.stop_gradient(emb)
        return self.text_projector(emb.astype(self.dtype))

    def encode_frames(self, images: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """Per-frame context tokens: ``images[cam]`` ``[B, T, size, size, 3]`` ->
        ``{'latents_<cam>': [B, T, latents, hidden], 'cls_<cam>': [B, T, hidden]}``.

        Position-free and per frame, so the policy caches it frame by frame. The MAE ViT is frozen
        (official) unless ``'vision_encoder'`` is left out of ``config.model.freeze`` (the tabletop preset).
        """
        cams = self.cfg.cameras
        b, t = images[cams[0]].shape[:2]
        flat = jnp.concatenate([images[c].reshape((b * t,) + images[c].shape[2:]) for c in cams])
        with jax.named_scope('vision_encoder'):
            tokens = self.vision_encoder(flat)
        if 'vision_encoder' in self.cfg.freeze:
            tokens = jax.lax.stop_gradient(tokens)
        tokens = tokens.astype(self.dtype)
        with jax.named_scope('resampler'):
            latents = self.resampler(tokens[:, 1:])
        out = {}
        for i, cam in enumerate(cams):
            sl = slice(i * b * t, (i + 1) * b * t)
            out[f'latents_{cam}'] = getattr(self.image_projectors, f'latents_{cam}')(latents[sl]).reshape(
                b, t, latents.shape[1], -1)
            out[f'cls_{cam}'] = getattr(self.image_projectors, f'cls_{cam}')(tokens[sl, 0]).reshape(b, t, -1)
        return out

    def context_tokens(self, text: jax.Array, state: jax.Array, frames: dict[str, jax.Array]) -> jax.Array:
        """Group A of every timestep ``[B, T, n_context, hidden]``: text, state, latents, CLS."""
        b, t = state.shape[:2]
        parts = [jnp.broadcast_to(text[:, None, None], (b, t, 1, text.shape[-1])), state[:, :, None]]
        parts += [frames[f'latents_{c}'] for c in self.cfg.cameras]
        parts += [frames[f'cls_{c}'][:, :, None] for c in self.cfg.cameras]
        return jnp.concatenate(parts, axis=2)

    def query_tokens(self) -> jax.Array:
        """Group B of one timestep ``[n_queries, hidden]``: dream queries in order, then actions."""
        names = masks.enabled_dreams(self.cfg)
        return jnp.concatenate([getattr(self.queries, n)[...] for n in names] + [self.queries.action[...]])

    # ------------------------------------------------------------------ backbone
    def backbone_forward(self, context: jax.Array, queries_at: tuple[int, ...] | None = None,
                         rng: jax.Array | None = None) -> dict[str, jax.Array]:
        """Runs the backbone over the DreamVLA token sequence.

        Args:
          context: ``[B, S, n_context, hidden]`` group-A tokens of S timesteps.
          queries_at: timesteps that carry query tokens (default: all, the training layout). The
            fast policy passes ``(S - 1,)``: past queries are seen by nobody (SPEC section 3).
          rng: dropout key (None: deterministic).
        Returns:
          ``{'dream_<name>': [B, Q, n, hidden], 'action': [B, Q, chunk, hidden]}`` for the Q
          timesteps in ``queries_at``.
        """
        b, s, nc, d = context.shape
        queries_at = tuple(range(s)) if queries_at is None else tuple(queries_at)
        temb = self.timestep_embedding[...][:s].astype(self.dtype)
        q = self.query_tokens().astype(self.dtype)
        ctx = context.astype(self.dtype) + temb[None, :, None]
        if queries_at == tuple(range(s)):
            qs = jnp.broadcast_to(q[None, None], (b, s) + q.shape) + temb[None, :, None]
            seq = jnp.concatenate([ctx, qs], axis=2).reshape(b, -1, d)
        elif queries_at == (s - 1,):
            qs = jnp.broadcast_to(q[None], (b,) + q.shape) + temb[s - 1]
            seq = jnp.concatenate([ctx.reshape(b, s * nc, d), qs], axis=1)
        else:
            raise ValueError(f"queries_at must be all timesteps or the last one, got {queries_at}")
        mask = jnp.asarray(_mask(self.cfg, s, queries_at))
        r_emb, r_blocks = layers.split_rng(rng, 2)
        seq = layers.dropout(self.embedding_ln(seq), self.cfg.backbone.dropout, r_emb)
        with jax.named_scope('backbone'):
            h = self.backbone(seq, mask, rng=r_blocks)
        # Gather the query outputs back into [B, Q, n_queries, D].
        if queries_at == tuple(range(s)):
            hq = h.reshape(b, s, nc + q.shape[0], d)[:, :, nc:]
        else:
            hq = h[:, s * nc:][:, None]
        return self.split_query_outputs(hq)

    def split_query_outputs(self, hq: jax.Array) -> dict[str, jax.Array]:
        """``[B, Q, n_queries, D]`` query outputs -> ``{'dream_<name>': ..., 'action': ...}``."""
        out, start = {}, 0
        for name in masks.enabled_dreams(self.cfg):
            n = getattr(self.queries, name)[...].shape[0]
            out[f'dream_{name}'] = hq[:, :, start:start + n]
            start += n
        out['action'] = hq[:, :, start:]
        return out

    def encode(self, inputs: dict, steps: int | None = None) -> jax.Array:
        """Context tokens ``[B, S, n_context, hidden]`` of the first ``S`` frames of ``inputs``."""
        s = steps or self.cfg.history
        frames = self.encode_frames({c: inputs[f'rgb_{c}'][:, :s] for c in self.cfg.cameras})
        state = self.state_encoder(inputs['robot_obs'][:, :s].astype(self.dtype))
        return self.context_tokens(self.encode_text(inputs), state, frames)

    # ------------------------------------------------------------------ training
    def compute_loss(self, inputs: dict, rng: jax.Array, *, train: bool = True) -> tuple[jax.Array, dict]:
        """Total loss and named terms for a batch (see the module docstring for ``inputs``).

        ``train`` enables dropout and condition dropout; ``rng`` also draws the diffusion noise.
        """
        cfg, s = self.cfg, self.cfg.history
        r_drop, r_cfg, r_diff = jax.random.split(rng, 3)
        out = self.backbone_forward(self.encode(inputs), rng=r_drop if train else None)
        b = out['action'].shape[0]
        terms = {}
        for name in masks.enabled_dreams(cfg):
            with jax.named_scope(f'decoder_{name}'):  # named scopes group the ops of a profile by module
                pred = getattr(self, f'decoder_{name}')(out[f'dream_{name}'].reshape(b * s, -1, cfg.hidden))
                terms[name] = self._dream_loss(name, pred, inputs)

        # Actions: epsilon-prediction with repeated noise and condition dropout (CFG).
        x0 = self.action_targets(inputs['rel_actions']).reshape(b * s, cfg.action.chunk, -1)
        cond = out['action'].reshape(b * s, cfg.action.chunk, -1)
        if train and cfg.dit.cfg_dropout > 0:
            drop = jax.random.bernoulli(r_cfg, cfg.dit.cfg_dropout, (b * s, 1, 1))
            cond = jnp.where(drop, self.action_head.uncondition[...].astype(cond.dtype), cond)
        dcfg = self.diffusion_cfg
        noisy, noise, t = diffusion.training_example(r_diff, x0, dcfg)
        with jax.named_scope('action_head'):
            eps = self.action_head(noisy.astype(self.dtype), t, jnp.repeat(cond, dcfg.repeats, axis=0))
            terms['action'] = losses.mse(eps, noise)
        total = sum(self.loss_cfg[name] * value for name, value in terms.items())
        return total, {'loss': total, **{f'loss_{k}': v for k, v in terms.items()}}

    def action_targets(self, rel_actions: jax.Array) -> jax.Array:
        """``[B, W, 7]`` -> chunks ``[B, S, chunk, 7]`` (gripper -1/+1 -> 0/1)."""
        s, chunk = self.cfg.history, self.cfg.action.chunk
        idx = np.arange(s)[:, None] + np.arange(chunk)[None]
        a = rel_actions[:, idx].astype(jnp.float32)
        arm = self.cfg.action.arm_dim
        return jnp.concatenate([a[..., :arm], (a[..., arm:] + 1.0) / 2.0], axis=-1)

    def _dream_loss(self, name: str, pred: jax.Array, inputs: dict) -> jax.Array:
        """``pred`` ``[B*S, cameras, n_mask, out]`` against the target of frames ``t + future``."""
        cfg, s, f = self.cfg, self.cfg.history, self.future
        cams = cfg.cameras
        if name in ('rgb', 'depth'):
            per_cam = []
            for i, cam in enumerate(cams):
                img = inputs[f'{name}_{cam}'][:, f:f + s]
                img = img.reshape((-1,) + img.shape[2:4] + (img.shape[4] if img.ndim == 5 else 1,))
                target = losses.patchify(img.astype(jnp.float32), cfg.vision.patch)
                if name == 'rgb':
                    mask = inputs['motion_mask'][:, :, i].reshape(target.shape[0], -1)
                    target = losses.normalize_patches(target)
                    term = losses.masked_mse(pred[:, i], target, mask)
                    static = self.loss_cfg.get('rgb_static', 0.0)
                    if static:  # the frame outside the motion mask too (a config choice; 0 is official)
                        term = term + static * losses.masked_mse(pred[:, i], target, 1.0 - mask.astype(jnp.float32))
                    per_cam.append(term)
                else:
                    per_cam.append(losses.silog(pred[:, i], target, self.loss_cfg.silog_lambda))
            return sum(per_cam) / len(per_cam)
        target = losses.pool_grid(inputs[name], tuple(cfg.dream[name].mask_grid))
        target = target.reshape(pred.shape[:2] + (-1, target.shape[-1]))
        return losses.cosine_loss(pred, target)

    # ------------------------------------------------------------------ inference
    def sample_actions(self, inputs: dict, rng: jax.Array, *, sample_steps: int | None = None,
                       guidance: float | None = None, newest_only: bool = False) -> jax.Array:
        """Official full recomputation: encode all S frames, run every token, sample every
        timestep's chunk with DDIM + classifier-free guidance.

        Returns raw chunks ``[B, S, chunk, 7]`` (``[B, 1, chunk, 7]`` with ``newest_only``): arm in
        model units, gripper in [0, 1] (see ``to_env_actions``).
        """
        out = self.backbone_forward(self.encode(inputs))
        cond = out['action'][:, -1:] if newest_only else out['action']
        return self.sample_from_condition(cond, rng, sample_steps=sample_steps, guidance=guidance)

    def sample_from_condition(self, cond: jax.Array, rng: jax.Array | None, *, sample_steps: int | None = None,
                              guidance: float | None = None, noise: jax.Array | None = None) -> jax.Array:
        """DDIM with CFG from action-query outputs ``[B, Q, chunk, hidden]`` -> ``[B, Q, chunk, 7]``.

        ``noise`` (``x_T``, broadcastable to ``[B*Q, chunk, 7]``) replaces the draw from ``rng``.
        """
        b, q, chunk, d = cond.shape
        cond = cond.reshape(b * q, chunk, d)
        scale = self.cfg.dit.guidance_scale if guidance is None else guidance
        uncond = jnp.broadcast_to(self.action_head.uncondition[...].astype(cond.dtype), cond.shape)
        both = jnp.concatenate([cond, uncond])

        def eps_cu(x, t):
            eps = self.action_head(jnp.concatenate([x, x]).astype(self.dtype), jnp.concatenate([t, t]), both)
            return jnp.split(eps.astype(jnp.float32), 2)

        shape = (b * q, chunk, self.cfg.action.dim)
        x_T = (jax.random.normal(rng, shape, jnp.float32) if noise is None
               else jnp.broadcast_to(noise.astype(jnp.float32), shape))
        x = diffusion.ddim_sample(diffusion.guided(eps_cu, scale), x_T, self.diffusion_cfg, sample_steps)
        return x.reshape(b, q, chunk, -1)


def to_env_actions(raw: jax.Array, arm_dim: int = 6) -> jax.Array:
    """Model-space actions -> environment actions: arm unchanged, gripper +1 if > 0.5 else -1."""
    return jnp.concatenate([raw[..., :arm_dim], jnp.where(raw[..., arm_dim:] > 0.5, 1.0, -1.0)], axis=-1)


def _check(cfg, future: int) -> None:
    """One clear sentence for inconsistent configs (instead of a shape error deep inside)."""
    size, patch = cfg.vision.image_size, cfg.vision.patch
    grid = (size // patch, size // patch)
    for name in ('rgb', 'depth'):
        head = cfg.dream[name]
        if head.enabled and tuple(head.mask_grid) != grid:
            raise ValueError(f"config.model.dream.{name}.mask_grid {tuple(head.mask_grid)} must equal the "
                             f"patch grid {grid} of image_size {size} / patch {patch}")
    if cfg.action.chunk > future + 1:
        raise ValueError(f"config.model.action.chunk {cfg.action.chunk} needs config.data.future >= "
                         f"{cfg.action.chunk - 1} so every chunk lies inside the window")


def trainable_filter(config):
    """NNX filter of trained parameters: every ``nnx.Param`` outside ``config.model.freeze``."""
    frozen = nnx.Any(*[nnx.PathContains(name) for name in config.model.freeze])
    return nnx.All(nnx.Param, nnx.Not(frozen))


def frozen_filter(config):
    return nnx.All(nnx.Param, nnx.Any(*[nnx.PathContains(name) for name in config.model.freeze]))


def abstract_model(config) -> DreamVLA:
    """The model with ``jax.ShapeDtypeStruct`` leaves: no weights allocated."""
    return nnx.eval_shape(lambda: DreamVLA(config, rngs=nnx.Rngs(config.seed)))


def init_model(config, seed: int | None = None, out_shardings=None) -> DreamVLA:
    """Initialises the model inside one ``jax.jit`` (eager NNX init dispatches op by op and is
    ~20x slower); ``out_shardings`` (a state pytree of shardings) places parameters directly on a mesh.
    """
    seed = config.seed if seed is None else seed
    graphdef = nnx.graphdef(abstract_model(config))

    def init():
        return nnx.state(DreamVLA(config, rngs=nnx.Rngs(seed)))

    state = jax.jit(init, out_shardings=out_shardings)()
    return nnx.merge(graphdef, state)
