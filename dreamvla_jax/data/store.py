"""Teacher feature store: ArrayRecord shards of per-frame records plus a manifest.

Layout of a store folder::

    manifest.json                 format, version, teachers (source, versions, random_init), fields
                                  (name -> shape, dtype), config fields used (image size, grid, gap),
                                  source split + fingerprint, shard list, ``complete`` flag
    frames.npy                    int64 [M] sorted frame ids held by the store (the annotated frames)
    shard-00000-of-00012.array_record
    ...

Shard k holds frames ``frames[k * shard_size : (k + 1) * shard_size]``, one record per frame, in order, so
a frame's (shard, position) follows from its rank in ``frames.npy``. A record is a small JSON header
(frame id, per-field dtype/shape/offset) followed by the raw little-endian arrays; decoding is
``np.frombuffer`` without copies of the header-described slices.

Shards are written under ``<name>.tmp`` and renamed once closed and fsynced, so a killed run never leaves a
file under a final shard name that is incomplete; a rerun skips the shards that exist and rewrites the rest.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from dreamvla_jax.data.errors import DataError

FORMAT = 'dreamvla-teacher-store'
VERSION = 1
MANIFEST = 'manifest.json'
FRAMES = 'frames.npy'
_HEADER_LEN = struct.Struct('<I')


def shard_name(index: int, count: int) -> str:
    return f'shard-{index:05d}-of-{count:05d}.array_record'


def encode_record(frame_id: int, fields: dict[str, np.ndarray]) -> bytes:
    """One frame's features -> bytes (4-byte header length, JSON header, raw arrays)."""
    header = {'frame': int(frame_id), 'fields': {}}
    blobs, offset = [], 0
    for name in sorted(fields):
        a = np.ascontiguousarray(fields[name])
        header['fields'][name] = [a.dtype.str, list(a.shape), offset]
        blobs.append(a.tobytes())
        offset += a.nbytes
    head = json.dumps(header, separators=(',', ':')).encode()
    return _HEADER_LEN.pack(len(head)) + head + b''.join(blobs)


def decode_record(data: bytes) -> tuple[int, dict[str, np.ndarray]]:
    """Inverse of ``encode_record``. Raises ValueError on malformed bytes."""
    (n,) = _HEADER_LEN.unpack_from(data, 0)
    header = json.loads(data[4:4 + n])
    base = 4 + n
    out = {}
    for name, (dtype, shape, offset) in header['fields'].items():
        dt = np.dtype(dtype)
        count = int(np.prod(shape)) if shape else 1
        out[name] = np.frombuffer(data, dt, count=count, offset=base + offset).reshape(shape)
    return int(header['frame']), out


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + '.tmp')
    with open(tmp, 'w') as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(store: str | os.PathLike) -> dict:
    path = Path(store) / MANIFEST
    if not path.exists():
        raise DataError(f"feature store {store} has no {MANIFEST}: not a teacher store (run "
                        "`python -m dreamvla_jax.teachers --data DIR --out STORE`).")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is unreadable ({type(e).__name__}: {e}).") from e
    if manifest.get('format') != FORMAT or manifest.get('version') != VERSION:
        raise DataError(f"{path}: format {manifest.get('format')!r} v{manifest.get('version')} is not "
                        f"{FORMAT!r} v{VERSION}.")
    return manifest


