"""The HDF5 feature cache: layout, key, atomic and resumable writes, lock, read (h5py + numpy only).

Layout of one cache file (see README "The cache file"):

    / attrs: format_version, key, model, weights, weights_sha256, transform (json), feature_dim,
             class_names (json), dataset_root, dataset_name, dataset_fingerprint, split_rule (json),
             dtype, versions (json), created, complete
    /<split>/features  (N, D) float16|float32, chunked by rows, allocated up front
    /<split>/labels    (N,) int64
    /<split>/paths     (N,) utf-8 strings, relative to the dataset root
    /<split>/done      (N,) bool: rows whose features are written (what resume trusts)

A cache is written to `<final>.partial` and renamed into place only when every row is done, so
a reader never sees a partial file under a final name. Datasets are allocated in full when the
partial file is created and never change shape afterwards: a write only touches raw data, which
is what lets a file survive SIGKILL at any moment and be resumed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import h5py
import numpy as np

from featcache.errors import CacheError, LockedError

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
PARTIAL_SUFFIX = ".partial"
LOCK_SUFFIX = ".lock"
REQUIRED_ATTRS = (
    "format_version", "key", "model", "weights", "weights_sha256", "transform", "feature_dim",
    "class_names", "dataset_root", "dataset_name", "dataset_fingerprint", "split_rule", "dtype",
    "versions", "created", "complete",
)
_JSON_ATTRS = ("transform", "class_names", "split_rule", "versions")
_ROWS_PER_CHUNK = 256  # HDF5 chunk height; writes are committed per batch


def cache_key(
    *,
    dataset_fingerprint: str,
    class_names: Sequence[str],
    split_rule: Mapping,
    model: str,
    weights: str,
    weights_id: str,
    transform: Mapping,
    dtype: str,
) -> str:
    """The sha256 over everything that changes the cached features (and nothing else)."""
    payload = {
        "format_version": FORMAT_VERSION,
        "dataset_fingerprint": dataset_fingerprint,
        "class_names": list(class_names),
        "split_rule": dict(split_rule),
        "model": model,
        "weights": weights,
        "weights_id": weights_id,
        "transform": dict(transform),
        "dtype": dtype,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def cache_path(cache_dir: str | Path, *, dataset_name: str, model: str, weights: str, key: str) -> Path:
    """`<cache_dir>/<dataset>/<model>-<weights>-<key12>.h5`; `weights` is a short tag."""
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in weights)
    return Path(cache_dir) / dataset_name / f"{model}-{safe}-{key[:12]}.h5"


def partial_path(final: Path) -> Path:
    return final.with_name(final.name + PARTIAL_SUFFIX)


def lock_path(final: Path) -> Path:
    return final.with_name(final.name + LOCK_SUFFIX)


# --------------------------------------------------------------------------- lock


@contextmanager
def write_lock(final: Path, *, wait: bool = False) -> Iterator[None]:
    """Hold the writer lock of `final` (flock: released by the kernel even on SIGKILL)."""
    path = lock_path(final)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
            if not wait:
                raise LockedError(
                    f"{final.name} is being written by {holder}; wait for it to finish "
                    "or run again with --wait."
                ) from None
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {_now()}".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing drops the flock; the file stays (unlinking would race a waiter)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# --------------------------------------------------------------------------- write


@dataclass(frozen=True)
class SplitRows:
    """What a split holds before its features are computed."""

    labels: np.ndarray  # (N,) int64
    paths: Sequence[str]  # (N,) relative to the dataset root


class CacheWriter:
    """Writes (or resumes) one partial cache file; `finish()` renames it into place.

    Use `pending(split, batch_size)` to get the row ranges still to compute, `write(split,
    start, features)` to commit one, and `finish()` once everything is done.
    """

    def __init__(self, final: Path, *, meta: Mapping, feature_dim: int, dtype: str,
                 splits: Mapping[str, SplitRows]):
        self.final = final
        self.partial = partial_path(final)
        self.resumed_rows = 0
        self._file = self._open_or_create(meta=meta, feature_dim=feature_dim, dtype=dtype, splits=splits)

    def _open_or_create(self, *, meta, feature_dim, dtype, splits) -> h5py.File:
        if self.partial.exists():
            try:
                f = h5py.File(self.partial, "r+", locking=False)  # our flock guards writers
                ok = f.attrs.get("key") == meta["key"] and all(
                    s in f and f[s]["features"].shape == (len(rows.labels), feature_dim)
                    for s, rows in splits.items()
                )
            except Exception:  # unreadable partial file: start over
                ok, f = False, None
            if ok:
                self.resumed_rows = sum(int(f[s]["done"][...].sum()) for s in splits)
                return f
            if f is not None:
                f.close()
            self.partial.unlink()
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        f = h5py.File(self.partial, "w", track_order=True, locking=False)
        for name, value in meta.items():
            f.attrs[name] = json.dumps(value) if name in _JSON_ATTRS else value
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["feature_dim"] = feature_dim
        f.attrs["dtype"] = dtype
        f.attrs["complete"] = False
        for split, rows in splits.items():
            n = len(rows.labels)
            g = f.create_group(split)
            _create_allocated(g, "features", (n, feature_dim), np.dtype(dtype),
                              chunk_rows=min(_ROWS_PER_CHUNK, max(n, 1)))
            g.create_dataset("labels", data=np.asarray(rows.labels, dtype=np.int64))
            g.create_dataset("paths", data=list(rows.paths), dtype=h5py.string_dtype("utf-8"))
            _create_allocated(g, "done", (n,), np.dtype(bool), chunk_rows=None)
        f.flush()
        return f

    def pending(self, split: str, batch_size: int) -> list[tuple[int, int]]:
        """Row ranges [start, stop) of `split` not yet committed, on the batch grid from row 0."""
        done = self._file[split]["done"][...]
        n = len(done)
        return [(a, min(a + batch_size, n)) for a in range(0, n, batch_size)
                if not done[a:min(a + batch_size, n)].all()]

    def write(self, split: str, start: int, features: np.ndarray) -> None:
        """Commit rows [start, start+len(features)): the features first, then their done flags."""
        g = self._file[split]
        stop = start + len(features)
        g["features"][start:stop] = features
        self._file.flush()
        g["done"][start:stop] = True
        self._file.flush()

    def finish(self) -> Path:
        """Check every row is done, mark complete, and rename the file into place."""
        for split in self._file:
            if not self._file[split]["done"][...].all():
                raise RuntimeError(f"finish() with rows of {split} not written")
        self._file.attrs["complete"] = True
        self._file.attrs["created"] = _now()
        self._file.close()
        os.replace(self.partial, self.final)
        _fsync_dir(self.final.parent)
        return self.final

    def close(self) -> None:
        if self._file.id.valid:
            self._file.close()


def _create_allocated(group: h5py.Group, name: str, shape: tuple, dtype: np.dtype, *,
                      chunk_rows: int | None) -> None:
    """A dataset whose storage is allocated now, so later writes never touch HDF5 metadata."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    if chunk_rows and all(shape):
        dcpl.set_chunk((chunk_rows,) + tuple(shape[1:]))
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_ALLOC)
    space = h5py.h5s.create_simple(shape)
    tid = h5py.h5t.py_create(dtype, logical=True)
    h5py.h5d.create(group.id, name.encode(), tid, space, dcpl=dcpl)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- read


