"""Frozen teacher networks (PyTorch via transformers) that produce the dream targets (SPEC section 4).

- SAM ViT-B image encoder: 256 x 64 x 64 embedding at 1024 px -> average-pooled to 16 x 16 x 256.
- DINOv2 ViT-B/14: final-layer normalised patch tokens at 224 px -> 16 x 16 x 768.
- Depth-Anything v2 (ViT-B): relative pseudo-depth for datasets without depth, resized to the camera size.

Each teacher is loaded from a local folder the user names (``from_pretrained(..., local_files_only=True)``),
or built with random weights (``random_init``) at full ViT-B size (``scale='base'``) or tiny
(``scale='tiny'``, for tests and CPU demos) with the same output shapes. Random teachers are labelled in the
store manifest.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch
import torch.nn.functional as F

from dreamvla_jax.data.errors import DataError
from dreamvla_jax.teachers.precompute import FEATURE_GRID

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SCALES = ('base', 'tiny')
SAM_DIM = 256
DINO_DIM = 768


def pick_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device('cuda' if torch.cuda.is_available() else 'cpu')


def to_pixels(images: np.ndarray, size: int, device: torch.device, pad_square: bool = False) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float32 [N, 3, size, size], ImageNet-normalised.

    ``pad_square``: SAM's preprocessing (resize the longest side to ``size``, zero-pad bottom/right after
    normalisation); otherwise a plain resize to ``size`` x ``size``.
    """
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float() / 255.0
    h, w = x.shape[-2:]
    if pad_square:
        s = size / max(h, w)
        nh, nw = int(round(h * s)), int(round(w * s))
    else:
        nh, nw = size, size
    x = F.interpolate(x, size=(nh, nw), mode='bilinear', align_corners=False, antialias=True)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    x = (x - mean) / std
    if pad_square and (nh, nw) != (size, size):
        x = F.pad(x, (0, size - nw, 0, size - nh))
    return x


def _check_dir(path: str, flag: str) -> None:
    if not os.path.isdir(path):
        raise DataError(f"{flag} {path}: no such folder (a transformers model folder is expected).")


@dataclasses.dataclass
class Teacher:
    """A loaded teacher: ``__call__(uint8 [N, H, W, 3]) -> np.ndarray [N, ...]`` (float16)."""
    name: str
    model: torch.nn.Module
    input_size: int
    device: torch.device
    info: dict  # manifest entry (source, architecture, random_init, scale)

    @torch.no_grad()
    def __call__(self, images: np.ndarray, grid: int = FEATURE_GRID) -> np.ndarray:
        raise NotImplementedError


