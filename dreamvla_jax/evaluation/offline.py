"""Offline evaluation on a dataset split: no simulator, just predictions against the batch's targets.

The model enters through one callable, so this module knows nothing of its internals:

  predict(batch) -> {'actions': [B, S, chunk, 7] raw (arm as stored, gripper in [0, 1]),
                     'dream_<name>': [B*S, cams, n_mask, out] for each enabled dream head}

``batch`` is what ``DreamVLA.compute_loss`` takes (the pipeline's batch after ``preprocess`` without
augmentation): ``rel_actions [B, W, 7]``, ``rgb_<cam> [B, W, H, W, 3]`` (normalised), ``depth_<cam>
[B, W, H, W]`` (metres), ``motion_mask [B, S, cams, L]``, ``sam``/``dino`` ``[B, S, cams, h, w, C]``.
Targets are built here exactly as the losses build them (SPEC sections 4 and 7): action chunk t = frames
t..t+chunk-1 with the gripper mapped -1/+1 -> 0/1; visual targets = frame t + future.

Metrics (all averaged over every element of the split, not over batch means):
  action_mse_per_dim [7], action_mse_arm, gripper_accuracy (prediction > 0.5 vs target);
  rgb_masked_mse (``losses.masked_mse`` on per-patch-normalised targets, mean over cameras);
  depth_absrel = mean |p - y| / y and depth_delta1 = fraction with max(p/y, y/p) < 1.25, over pixels
  with y > ``min_depth``; sam_cosine / dino_cosine = mean cosine similarity per position.
Every visual metric is also reported per camera (``<metric>/<camera>``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from dreamvla_jax import losses
from dreamvla_jax.evaluation.media import normalize_patches


def action_targets(rel_actions: np.ndarray, history: int, chunk: int, arm_dim: int = 6) -> np.ndarray:
    """``[B, W, 7]`` -> ``[B, S, chunk, 7]`` chunks, gripper -1/+1 -> 0/1 (the model's training target)."""
    idx = np.arange(history)[:, None] + np.arange(chunk)[None]
    a = np.asarray(rel_actions, np.float32)[:, idx]
    return np.concatenate([a[..., :arm_dim], (a[..., arm_dim:] + 1.0) / 2.0], axis=-1)


def _visual_target(batch: dict, name: str, cam: str, history: int, future: int, patch: int) -> np.ndarray:
    img = np.asarray(batch[f'{name}_{cam}'], np.float32)[:, future:future + history]
    img = img.reshape((-1,) + img.shape[2:4] + (img.shape[4] if img.ndim == 5 else 1,))
    return losses.patchify(img, patch)


class _Mean:
    """Running sum / count per metric name."""

    def __init__(self):
        self.sum = defaultdict(float)
        self.count = defaultdict(float)

    def add(self, name: str, total, count) -> None:
        self.sum[name] += float(np.sum(total))
        self.count[name] += float(count)

    def result(self) -> dict[str, float]:
        return {k: self.sum[k] / self.count[k] for k in self.sum if self.count[k] > 0}


def batch_metric_sums(batch: dict, pred: dict, acc: _Mean, *, history: int, chunk: int, future: int,
                      patch: int, cameras: Sequence[str], arm_dim: int = 6, min_depth: float = 1e-3) -> None:
    """Adds one batch's sums and counts to ``acc`` (see the module docstring for the metrics)."""
    if 'actions' in pred:
        p = np.asarray(pred['actions'], np.float32)
        y = action_targets(batch['rel_actions'], history, chunk, arm_dim)
        p = p[:, :y.shape[1]]
        sq = np.square(p - y).reshape(-1, y.shape[-1])
        for d in range(sq.shape[1]):
            acc.add(f'action_mse/{d}', sq[:, d], sq.shape[0])
        acc.add('action_mse_arm', sq[:, :arm_dim], sq[:, :arm_dim].size)
        g_ok = (p[..., arm_dim:] > 0.5) == (y[..., arm_dim:] > 0.5)
        acc.add('gripper_accuracy', g_ok, g_ok.size)
    for name in ('rgb', 'depth', 'sam', 'dino'):
        key = f'dream_{name}'
        if key not in pred:
            continue
        out = np.asarray(pred[key], np.float32)       # [B*S, cams, L, D]
        for i, cam in enumerate(cameras):
            p = out[:, i]
            if name == 'rgb':
                y = normalize_patches(_visual_target(batch, 'rgb', cam, history, future, patch))
                m = np.asarray(batch['motion_mask'], np.float32)[:, :, i].reshape(y.shape[0], -1)[..., None]
                se = np.square(m * p - m * y)
                acc.add(f'rgb_masked_mse/{cam}', se, se.size)
            elif name == 'depth':
                y = _visual_target(batch, 'depth', cam, history, future, patch)
                valid = y > min_depth
                ratio = np.where(valid, np.maximum(p, 1e-6) / np.where(valid, y, 1.0), 1.0)
                acc.add(f'depth_absrel/{cam}', np.where(valid, np.abs(p - y) / np.where(valid, y, 1.0), 0.0),
                        valid.sum())
                d1 = valid & (np.maximum(ratio, 1.0 / ratio) < 1.25)
                acc.add(f'depth_delta1/{cam}', d1, valid.sum())
            else:
                t = np.asarray(batch[name], np.float32)[:, :, i]
                grid = math.isqrt(p.shape[1])
                y = losses.pool_grid(t, (grid, grid)).reshape(p.shape[0], -1, t.shape[-1])
                cos = np.sum(p * y, -1) / (np.maximum(np.linalg.norm(p, axis=-1), 1e-8)
                                           * np.maximum(np.linalg.norm(y, axis=-1), 1e-8))
                acc.add(f'{name}_cosine/{cam}', cos, cos.size)


def evaluate_offline(batches: Iterable[dict], predict: Callable[[dict], dict], *, history: int, chunk: int,
                     future: int, patch: int, cameras: Sequence[str] = ('static', 'gripper'),
                     arm_dim: int = 6, max_batches: int | None = None, progress: bool = False) -> dict:
    """Runs ``predict`` over ``batches`` and returns the split's metrics.

    Returns ``{'batches', 'action_mse_per_dim': [7], 'action_mse_arm', 'gripper_accuracy',
    'rgb_masked_mse', 'depth_absrel', 'depth_delta1', 'sam_cosine', 'dino_cosine', '<metric>/<cam>': ...}``
    (keys of heads or targets that are absent are left out). Camera means weight cameras equally, as the
    training losses do.
    """
    acc, n = _Mean(), 0
    it = batches
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(batches, total=max_batches, desc='offline eval')
    for batch in it:
        if max_batches is not None and n >= max_batches:
            break
        batch_metric_sums(batch, predict(batch), acc, history=history, chunk=chunk, future=future,
                          patch=patch, cameras=cameras, arm_dim=arm_dim)
        n += 1
    res = acc.result()
    out: dict = {'batches': n}
    dims = sorted(int(k.split('/')[1]) for k in res if k.startswith('action_mse/'))
    if dims:
        out['action_mse_per_dim'] = [res.pop(f'action_mse/{d}') for d in dims]
    for k in ('action_mse_arm', 'gripper_accuracy'):
        if k in res:
            out[k] = res.pop(k)
    for metric in ('rgb_masked_mse', 'depth_absrel', 'depth_delta1', 'sam_cosine', 'dino_cosine'):
        per_cam = {k: v for k, v in res.items() if k.startswith(metric + '/')}
        if per_cam:
            out[metric] = float(np.mean(list(per_cam.values())))
            out.update(per_cam)
    return out


def format_offline(result: dict) -> str:
    lines = [f"offline evaluation over {result['batches']} batches"]
    if 'action_mse_per_dim' in result:
        dims = ['x', 'y', 'z', 'roll', 'pitch', 'yaw', 'grip'][:len(result['action_mse_per_dim'])]
        pairs = zip(dims, result['action_mse_per_dim'], strict=True)
        lines.append('  action MSE  ' + '  '.join(f'{d}={v:.4f}' for d, v in pairs))
        lines.append(f"  arm MSE {result['action_mse_arm']:.4f}   gripper accuracy "
                     f"{result['gripper_accuracy'] * 100:.1f}%")
    for k in ('rgb_masked_mse', 'depth_absrel', 'depth_delta1', 'sam_cosine', 'dino_cosine'):
        if k in result:
            cams = '  '.join(f"{c.split('/')[1]}={v:.4f}" for c, v in result.items() if c.startswith(k + '/'))
            lines.append(f'  {k:<15} {result[k]:.4f}   ({cams})')
    return '\n'.join(lines)


def panel_inputs(batch: dict, pred: dict, example: int, *, history: int, future: int,
                 cameras: Sequence[str] = ('static', 'gripper')) -> tuple[dict, dict]:
    """``(pred, target)`` dicts for ``media.dream_panel`` of one (window, timestep) row ``example`` of B*S."""
    b, s = divmod(example, history)
    p = {k[len('dream_'):]: np.asarray(v)[example] for k, v in pred.items() if k.startswith('dream_')}
    t = {}
    for name in ('rgb', 'depth'):
        if all(f'{name}_{c}' in batch for c in cameras):
            t[name] = np.stack([np.asarray(batch[f'{name}_{c}'])[b, s + future] for c in cameras])
    for name in ('sam', 'dino'):
        if name in batch:
            t[name] = np.asarray(batch[name], np.float32)[b, s]
    if 'motion_mask' in batch:
        t['motion_mask'] = np.asarray(batch['motion_mask'], np.float32)[b, s]
    return p, t