def _decode_attrs(attrs: h5py.AttributeManager) -> dict:
    meta = {}
    for name, value in attrs.items():
        if isinstance(value, bytes):
            value = value.decode()
        if isinstance(value, np.generic):
            value = value.item()
        if name in _JSON_ATTRS and isinstance(value, str):
            value = json.loads(value)
        meta[name] = value
    return meta


@contextmanager
def open_cache(path: str | Path) -> Iterator[h5py.File]:
    """Open a COMPLETE cache for reading; a partial, corrupt or foreign file is a CacheError."""
    path = Path(path)
    if path.name.endswith(PARTIAL_SUFFIX):
        raise CacheError(f"{path} is an unfinished cache; run the same featcache extract again to finish it.")
    if not path.is_file():
        raise CacheError(f"Cache file {path} does not exist; run featcache extract to create it.")
    try:
        f = h5py.File(path, "r")
    except Exception:
        raise CacheError(
            f"{path} is not a readable cache (corrupt or truncated); delete it and run featcache extract again."
        ) from None
    try:
        if f.attrs.get("format_version") != FORMAT_VERSION or not f.attrs.get("complete", False):
            raise CacheError(
                f"{path} is not a complete featcache cache (format {f.attrs.get('format_version')}); "
                "delete it and run featcache extract again."
            )
        yield f
    finally:
        f.close()


