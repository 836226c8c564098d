"""The DreamVLA policy: observation history, preprocessing, jitted sampling, action execution.

Batched over N environments stepped in lockstep: ``policy.step(observations, instructions)`` takes one
CALVIN-style observation per environment and returns ``[N, 7]`` environment actions.

History (official, SPEC section 8): cleared by ``reset`` at every subtask start; each step appends the
newest frame; while fewer than S frames exist the window is padded by repeating the newest frame and
the action is read at the newest real frame's index; afterwards the window holds the last S frames.

Two exact paths (``fast``):
  * full recomputation (official): both encoders on all 2*S window images, all ``93*S`` tokens, the
    DiT sampler for every timestep; only the newest timestep's chunk is used.
  * fast (default): each frame is encoded once when it arrives (MAE, resampler, projectors and the
    state encoder are per frame and position-free) and cached; the instruction embedding is cached per
    string; the query tokens of past timesteps are dropped (nobody attends to them), so the backbone
    runs on ``36*S + 57`` tokens; the DiT runs for the newest timestep only.
    Keys/values, two regimes:
      - while the window fills (the first S steps after a reset), frame t sits at position t for good
        and context tokens attend only to context of their own and earlier timesteps, so the keys and
        values of earlier frames never change: they are cached per layer, and each step runs the
        backbone on the newest frame's 36 context tokens plus the 57 queries only (``kv_cache``);
      - once the window slides, every frame's timestep embedding (its position in the window) shifts,
        so every context token must be recomputed: the backbone runs on ``36*S + 57`` tokens.
    The cache is used while every environment of the batch is filling and has its cache complete
    (an environment that was stepped through the recomputing path keeps recomputing until its reset).
Both give the same actions for the same noise (tests/test_policy.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dreamvla_jax import masks
from dreamvla_jax.data import preprocess
from dreamvla_jax.models import dreamvla

EXECUTE_MODES = ('first', 'chunk', 'ensemble')


def observation_batch(observations: list[dict], cameras=('static', 'gripper')) -> dict[str, np.ndarray]:
    """CALVIN obs dicts -> the pipeline's raw keys with a time axis of 1: ``rgb_<cam>`` uint8
    ``[N, 1, H, W, 3]`` and ``robot_obs`` ``[N, 1, 15]``."""
    out = {f'rgb_{c}': np.stack([o['rgb_obs'][f'rgb_{c}'] for o in observations])[:, None] for c in cameras}
    out['robot_obs'] = np.stack([np.asarray(o['robot_obs'], np.float32) for o in observations])[:, None]
    return out


@functools.lru_cache(maxsize=8)
def _fast_masks(cfg, steps: int) -> np.ndarray:
    """``[S, T, T]``: the fast-layout mask when the queries sit at timestep q (index q)."""
    groups = masks.timestep_groups(cfg)
    roles, times = masks.layout(groups, steps, queries_at=(steps - 1,))
    out = []
    for q in range(steps):
        t = np.where(roles == masks.CONTEXT, times, q)
        out.append(masks.attention_mask(roles, t))
    return np.stack(out)


def fast_action_condition(model: dreamvla.DreamVLA, frames: jax.Array, text: jax.Array,
                          query_step: jax.Array) -> dict[str, jax.Array]:
    """Backbone on cached per-frame tokens with the queries of ONE timestep per example.

    Args:
      frames: ``[B, S, n_context - 1, hidden]`` cached state/latent/CLS tokens (no text, no timestep
        embedding); positions after ``query_step`` are padding (never attended by the queries).
      text: ``[B, hidden]`` projected instruction embedding.
      query_step: int ``[B]``: the timestep whose queries are evaluated (newest real frame).
    Returns:
      ``{'dream_<name>': [B, 1, n, hidden], 'action': [B, 1, chunk, hidden]}``.
    """
    cfg = model.cfg
    b, s, _, d = frames.shape
    ctx = jnp.concatenate([jnp.broadcast_to(text[:, None, None], (b, s, 1, d)), frames], axis=2)
    temb = model.timestep_embedding[...][:s].astype(model.dtype)
    ctx = (ctx + temb[None, :, None]).reshape(b, -1, d)
    q = model.query_tokens().astype(model.dtype)[None] + temb[query_step][:, None]
    seq = model.embedding_ln(jnp.concatenate([ctx, q], axis=1))
    mask = jnp.asarray(_fast_masks(cfg, s))[query_step][:, None]  # [B, 1, T, T]
    h = model.backbone(seq, mask)[:, ctx.shape[1]:][:, None]
    return model.split_query_outputs(h)


@functools.lru_cache(maxsize=8)
def _cached_masks(cfg, steps: int, n_ctx: int) -> np.ndarray:
    """``[S, n_ctx + nq, S * n_ctx + nq]``: the fast-layout mask rows of the newest frame's context and the
    queries (queries at timestep t = index t), against every cache slot and the queries."""
    full = _fast_masks(cfg, steps)
    return np.stack([np.concatenate([full[t, t * n_ctx:(t + 1) * n_ctx], full[t, steps * n_ctx:]])
                     for t in range(steps)])


def cached_action_condition(model: dreamvla.DreamVLA, frame: jax.Array, text: jax.Array, step: jax.Array,
                            k_cache: jax.Array, v_cache: jax.Array):
    """The fast layout's query outputs while the window fills, from a key/value cache of earlier frames.

    Args:
      frame: ``[B, n_context - 1, hidden]`` the newest frame's cached tokens (as in ``fast_action_condition``).
      text: ``[B, hidden]``; step: int ``[B]``, the newest frame's timestep (< S).
      k_cache, v_cache: ``[layers, B, S * n_context, heads, head_dim]``; slots of timesteps < step hold the
        earlier frames' keys/values, the newest frame's are written at slot ``step``.
    Returns:
      ``(outputs as fast_action_condition's, k_cache, v_cache)``.
    """
    cfg = model.cfg
    s = cfg.history
    n_ctx = frame.shape[1] + 1
    temb = model.timestep_embedding[...][:s].astype(model.dtype)[step][:, None]     # [B, 1, D]
    ctx = jnp.concatenate([text[:, None].astype(frame.dtype), frame], axis=1) + temb
    q = model.query_tokens().astype(model.dtype)[None] + temb
    seq = model.embedding_ln(jnp.concatenate([ctx, q], axis=1))
    mask = jnp.asarray(_cached_masks(cfg, s, n_ctx))[step][:, None]                  # [B, 1, rows, cols]
    h, k_cache, v_cache = model.backbone.cached(seq, mask, k_cache, v_cache, step * n_ctx, n_ctx)
    return model.split_query_outputs(h[:, n_ctx:][:, None]), k_cache, v_cache


class Policy:
    """Batched DreamVLA policy for ``num_envs`` environments (see the module docstring)."""

    def __init__(self, config, model: dreamvla.DreamVLA, *, num_envs: int = 1, seed: int = 0,
                 execute: str = 'first', fast: bool = True, kv_cache: bool = True, tokenizer=None,
                 sample_steps: int | None = None):
        if execute not in EXECUTE_MODES:
            raise ValueError(f"execute mode {execute!r} is not one of {EXECUTE_MODES}")
        self.config, self.num_envs, self.execute, self.fast = config, num_envs, execute, fast
        self.kv_cache = fast and kv_cache
        self.kv_steps = 0              # chunks computed from the key/value cache (while filling)
        self.cfg = config.model
        self.steps = self.cfg.history
        self.chunk = self.cfg.action.chunk
        self.graphdef, self.state = nnx.split(model)
        self.sample_steps = sample_steps
        self.rng = jax.random.key(seed)
        self.calls = 0
        if tokenizer is None:
            from dreamvla_jax.data.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(config.data.get('tokenizer', None) or None)
        self.tokenizer = tokenizer
        self._text_cache: dict[str, jax.Array] = {}
        self._jit_text = jax.jit(self._text_fn)
        self._jit_encode = jax.jit(self._encode_fn)
        self._jit_fast = jax.jit(self._fast_fn)
        self._jit_cached = jax.jit(self._cached_fn, donate_argnums=(5, 6))
        self._jit_full = jax.jit(self._full_fn)
        self._jit_images = jax.jit(self._images_fn)
        self._jit_dream = jax.jit(self._dream_fn)
        self.reset()

    @classmethod
    def from_checkpoint(cls, config, path, *, step: int | None = None, **kwargs) -> 'Policy':
        """Loads a training checkpoint (``<workdir>`` or ``<workdir>/checkpoints``) or a converted
        official checkpoint (``convert_weights --dreamvla``)."""
        from dreamvla_jax.training.checkpoint import load_model_state

        return cls(config, load_model_state(config, path, step=step), **kwargs)

    # ------------------------------------------------------------------ history
    def reset(self, env_index: int | None = None) -> None:
        """Clears the history of one environment (or all): call at every subtask start."""
        envs = range(self.num_envs) if env_index is None else [env_index]
        if env_index is None:
            self.count = np.zeros(self.num_envs, np.int64)
            self.frames = None          # fast: [N, S, n_context - 1, hidden] cached tokens (device)
            self.raw = None             # full: dict of [N, S, ...] preprocessed frames (device)
            self.plan = [[] for _ in range(self.num_envs)]       # chunk mode: queued actions
            self.ensemble = [[] for _ in range(self.num_envs)]   # ensemble mode: (age, chunk) pairs
            self.newest = None          # fast: [N, n_context - 1, hidden] tokens of the newest frame
            self.kv = None              # fast, filling: (k, v) [layers, N, S * n_context, heads, head_dim]
            self.cached = np.zeros(self.num_envs, np.int64)  # frames whose keys/values are in self.kv
        for i in envs:
            self.count[i] = 0
            self.cached[i] = 0
            self.plan[i] = []
            self.ensemble[i] = []

    def _push(self, store, new):
        """Appends ``new`` ``[N, ...]`` to a ``[N, S, ...]`` window per env (slides when full)."""
        if store is None:
            store = jnp.repeat(new[:, None], self.steps, axis=1)
        full = self.count >= self.steps
        idx = np.minimum(self.count, self.steps - 1)
        rolled = jnp.where(full.reshape((-1,) + (1,) * (store.ndim - 1)), jnp.roll(store, -1, axis=1), store)
        return rolled.at[jnp.arange(self.num_envs), idx].set(new)

    # ------------------------------------------------------------------ jitted pieces
    def _model(self, state):
        return nnx.merge(self.graphdef, state)

    def _text_fn(self, state, tokens):
        model = self._model(state)
        return model.encode_text({'text_tokens': tokens})

    def _encode_fn(self, state, raw):
        """One new frame per env -> cached tokens ``[N, n_context - 1, hidden]`` and preprocessed frame."""
        model = self._model(state)
        x = preprocess.preprocess(raw, self.config)  # the training preprocessing, no augmentation
        frames = model.encode_frames({c: x[f'rgb_{c}'] for c in self.cfg.cameras})
        st = model.state_encoder(x['robot_obs'].astype(model.dtype))
        parts = [st[:, :, None]] + [frames[f'latents_{c}'] for c in self.cfg.cameras]
        parts += [frames[f'cls_{c}'][:, :, None] for c in self.cfg.cameras]
        return jnp.concatenate(parts, axis=2)[:, 0], x

    def _images_fn(self, state, raw):
        model = self._model(state)
        x = preprocess.preprocess(raw, self.config)
        frames = model.encode_frames({c: x[f'rgb_{c}'] for c in self.cfg.cameras})
        n = x['robot_obs'].shape[0]
        return jnp.concatenate([frames[f'{kind}_{c}'].reshape(n, -1) for c in self.cfg.cameras
                                for kind in ('latents', 'cls')], axis=-1)

    def _fast_fn(self, state, frames, text, query_step, rng):
        model = self._model(state)
        cond = fast_action_condition(model, frames, text, query_step)
        return model.sample_from_condition(cond['action'], None, sample_steps=self.sample_steps,
                                           noise=self._noise(rng))[:, 0]

    def _cached_fn(self, state, frame, text, query_step, rng, k_cache, v_cache):
        model = self._model(state)
        cond, k_cache, v_cache = cached_action_condition(model, frame, text, query_step, k_cache, v_cache)
        act = model.sample_from_condition(cond['action'], None, sample_steps=self.sample_steps,
                                          noise=self._noise(rng))[:, 0]
        return act, k_cache, v_cache

    def _empty_kv(self, frame_tokens: jax.Array):
        cfg = self.cfg
        heads = cfg.backbone.heads
        shape = (cfg.backbone.layers, self.num_envs, self.steps * (frame_tokens.shape[1] + 1), heads,
                 cfg.hidden // heads)
        return jnp.zeros(shape, frame_tokens.dtype), jnp.zeros(shape, frame_tokens.dtype)

    def _full_fn(self, state, window, text, query_step, rng):
        model = self._model(state)
        frames = model.encode_frames({c: window[f'rgb_{c}'] for c in self.cfg.cameras})
        st = model.state_encoder(window['robot_obs'].astype(model.dtype))
        ctx = model.context_tokens(text, st, frames)
        out = model.backbone_forward(ctx)
        cond = jnp.take_along_axis(out['action'], query_step[:, None, None, None], axis=1)
        return model.sample_from_condition(cond, None, sample_steps=self.sample_steps, noise=self._noise(rng))[:, 0]

    def _dream_fn(self, state, frames, text, query_step):
        model = self._model(state)
        cond = fast_action_condition(model, frames, text, query_step)
        return {name: getattr(model, f'decoder_{name}')(cond[f'dream_{name}'][:, 0])
                for name in masks.enabled_dreams(self.cfg)}

    def _noise(self, rng):
        # One x_T per call shared by all environments: env i of a batched call then acts exactly as a
        # single-env policy with the same seed would (the environments stay independent).
        return jax.random.normal(rng, (1, self.chunk, self.cfg.action.dim), jnp.float32)

    # ------------------------------------------------------------------ acting
    def text_embeddings(self, instructions: list[str]) -> jax.Array:
        new = [s for s in dict.fromkeys(instructions) if s not in self._text_cache]
        if new:
            emb = self._jit_text(self.state, jnp.asarray(self.tokenizer(new)))
            self._text_cache.update({s: emb[i] for i, s in enumerate(new)})
        return jnp.stack([self._text_cache[s] for s in instructions])

    def observe(self, observations: list[dict]) -> None:
        """Encodes and appends the newest frame of every environment."""
        if len(observations) != self.num_envs:
            raise ValueError(f"the policy was built for {self.num_envs} environments, got {len(observations)} "
                             "observations")
        tokens, x = self._jit_encode(self.state, observation_batch(observations, self.cfg.cameras))
        if self.fast:
            self.frames = self._push(self.frames, tokens)
            self.newest = tokens
        else:
            keys = [f'rgb_{c}' for c in self.cfg.cameras] + ['robot_obs']
            self.raw = {k: self._push(None if self.raw is None else self.raw[k], x[k][:, 0]) for k in keys}
        self.count += 1

    def chunks(self, instructions: list[str]) -> np.ndarray:
        """Raw chunks ``[N, chunk, 7]`` (gripper in [0, 1]) for the current windows."""
        text = self.text_embeddings(instructions)
        query = jnp.asarray(np.minimum(self.count, self.steps) - 1, jnp.int32)
        rng = jax.random.fold_in(self.rng, self.calls)
        self.calls += 1
        if self.kv_cache and (self.count <= self.steps).all() and (self.cached >= self.count - 1).all():
            # Every window is filling and holds its earlier frames' keys/values: newest frame + queries only.
            if self.kv is None:
                self.kv = self._empty_kv(self.newest)
            act, k, v = self._jit_cached(self.state, self.newest, text, query, rng, *self.kv)
            self.kv = (k, v)
            self.cached = self.count.copy()
            self.kv_steps += 1
            return np.asarray(act)
        if self.fast:
            # Recomputing path. While every window is still filling, positions past the newest frame are
            # padding that no query may see: cut them off (one compiled variant per length, S at most).
            m = int(np.minimum(self.count, self.steps).max())
            return np.asarray(self._jit_fast(self.state, self.frames[:, :m], text, query, rng))
        return np.asarray(self._jit_full(self.state, self.raw, text, query, rng))

    def frame_features(self, observations: list[dict]) -> np.ndarray:
        """``[N, D]`` float32: what the backbone sees of each observation's images, flattened (per camera
        in ``cfg.cameras`` order: the resampler latents, then the CLS token; no state, no text). Stateless:
        the history is untouched. The feature probe (``evaluation.probe.feature_probe``) reads it."""
        raw = observation_batch(observations, self.cfg.cameras)
        return np.asarray(self._jit_images(self.state, raw), np.float32)

    def step(self, observations: list[dict], instructions: list[str]) -> np.ndarray:
        """Appends the observations and returns ``[N, 7]`` environment actions (gripper +-1)."""
        self.observe(observations)
        if self.execute == 'chunk' and all(self.plan):
            return self._pop_plan()
        raw = self.chunks(instructions)
        if self.execute == 'first':
            act = raw[:, 0]
        elif self.execute == 'chunk':
            for i in range(self.num_envs):
                if not self.plan[i]:
                    self.plan[i] = list(raw[i])
            return self._pop_plan()
        else:
            act = self._ensemble(raw)
        return np.asarray(dreamvla.to_env_actions(act, self.cfg.action.arm_dim))

    def dream(self, observations: list[dict] | None = None, instructions: list[str] | None = None) -> dict:
        """What the model dreams at the newest step: ``{name: [N, cameras, n_mask, out]}`` decoder
        outputs (RGB patches are per-patch normalised, depth in metres, SAM/DINOv2 features).

        Call after ``step`` with the same observations: they are NOT appended again.
        """
        del observations
        if not self.fast:
            raise ValueError('dream() needs the fast path (fast=True)')
        text = self.text_embeddings(instructions)
        query = jnp.asarray(np.minimum(self.count, self.steps) - 1, jnp.int32)
        return {k: np.asarray(v) for k, v in self._jit_dream(self.state, self.frames, text, query).items()}

    def _pop_plan(self) -> np.ndarray:
        act = np.stack([self.plan[i].pop(0) for i in range(self.num_envs)])
        return np.asarray(dreamvla.to_env_actions(act, self.cfg.action.arm_dim))

    def _ensemble(self, raw: np.ndarray, k: float = 0.01) -> np.ndarray:
        """Temporal ensembling (ACT): average every stored chunk's prediction for the current step,
        weight ``exp(-k * i)`` with i = 0 for the oldest prediction."""
        out = []
        for i in range(self.num_envs):
            self.ensemble[i] = [(age + 1, c) for age, c in self.ensemble[i] if age + 1 < self.chunk]
            self.ensemble[i].append((0, raw[i]))
            preds = np.stack([c[age] for age, c in self.ensemble[i]])  # oldest first
            w = np.exp(-k * np.arange(len(preds)))
            out.append((w[:, None] * preds).sum(0) / w.sum())
        return np.stack(out)


def make_offline_predict(config, checkpoint, *, seed: int = 0, model: dreamvla.DreamVLA | None = None):
    """``predict(batch)`` for ``evaluation.offline``: ``batch`` is a preprocessed pipeline batch (no
    augmentation). Returns ``{'actions': [B, S, chunk, 7] raw, 'dream_<name>': [B*S, cams, n_mask, out]}``.
    ``model``: an already loaded model (then ``checkpoint`` is not read).
    """
    if model is None:
        from dreamvla_jax.training.checkpoint import load_model_state

        model = load_model_state(config, checkpoint)
    graphdef, state = nnx.split(model)
    s = config.model.history

    @jax.jit
    def run(state, batch, rng):
        m = nnx.merge(graphdef, state)
        out = m.backbone_forward(m.encode(batch))
        b = out['action'].shape[0]
        pred = {'actions': m.sample_from_condition(out['action'], rng)}
        for name in masks.enabled_dreams(m.cfg):
            pred[f'dream_{name}'] = getattr(m, f'decoder_{name}')(
                out[f'dream_{name}'].reshape(b * s, -1, m.cfg.hidden))
        return pred

    calls = iter(range(1 << 62))

    def predict(batch: dict) -> dict:
        keys = ('rgb_static', 'rgb_gripper', 'robot_obs', 'text_tokens')
        rng = jax.random.fold_in(jax.random.key(seed), next(calls))
        return {k: np.asarray(v) for k, v in run(state, {k: batch[k] for k in keys}, rng).items()}

    return predict
