"""Grain input pipeline: CALVIN windows joined with teacher features, shuffled, sharded, batched.

Yields host-local numpy batches (B = global batch / process count, W = history + future, S = history):

  rgb_static    uint8   [B, W, Hs, Ws, 3]   raw frames (resizing, augmentation and normalisation happen on
  rgb_gripper   uint8   [B, W, Hg, Wg, 3]   the device, ``data/preprocess.py``)
  depth_static  float32 [B, W, Hs, Ws]      dataset depth (or the store's pseudo-depth)
  depth_gripper float32 [B, W, Hg, Wg]
  robot_obs     float32 [B, W, 15]
  rel_actions   float32 [B, W, 7]
  text_tokens   int32   [B, 77]             CLIP tokens of the window's instruction
  motion_mask   float32 [B, S, 2, L]        from the tracks of input frames t = 0..S-1 (static, gripper)
  sam           float16 [B, S, 2, g, g, 256]    features of target frames t + future (if the SAM head is on;
                                                g: the store's grid, 16 or the head's coarser mask_grid)
  dino          float16 [B, S, 2, g, g, 768]    same, DINOv2 (if the DINOv2 head is on)
  index         int64   [B]                 window id (row of ``CalvinDataset.windows``)

Order: windows -> seeded shuffle (reshuffled every epoch) -> repeat -> batch -> per-process slice ->
optional worker processes. Process p of P takes rows [p*B, (p+1)*B) of every global batch (of P*B
windows), so the global batch that ``sharding.global_batch`` assembles is the same for any process count.
Batches are formed before the workers split the work, so the stream is the same for any worker count, and
the iterator state (``get_state``/``set_state``, or Orbax through ``grain.checkpoint``) is the number of
(global) batches consumed, valid for any process count too.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import grain
import numpy as np

from dreamvla_jax.data.calvin import CalvinDataset
from dreamvla_jax.data.errors import DataError
from dreamvla_jax.data.motion import motion_mask
from dreamvla_jax.data.store import FRAMES, FeatureStore

log = logging.getLogger(__name__)
_RETRIES = 64  # windows tried in turn when config.data.skip_corrupt replaces an unreadable one


def split_dir(config, split: str | None = None) -> Path:
    root = config.data.root
    if not root:
        raise DataError("config.data.root is empty: set --config.data.root to a CALVIN dataset folder.")
    return Path(root) / (split or config.data.split)


class WindowSource:
    """Random-access source (Grain ``RandomAccessDataSource`` protocol): window id -> one window dict.

    Picklable for Grain's spawned workers; files are opened lazily in each process.
    """

    def __init__(self, dataset: CalvinDataset, store: FeatureStore, tokens: np.ndarray, *, history: int,
                 future: int, motion: dict, sam: bool, dino: bool, skip_corrupt: bool = False):
        self.ds = dataset
        self.store = store
        self.tokens = np.asarray(tokens, np.int32)      # [num_annotations, 77]
        self.history, self.future = int(history), int(future)
        self.window = self.history + self.future
        self.windows = dataset.windows(self.history, self.future)   # int64 [N, 2] (annotation, start)
        self.motion = dict(motion)
        self.sam, self.dino = bool(sam), bool(dino)
        self.skip_corrupt = bool(skip_corrupt)
        self.depth_from_store = not dataset.has_depth
        self.skipped = 0
        keys = ['rgb_static', 'rgb_gripper', 'robot_obs', 'rel_actions']
        self.keys = keys + ([] if self.depth_from_store else ['depth_static', 'depth_gripper'])
        self.target_fields = [f for f, on in (('sam', self.sam), ('dino', self.dino)) if on]
        self._check_store()

    def _check_store(self) -> None:
        """Fails fast (before training) when the store lacks a field or a frame the windows need."""
        fields = ['tracks'] + self.target_fields
        if self.depth_from_store:
            fields += ['depth_static', 'depth_gripper']
        for f in fields:
            if f not in self.store.fields:
                raise DataError(f"feature store {self.store.path} has no field {f!r} (it has "
                                f"{sorted(self.store.fields)}); rerun the teachers with the needed "
                                "--teachers.")
        need = self.ds.annotated_frames()
        missing = need[~np.isin(need, self.store.frames)]
        if len(missing):
            f = int(missing[0])
            raise DataError(f"feature store {self.store.path / FRAMES} has no features for frame {f} "
                            f"(episode {self.ds.episode_of(f, check=False)}, file {self.ds.frame_path(f)}) "
                            f"and {len(missing) - 1} more annotated frames.")

    def __len__(self) -> int:
        return len(self.windows)

    def __repr__(self) -> str:
        return f'WindowSource({self.ds.root}, {len(self)} windows of {self.window})'

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        idx = int(idx)
        if not self.skip_corrupt:
            return self.load(idx)
        for k in range(_RETRIES):
            j = (idx + k) % len(self)
            try:
                return self.load(j)
            except DataError as e:
                self.skipped += 1
                log.warning('skipping window %d (%d skipped in this process): %s', j, self.skipped, e)
        raise DataError(f"{_RETRIES} consecutive windows from {idx} are unreadable in {self.ds.root}.")

    def load(self, idx: int) -> dict[str, np.ndarray]:
        """Window ``idx`` without a batch dimension (shapes of the module docstring minus B)."""
        ann, start = (int(x) for x in self.windows[idx])
        ep = self.ds.episode_of(start, check=False)
        frames = [self.ds.frame(f, self.keys) for f in range(start, start + self.window)]
        out = {k: np.stack([f[k] for f in frames]) for k in self.keys}
        for k in ('robot_obs', 'rel_actions', 'depth_static', 'depth_gripper'):
            if k in out:
                out[k] = out[k].astype(np.float32, copy=False)
        s, where = self.history, f' (episode {ep}, window {idx})'
        # Each stored frame is read once: inputs t need tracks, targets t + future need features.
        depth_fields = ['depth_static', 'depth_gripper'] if self.depth_from_store else []
        feats = {}
        for t in range(self.window):
            fields = (['tracks'] if t < s else []) + (self.target_fields if t >= self.future else [])
            fields += depth_fields
            if fields:
                feats[t] = self.store.get(start + t, fields, where)
        out['motion_mask'] = motion_mask(np.stack([feats[t]['tracks'] for t in range(s)]),
                                         **self.motion)                     # [S, 2, L]
        for f in self.target_fields:
            out[f] = np.stack([feats[t + self.future][f] for t in range(s)])  # [S, 2, 16, 16, D]
        for k in depth_fields:
            out[k] = np.stack([feats[t][k] for t in range(self.window)]).astype(np.float32)
        out['text_tokens'] = self.tokens[ann]
        out['index'] = np.int64(idx)
        return out


def check_store_config(store: FeatureStore, config) -> None:
    """The store's tracks must have been computed with this config's image size, grid and gap, and its
    SAM / DINOv2 maps must be at least as fine as the grids the config's heads decode (training pools them)."""
    got = store.manifest['config']
    want = {'image_size': int(config.model.vision.image_size), 'grid': int(config.data.motion.grid),
            'gap': int(config.data.motion.gap)}
    for k, v in want.items():
        if int(got[k]) != v:
            raise DataError(f"feature store {store.path} was computed with {k} {got[k]} but the config asks "
                            f"for {v}; rerun the teachers with --config matching this config.")
    for head in ('sam', 'dino'):  # dream head name = store field name
        if not config.model.dream[head].enabled or head not in store.fields:
            continue  # a missing field is reported by WindowSource
        (h, w), grid = store.fields[head][0][1:3], tuple(config.model.dream[head].mask_grid)
        if h % grid[0] or w % grid[1]:
            raise DataError(f"feature store {store.path} keeps {head} at {h}x{w}, which "
                            f"config.model.dream.{head}.mask_grid {grid} does not divide; rerun the teachers "
                            "with --config matching this config.")