def read_meta(path: str | Path) -> dict:
    """The file attributes of a complete cache, JSON fields decoded, plus split sizes and `path`."""
    with open_cache(path) as f:
        meta = _decode_attrs(f.attrs)
        meta["splits"] = {s: int(f[s]["labels"].shape[0]) for s in f}
    meta["path"] = str(path)
    return meta


def load_features(path: str | Path, split: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """Features (N, D), labels (N,) int64 and the file's metadata for one split of a complete cache."""
    meta = read_meta(path)
    if split not in meta["splits"]:
        raise CacheError(f"{path} has no split {split!r} (it has {', '.join(meta['splits'])}).")
    with open_cache(path) as f:
        g = f[split]
        try:
            features = g["features"][...]  # (N, D) float16|float32
            labels = g["labels"][...].astype(np.int64)  # (N,)
            done = g["done"][...]
        except Exception:
            raise CacheError(
                f"{path} cannot be read (corrupt or truncated); delete it and run featcache extract again."
            ) from None
    if not done.all():
        raise CacheError(f"{path} is missing rows of {split}; delete it and run featcache extract again.")
    if not np.isfinite(features).all():
        raise CacheError(f"{path} holds non-finite features in {split}; delete it and run featcache extract again.")
    return features, labels, meta


def load_paths(path: str | Path, split: str) -> list[str]:
    """The image paths (relative to the dataset root) of one split, in row order."""
    with open_cache(path) as f:
        return [p.decode() if isinstance(p, bytes) else p for p in f[split]["paths"][...]]


def verify_cache(path: str | Path) -> list[str]:
    """Every problem found in one cache file (empty list: the file is sound)."""
    path = Path(path)
    try:
        with open_cache(path) as f:
            problems = [f"attribute {a!r} missing" for a in REQUIRED_ATTRS if a not in f.attrs]
            meta = _decode_attrs(f.attrs)
            dim = meta.get("feature_dim")
            n_classes = len(meta.get("class_names") or [])
            if not list(f):
                problems.append("no splits")
            for split in f:
                g = f[split]
                missing = [d for d in ("features", "labels", "paths", "done") if d not in g]
                if missing:
                    problems.append(f"{split}: datasets {missing} missing")
                    continue
                n = g["labels"].shape[0]
                if g["features"].shape != (n, dim):
                    problems.append(f"{split}: features {g['features'].shape} but {n} labels and D={dim}")
                if g["paths"].shape != (n,) or g["done"].shape != (n,):
                    problems.append(f"{split}: paths/done lengths differ from labels ({n})")
                    continue
                try:
                    done = g["done"][...]
                    labels = g["labels"][...]
                    features = g["features"][...]
                except Exception as exc:
                    problems.append(f"{split}: unreadable data ({exc.__class__.__name__})")
                    continue
                if not done.all():
                    problems.append(f"{split}: {int((~done).sum())} of {n} rows not written")
                if n and (labels.min() < 0 or labels.max() >= n_classes):
                    problems.append(f"{split}: labels outside 0..{n_classes - 1}")
                if not np.isfinite(features).all():
                    problems.append(f"{split}: non-finite features")
    except CacheError as exc:
        return [str(exc)]
    return problems


def list_caches(cache_dir: str | Path) -> list[dict]:
    """One row per cache file (complete, partial or unreadable) under `cache_dir`."""
    rows = []
    for p in sorted(Path(cache_dir).glob("*/*.h5*")):
        if p.name.endswith(LOCK_SUFFIX):
            continue
        row = {"path": str(p), "dataset": p.parent.name, "size": p.stat().st_size, "splits": {}}
        if p.name.endswith(PARTIAL_SUFFIX):
            row["status"] = "partial"
        try:
            with h5py.File(p, "r", locking=False) as f:  # a writer holds the HDF5 lock of a partial
                meta = _decode_attrs(f.attrs)
                row.update(model=meta.get("model"), weights=meta.get("weights"), dtype=meta.get("dtype"),
                           feature_dim=meta.get("feature_dim"), key=meta.get("key"))
                for split in f:
                    done = f[split]["done"][...]
                    row["splits"][split] = {"n": int(len(done)), "done": int(done.sum())}
                if "status" not in row:
                    row["status"] = "complete" if meta.get("complete") else "incomplete"
        except Exception:
            row["status"] = "corrupt"
        rows.append(row)
    return rows
