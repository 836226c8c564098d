r"""DreamVLA on the built-in pybullet tabletop (6 tasks), sized to train on 2 CPU cores: `make demo`.

The same structure as ``configs/calvin.py`` (CLIP text tower, MAE ViT, Perceiver resampler, GPT-2
backbone with the block mask, RGB/dynamic + depth + SAM dream heads, DiT diffusion head with CFG), with
small widths, 64-px images, a convolutional stem in the ViT and a history of 1. No pretrained weights exist
offline, so both towers are trained from scratch (nothing is frozen; see ``m.freeze`` below).

Presets (``--config configs/tabletop.py[:preset]``):

  default   The demo model, all parameters trained (1.6 M of them are the text tower's token table).
              XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m dreamvla_jax.train \
                  --config configs/tabletop.py --workdir runs/demo/train \
                  --config.data.root=runs/demo/data --config.data.features=runs/demo/data/features \
                  --config.train.time_limit_s=1560
            Measured on 2 CPU cores, 8 fake devices: ~0.39 s per step, the 4000 steps in ~26 minutes (the demo's
            bound). Closed-loop success, 10 episodes per task, 120 steps, ensembled chunks (random / mean-action:
            0.0% / 1.7% mean); these runs had random-init SAM targets at loss.sam=0.1 (the object masks: below):
              900 demonstrations with DART noise 0.3 (the demo's default), 4000 steps: 41.7% mean (lift 80,
              push left 50, push right 70, place 40, stack 10, button 0) with SAM targets stored at 8x8; 48.3%
              (80 / 80 / 80 / 30 / 10 / 10) in a run that stored them at 16x16 (only the rounding differs).
              1800 demonstrations, 8000 steps (~50 min): 78.3% over 20 episodes per task (lift 100, push left
              90, push right 90, place 90, stack 95, button 5); 4000 steps on the same data: 43.3%.
              900 demonstrations, 4000 steps, data.balance_tasks=True: 26.7% (lift 10, push left 50, push
              right 80, place 0, stack 0, button 20); not adopted. 1800 demonstrations, 8000 steps, balanced:
              55.8% over 20 episodes per task (lift 65, push left 100, push right 100, place 35, stack 30,
              button 5).
              2400 demonstrations with the button collected 3x (collect --tasks ... press_button x3: 302 per
              task, 906 button), 8000 steps (~50 min): 71.7% over 20 episodes per task (lift 100, push left
              80, push right 100, place 80, stack 65, button 5); the button's image tokens rise from R^2
              0.42 / 0.44 to 0.65 / 0.51 (eval --probe's feature probe) but not enough to press it.
              300 demonstrations, ~3400 steps: 25.0-31.7% (two runs; place and stack 0): the number of scenes
              seen, not the steps, was the limit (the action loss plateaus at ~0.055 either way).
              300 demonstrations with 16 resampler latents (the official count) instead of 4, 3800 steps:
              13.3% (one run; not adopted).
              900 demonstrations, batch 16 for 7000 steps in the same 24 minutes (0.20 s per step): 28.3% (lift
              10, push left 70, push right 60, place 10, stack 0, button 20); not adopted: what counts is the
              number of windows seen, not of updates (batch 64 would see 14% more windows per second).
            loss.rgb_static=1.0 (the RGB dream asks for the whole frame, not only its moving patches), 900
              demonstrations, 1500 steps, feature probe R^2 against the same run without it: button 0.32 / 0.30
              -> 0.51 / 0.40, but red block 0.54 / 0.61 -> 0.30 / 0.19.
            loss.rgb_static=0.2, 1800 demonstrations, 8000 steps: 85.0% over 20 episodes per task (lift, push
              left, push right, place 100, stack 95, button 15; mean-action 10 on the button), button tokens
              0.61 / 0.36; the button's first-action correlation stays ~0 (-0.41 / -0.01). At the demo's
              budget (900 demonstrations, 4000 steps) the same weight gives 8.3% (lift 30, push left 10, place
              10, the rest 0) against 41.7%: left at 0 (official).
            SAM targets from the simulator's object masks (teachers --sam segmentation, the demo's default now)
              with loss.sam=1.0: 1800 demonstrations, 8000 steps: 79.2% over 20 episodes per task (lift 100,
              push left 100, push right 95, place 80, stack 65, button 35; mean-action 10 on the button; 37
              vs 6 over 100 more button scenes), the
              first time the policy aims for the button (first-action correlation 0.53 / 0.42, was ~0; button
              tokens 0.95 / 0.94). At the demo's budget (900 demonstrations, 4000 steps): 45.8% over 20
              episodes per task (75 / 75 / 70 / 40 / 10 / 5), level with random-init SAM (47.5%).
            The first action only instead of the ensemble: 25.0% vs 31.7% on one 300-demonstration checkpoint.
            See README ("Honest status") for the runs before this preset and what each change did.
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
    # S = 1: with two frames the state tokens give the arm's velocity, and the policy learned to continue its
    # motion instead of looking for the block (copycat shortcut; measured: swapping the images between windows
    # changed its actions by 0.02, swapping the states by 0.33). One frame also halves the cost of a step.
    m.history = 1
    m.hidden = 128             # backbone / token width
    # No pretrained weights exist here, so nothing is frozen: random CLIP features of 'push ... to the left'
    # and '... to the right' have cosine 0.996 (one word apart), and frozen random MAE features lose the
    # block/arm positions the tasks need. Both towers train with the rest.
    m.freeze = ()
    m.text.update(width=32, layers=2, heads=2, mlp=64, proj_dim=32)
    # A convolutional stem instead of the linear patch embedding: trained from scratch on a few thousand
    # frames it localises a block in fewer steps (a probe regressing the red block's xy from the static image:
    # 1.7 cm vs 2.5 cm error after 400 steps).
    m.vision.update(image_size=IMAGE, patch=PATCH, width=64, layers=2, heads=4, mlp=128, stem='conv',
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
    # SAM: this head decodes the teachers' 16x16x256 map average-pooled to the 8x8 patch grid (256 -> 64 mask
    # tokens per camera: ~40% less compute per step); teachers run with this config store it pooled (4x less
    # disk). DINOv2 stays off.
    m.dream.sam.mask_grid = grid
    m.dream.dino.enabled = False
    m.action.chunk = 3         # official chunk of 3 actions
    m.dit.update(hidden=64, layers=2, heads=4, mlp=128, time_freq_dim=32)
    # Classifier-free guidance stays at CALVIN's 1.5: on the 900-demonstration checkpoint (10 episodes per task)
    # 1.0 gave 41.7% and 3.0 gave 40.0% mean success, against 48.3% at 1.5.

    c.diffusion.repeats = 16   # noise draws per window: cheap here (the DiT is tiny), steadies the loss

    # Heavier dream losses than CALVIN's (0.1 / 0.01): with them the image path carries what the actions need.
    # At the CALVIN weights the policy ignored the images (swapping them changed its actions by < 0.001 at step
    # 1000); with these, by 0.11 at step 1000, and closed-loop success rose from 3-8% to 22-25%.
    c.loss.rgb = 1.0
    # SAM weight 1.0 with the demo's SAM targets: the simulator's object masks (teachers --sam segmentation;
    # background cells carry no target, so loss_sam has a floor of ~0.6). They make the image tokens carry every
    # object: the button's position R^2 0.95 / 0.94 at 1800 demonstrations and 8000 steps (random-init SAM at
    # 0.1: 0.42 / 0.44) and its success 35% (5%). With random-init SAM features use 0.1.
    c.loss.sam = 1.0

    d = c.data
    d.shift_static = 3         # random-shift padding (px at 64; the official 10 px at 224, scaled)
    d.shift_gripper = 1
    d.motion.update(grid=16, pool=2, gap=5)  # 16x16 tracks pooled to the 8x8 patch grid
    d.workers = 1              # one Grain process reads windows while the step runs (~0.3 s/batch)

    t = c.train
    # ~990 steps per epoch on the demo's 900 episodes (~4 epochs); the cosine decay ends at train.steps, which
    # fit the demo's 26 minutes at ~0.39 s per step.
    t.update(batch_size=32, steps=4000, lr=1e-3, warmup_epochs=0.25, schedule='cosine', weight_decay=1e-4,
             clip=1.0, log_every=25)
    t.time_limit_s = 0.0       # > 0: stop (with a checkpoint) once training has run this many seconds
    c.checkpoint.update(every=500, keep=2)

    # Temporal ensembling (ACT) of the overlapping 3-action chunks: smoother than executing only the first
    # action (official). Same checkpoint, 10 episodes per task: 'first' 25.0% -> 'ensemble' 31.7% mean
    # (and 8.3% -> 11.7% with an earlier preset).
    c.eval.execute = 'ensemble'  # 'first' | 'chunk' | 'ensemble'

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