def make_source(config, split: str | None = None, *, features: str | None = None,
                tokenizer=None) -> WindowSource:
    """The window source of ``split`` (default ``config.data.split``) and store ``config.data.features``."""
    ds = CalvinDataset(split_dir(config, split))
    path = features or config.data.features
    if not path:
        raise DataError("config.data.features is empty: point it to a store written by "
                        "`python -m dreamvla_jax.teachers`.")
    store = FeatureStore(path, fingerprint=ds.fingerprint())
    check_store_config(store, config)
    if tokenizer is None:
        from dreamvla_jax.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(config.data.get('tokenizer', None) or None)
    texts = [a.instruction for a in ds.annotations]
    tokens = tokenizer(texts) if texts else np.zeros((0, 77), np.int32)
    mo = config.data.motion
    motion = {'grid': int(mo.grid), 'pool': int(mo.pool), 'threshold': float(mo.threshold),
              'dilate': tuple(mo.dilate), 'cameras': tuple(config.model.cameras)}
    return WindowSource(ds, store, tokens, history=config.model.history, future=config.data.future,
                        motion=motion, sam=config.model.dream.sam.enabled,
                        dino=config.model.dream.dino.enabled, skip_corrupt=config.data.skip_corrupt)


def _process_index_count(process_index, process_count) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # only for the default: the pipeline itself never needs jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index {process_index} is outside process_count {process_count}.")
    return int(process_index), int(process_count)


