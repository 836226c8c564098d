r"""DreamVLA on the built-in pybullet tabletop (6 tasks), sized to train on 2 CPU cores: `make demo`.

The same structure as ``configs/calvin.py`` (CLIP text tower, MAE ViT, Perceiver resampler, GPT-2
backbone with the block mask, RGB/dynamic + depth + SAM dream heads, DiT diffusion head with CFG), with
small widths, 64-px images and a history of 2. No pretrained weights exist offline, so both towers are
trained from scratch (nothing is frozen; see ``m.freeze`` below).

Presets (``--config configs/tabletop.py[:preset]``):

  default   The demo model: 2.46 M parameters, all trained (1.6 M are the text tower's token table).
              XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m dreamvla_jax.train \
                  --config configs/tabletop.py --workdir runs/demo/train \
                  --config.data.root=runs/demo/data --config.data.features=runs/demo/data/features \
                  --config.train.time_limit_s=1320
            Measured on 2 CPU cores, 180 demos, 8 fake devices: ~0.30 s per step alone (0.45 s with the
            16x16 SAM head), 0.4-0.7 s beside other jobs, ~45 s to compile. Closed-loop success, 10
            episodes per task, 120 steps, execute 'first' (random / mean-action: 0.0% / 1.7% mean):
              frozen text, 16x16 SAM head: step 1199 3.3%, 2172 8.3%, 5288 8.3% (ensemble 11.7%)
              this preset, cosine over 6000 steps: step 3000 6.7%, step 6000 8.3%
                (lift 0%, push left 20%, push right 20%, place 10%, stack 0%, button 0%)
            Far from the 60% target, and more steps do not help: the offline action MSE on the training
            windows was 0.03-0.05 per axis at step 5288. Next things to try: a tighter static camera (the blocks
            are ~4 px wide at 64 px), more demonstrations per task (30 now), a convolutional stem or
            pretrained MAE weights for the vision tower, and DART-style noise injection in the experts.
  quick     The same structure at 32 px with one layer per stack, 20 steps (the demo's `--quick` run).

The whole pipeline (collect -> teachers -> train -> evaluate -> report) is ``python -m dreamvla_jax.demo``.
"""

import importlib.util
from pathlib import Path


def _calvin():
    """configs/calvin.py, loaded by path (configs/ is not a package; load_config loads files the same way)."""
    path = Path(__file__).with_name('calvin.py')
    spec = importlib.util.spec_from_file_location('_dreamvla_config_calvin_base', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


IMAGE, PATCH = 64, 8   # 8x8 patch grid: the RGB/depth dream heads decode 64 patches per camera


def get_config(arg=None):
    """Returns the tabletop config for preset ``arg`` ('default' | 'quick')."""
    preset = arg or 'default'
    if preset not in ('default', 'quick'):
        raise ValueError(f"configs/tabletop.py: unknown preset {preset!r}; choose default or quick.")
    c = _calvin().get_config('debug')  # the debug preset's structure; every size is set again below
    c.preset = preset
    m = c.model
    m.history = 2              # S: two frames are enough to see the arm's motion on these short tasks
    m.hidden = 128             # backbone / token width
    # No pretrained weights exist here, so nothing is frozen: random CLIP features of 'push ... to the left'
    # and '... to the right' have cosine 0.996 (one word apart), and frozen random MAE features lose the
    # block/arm positions the tasks need. Both towers train with the rest.
    m.freeze = ()
    m.text.update(width=32, layers=2, heads=2, mlp=64, proj_dim=32)
    m.vision.update(image_size=IMAGE, patch=PATCH, width=64, layers=2, heads=4, mlp=128,
                    dtype='float32', param_dtype='float32')
    m.resampler.update(latents=4, layers=1, heads=4, head_dim=16, mlp=128)
    m.backbone.update(layers=4, heads=4, mlp=256, dropout=0.0)
    # Narrow decoders: the SAM head decodes 256 mask tokens per camera and image, the largest cost per step.
    m.decoder.update(width=32, layers=1, heads=2, mlp=64)
    grid = (IMAGE // PATCH, IMAGE // PATCH)
    for name in ('rgb', 'depth', 'sam'):
        m.dream[name].update(queries_per_camera=2, query_grid=(1, 2))
    m.dream.rgb.update(mask_grid=grid, out_dim=PATCH * PATCH * 3)
    m.dream.depth.update(mask_grid=grid, out_dim=PATCH * PATCH)
    # SAM: the feature store keeps the teachers' 16x16x256 map; this head decodes it average-pooled to the
    # 8x8 patch grid (256 -> 64 mask tokens per camera: ~40% less compute per step). DINOv2 stays off.
    m.dream.sam.mask_grid = grid
    m.dream.dino.enabled = False
    m.action.chunk = 3         # official chunk of 3 actions
    m.dit.update(hidden=64, layers=2, heads=4, mlp=128, time_freq_dim=32)

    c.diffusion.repeats = 4    # noise draws per window: cheap here (the DiT is tiny), steadies the loss

    d = c.data
    d.shift_static = 3         # random-shift padding (px at 64; the official 10 px at 224, scaled)
    d.shift_gripper = 1
    d.motion.update(grid=16, pool=2, gap=5)  # 16x16 tracks pooled to the 8x8 patch grid
    d.workers = 1              # one Grain process reads windows while the step runs (~0.3 s/batch)

    t = c.train
    # ~400 steps per epoch on the demo's 180 episodes; the cosine decay ends at train.steps.
    t.update(batch_size=32, steps=3000, lr=1e-3, warmup_epochs=0.25, schedule='cosine', weight_decay=1e-4,
             clip=1.0, log_every=25)
    t.time_limit_s = 0.0       # > 0: stop (with a checkpoint) once training has run this many seconds
    c.checkpoint.update(every=500, keep=2)

    c.eval.execute = 'first'   # 'first' | 'chunk' | 'ensemble'

    if preset == 'quick':
        _shrink_for_quick(c)
    return c


def _shrink_for_quick(c):
    """The `--quick` demo (and its test): the same structure at 32 px with one layer everywhere, trained
    for tens of steps, so that compiling and running every stage takes seconds, not minutes."""
    m = c.model
    m.hidden = 64
    m.vision.update(image_size=32, width=32, layers=1, heads=2, mlp=64)
    m.backbone.update(layers=1, heads=2, mlp=128)
    m.dit.update(hidden=32, layers=1, heads=2, mlp=64)
    m.dream.rgb.mask_grid = m.dream.depth.mask_grid = (4, 4)
    c.diffusion.repeats = 1
    c.data.motion.grid = 8
    c.data.workers = 0         # a worker process costs more to start than it saves in 20 steps
    c.train.update(steps=20, log_every=5, batch_size=8, warmup_epochs=0.0)
    c.checkpoint.every = 20
