r"""DreamVLA on CALVIN (ABC->D), big_vision style: ``get_config(arg)`` with presets.

Presets (``--config configs/calvin.py[:preset]``):

  default   The official CALVIN ABC->D recipe (SPEC "official" column): 54 dream queries
            (18 x RGB/dynamic, depth, SAM), 3 action queries, history 10, DiT-B hidden 768,
            100 diffusion steps with squaredcos_cap_v2, DDIM 10, CFG 1.5. 642.8 M parameters,
            493.7 M trainable.
              python -m dreamvla_jax.train --config configs/calvin.py --workdir runs/calvin \
                  --config.data.root=/data/task_ABC_D --config.data.features=/data/abc_features
            Published result (8 GPUs, 20 epochs): CALVIN ABC->D average length 4.44.

  paper     The paper's variant (SPEC sections 9 and 12): 64 dream queries (16 per modality for
            dynamic, depth, DINOv2, SAM), linear noise schedule, lambda_sem 0.1, constant LR after a
            1-epoch warm-up from 1e-2 LR, weight decay 0.01, batch 64. 520.8 M trainable.
              python -m dreamvla_jax.train --config configs/calvin.py:paper --workdir runs/paper \
                  --config.data.root=/data/task_ABC_D --config.data.features=/data/abc_features

  mid       The default structure at a quarter of the width and depth (history 10, 224 px): for CPU
            benchmarks of the performance levers (python -m dreamvla_jax.benchmark train --config ...:mid).

  debug     Same structure, tiny widths and depths, history 2: a train step runs on a CPU in seconds.
              python -m dreamvla_jax.train --config configs/calvin.py:debug --workdir runs/debug \
                  --config.data.root=runs/debug_data --config.data.features=runs/debug_data/features

Every dimension the model uses is a named field here; module code has no magic numbers.
"""

import ml_collections

# CLIP image normalisation (both cameras, SPEC section 2).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _dream_head(enabled, queries_per_camera, query_grid, mask_grid, out_dim, activation, target):
    h = ml_collections.ConfigDict()
    h.enabled = enabled                        # a disabled head creates no parameters and no queries
    h.queries_per_camera = queries_per_camera  # dream queries per camera (static first, then wrist)
    h.query_grid = query_grid                  # (rows, cols) sin-cos grid of those queries
    h.mask_grid = mask_grid                    # (rows, cols) grid of mask tokens the decoder fills in
    h.out_dim = out_dim                        # head output per mask token
    h.activation = activation                  # 'none' | 'relu'
    h.target = target                          # which target the head predicts (see losses.py)
    return h


