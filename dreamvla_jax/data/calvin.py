"""CALVIN on-disk format (see shared/CALVIN.md section 1): a reader with window indexing, and a writer.

A split folder (``training/`` or ``validation/``) holds one ``episode_XXXXXXX.npz`` per frame (7-digit global
frame id), ``ep_start_end_ids.npy`` (int [E, 2], end inclusive), ``ep_lens.npy``, ``scene_info.npy``,
``statistics.yaml`` and ``lang_annotations/auto_lang_ann.npy`` (pickled dict with ``language.ann/task/emb``
and ``info.indx`` = inclusive global frame windows).

Training windows (SPEC section 8): W = history + future consecutive frames, one window per (annotation,
start) with start in ``range(ann_start, ann_end + 1 - W)`` (CALVIN's and the official code's
``_build_file_indices_lang``; annotation windows overlap, every pair is indexed).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import struct
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dreamvla_jax.data.errors import DataError

# Documented per-frame keys: (shape, dtype or None when the dtype is not fixed, see CALVIN.md's dtype note).
FRAME_KEYS: dict[str, tuple[tuple[int, ...], type | None]] = {
    'rgb_static': ((200, 200, 3), np.uint8),
    'rgb_gripper': ((84, 84, 3), np.uint8),
    'rgb_tactile': ((160, 120, 6), np.uint8),
    'depth_static': ((200, 200), np.float32),
    'depth_gripper': ((84, 84), np.float32),
    'depth_tactile': ((160, 120, 2), np.float32),
    'actions': ((7,), None),
    'rel_actions': ((7,), None),
    'robot_obs': ((15,), None),
    'scene_obs': ((24,), None),
}
# Keys every frame must have; the rest are optional (depth: a dataset without depth gets pseudo-depth).
REQUIRED_KEYS = ('rgb_static', 'rgb_gripper', 'actions', 'rel_actions', 'robot_obs')
# Image keys whose spatial size may differ from CALVIN's (other robots, the built-in simulator).
_IMAGE_KEYS = ('rgb_static', 'rgb_gripper', 'depth_static', 'depth_gripper', 'rgb_tactile', 'depth_tactile')
LANG_FILE = os.path.join('lang_annotations', 'auto_lang_ann.npy')
_NORMALIZE = 'calvin_models.calvin_agent.utils.transforms.NormalizeVector'
EMB_DIM = 384  # SBERT paraphrase-MiniLM-L6-v2


def frame_name(frame_id: int) -> str:
    return f'episode_{int(frame_id):07d}.npz'


@dataclasses.dataclass(frozen=True)
class Annotation:
    """One language-annotated segment, global frame ids, ``end`` inclusive."""
    start: int
    end: int
    task: str
    instruction: str


class CalvinDataset:
    """Read access to one CALVIN split folder.

    Validates the index files on construction (each failure is a ``DataError`` naming the file); frame files
    are validated when read.
    """

    def __init__(self, split_dir: str | os.PathLike):
        self.root = Path(split_dir)
        if not self.root.is_dir():
            raise DataError(f"CALVIN split folder {self.root} does not exist.")
        self.episodes = self._load_episodes()             # int64 [E, 2], inclusive
        self._ep_starts = self.episodes[:, 0]
        self.annotations = self._load_annotations()       # list[Annotation]

    # -- index files ---------------------------------------------------------------------------------------
    def _load_episodes(self) -> np.ndarray:
        path = self.root / 'ep_start_end_ids.npy'
        if not path.exists():
            raise DataError(f"{path} is missing: not a CALVIN split folder.")
        try:
            ids = np.asarray(np.load(path, allow_pickle=False), dtype=np.int64)
        except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
            raise DataError(f"{path} is unreadable ({type(e).__name__}: {e}).") from e
        ids = ids.reshape(-1, 2) if ids.size else ids.reshape(0, 2)
        if ids.ndim != 2 or len(ids) == 0 or np.any(ids[:, 1] < ids[:, 0]):
            raise DataError(f"{path} must hold (n_episodes, 2) [start, end] frame ids with end >= start.")
        order = np.argsort(ids[:, 0], kind='stable')
        ids = ids[order]
        if np.any(ids[1:, 0] <= ids[:-1, 1]):
            raise DataError(f"{path}: episodes overlap.")
        return ids

    def _load_annotations(self) -> list[Annotation]:
        path = self.root / LANG_FILE
        if not path.exists():
            raise DataError(f"{path} is missing: the split has no language annotations.")
        try:
            ann = np.load(path, allow_pickle=True).item()
            texts, tasks = list(ann['language']['ann']), list(ann['language']['task'])
            indx = [(int(s), int(e)) for s, e in ann['info']['indx']]
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{path} is not a CALVIN annotation file ({type(e).__name__}: {e}).") from e
        if not (len(texts) == len(tasks) == len(indx)):
            raise DataError(f"{path}: language.ann, language.task and info.indx have different lengths "
                            f"({len(texts)}, {len(tasks)}, {len(indx)}).")
        out = []
        for i, ((s, e), task, text) in enumerate(zip(indx, tasks, texts, strict=True)):
            ep = self.episode_of(s, check=False)
            if e < s or ep < 0 or e > self.episodes[ep, 1]:
                raise DataError(f"{path}: annotation {i} ({task}) spans frames {s}..{e}, which do not lie "
                                "inside one episode of ep_start_end_ids.npy.")
            out.append(Annotation(s, e, str(task), str(text)))
        return out

    # -- frames --------------------------------------------------------------------------------------------
    @property
    def num_frames(self) -> int:
        return int(np.sum(self.episodes[:, 1] - self.episodes[:, 0] + 1))

    def frame_ids(self) -> np.ndarray:
        """int64 [num_frames]: every frame id of every episode, ascending."""
        return np.concatenate([np.arange(s, e + 1) for s, e in self.episodes])

    def frame_path(self, frame_id: int) -> Path:
        return self.root / frame_name(frame_id)

    def episode_of(self, frame_id: int, check: bool = True) -> int:
        """Index into ``episodes`` of the episode holding ``frame_id`` (-1 if none and not ``check``)."""
        i = int(np.searchsorted(self._ep_starts, frame_id, side='right')) - 1
        if i < 0 or frame_id > self.episodes[i, 1]:
            if check:
                raise DataError(f"frame {frame_id} is in no episode of {self.root / 'ep_start_end_ids.npy'}.")
            return -1
        return i

    def episode_end(self, frame_id: int) -> int:
        return int(self.episodes[self.episode_of(frame_id), 1])

    def frame(self, frame_id: int, keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Loads one frame: ``{key: array}`` for ``keys`` (default: all keys in the file).

        Vectors (actions, rel_actions, robot_obs, scene_obs) are cast to float32; images keep their dtype.
        Raises ``DataError`` naming the episode, frame and file when the file is missing, corrupt, or lacks
        a key or has the wrong shape/dtype.
        """
        path = self.frame_path(frame_id)
        where = f"episode {self.episode_of(frame_id, check=False)}, frame {frame_id}, file {path}"
        if not path.exists():
            raise DataError(f"CALVIN frame file is missing ({where}).")
        try:
            with zipfile.ZipFile(path) as zf:
                files = [n[:-4] for n in zf.namelist() if n.endswith('.npy')]
                names = files if keys is None else list(keys)
                missing = [k for k in names if k not in files]
                if missing:
                    raise DataError(f"CALVIN frame has no key {missing[0]!r} ({where}).")
                out = {k: read_npy_member(zf, k + '.npy') for k in names}
        except DataError:
            raise
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError, zlib.error) as e:
            raise DataError(f"CALVIN frame file is corrupt ({where}): {type(e).__name__}: {e}.") from e
        for k, v in out.items():
            check_key(k, v, where)
            if k in FRAME_KEYS and FRAME_KEYS[k][1] is None:
                out[k] = v.astype(np.float32)
        return out

    def frame_keys(self) -> list[str]:
        """Keys of the first frame file (all frames of a split share them)."""
        path = self.frame_path(int(self.episodes[0, 0]))
        try:
            with zipfile.ZipFile(path) as zf:
                return [n[:-4] for n in zf.namelist() if n.endswith('.npy')]
        except Exception as e:  # noqa: BLE001
            raise DataError(f"CALVIN frame file is corrupt (frame {self.episodes[0, 0]}, file {path}): "
                            f"{type(e).__name__}: {e}.") from e

    @property
    def has_depth(self) -> bool:
        keys = self.frame_keys()
        return 'depth_static' in keys and 'depth_gripper' in keys

    def image_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of the image keys present in the split (read from the first frame)."""
        f = self.frame(int(self.episodes[0, 0]))
        return {k: tuple(v.shape) for k, v in f.items() if k in _IMAGE_KEYS}

    # -- windows -------------------------------------------------------------------------------------------
    def windows(self, history: int, future: int) -> np.ndarray:
        """int64 [N, 2]: (annotation index, start frame id) of every training window, window id = row.

        W = history + future frames starting at ``start``; starts in ``range(ann.start, ann.end + 1 - W)``.
        """
        w = history + future
        rows = [(i, s) for i, a in enumerate(self.annotations) for s in range(a.start, a.end + 1 - w)]
        return np.asarray(rows, np.int64).reshape(-1, 2)

    def annotated_frames(self) -> np.ndarray:
        """int64 [M]: sorted ids of every frame inside some language annotation (what training reads)."""
        if not self.annotations:
            return np.zeros((0,), np.int64)
        ranges = [np.arange(a.start, a.end + 1) for a in self.annotations]
        return np.unique(np.concatenate(ranges))

    def fingerprint(self) -> str:
        """sha256 over the episode table, the annotations and the names and sizes of boundary frame files.

        Cheap (O(episodes + annotations) file stats, not O(frames)) yet different for any other dataset.
        """
        h = hashlib.sha256()
        h.update(self.episodes.tobytes())
        for a in self.annotations:
            h.update(f'{a.start},{a.end},{a.task},{a.instruction}\n'.encode())
        probe = sorted({int(x) for x in self.episodes.ravel()}
                       | {f for a in self.annotations for f in (a.start, a.end)})
        for f in probe:
            p = self.frame_path(f)
            size = p.stat().st_size if p.exists() else -1
            h.update(f'{p.name}:{size}\n'.encode())
        return h.hexdigest()


_NPY_HEADER = re.compile(r"\{'descr': '([^']+)', 'fortran_order': (True|False), 'shape': \(([0-9, ]*)\), *\}")


def read_npy_member(zf: zipfile.ZipFile, name: str) -> np.ndarray:
    """One array of an ``.npz`` archive, without ``np.load``.

    numpy parses ``.npy`` headers with ``ast.literal_eval``, which on CPython 3.11 < 3.11.8 can raise
    ``SystemError: AST constructor recursion depth mismatch`` when threads parse at the same time (Grain
    reads windows and the teacher run reads frames in threads). The header is a fixed-format dict, parsed
    here with a regular expression; the returned array is writable.
    """
    with zf.open(name) as f:
        buf = bytearray(zf.getinfo(name).file_size)
        if f.readinto(buf) != len(buf):
            raise ValueError(f'{name} is truncated')
    if bytes(buf[:6]) != b'\x93NUMPY':
        raise ValueError(f'{name} is not an .npy array')
    major = buf[6]
    if major == 1:
        (hlen,), start = struct.unpack_from('<H', buf, 8), 10
    else:
        (hlen,), start = struct.unpack_from('<I', buf, 8), 12
    header = bytes(buf[start:start + hlen]).decode('latin1').strip()
    m = _NPY_HEADER.fullmatch(header)
    if not m:
        raise ValueError(f'{name} has an unsupported .npy header {header[:80]!r}')
    dtype = np.dtype(m.group(1))
    if dtype.hasobject:
        raise ValueError(f'{name} holds Python objects (pickle), refused')
    shape = tuple(int(x) for x in m.group(3).split(',') if x.strip())
    count = int(np.prod(shape)) if shape else 1
    return np.frombuffer(buf, dtype, count=count, offset=start + hlen).reshape(
        shape, order='F' if m.group(2) == 'True' else 'C')


def check_key(key: str, value: np.ndarray, where: str) -> None:
    """Raises DataError when ``value`` does not fit the documented shape/dtype of ``key``."""
    if key not in FRAME_KEYS:
        return
    shape, dtype = FRAME_KEYS[key]
    if key in _IMAGE_KEYS:
        # Other datasets may use other resolutions; only the rank and channel count are fixed.
        ok = value.ndim == len(shape) and (len(shape) < 3 or value.shape[-1] == shape[-1])
    else:
        ok = value.shape == shape
    if not ok:
        raise DataError(f"CALVIN key {key!r} has shape {value.shape}, expected {shape} ({where}).")
    if dtype is not None and value.dtype != dtype:
        raise DataError(f"CALVIN key {key!r} has dtype {value.dtype}, expected {np.dtype(dtype)} ({where}).")
    if dtype is None and not np.issubdtype(value.dtype, np.floating):
        raise DataError(f"CALVIN key {key!r} has dtype {value.dtype}, expected a float type ({where}).")


class CalvinWriter:
    """Writes a CALVIN split folder, episode by episode, in the real on-disk format.

    >>> w = CalvinWriter(root / 'training')
    >>> w.add_episode(frames, [(0, 63, 'open_drawer', 'pull the handle to open the drawer')])
    >>> w.close()

    ``frames``: key -> array [T, ...] with the per-frame keys of CALVIN.md (``REQUIRED_KEYS`` at least);
    vectors are stored as float64 like calvin_env's renderer, images as uint8 / float32.
    Annotations: (start, end_inclusive, task, instruction) relative to the episode's first frame.
    """

    def __init__(self, split_dir: str | os.PathLike, *, start_id: int = 0, scene: str = 'calvin_scene_D',
                 lang_embeddings=None):
        self.root = Path(split_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        if any(self.root.glob('episode_*.npz')):
            raise DataError(f"{self.root} already holds episode files; write a new split into an empty "
                            "folder.")
        self.next_id = int(start_id)
        self.scene = scene
        self.embed = lang_embeddings  # optional callable list[str] -> float32 [N, 1, D]
        self.episodes: list[tuple[int, int]] = []
        self.annotations: list[tuple[int, int, str, str]] = []
        self._stats: dict[str, list[np.ndarray]] = {'robot_obs': [], 'scene_obs': [], 'actions': []}
        self._keys: tuple[str, ...] | None = None
        self.closed = False

    def add_episode(self, frames: dict[str, np.ndarray],
                    annotations: Sequence[tuple] = ()) -> tuple[int, int]:
        """Writes T frame files; returns the episode's inclusive global (start, end) frame ids."""
        if self.closed:
            raise DataError(f"CalvinWriter for {self.root} is closed.")
        missing = [k for k in REQUIRED_KEYS if k not in frames]
        if missing:
            raise DataError(f"add_episode: frames lack the CALVIN key {missing[0]!r}.")
        lengths = {k: len(v) for k, v in frames.items()}
        t = lengths['rgb_static']
        if t == 0 or any(n != t for n in lengths.values()):
            raise DataError(f"add_episode: all keys need the same non-zero length, got {lengths}.")
        keys = tuple(sorted(frames))
        if self._keys is not None and keys != self._keys:
            raise DataError(f"add_episode: keys {keys} differ from the first episode's {self._keys}.")
        self._keys = keys
        arrays = {}
        for k, v in frames.items():
            v = np.asarray(v)
            if k in FRAME_KEYS:
                dtype = FRAME_KEYS[k][1]
                if dtype is np.uint8 and v.dtype != np.uint8:
                    # Casting would silently wrap or truncate pixel values.
                    raise DataError(f"add_episode: key {k!r} must be uint8, got {v.dtype}.")
                if not np.issubdtype(v.dtype, np.number):
                    raise DataError(f"add_episode: key {k!r} must be numeric, got {v.dtype}.")
                v = v.astype(dtype or np.float64, copy=False)
                check_key(k, v[0], f"add_episode key {k}")
            arrays[k] = v
        for a in annotations:  # validated before any file is written
            if len(a) != 4 or not 0 <= int(a[0]) <= int(a[1]) < t:
                raise DataError(f"add_episode: annotation {a!r} is not (start, end, task, instruction) "
                                f"inside the episode's {t} frames.")
        start = self.next_id
        for i in range(t):
            path = self.root / frame_name(start + i)
            np.savez_compressed(path, **{k: v[i] for k, v in arrays.items()})
        end = start + t - 1
        for s, e, task, text in annotations:
            self.annotations.append((start + int(s), start + int(e), str(task), str(text)))
        for k in self._stats:
            if k in arrays:
                self._stats[k].append(arrays[k].astype(np.float64))
        self.episodes.append((start, end))
        self.next_id = end + 1
        return start, end

    def close(self) -> None:
        """Writes the index files (ep_start_end_ids, ep_lens, scene_info, statistics, language)."""
        if self.closed:
            return
        if not self.episodes:
            raise DataError(f"CalvinWriter for {self.root}: no episodes were added.")
        ids = np.asarray(self.episodes, np.int64)
        np.save(self.root / 'ep_start_end_ids.npy', ids)
        np.save(self.root / 'ep_lens.npy', ids[:, 1] - ids[:, 0] + 1)
        scene_info = {self.scene: [int(ids[0, 0]), int(ids[-1, 1])]}
        np.save(self.root / 'scene_info.npy', scene_info, allow_pickle=True)
        self._write_statistics()
        texts = [a[3] for a in self.annotations]
        if self.embed is not None and texts:
            emb = np.asarray(self.embed(texts), np.float32)
        else:
            emb = np.zeros((len(texts), 1, EMB_DIM), np.float32)
        lang = {'language': {'ann': texts, 'task': [a[2] for a in self.annotations], 'emb': emb},
                'info': {'episodes': [], 'indx': [(a[0], a[1]) for a in self.annotations]}}
        (self.root / 'lang_annotations').mkdir(exist_ok=True)
        np.save(self.root / LANG_FILE, lang, allow_pickle=True)
        self.closed = True

    def _write_statistics(self) -> None:
        def vec(x):
            return '[' + ', '.join(f'{float(v):.8g}' for v in x) + ']'

        lines = []
        for key in ('robot_obs', 'scene_obs'):
            if self._stats[key]:
                x = np.concatenate(self._stats[key])
                std = x.std(0)
                lines += [f'{key}:', f'- _target_: {_NORMALIZE}', f'  mean: {vec(x.mean(0))}',
                          f'  std: {vec(std)}']
        a = np.concatenate(self._stats['actions'])
        lines += [f'act_min_bound: {vec(a.min(0))}', f'act_max_bound: {vec(a.max(0))}']
        (self.root / 'statistics.yaml').write_text('\n'.join(lines) + '\n')

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