class _Subset:
    """Windows ``ids`` of a ``WindowSource`` as a random-access source (picklable for Grain workers)."""

    def __init__(self, source: WindowSource, ids: np.ndarray):
        self.source, self.ids = source, np.asarray(ids, np.int64)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return self.source[int(self.ids[i])]


def _task_balanced(source: WindowSource, seed: int):
    """``config.data.balance_tasks``: an endless stream that draws every annotation task (CALVIN's ``task``
    label) equally often, whatever its number of windows (each task's windows shuffled and repeated, then
    interleaved with equal weights by ``grain.MapDataset.mix``)."""
    labels = np.array([a.task for a in source.ds.annotations])[source.windows[:, 0]]
    parts = [grain.MapDataset.source(_Subset(source, np.flatnonzero(labels == t))).shuffle(seed=seed + k)
             .repeat(None) for k, t in enumerate(sorted(set(labels)))]
    return grain.MapDataset.mix(parts)


def make_batches(config, split: str | None = None, *, source: WindowSource | None = None,
                 process_index: int | None = None, process_count: int | None = None,
                 num_epochs: int | None = None, batch_size: int | None = None, shuffle: bool | None = None,
                 seed: int | None = None):
    """The batched ``grain.MapDataset`` of this process: element k is the k-th batch of its stream.

    ``batch_size``: host-local batch (default ``config.train.batch_size // process_count``).
    ``num_epochs``: None repeats forever.
    """
    source = source or make_source(config, split)
    pi, pc = _process_index_count(process_index, process_count)
    if batch_size is None:
        if config.train.batch_size % pc:
            raise DataError(f"config.train.batch_size {config.train.batch_size} is not divisible by the "
                            f"{pc} processes.")
        batch_size = config.train.batch_size // pc
    if len(source) == 0:
        raise DataError(f"{source.ds.root}: no training windows of {source.window} frames in any annotation.")
    shuffle = config.data.shuffle if shuffle is None else shuffle
    seed = int(config.seed if seed is None else seed)
    if config.data.get('balance_tasks', False) and shuffle and num_epochs is None:
        ds = _task_balanced(source, seed)
    else:
        ds = grain.MapDataset.source(source)
        if shuffle:
            ds = ds.shuffle(seed=seed)
        ds = ds.repeat(num_epochs)
    if pc == 1:
        return ds.batch(batch_size, drop_remainder=True)
    # Local batch k*pc + p is process p's contiguous slice of global batch k (the global batch equals a
    # single-process run's). Striding over local batches keeps it lazy: no process reads another's windows.
    # Whole global batches only, so every process has the same number of batches.
    stop = None if num_epochs is None else (len(ds) // (batch_size * pc)) * pc
    return ds.batch(batch_size, drop_remainder=True)[pi:stop:pc]


class BatchIterator(grain.DatasetIterator):
    """Iterator over the batches of ``make_batches``, optionally read by Grain worker processes.

    Its state is the number of batches consumed (``get_state() -> {'version': 1, 'next_batch': k}``), which
    does not depend on the worker count: a run may resume with other ``config.data.workers``. It is a
    ``grain.DatasetIterator``, so ``grain.checkpoint.CheckpointSave/Restore`` put it into an Orbax
    ``CheckpointManager`` (one JSON file per process), and the dict state also fits ``ocp.args.JsonSave``.
    """

    def __init__(self, batches, workers: int = 0):
        super().__init__()
        self.batches = batches
        self.workers = int(workers)
        self.next_batch = 0
        self._it = None

    def _start(self):
        ds = self.batches[self.next_batch:] if self.next_batch else self.batches
        # Two threads overlap file reads/decompression (both release the GIL) with batch assembly.
        ids = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2))
        if self.workers > 0:
            _mark_flags_parsed()
            ids = ids.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.workers,
                                                               per_worker_buffer_size=1))
        self._it = iter(ids)

    def __next__(self) -> dict[str, np.ndarray]:
        self._assert_not_closed()
        if self._it is None:
            self._start()
        batch = next(self._it)
        self.next_batch += 1
        return batch

    def start_prefetch(self) -> None:
        if self._it is None:
            self._start()

    def get_state(self) -> dict:
        return {'version': 1, 'next_batch': self.next_batch}

    def set_state(self, state: dict | bytes | str) -> None:
        if isinstance(state, (bytes, str)):
            state = json.loads(state)
        if not isinstance(state, dict) or state.get('version') != 1 or \
                not isinstance(state.get('next_batch'), int):
            raise DataError(f"input pipeline state {state!r} is not a BatchIterator state (version 1).")
        self._stop()
        self.next_batch = state['next_batch']

    def _stop(self) -> None:
        it, self._it = self._it, None
        if it is not None and hasattr(it, 'close'):
            it.close()

    def close(self) -> None:
        self._stop()
        super().close()

    def __str__(self) -> str:
        return f'BatchIterator(next_batch={self.next_batch}, workers={self.workers})'