class SamTeacher(Teacher):
    @torch.no_grad()
    def __call__(self, images, grid: int = FEATURE_GRID):
        """uint8 [N, H, W, 3] -> float16 [N, grid, grid, 256] (encoder embedding, average-pooled)."""
        x = to_pixels(images, self.input_size, self.device, pad_square=True)
        emb = self.model(pixel_values=x).last_hidden_state  # [N, 256, g, g]
        g = emb.shape[-1]
        if g % FEATURE_GRID:
            raise DataError(f"SAM teacher embedding grid {g} is not a multiple of {FEATURE_GRID}.")
        emb = F.avg_pool2d(emb, g // grid)
        return emb.permute(0, 2, 3, 1).float().cpu().numpy().astype(np.float16)


class DinoTeacher(Teacher):
    @torch.no_grad()
    def __call__(self, images, grid: int = FEATURE_GRID):
        """uint8 [N, H, W, 3] -> float16 [N, grid, grid, 768] (final LayerNorm'd patch tokens; average-pooled
        when ``grid`` is coarser than the 16 x 16 patch grid)."""
        x = to_pixels(images, self.input_size, self.device)
        tokens = self.model(pixel_values=x).last_hidden_state  # [N, 1 (+registers) + g*g, 768]
        g = self.input_size // self.model.config.patch_size
        patches = tokens[:, -g * g:].reshape(len(images), g, g, -1)
        if grid != g:
            patches = F.avg_pool2d(patches.permute(0, 3, 1, 2), g // grid).permute(0, 2, 3, 1)
        return patches.float().cpu().numpy().astype(np.float16)


class DepthTeacher(Teacher):
    @torch.no_grad()
    def __call__(self, images, grid: int = FEATURE_GRID):
        """uint8 [N, H, W, 3] -> float16 [N, H, W] relative inverse depth at the camera resolution (``grid``:
        unused, depth is stored per pixel)."""
        h, w = images.shape[1:3]
        x = to_pixels(images, self.input_size, self.device)
        depth = self.model(pixel_values=x).predicted_depth  # [N, s, s]
        depth = F.interpolate(depth[:, None], size=(h, w), mode='bilinear', align_corners=False)[:, 0]
        return depth.float().cpu().numpy().astype(np.float16)


def _sam_config(scale):
    from transformers import SamVisionConfig
    if scale == 'tiny':
        # 64 px / patch 4 = 16 x 16 embedding: same output shape as ViT-B's pooled 64 x 64.
        return SamVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_dim=64,
                               image_size=64, patch_size=4, output_channels=SAM_DIM, window_size=4,
                               global_attn_indexes=[1], num_pos_feats=16, initializer_range=0.02)
    # SAM ViT-B image encoder (transformers defaults), but with a usable init range (its default 1e-10
    # would give near-constant random features).
    return SamVisionConfig(initializer_range=0.02)


def _dino_config(scale):
    from transformers import Dinov2Config
    if scale == 'tiny':
        return Dinov2Config(hidden_size=DINO_DIM, num_hidden_layers=1, num_attention_heads=4, mlp_ratio=1,
                            image_size=64, patch_size=4)
    return Dinov2Config(hidden_size=DINO_DIM, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4,
                        image_size=518, patch_size=14)


def _depth_config(scale):
    from transformers import DepthAnythingConfig, Dinov2Config
    if scale == 'tiny':
        backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, mlp_ratio=2,
                                image_size=56, patch_size=14, out_indices=[1, 2, 3, 4],
                                reshape_hidden_states=False)
        return DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=32,
                                   neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16,
                                   head_hidden_size=8)
    # Depth-Anything-V2-Base: DINOv2 ViT-B/14 backbone, taps after layers 3, 6, 9, 12.
    backbone = Dinov2Config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4,
                            image_size=518, patch_size=14, out_indices=[3, 6, 9, 12],
                            reshape_hidden_states=False)
    return DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=768,
                               neck_hidden_sizes=[96, 192, 384, 768], fusion_hidden_size=128)


# name -> (class, config builder, input size (base, tiny))
_SPECS = {
    'sam': (SamTeacher, _sam_config, (1024, 64)),
    'dino': (DinoTeacher, _dino_config, (224, 64)),
    'depth': (DepthTeacher, _depth_config, (518, 56)),
}


def build_teacher(name: str, *, path: str | None = None, random_init: bool = False, scale: str = 'base',
                  device: str | None = None, seed: int = 0) -> Teacher:
    """Loads teacher ``name`` ('sam' | 'dino' | 'depth') from ``path`` or builds it with random weights."""
    import transformers

    if name not in _SPECS:
        raise DataError(f"unknown teacher {name!r}; choose from {sorted(_SPECS)}.")
    if scale not in SCALES:
        raise DataError(f"--teacher-scale {scale!r}: choose from {SCALES}.")
    cls, make_config, sizes = _SPECS[name]
    dev = pick_device(device)
    flag = {'sam': '--sam', 'dino': '--dinov2', 'depth': '--depth-model'}[name]
    if path and not random_init:
        _check_dir(path, flag)
        if name == 'sam':
            model = transformers.SamModel.from_pretrained(path, local_files_only=True).vision_encoder
        elif name == 'dino':
            model = transformers.Dinov2Model.from_pretrained(path, local_files_only=True)
        else:
            model = transformers.DepthAnythingForDepthEstimation.from_pretrained(path, local_files_only=True)
        size = sizes[0]
        info = {'source': os.path.abspath(path), 'random_init': False, 'scale': 'pretrained'}
    elif random_init:
        # Seeded so that a resumed run builds bit-identical weights.
        torch.manual_seed(seed)
        config = make_config(scale)
        if name == 'sam':
            model = transformers.SamVisionModel(config)
        elif name == 'dino':
            model = transformers.Dinov2Model(config)
        else:
            model = transformers.DepthAnythingForDepthEstimation(config)
        size = sizes[1] if scale == 'tiny' else sizes[0]
        info = {'source': f'random-init ({scale}, seed {seed})', 'random_init': True, 'scale': scale}
    else:
        raise DataError(f"teacher {name} needs weights: pass {flag} PATH (a local transformers folder) "
                        "or --random-init.")
    model = model.to(dev).eval()
    info['architecture'] = type(model).__name__
    info['input_size'] = size
    info['parameters'] = int(sum(p.numel() for p in model.parameters()))
    return cls(name=name, model=model, input_size=size, device=dev, info=info)
