r"""``python -m dreamvla_jax.teachers``: precompute teacher features of a CALVIN split into a feature store.

  python -m dreamvla_jax.teachers --data /data/task_ABC_D/training --out /data/abc_features \
      --sam weights/sam-vit-base --teachers motion,depth,sam
  python -m dreamvla_jax.teachers --data runs/debug_data --out runs/debug_data/features \
      --config configs/calvin.py:debug --random-init --teacher-scale tiny
  python -m dreamvla_jax.teachers --data runs/demo/data --out runs/demo/data/features \
      --config configs/tabletop.py --sam segmentation --random-init --teacher-scale tiny
"""

import argparse
import sys

from dreamvla_jax.teachers import precompute


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog='python -m dreamvla_jax.teachers', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data', required=True, help='CALVIN split folder (or a dataset root with --split)')
    p.add_argument('--out', required=True, help='feature store folder (created; resumed if it exists)')
    p.add_argument('--split', default='training', help='split under --data when --data is a dataset root')
    p.add_argument('--teachers', default=None,
                   help='comma list from motion,depth,sam,dinov2 (default: motion,depth,sam, plus dinov2 '
                        'when --config enables the DINOv2 head); depth is read from the dataset when present')
    p.add_argument('--config', default=None,
                   help='configs/calvin.py[:preset]: takes image size, motion grid and gap from it')
    p.add_argument('--image-size', type=int, default=None, help='model image size (default 224)')
    p.add_argument('--grid', type=int, default=None, help='tracked points per side (default 28)')
    p.add_argument('--gap', type=int, default=None, help='track from frame j to j + gap (default 5)')
    p.add_argument('--feature-grid', type=int, default=None,
                   help='store SAM / DINOv2 maps average-pooled to NxN (divides 16; default: the mask_grid of '
                        "--config's SAM / DINOv2 head when it divides 16, else 16)")
    p.add_argument('--sam', default=None,
                   help="local transformers SAM folder (e.g. facebook/sam-vit-base), or 'segmentation': the "
                        "dataset's seg_static / seg_gripper object classes (tabletop collect) stand in for SAM")
    p.add_argument('--dinov2', default=None, help='local transformers DINOv2 folder (facebook/dinov2-base)')
    p.add_argument('--depth-model', default=None,
                   help='local Depth-Anything v2 folder (depth-anything/Depth-Anything-V2-Base-hf)')
    p.add_argument('--cotracker', default=None,
                   help='CoTracker checkpoint (needs the cotracker package); default: OpenCV Lucas-Kanade')
    p.add_argument('--random-init', action='store_true',
                   help='randomly initialised teachers of the right architecture (labelled in the manifest)')
    p.add_argument('--teacher-scale', default='base', choices=('base', 'tiny'),
                   help='with --random-init: ViT-B teachers, or tiny ones with the same output shapes')
    p.add_argument('--shard-size', type=int, default=256, help='frames per ArrayRecord shard')
    p.add_argument('--batch-size', type=int, default=16, help='frames per teacher batch')
    p.add_argument('--device', default=None, help='torch device (default: cuda when available, else cpu)')
    p.add_argument('--seed', type=int, default=0, help='seed of --random-init weights')
    p.add_argument('--no-progress', action='store_true', help='no progress bar')
    return p.parse_args(argv)


def options_from_args(a: argparse.Namespace) -> precompute.Options:
    image_size, grid, gap, dino = 224, 28, 5, False
    sides = {'sam': precompute.FEATURE_GRID, 'dino': precompute.FEATURE_GRID}
    if a.config:
        from dreamvla_jax.cli import load_config

        c = load_config(a.config)
        image_size, grid, gap = c.model.vision.image_size, c.data.motion.grid, c.data.motion.gap
        dino = bool(c.model.dream.dino.enabled)
        for name in sides:  # keep only the (square) grid the config's head decodes; training pools the rest
            rows, cols = tuple(c.model.dream[name].mask_grid)
            if rows == cols and precompute.FEATURE_GRID % rows == 0:
                sides[name] = rows
    if a.feature_grid is not None:
        sides = dict.fromkeys(sides, a.feature_grid)
    teachers = a.teachers or ('motion,depth,sam' + (',dinov2' if dino else ''))
    return precompute.Options(
        data=a.data, out=a.out, split=a.split,
        teachers=tuple(t.strip() for t in teachers.split(',') if t.strip()),
        image_size=a.image_size or image_size, grid=a.grid or grid, gap=a.gap or gap,
        sam_grid=sides['sam'], dino_grid=sides['dino'],
        random_init=a.random_init, teacher_scale=a.teacher_scale, sam=a.sam, dinov2=a.dinov2,
        depth_model=a.depth_model, cotracker=a.cotracker, shard_size=a.shard_size, batch_size=a.batch_size,
        device=a.device, seed=a.seed, progress=not a.no_progress)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        manifest = precompute.run(options_from_args(args))
    except ValueError as e:  # DataError, or a bad --config (cli.UsageError)
        print(f'error: {e}', file=sys.stderr)
        return 2
    label = ' (RANDOM-INIT teachers)' if manifest['random_init'] else ''
    print(f"wrote {args.out}: {manifest['dataset']['num_frames']} frames, {len(manifest['shards'])} shards, "
          f"fields {sorted(manifest['fields'])}{label}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