def model_config(preset='default'):
    m = ml_collections.ConfigDict()
    m.history = 10             # S: timesteps the backbone sees (observation window)
    m.hidden = 1024            # backbone / token width
    m.cameras = ('static', 'gripper')
    m.dtype = 'float32'        # compute dtype of trainable parts ('float32' | 'bfloat16')
    m.param_dtype = 'float32'  # master weights
    m.attention_impl = 'xla'   # jax.nn.dot_product_attention implementation: 'xla' | 'cudnn'
    m.unroll_layers = False    # train step: unroll the layer scans (no stacked-activation copies; slower compile)
    m.freeze = ('text_encoder', 'vision_encoder')  # top-level modules excluded from training

    # CLIP ViT-B/32 text tower (frozen).
    t = m.text = ml_collections.ConfigDict()
    t.vocab_size = 49408
    t.context = 77
    t.width = 512
    t.layers = 12
    t.heads = 8
    t.mlp = 2048
    t.proj_dim = 512           # text_projection output
    t.ln_eps = 1e-5
    t.dtype = 'float32'

    # MAE ViT-B/16 image encoder (frozen, bf16 as in the official code).
    v = m.vision = ml_collections.ConfigDict()
    v.image_size = 224
    v.patch = 16
    v.stem = 'patch'           # 'patch' (MAE's linear patch embedding) | 'conv' (3x3 stride-2 convs, from scratch)
    v.width = 768
    v.layers = 12
    v.heads = 12
    v.mlp = 3072
    v.ln_eps = 1e-6
    v.dtype = 'bfloat16'       # compute dtype
    v.param_dtype = 'bfloat16'  # frozen weights stored in bf16

    # Perceiver resampler (shared by both cameras).
    r = m.resampler = ml_collections.ConfigDict()
    r.latents = 16
    r.layers = 3
    r.heads = 8
    r.head_dim = 64
    r.mlp = 3072
    r.ln_eps = 1e-5

    # GPT-2 Medium blocks (no token / position tables).
    b = m.backbone = ml_collections.ConfigDict()
    b.layers = 24
    b.heads = 16
    b.mlp = 4096
    b.ln_eps = 1e-5
    b.dropout = 0.1            # embeddings and both residual branches (official GPT-2)
    b.attn_dropout = 0.1       # attention probabilities (official); 0 lets training use fused attention
    b.remat = 'none'           # 'none' | 'full' | 'dots_saveable'
    b.emb_ln_eps = 1e-5        # LayerNorm over the embedded sequence

    # Dream decoders (one per modality; shared by both cameras).
    d = m.decoder = ml_collections.ConfigDict()
    d.width = 1024
    d.layers = 2
    d.heads = 16
    d.mlp = 4096
    d.ln_eps = 1e-5
    d.sam_official_zero_init = False  # True reproduces the official bug: SAM pos-emb and mask token zero

    m.dream = ml_collections.ConfigDict()
    if preset == 'paper':
        q, grid = 8, (2, 4)
        m.dream.order = ('rgb', 'depth', 'dino', 'sam')
    else:
        q, grid = 9, (3, 3)
        m.dream.order = ('rgb', 'depth', 'dino', 'sam')  # token order; disabled heads are skipped
    m.dream.rgb = _dream_head(True, q, grid, (14, 14), 768, 'none', 'rgb')
    m.dream.depth = _dream_head(True, q, grid, (14, 14), 256, 'relu', 'depth')
    m.dream.dino = _dream_head(preset == 'paper', q, grid, (16, 16), 768, 'none', 'dino')
    m.dream.sam = _dream_head(True, q, grid, (16, 16), 256, 'none', 'sam')

    # Action chunk and DiT-B diffusion head.
    a = m.action = ml_collections.ConfigDict()
    a.chunk = 3                # action queries per timestep = actions per chunk
    a.dim = 7                  # 6 arm (relative, in [-1, 1]) + gripper in {0, 1}
    a.arm_dim = 6
    dit = m.dit = ml_collections.ConfigDict()
    dit.hidden = 768
    dit.layers = 12
    dit.heads = 12
    dit.mlp = 3072
    dit.ln_eps = 1e-6
    dit.time_freq_dim = 256    # sinusoidal timestep features before the MLP
    dit.max_period = 10000.0
    dit.cfg_dropout = 0.1      # condition dropout probability (classifier-free guidance)
    dit.guidance_scale = 1.5   # eps = eps_u + scale * (eps_c - eps_u)
    dit.remat = 'none'
    return m