def make_iterator(config, split: str | None = None, *, process_index: int | None = None,
                  process_count: int | None = None, workers: int | None = None, **kwargs) -> BatchIterator:
    """The training input iterator of this process (``config.data.workers`` worker processes by default).

    Keyword arguments go to ``make_batches`` (source, num_epochs, batch_size, shuffle, seed). Checkpoint it
    with ``save_iterator``/``restore_iterator`` or ``grain.checkpoint.CheckpointSave/Restore`` in Orbax.
    """
    batches = make_batches(config, split, process_index=process_index, process_count=process_count, **kwargs)
    return BatchIterator(batches, config.data.workers if workers is None else workers)


def _mark_flags_parsed() -> None:
    # Grain reads absl flags; programs that never parse them (pytest, scripts) would raise
    # UnparsedFlagAccessError in the workers.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def save_iterator(iterator, directory: str | os.PathLike) -> None:
    """Saves the iterator state with Orbax (``grain.checkpoint.CheckpointHandler``) to ``directory``."""
    import orbax.checkpoint as ocp

    with ocp.Checkpointer(grain.checkpoint.CheckpointHandler()) as ckpt:
        ckpt.save(os.path.abspath(directory), args=grain.checkpoint.CheckpointSave(iterator), force=True)


def restore_iterator(iterator, directory: str | os.PathLike):
    """Restores a freshly built iterator (same config) to the state saved in ``directory``."""
    import orbax.checkpoint as ocp

    with ocp.Checkpointer(grain.checkpoint.CheckpointHandler()) as ckpt:
        return ckpt.restore(os.path.abspath(directory), args=grain.checkpoint.CheckpointRestore(iterator))
