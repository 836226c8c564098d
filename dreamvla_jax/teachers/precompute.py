"""Teacher precompute: CALVIN split -> feature store (see ``dreamvla_jax.data.store`` for the layout).

Per annotated frame (the frames training windows read) and camera (static, gripper):
- ``tracks``  float16 [2, grid*grid, 2]: grid displacement from frame j to min(j + gap, episode end);
- ``sam``     float16 [2, g, g, 256]: SAM image-encoder features, average-pooled to ``sam_grid`` (16 unless the
  config's SAM head decodes a coarser grid: the store then keeps only what training reads); with
  ``sam='segmentation'``, the dataset's own object classes instead (``teachers.segmentation``);
- ``dino``    float16 [2, g, g, 768]: DINOv2 patch tokens, average-pooled to ``dino_grid`` (likewise);
- ``depth_static`` / ``depth_gripper`` float16 [H, W]: Depth-Anything pseudo-depth, only for datasets
  without depth (CALVIN has depth: it is read from the frames instead).

Resumable: shards that exist are complete (written under a temporary name, then renamed) and are skipped.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.metadata
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from dreamvla_jax.data import store as store_lib
from dreamvla_jax.data.calvin import CalvinDataset
from dreamvla_jax.data.errors import DataError
from dreamvla_jax.teachers.segmentation import SegmentationTeacher

TEACHERS = ('motion', 'depth', 'sam', 'dinov2')
FEATURE_GRID = 16  # side of the SAM / DINOv2 maps the teachers produce (SPEC section 4)
SEGMENTATION = 'segmentation'  # --sam value: the dataset's seg_static / seg_gripper classes stand in for SAM
CAMERAS = ('static', 'gripper')
# Test hook: after the first batch of this shard index is written, the run announces it and hangs (so a
# test can SIGKILL it while a shard is half written).
HANG_ENV = 'DREAMVLA_TEACHERS_TEST_HANG_SHARD'


@dataclasses.dataclass
class Options:
    data: str                           # CALVIN split folder (or a dataset root holding ``split``)
    out: str                            # store folder
    teachers: tuple[str, ...] = ('motion', 'depth', 'sam')
    split: str = 'training'
    image_size: int = 224               # config.model.vision.image_size
    grid: int = 28                      # config.data.motion.grid
    gap: int = 5                        # config.data.motion.gap
    sam_grid: int = FEATURE_GRID        # stored SAM map side (divides 16; config.model.dream.sam.mask_grid)
    dino_grid: int = FEATURE_GRID       # stored DINOv2 map side (divides 16)
    random_init: bool = False
    teacher_scale: str = 'base'         # 'base' | 'tiny' (random teachers only)
    sam: str | None = None
    dinov2: str | None = None
    depth_model: str | None = None
    cotracker: str | None = None
    shard_size: int = 256               # frames per shard
    batch_size: int = 16                # frames per teacher batch
    device: str | None = None
    seed: int = 0
    progress: bool = True


def resolve_split(data: str, split: str) -> Path:
    p = Path(data)
    if (p / 'ep_start_end_ids.npy').exists():
        return p
    if (p / split / 'ep_start_end_ids.npy').exists():
        return p / split
    raise DataError(f"--data {data}: neither it nor {p / split} is a CALVIN split folder "
                    "(no ep_start_end_ids.npy).")


def _versions() -> dict:
    out = {}
    for pkg in ('numpy', 'torch', 'transformers', 'opencv-python-headless', 'array-record', 'dreamvla_jax'):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _settings(opts: Options, ds: CalvinDataset, frames: np.ndarray, image_shapes: dict) -> tuple[dict, dict]:
    """The manifest parts that must agree between a run and the run it resumes: (teacher specs, fields)."""
    teachers, fields = {}, {}
    for name in opts.teachers:
        if name not in TEACHERS:
            raise DataError(f"--teachers: unknown teacher {name!r}; choose from {','.join(TEACHERS)}.")
    for side in (opts.sam_grid, opts.dino_grid):
        if side < 1 or FEATURE_GRID % side:
            raise DataError(f"--feature-grid {side}: must divide the teachers' {FEATURE_GRID}x{FEATURE_GRID} "
                            "feature map (1, 2, 4, 8 or 16).")
    if 'motion' in opts.teachers:
        method = 'cotracker' if opts.cotracker else 'opencv-lk'
        teachers['motion'] = {'method': method, 'checkpoint': opts.cotracker, 'image_size': opts.image_size,
                              'grid': opts.grid, 'gap': opts.gap, 'random_init': False}
        fields['tracks'] = ([2, opts.grid * opts.grid, 2], 'float16')
    for name, path in (('sam', opts.sam), ('dinov2', opts.dinov2), ('depth', opts.depth_model)):
        if name not in opts.teachers:
            continue
        if name == 'depth' and ds.has_depth:
            teachers['depth'] = {'source': 'dataset (depth_static, depth_gripper)', 'random_init': False}
            continue
        if name == 'sam' and path == SEGMENTATION:
            if not {f'seg_{cam}' for cam in CAMERAS} <= set(ds.frame_keys()):
                raise DataError(f"--sam segmentation: the frames of {ds.root} have no seg_static / seg_gripper "
                                "keys (python -m dreamvla_jax.envs.collect stores them; CALVIN has none).")
            teachers['sam'] = dict(SegmentationTeacher.info)
            fields['sam'] = ([2, opts.sam_grid, opts.sam_grid, 256], 'float16')
            continue
        rnd = bool(opts.random_init)
        teachers[name] = {'source': os.path.abspath(path) if (path and not rnd) else None,
                          'random_init': rnd, 'scale': opts.teacher_scale if rnd else 'pretrained',
                          'seed': opts.seed if rnd else None}
        if not rnd and not path:
            flag = {'sam': '--sam', 'dinov2': '--dinov2', 'depth': '--depth-model'}[name]
            raise DataError(f"teacher {name} needs weights: pass {flag} PATH (a local transformers folder) "
                            "or --random-init.")
        if name == 'sam':
            fields['sam'] = ([2, opts.sam_grid, opts.sam_grid, 256], 'float16')
        elif name == 'dinov2':
            fields['dino'] = ([2, opts.dino_grid, opts.dino_grid, 768], 'float16')
        else:
            for cam in CAMERAS:
                fields[f'depth_{cam}'] = (list(image_shapes[f'rgb_{cam}'][:2]), 'float16')
    return teachers, fields


def build_manifest(opts: Options, ds: CalvinDataset, frames: np.ndarray) -> dict:
    image_shapes = ds.image_shapes()
    teachers, fields = _settings(opts, ds, frames, image_shapes)
    count = max(1, -(-len(frames) // opts.shard_size))
    return {
        'format': store_lib.FORMAT,
        'version': store_lib.VERSION,
        'complete': False,
        'random_init': any(t.get('random_init') for t in teachers.values()),
        'teachers': teachers,
        'fields': {k: {'shape': s, 'dtype': d} for k, (s, d) in fields.items()},
        'config': {'image_size': opts.image_size, 'grid': opts.grid, 'gap': opts.gap,
                   'cameras': list(CAMERAS)},
        'dataset': {'split_dir': str(ds.root.resolve()), 'fingerprint': ds.fingerprint(),
                    'num_frames': int(len(frames)), 'has_depth': ds.has_depth,
                    'image_shapes': {k: list(v) for k, v in image_shapes.items()}},
        'shard_size': opts.shard_size,
        'shards': [store_lib.shard_name(i, count) for i in range(count)],
        'versions': _versions(),
    }


_COMPARED = ('teachers', 'fields', 'config', 'dataset', 'shard_size', 'shards')


def prepare_store(out: Path, manifest: dict, frames: np.ndarray) -> dict:
    """Creates the store folder, or checks that an existing one was started with the same settings."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / store_lib.MANIFEST
    if path.exists():
        old = store_lib.read_manifest(out)
        for key in _COMPARED:
            if old.get(key) != manifest[key]:
                raise DataError(f"store {out} was started with different {key!r} ({path}); use another --out "
                                "or delete the store to recompute.")
        if not np.array_equal(np.load(out / store_lib.FRAMES), frames):
            raise DataError(f"store {out}: {store_lib.FRAMES} lists other frames; use another --out.")
        return old
    np.save(out / store_lib.FRAMES, frames)
    store_lib.write_json_atomic(path, manifest)
    return manifest