class ShardWriter:
    """Writes one shard under a temporary name; ``commit()`` closes, fsyncs and renames it into place."""

    def __init__(self, path: Path):
        from array_record.python.array_record_module import ArrayRecordWriter

        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + '.tmp')
        if self.tmp.exists():
            self.tmp.unlink()
        # group_size:1 makes every record independently addressable (cheap random access for Grain).
        self._writer = ArrayRecordWriter(str(self.tmp), 'group_size:1')
        self.count = 0

    def write(self, record: bytes) -> None:
        self._writer.write(record)
        self.count += 1

    def commit(self) -> None:
        self._writer.close()
        fd = os.open(self.tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        try:
            self._writer.close()
        finally:
            if self.tmp.exists():
                self.tmp.unlink()


class FeatureStore:
    """Random access to a complete teacher store, checked against the dataset it claims to describe.

    Picklable (Grain workers): shard readers open lazily in each process.
    """

    def __init__(self, path: str | os.PathLike, *, fingerprint: str | None = None):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        m = self.manifest
        if not m.get('complete'):
            done = sum((self.path / s).exists() for s in m['shards'])
            raise DataError(f"feature store {self.path} is incomplete ({done}/{len(m['shards'])} shards): "
                            "rerun the same `python -m dreamvla_jax.teachers` command to finish it.")
        if fingerprint is not None and m['dataset']['fingerprint'] != fingerprint:
            raise DataError(f"feature store {self.path} was computed from another dataset "
                            f"({m['dataset']['split_dir']}, fingerprint {m['dataset']['fingerprint'][:12]}) "
                            f"and does not match this one (fingerprint {fingerprint[:12]}).")
        for s in m['shards']:
            if not (self.path / s).exists():
                raise DataError(f"feature shard {self.path / s} is missing from store {self.path}.")
        frames_path = self.path / FRAMES
        try:
            self.frames = np.load(frames_path)
        except (OSError, ValueError) as e:
            raise DataError(f"{frames_path} is missing or unreadable ({e}).") from e
        self.shard_size = int(m['shard_size'])
        self.fields = {k: (tuple(v['shape']), np.dtype(v['dtype'])) for k, v in m['fields'].items()}
        self._readers: dict[int, object] = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state['_readers'] = {}
        return state

    def __contains__(self, frame_id: int) -> bool:
        i = int(np.searchsorted(self.frames, frame_id))
        return i < len(self.frames) and self.frames[i] == frame_id

    def _reader(self, shard: int):
        r = self._readers.get(shard)
        if r is None:
            from array_record.python.array_record_module import ArrayRecordReader

            path = self.path / self.manifest['shards'][shard]
            try:
                r = ArrayRecordReader(str(path), 'readahead_buffer_size:0')
            except Exception as e:  # noqa: BLE001 - the C++ reader raises plain RuntimeError/ValueError
                raise DataError(f"feature shard {path} is missing or corrupt ({e}).") from e
            self._readers[shard] = r
        return r

    def get(self, frame_id: int, fields=None, where: str = '') -> dict[str, np.ndarray]:
        """Features of one frame: field -> array (shapes/dtypes of the manifest). ``where`` names the user."""
        i = int(np.searchsorted(self.frames, frame_id))
        if i >= len(self.frames) or self.frames[i] != frame_id:
            raise DataError(f"feature store {self.path} has no features for frame {frame_id}{where}: "
                            f"{self.path / FRAMES} lists {len(self.frames)} frames of "
                            f"{self.manifest['dataset']['split_dir']}.")
        shard, pos = divmod(i, self.shard_size)
        path = self.path / self.manifest['shards'][shard]
        try:
            data = self._reader(shard).read([pos])[0]
            got_id, out = decode_record(data)
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001
            raise DataError(f"feature shard {path} is corrupt at record {pos} (frame {frame_id}{where}): "
                            f"{type(e).__name__}: {e}.") from e
        if got_id != frame_id:
            raise DataError(f"feature shard {path} record {pos} holds frame {got_id}, expected "
                            f"{frame_id}{where}.")
        names = list(self.fields) if fields is None else list(fields)
        for name in names:
            if name not in out:
                raise DataError(f"feature shard {path} has no field {name!r} for frame {frame_id}{where}.")
            shape, dtype = self.fields[name]
            if out[name].shape != shape or out[name].dtype != dtype:
                raise DataError(f"feature shard {path} field {name!r} of frame {frame_id}{where} has "
                                f"{out[name].dtype}{list(out[name].shape)}, manifest says "
                                f"{dtype}{list(shape)}.")
        return {k: out[k] for k in names}

    def close(self) -> None:
        for r in self._readers.values():
            r.close()
        self._readers = {}
