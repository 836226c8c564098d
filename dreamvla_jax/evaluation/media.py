"""Rollout videos with the instruction overlaid, and PNG panels of dream predictions next to their targets.

Dream maps arrive in either of two forms, per environment/example and camera:
  * tokens ``[cams, L, D]`` as the decoders emit them (``L = g*g`` patches, row-major; RGB ``D = p*p*3``
    in (row, col, channel) order inside a patch, depth ``D = p*p``, features ``D = channels``);
  * images ``[cams, H, W]`` / ``[cams, H, W, C]``.
RGB predictions are per-patch normalised (the training target, SPEC section 4), so a panel shows the
target normalised the same way; depth is shown with a shared colour scale per row; features as the first
three principal components of prediction and target together, so equal colours mean equal features.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from dreamvla_jax import losses
from dreamvla_jax.evaluation.rollout import StepEvent

CELL = 112  # pixels per panel cell


# ------------------------------------------------------------------------------------------------------
# Frames and videos
# ------------------------------------------------------------------------------------------------------

def overlay_text(frame: np.ndarray, text: str, scale: float = 0.4) -> np.ndarray:
    """A copy of an RGB uint8 frame with ``text`` written (wrapped, outlined) along the top edge."""
    img = np.ascontiguousarray(frame.copy())
    h, w = img.shape[:2]
    char_w = max(1, int(cv2.getTextSize('M', cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0]))
    words, lines, line = text.split(), [], ''
    for word in words:
        cand = f'{line} {word}'.strip()
        if len(cand) * char_w > w - 8 and line:
            lines.append(line)
            line = word
        else:
            line = cand
    lines.append(line)
    step = int(22 * scale / 0.5)
    for i, ln in enumerate(lines):
        org = (4, step * (i + 1))
        cv2.putText(img, ln, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.putText(img, ln, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return img


def rollout_frame(obs: dict, text: str, size: int = 256) -> np.ndarray:
    """Static camera (and the wrist camera beside it, when present) at ``size`` px, instruction on top."""
    rgb = obs['rgb_obs']
    parts = [cv2.resize(np.asarray(rgb['rgb_static'], np.uint8), (size, size), interpolation=cv2.INTER_AREA)]
    if 'rgb_gripper' in rgb:
        parts.append(cv2.resize(np.asarray(rgb['rgb_gripper'], np.uint8), (size, size)))
    return overlay_text(np.concatenate(parts, axis=1), text, scale=0.5)


def write_video(path: str | Path, frames: Sequence[np.ndarray], fps: int = 15) -> Path:
    """Writes RGB uint8 frames as MP4 (OpenCV's mp4v) or GIF (Pillow), chosen by the suffix of ``path``.

    Raises ValueError when there are no frames or the MP4 encoder is unavailable (use .gif then).
    """
    path = Path(path)
    if not frames:
        raise ValueError(f"no frames to write to {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == '.gif':
        from PIL import Image

        images = [Image.fromarray(np.asarray(f, np.uint8)) for f in frames]
        images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
        return path
    h, w = frames[0].shape[:2]
    h2, w2 = h - h % 2, w - w % 2  # codecs want even sizes
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*'mp4v'), fps, (w2, h2))
    if not writer.isOpened():
        raise ValueError(f"OpenCV cannot write MP4 here ({path}); use --media-format gif")
    for f in frames:
        writer.write(cv2.cvtColor(np.asarray(f, np.uint8)[:h2, :w2], cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def save_png(path: str | Path, image: np.ndarray) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(np.asarray(image, np.uint8), cv2.COLOR_RGB2BGR)):
        raise ValueError(f"could not write {path}")
    return path


# ------------------------------------------------------------------------------------------------------
# Dream maps -> images
# ------------------------------------------------------------------------------------------------------

def unpatchify(tokens: np.ndarray, channels: int) -> np.ndarray:
    """``[L, p*p*C]`` (patches row-major, (row, col, channel) inside) -> ``[g*p, g*p, C]``; inverse of
    ``losses.patchify``."""
    tokens = np.asarray(tokens, np.float32)
    g = math.isqrt(tokens.shape[0])
    p = math.isqrt(tokens.shape[1] // channels)
    if g * g != tokens.shape[0] or p * p * channels != tokens.shape[1]:
        raise ValueError(f"cannot unpatchify tokens of shape {tokens.shape} with {channels} channels")
    x = tokens.reshape(g, g, p, p, channels).transpose(0, 2, 1, 3, 4)
    return x.reshape(g * p, g * p, channels)


def patchify(image: np.ndarray, patch: int) -> np.ndarray:
    """``[H, W, C]`` -> ``[(H/p)*(W/p), p*p*C]`` (``losses.patchify`` of one image)."""
    return losses.patchify(np.asarray(image)[None], patch)[0]


def normalize_patches(patches: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Per-patch zero mean / unit variance (unbiased), as the RGB target of the dream head."""
    return np.asarray(losses.normalize_patches(np.asarray(patches, np.float32), eps))


def to_unit(x: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Min-max scaling to [0, 1] (constant input -> 0.5)."""
    x = np.asarray(x, np.float32)
    lo = float(np.nanmin(x)) if lo is None else lo
    hi = float(np.nanmax(x)) if hi is None else hi
    if not np.isfinite(hi - lo) or hi - lo < 1e-12:
        return np.full_like(x, 0.5)
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0)


def pca_rgb(*features: np.ndarray) -> list[np.ndarray]:
    """Projects feature maps ``[h, w, C]`` (or ``[L, C]``, L square) on their joint first three principal
    components -> images ``[h, w, 3]`` in [0, 1] with one shared colour scale."""
    maps = []
    for f in features:
        f = np.asarray(f, np.float32)
        if f.ndim == 2:
            g = math.isqrt(f.shape[0])
            f = f.reshape(g, g, -1)
        maps.append(f)
    flat = np.concatenate([m.reshape(-1, m.shape[-1]) for m in maps])
    mean = flat.mean(0)
    _, _, vt = np.linalg.svd(flat - mean, full_matrices=False)
    basis = vt[:3].T
    if basis.shape[1] < 3:
        basis = np.pad(basis, ((0, 0), (0, 3 - basis.shape[1])))
    proj = (flat - mean) @ basis
    lo, hi = np.percentile(proj, 1, axis=0), np.percentile(proj, 99, axis=0)
    out, start = [], 0
    for m in maps:
        n = m.shape[0] * m.shape[1]
        p = proj[start:start + n]
        start += n
        unit = np.clip((p - lo) / np.maximum(hi - lo, 1e-12), 0.0, 1.0)
        out.append(unit.reshape(m.shape[0], m.shape[1], 3))
    return out


def _cell(img: np.ndarray, size: int = CELL) -> np.ndarray:
    """[0, 1] image ``[h, w]`` or ``[h, w, 3]`` -> uint8 ``[size, size, 3]`` (nearest: patches stay sharp)."""
    img = np.asarray(img, np.float32)
    if img.ndim == 2:
        img = cv2.applyColorMap((img * 255).astype(np.uint8), cv2.COLORMAP_VIRIDIS)[..., ::-1]
    else:
        img = (np.clip(img, 0, 1) * 255).astype(np.uint8)
    return cv2.resize(np.ascontiguousarray(img), (size, size), interpolation=cv2.INTER_NEAREST)


def _label(img: np.ndarray, text: str) -> np.ndarray:
    return overlay_text(img, text, scale=0.35)


def _rgb_pair(pred, target):
    """Prediction tokens/image and target image -> two [0, 1] images on the per-patch-normalised scale."""
    pred = np.asarray(pred, np.float32)
    if pred.ndim == 2:                                   # tokens [L, p*p*3]
        patch = math.isqrt(pred.shape[1] // 3)
        pred_img = unpatchify(pred, 3)
        tgt_img = None
        if target is not None:
            t = _as_float_image(target, pred_img.shape[0])
            tgt_img = unpatchify(normalize_patches(patchify(t, patch)), 3)
        lo, hi = np.percentile(pred_img, 1), np.percentile(pred_img, 99)
        return to_unit(pred_img, lo, hi), None if tgt_img is None else to_unit(tgt_img, lo, hi)
    pred_img = to_unit(pred)
    return pred_img, None if target is None else to_unit(_as_float_image(target, pred_img.shape[0]))


def _as_float_image(img, size: int) -> np.ndarray:
    img = np.asarray(img)
    img = img.astype(np.float32) / 255.0 if img.dtype == np.uint8 else img.astype(np.float32)
    if img.shape[0] != size:
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    return img


def _depth_pair(pred, target):
    pred = np.asarray(pred, np.float32)
    pred_img = unpatchify(pred, 1)[..., 0] if pred.ndim == 2 and pred.shape[0] != pred.shape[1] else pred
    tgt = None
    if target is not None:
        tgt = np.asarray(target, np.float32)
        if tgt.ndim == 2 and tgt.shape[0] != tgt.shape[1]:
            tgt = unpatchify(tgt, 1)[..., 0]
        if tgt.shape != pred_img.shape:
            tgt = cv2.resize(tgt, pred_img.shape[::-1], interpolation=cv2.INTER_NEAREST)
    both = pred_img if tgt is None else np.concatenate([pred_img.ravel(), tgt.ravel()])
    lo, hi = float(np.percentile(both, 1)), float(np.percentile(both, 99))
    return to_unit(pred_img, lo, hi), None if tgt is None else to_unit(tgt, lo, hi)


def _feature_pair(pred, target):
    if target is None:
        return pca_rgb(pred)[0], None
    return tuple(pca_rgb(pred, target))


_PAIRS = {'rgb': _rgb_pair, 'depth': _depth_pair}


def dream_panel(pred: dict, target: dict | None = None, cameras: Sequence[str] = ('static', 'gripper'),
                cell: int = CELL) -> np.ndarray:
    """One uint8 RGB panel: a row per (modality, camera), columns prediction | target.

    Args:
      pred: ``{'rgb'|'depth'|'sam'|'dino': [cams, ...]}`` for ONE example (tokens or images, see module
        docstring); unknown keys are ignored.
      target: the same keys (RGB/depth as images or tokens, features ``[cams, h, w, C]`` or
        ``[cams, L, C]``); a missing key leaves its cell grey. Optional ``'motion_mask'`` ``[cams, L]``
        adds a row of the dynamic region (target RGB times the dilated motion mask).
    Returns:
      ``[rows * cell, 2 * cell, 3]`` uint8.
    """
    target = target or {}
    rows = []
    grey = np.full((cell, cell, 3), 128, np.uint8)
    for name in ('rgb', 'depth', 'sam', 'dino'):
        if name not in pred:
            continue
        p_all = np.asarray(pred[name])
        for i in range(p_all.shape[0]):
            cam = cameras[i] if i < len(cameras) else str(i)
            t = None if name not in target else np.asarray(target[name])[i]
            p_img, t_img = _PAIRS.get(name, _feature_pair)(p_all[i], t)
            left = _label(_cell(p_img, cell), f'{name} {cam} pred')
            right = grey if t_img is None else _label(_cell(t_img, cell), 'target')
            rows.append(np.concatenate([left, right], axis=1))
    if 'motion_mask' in target and 'rgb' in target:
        for i, m in enumerate(np.asarray(target['motion_mask'])):
            img = _as_float_image(np.asarray(target['rgb'])[i], cell)
            g = math.isqrt(m.size)
            mask = cv2.resize(np.asarray(m, np.float32).reshape(g, g), (cell, cell),
                              interpolation=cv2.INTER_NEAREST)
            dyn = _label(_cell(to_unit(img) * (0.25 + 0.75 * mask[..., None]), cell),
                         f'dynamic {cameras[i] if i < len(cameras) else i}')
            rows.append(np.concatenate([dyn, grey], axis=1))
    if not rows:
        raise ValueError(f"no dream maps to draw (got keys {sorted(pred)})")
    return np.concatenate(rows, axis=0)


# ------------------------------------------------------------------------------------------------------
# Rollout recorder
# ------------------------------------------------------------------------------------------------------

class RolloutRecorder:
    """Collects frames of the first ``max_episodes`` episodes and writes one video per episode; with a
    policy that has ``dream``, also a panel every ``panel_every`` steps whose targets are the frames
    ``future`` steps later (RGB and depth from the simulator; features have no online target).

    Hook it into ``rollout.run_episodes`` with ``on_subtask_start``/``on_step``/``on_episode_end``.
    """

    def __init__(self, out_dir: str | Path, *, max_episodes: int = 8, video_format: str = 'mp4',
                 fps: int = 15, panel_every: int = 0, future: int = 3,
                 cameras: Sequence[str] = ('static', 'gripper')):
        self.out = Path(out_dir)
        self.max_episodes = max_episodes
        self.video_format = video_format
        self.fps = fps
        self.panel_every = panel_every
        self.future = future
        self.cameras = tuple(cameras)
        self.frames: dict[int, list[np.ndarray]] = {}
        self.pending: list[tuple[int, int, int, int, dict]] = []  # (slot, episode, subtask, due step, pred)
        self.written: list[Path] = []

    def wants(self, episode_index: int) -> bool:
        return episode_index in self.frames or len(self.frames) < self.max_episodes

    def on_subtask_start(self, slot: int, episode, subtask: int, obs: dict) -> None:
        if self.wants(episode.index):
            self.frames.setdefault(episode.index, []).append(
                rollout_frame(obs, f'{subtask + 1}/{len(episode.subtasks)} {episode.instructions[subtask]}'))

    def on_step(self, event: StepEvent) -> None:
        ep = event.episode
        if ep.index not in self.frames:
            return
        text = f'{event.subtask + 1}/{len(ep.subtasks)} {ep.instructions[event.subtask]}  t={event.step}'
        if event.success:
            text += '  [done]'
        self.frames[ep.index].append(rollout_frame(event.obs, text))
        keep = []
        for slot, idx, sub, due, pred in self.pending:
            if (slot, idx, sub) == (event.slot, ep.index, event.subtask) and event.step >= due:
                self._write_panel(idx, sub, due - self.future, pred, event.obs)
            elif idx == ep.index and sub != event.subtask:
                self._write_panel(idx, sub, due - self.future, pred, None)   # subtask ended first
            else:
                keep.append((slot, idx, sub, due, pred))
        self.pending = keep

    def add_dream(self, slot: int, event_episode, subtask: int, step: int, pred: dict) -> None:
        """Registers the dream prediction made at ``step`` (written once the target frame exists)."""
        self.pending.append((slot, event_episode.index, subtask, step + self.future, pred))

    def wants_dream(self, episode_index: int, step: int) -> bool:
        return self.panel_every > 0 and episode_index in self.frames and step % self.panel_every == 0

    def _write_panel(self, idx: int, sub: int, step: int, pred: dict, obs: dict | None) -> None:
        target = None
        if obs is not None:
            # The cameras differ in size (tabletop/CALVIN: 200 and 84 px): bring them to one before stacking.
            rgb = [np.asarray(obs['rgb_obs'][f'rgb_{c}']) for c in self.cameras]
            size = max(o.shape[0] for o in rgb)
            target = {'rgb': np.stack([cv2.resize(o, (size, size)) for o in rgb])}
            depth = obs.get('depth_obs', {})
            if all(f'depth_{c}' in depth for c in self.cameras):
                hw = np.asarray(depth[f'depth_{self.cameras[0]}']).shape[::-1]
                nearest = cv2.INTER_NEAREST
                target['depth'] = np.stack([cv2.resize(np.asarray(depth[f'depth_{c}'], np.float32), hw,
                                                       interpolation=nearest) for c in self.cameras])
        panel = dream_panel(pred, target, self.cameras)
        path = self.out / f'episode_{idx:04d}' / f'panel_sub{sub}_step{step:03d}.png'
        self.written.append(save_png(path, panel))

    def on_episode_end(self, episode, n_done: int) -> None:
        frames = self.frames.get(episode.index)
        for _, idx, sub, due, pred in [p for p in self.pending if p[1] == episode.index]:
            self._write_panel(idx, sub, due - self.future, pred, None)
        self.pending = [p for p in self.pending if p[1] != episode.index]
        if frames:
            name = f'episode_{episode.index:04d}_{n_done}of{len(episode.subtasks)}.{self.video_format}'
            self.written.append(write_video(self.out / name, frames, self.fps))
            self.frames[episode.index] = []  # keeps the slot counted without holding the frames

    def on_policy_step(self, policy, observations: list, instructions: list, states: list) -> None:
        """Asks ``policy.dream`` (when the policy has one) for the slots due a panel at this step."""
        due = [(k, ep, sub, t) for k, ep, sub, t in states if self.wants_dream(ep.index, t)]
        if not due or not hasattr(policy, 'dream'):
            return
        preds = policy.dream(observations, instructions)
        for k, ep, sub, t in due:
            self.add_dream(k, ep, sub, t, {name: np.asarray(v[k]) for name, v in preds.items()})