def get_config(arg=None):
    """Returns the config for preset ``arg`` ('default' | 'paper' | 'debug')."""
    preset = arg or 'default'
    if preset not in ('default', 'paper', 'debug', 'mid'):
        raise ValueError(f"configs/calvin.py: unknown preset {preset!r}; choose default, paper, mid or debug.")
    c = ml_collections.ConfigDict()
    c.preset = preset
    c.seed = 0
    c.model = model_config(preset)

    # Diffusion (SPEC section 6).
    df = c.diffusion = ml_collections.ConfigDict()
    df.train_steps = 100
    df.schedule = 'linear' if preset == 'paper' else 'squaredcos_cap_v2'
    df.beta_start = 1e-4       # linear schedule only
    df.beta_end = 0.02
    df.sample_steps = 10       # DDIM steps at inference
    df.repeats = 8             # each training sample repeated with independent noise and t
    df.eta = 0.0

    # Loss weights (SPEC section 7).
    lw = c.loss = ml_collections.ConfigDict()
    lw.action = 1.0
    lw.rgb = 0.1
    lw.depth = 0.001
    lw.sam = 0.1 if preset == 'paper' else 0.01
    lw.dino = 0.1 if preset == 'paper' else 0.01
    lw.silog_lambda = 0.5
    # Weight of the RGB dream's squared error on patches OUTSIDE the motion mask, relative to those inside
    # (0: official, dynamic regions only; > 0 also asks for the static parts of the future frame).
    lw.rgb_static = 0.0

    # Data (SPEC section 8, CALVIN.md).
    dc = c.data = ml_collections.ConfigDict()
    dc.root = ''               # prepared CALVIN-format dataset (a folder with training/ and validation/)
    dc.features = ''           # teacher feature store written by `python -m dreamvla_jax.teachers`
    dc.split = 'training'
    dc.future = 3              # visual targets are frame t + future
    # Image size, history and chunk come from config.model (one field each, read by data, model, policy).
    dc.mean = CLIP_MEAN
    dc.std = CLIP_STD
    dc.shift_static = 10       # random-shift augmentation padding (px at 224)
    dc.shift_gripper = 4
    dc.align_depth_shift = True  # False reproduces the official independent depth shift
    dc.augment = True
    dc.shuffle = True
    dc.balance_tasks = False   # True: draw every annotation task equally often (not by its window count)
    dc.workers = 0             # Grain worker processes (0: in-process)
    dc.prefetch = 2            # batches prefetched to the device
    dc.skip_corrupt = False    # skip (count and log) unreadable frames instead of failing
    mo = dc.motion = ml_collections.ConfigDict()
    mo.gap = 5                 # track from frame j to j + gap
    mo.grid = 28               # tracked points per side (one every 8 px at 224)
    mo.pool = 2                # average-pool the grid to the decoder's 14x14 patches
    mo.threshold = 1.0         # px (224-px units) over the gap
    mo.dilate = ('static',)    # cameras whose mask is dilated to the 8 neighbours

    # Training (SPEC section 9).
    tr = c.train = ml_collections.ConfigDict()
    tr.steps = 0               # 0: epochs * steps per epoch
    tr.epochs = 20
    tr.batch_size = 64 if preset == 'paper' else 16
    tr.lr = 1e-3
    tr.warmup_epochs = 1.0
    tr.warmup_init = 1e-2 if preset == 'paper' else 0.0  # warm-up starts at warmup_init * lr
    tr.schedule = 'constant' if preset == 'paper' else 'cosine'
    tr.weight_decay = 0.01 if preset == 'paper' else 1e-4
    tr.b1 = 0.9
    tr.b2 = 0.999
    tr.eps = 1e-8
    tr.clip = 0.1
    tr.log_every = 50
    tr.nan_check = True        # stop on a non-finite loss (checked one step behind, no sync stall)

    ck = c.checkpoint = ml_collections.ConfigDict()
    ck.every = 1000
    ck.keep = 3

    ms = c.mesh = ml_collections.ConfigDict()
    ms.data = -1               # data-parallel rows: -1 = one per process (hosts), fsdp within
    ms.fsdp = -1               # -1: all remaining devices
    ms.fsdp_min_bytes = 4 * 2**20  # tensors smaller than this stay replicated
    ms.rules = ()              # ordered (regex over 'a/b/c' parameter paths, 'replicate' | 'fsdp') overrides

    ini = c.init = ml_collections.ConfigDict()
    ini.pretrained = ''        # Orbax checkpoint of CLIP/MAE/GPT-2 from convert_weights
    ini.official = ''          # Orbax checkpoint converted from an official DreamVLA/Seer .pth

    ev = c.eval = ml_collections.ConfigDict()
    ev.execute = 'first'       # 'first' (official) | 'chunk' | 'ensemble'

    if preset == 'debug':
        _shrink_for_debug(c)
    if preset == 'mid':
        _shrink_for_mid(c)
    return c


def _shrink_for_mid(c):
    m = c.model
    m.hidden = 256
    m.text.update(width=256, layers=3, heads=4, mlp=1024, proj_dim=256)
    m.vision.update(width=256, layers=3, heads=4, mlp=1024)
    m.resampler.update(layers=1, heads=4, head_dim=64, mlp=1024)
    m.backbone.update(layers=6, heads=4, mlp=1024)
    m.decoder.update(width=256, layers=1, heads=4, mlp=1024)
    m.dit.update(hidden=256, layers=3, heads=4, mlp=1024)
    c.train.batch_size = 4


def _shrink_for_debug(c):
    m = c.model
    m.history = 2
    m.hidden = 64
    m.vision.dtype = 'float32'
    m.vision.param_dtype = 'float32'
    m.text.update(vocab_size=49408, context=77, width=32, layers=2, heads=2, mlp=64, proj_dim=32)
    m.vision.update(image_size=32, patch=8, width=32, layers=2, heads=2, mlp=64)
    m.resampler.update(latents=4, layers=1, heads=2, head_dim=16, mlp=64)
    m.backbone.update(layers=2, heads=2, mlp=128, dropout=0.0, attn_dropout=0.0)
    m.decoder.update(width=64, layers=1, heads=2, mlp=128)
    for name in ('rgb', 'depth', 'dino', 'sam'):
        head = m.dream[name]
        head.queries_per_camera = 2
        head.query_grid = (1, 2)
    m.dream.rgb.update(mask_grid=(4, 4), out_dim=8 * 8 * 3)
    m.dream.depth.update(mask_grid=(4, 4), out_dim=8 * 8)
    # SAM / DINOv2 targets keep the teachers' real 16x16 grid and widths (the store is shared).
    m.dit.update(hidden=32, layers=2, heads=2, mlp=64, time_freq_dim=16)
    c.diffusion.repeats = 2
    c.data.shift_static = 2
    c.data.shift_gripper = 1
    c.data.motion.update(grid=8, pool=2)
    c.train.update(batch_size=8, steps=20, lr=1e-3, warmup_epochs=0.0, log_every=5)
    c.checkpoint.every = 10