class FrameCache:
    """LRU of decoded camera images (tracking reads each frame up to gap + 1 times)."""

    def __init__(self, ds: CalvinDataset, size: int, kinds: tuple[str, ...] = ('rgb',)):
        self.ds, self.size, self.kinds = ds, size, kinds
        self.items: collections.OrderedDict[int, dict] = collections.OrderedDict()

    def get_many(self, ids, pool: ThreadPoolExecutor) -> list[dict]:
        todo = [i for i in dict.fromkeys(ids) if i not in self.items]
        keys = [f'{k}_{c}' for k in self.kinds for c in CAMERAS]
        for i, frame in zip(todo, pool.map(lambda f: self.ds.frame(f, keys), todo), strict=True):
            self.items[i] = frame
        out = []
        for i in ids:
            self.items.move_to_end(i)
            out.append(self.items[i])
        while len(self.items) > self.size:
            self.items.popitem(last=False)
        return out


def run(opts: Options) -> dict:
    """Computes (or completes) the store ``opts.out``; returns the final manifest."""
    from tqdm import tqdm

    ds = CalvinDataset(resolve_split(opts.data, opts.split))
    frames = ds.annotated_frames()
    if len(frames) == 0:
        raise DataError(f"{ds.root}: no language-annotated frames, nothing to compute.")
    out = Path(opts.out)
    manifest = prepare_store(out, build_manifest(opts, ds, frames), frames)
    shards = manifest['shards']
    todo = [k for k, s in enumerate(shards) if not (out / s).exists()]
    for stale in out.glob('*.tmp'):  # left by a killed run; never read
        stale.unlink()

    models, tracker = {}, None
    if todo:
        from dreamvla_jax.teachers.models import build_teacher
        from dreamvla_jax.teachers.tracking import build_tracker

        if 'motion' in manifest['teachers']:
            tracker = build_tracker(opts.image_size, opts.grid, opts.cotracker, opts.device)
        for name, field in (('sam', 'sam'), ('dinov2', 'dino'), ('depth', 'depth')):
            spec = manifest['teachers'].get(name)
            if name == 'sam' and opts.sam == SEGMENTATION:
                models[field] = SegmentationTeacher()
                continue
            if spec is None or str(spec.get('source') or '').startswith('dataset'):
                continue
            path = {'sam': opts.sam, 'dinov2': opts.dinov2, 'depth': opts.depth_model}[name]
            models[field] = build_teacher('dino' if name == 'dinov2' else name, path=path,
                                          random_init=opts.random_init, scale=opts.teacher_scale,
                                          device=opts.device, seed=opts.seed)
            manifest['teachers'][name]['model'] = models[field].info

    done = sum(min(opts.shard_size, len(frames) - k * opts.shard_size)
               for k in range(len(shards)) if k not in todo)
    hang_at = int(os.environ.get(HANG_ENV, '-1'))
    sources = {'rgb'} | {getattr(m, 'frame_key', 'rgb') for m in models.values()}
    cache = FrameCache(ds, size=4 * (opts.batch_size + opts.gap + 1), kinds=tuple(sorted(sources)))
    bar = tqdm(total=len(frames), initial=done, unit='frame', desc=f'teachers -> {out.name}',
               disable=not opts.progress, dynamic_ncols=True)
    with ThreadPoolExecutor(max(4, os.cpu_count() or 1)) as pool:
        for k in todo:
            ids = frames[k * opts.shard_size:(k + 1) * opts.shard_size]
            writer = store_lib.ShardWriter(out / shards[k])
            try:
                for b in range(0, len(ids), opts.batch_size):
                    batch = [int(i) for i in ids[b:b + opts.batch_size]]
                    for fid, rec in zip(batch, compute_batch(ds, batch, cache, pool, tracker, models, opts),
                                        strict=True):
                        writer.write(store_lib.encode_record(fid, rec))
                    bar.update(len(batch))
                    if k == hang_at and b == 0:
                        (out / '.test_hang').write_text(str(os.getpid()))
                        signal.pause() if hasattr(signal, 'pause') else time.sleep(3600)
                writer.commit()
            except BaseException:
                writer.abort()
                raise
    bar.close()
    manifest['complete'] = True
    manifest['versions'] = _versions()
    store_lib.write_json_atomic(out / store_lib.MANIFEST, manifest)
    return manifest


def compute_batch(ds, batch, cache, pool, tracker, models, opts) -> list[dict]:
    """Features of the frames ``batch`` (ids): one dict field -> array per frame."""
    from dreamvla_jax.teachers.tracking import LKTracker

    recs = [{} for _ in batch]
    imgs = cache.get_many(batch, pool)
    if tracker is not None:
        spans = [(fid, min(fid + opts.gap, ds.episode_end(fid))) for fid in batch]
        needed = sorted({f for a, b in spans for f in range(a, b + 1)})
        # Each frame is resized/converted once per batch, then shared by the gap + 1 tracks that use it.
        prepared = {(f, cam): tracker.prepare(img[f'rgb_{cam}'])
                    for f, img in zip(needed, cache.get_many(needed, pool), strict=True) for cam in CAMERAS}

        def track(span):
            a, b = span
            return np.stack([tracker.track([prepared[f, cam] for f in range(a, b + 1)]) for cam in CAMERAS])

        # OpenCV releases the GIL: frames are tracked in parallel threads (CoTracker: one at a time).
        tracks = pool.map(track, spans) if isinstance(tracker, LKTracker) else map(track, spans)
        for r, t in zip(recs, tracks, strict=True):
            r['tracks'] = t.astype(np.float16)
    for field, model in models.items():
        side = {'sam': opts.sam_grid, 'dino': opts.dino_grid}.get(field, FEATURE_GRID)
        source = getattr(model, 'frame_key', 'rgb')
        per_cam = [model(np.stack([f[f'{source}_{cam}'] for f in imgs]), grid=side) for cam in CAMERAS]
        for i, r in enumerate(recs):
            if field == 'depth':
                for c, cam in enumerate(CAMERAS):
                    r[f'depth_{cam}'] = per_cam[c][i]
            else:
                r[field] = np.stack([p[i] for p in per_cam])
    return recs
