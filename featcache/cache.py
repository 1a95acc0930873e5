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

An image that cannot be decoded is never stored: the partial file has one more dataset,
`/<split>/failed` (N,) bool, set (before `done`) for such rows. At `finish()` a file without
failed rows is renamed as it is (`failed` deleted first); otherwise it is copied without them
into `<final>.compact.partial`, which is renamed into place. The attribute `skipped` (json) lists
(split, path, reason) of the rows left out.

Several processes (featcache.distributed) write one shard each, `<final>.shard-R-of-N-bB.partial`:
a small cache of their batches of the one-process batch grid (shard_batches), written by a
CacheWriter; merge_shards copies them into the cache file through a CacheWriter, so the result
is the file one process writes.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import h5py
import numpy as np

from featcache.errors import CacheError, LockedError, NoSpaceError, out_of_space
from featcache.files import fsync_dir

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
PARTIAL_SUFFIX = ".partial"
LOCK_SUFFIX = ".lock"
REQUIRED_ATTRS = (
    "format_version", "key", "model", "weights", "weights_sha256", "transform", "feature_dim",
    "class_names", "dataset_root", "dataset_name", "dataset_fingerprint", "split_rule", "dtype",
    "versions", "created", "complete",
)
_JSON_ATTRS = ("transform", "class_names", "split_rule", "versions", "skipped")
_ROWS_PER_CHUNK = 256  # HDF5 chunk height; writes are committed per batch
_COPY_ROWS = 8192  # rows per block when a finished file is copied without its failed rows
LOCK_GRACE_S = 1.0  # a held lock is retried this long before it counts as held (a killed run's workers let go)


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


def failures_path(final: Path) -> Path:
    """`<cache stem>.failures.csv` beside the cache: the images extraction could not read (split, path, reason)."""
    return final.with_name(final.stem + ".failures.csv")


# --------------------------------------------------------------------------- lock


@contextmanager
def write_lock(final: Path, *, wait: bool = False) -> Iterator[None]:
    """Hold the writer lock of `final` (flock: released by the kernel even on SIGKILL)."""
    path = lock_path(final)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _flock_within(fd, LOCK_GRACE_S):
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


def _flock_within(fd: int, seconds: float) -> bool:
    """Take the exclusive flock, retrying for `seconds` (a probe by lock_holder holds it for a moment)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)


def lock_holder(final: Path) -> str | None:
    """Who writes `final` now ("pid N on HOST since T"), or None when no process holds its lock.

    Retries for LOCK_GRACE_S, as a writer does: the decode workers of a writer killed a moment ago
    still hold its lock until they die with it.
    """
    try:
        fd = os.open(lock_path(Path(final)), os.O_RDONLY)
    except FileNotFoundError:
        return None
    deadline = time.monotonic() + LOCK_GRACE_S
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # released at once (close); writers retry meanwhile
                return None
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
                time.sleep(0.05)
    finally:
        os.close(fd)


def missing_cache_error(final: Path) -> CacheError | LockedError:
    """Why the cache `final` is not there: being extracted now (LockedError), interrupted, or never extracted."""
    final = Path(final)
    holder = lock_holder(final)
    if holder is not None:
        return LockedError(f"{final} is still being extracted by {holder}; wait for featcache extract to "
                           "finish (or run it with --wait) and try again.")
    if partial_path(final).exists():
        return CacheError(f"Cache file {final} does not exist yet: its extraction was interrupted "
                          f"({partial_path(final).name} is kept); run the same featcache extract again to resume it.")
    return CacheError(f"Cache file {final} does not exist; run featcache extract to create it.")


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
                # `failed` is deleted just before the final rename: a file killed there has every row done
                ok = f.attrs.get("key") == meta["key"] and all(
                    s in f and f[s]["features"].shape == (len(rows.labels), feature_dim)
                    and ("failed" in f[s] or bool(f[s]["done"][...].all()))
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
        try:
            self._allocate(f, meta=meta, feature_dim=feature_dim, dtype=dtype, splits=splits)
        except Exception as exc:
            _close_quietly(f)
            self.partial.unlink(missing_ok=True)  # nothing in it yet; give the space back
            reason = out_of_space(exc)
            if reason:
                raise NoSpaceError(self.partial, reason, f"free space in {self.partial.parent} and run the same "
                                   "command again (the partial file was removed).") from None
            raise
        return f

    @staticmethod
    def _allocate(f: h5py.File, *, meta, feature_dim, dtype, splits) -> None:
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
            _create_allocated(g, "failed", (n,), np.dtype(bool), chunk_rows=None)
            _create_allocated(g, "done", (n,), np.dtype(bool), chunk_rows=None)
        f.flush()

    def pending(self, split: str, batch_size: int) -> list[tuple[int, int]]:
        """Row ranges [start, stop) of `split` not yet committed, on the batch grid from row 0."""
        done = self._file[split]["done"][...]
        n = len(done)
        return [(a, min(a + batch_size, n)) for a in range(0, n, batch_size)
                if not done[a:min(a + batch_size, n)].all()]

    def write(self, split: str, start: int, features: np.ndarray, *, failed: Sequence[int] = ()) -> None:
        """Commit rows [start, stop), stop = start + len(features) + len(failed): the features first, then the
        failed flags, then the done flags.

        `failed` lists the rows (absolute, in [start, stop)) whose image could not be read; `features`
        (B, D) holds the other rows in order. Failed rows get no features: finish() leaves them out.
        """
        g = self._file[split]
        stop = start + len(features) + len(failed)
        bad = np.zeros(stop - start, dtype=bool)
        bad[np.asarray(failed, dtype=np.int64) - start] = True
        try:
            if not bad.any():
                g["features"][start:stop] = features
            else:
                good = np.flatnonzero(~bad)
                # one write per run of consecutive readable rows
                for run in np.split(good, np.flatnonzero(np.diff(good) != 1) + 1) if len(good) else []:
                    first = int(np.searchsorted(good, run[0]))
                    g["features"][start + run[0]:start + run[-1] + 1] = features[first:first + len(run)]
                self._file.flush()
                g["failed"][start:stop] = bad
            self._file.flush()
            g["done"][start:stop] = True
            self._file.flush()
        except Exception as exc:
            reason = out_of_space(exc)
            if reason:
                raise NoSpaceError(self.partial, reason, f"free space in {self.partial.parent} and run the same "
                                   "command again: it resumes from the rows already written.") from None
            raise

    def failed_rows(self, split: str) -> np.ndarray:
        """(F,) int64: the rows of `split` committed as unreadable (this run or an earlier one)."""
        g = self._file[split]
        return np.flatnonzero(g["failed"][...]) if "failed" in g else np.zeros(0, dtype=np.int64)

    def finish(self, *, skipped: Sequence[tuple[str, str, str]] = ()) -> Path:
        """Check every row is done, mark complete, and put the file in place without its failed rows.

        Args:
            skipped: (split, path, reason) of every failed row, stored in the attribute `skipped`.
        """
        n_failed = 0
        for split in self._file:
            if not self._file[split]["done"][...].all():
                raise RuntimeError(f"finish() with rows of {split} not written")
            n_failed += len(self.failed_rows(split))
        if n_failed != len(skipped):
            raise RuntimeError(f"finish() with {n_failed} failed rows but {len(skipped)} reasons")
        if n_failed:
            compact = self._copy_without_failed(skipped)
            self._file.close()
            os.replace(compact, self.final)
            self.partial.unlink()
        else:
            for split in self._file:
                if "failed" in self._file[split]:
                    del self._file[split]["failed"]
            self._file.attrs["skipped"] = "[]"
            self._file.attrs["complete"] = True
            self._file.attrs["created"] = _now()
            self._file.close()
            os.replace(self.partial, self.final)
        fsync_dir(self.final.parent)
        return self.final

    def _copy_without_failed(self, skipped: Sequence[tuple[str, str, str]]) -> Path:
        """Write `<final>.compact.partial`: the partial file's attributes and its readable rows only."""
        src = self._file
        out = self.final.with_name(self.final.name + ".compact" + PARTIAL_SUFFIX)
        try:
            with h5py.File(out, "w", track_order=True, locking=False) as dst:
                for name, value in src.attrs.items():
                    dst.attrs[name] = value
                dst.attrs["skipped"] = json.dumps([list(row) for row in skipped])
                dst.attrs["created"] = _now()
                for split in src:
                    g = src[split]
                    keep = np.flatnonzero(~g["failed"][...])  # (N',)
                    n, dim = len(keep), g["features"].shape[1]
                    h = dst.create_group(split)
                    _create_allocated(h, "features", (n, dim), g["features"].dtype,
                                      chunk_rows=min(_ROWS_PER_CHUNK, max(n, 1)))
                    for a in range(0, n, _COPY_ROWS):
                        rows = keep[a:a + _COPY_ROWS]
                        block = g["features"][int(rows[0]):int(rows[-1]) + 1]  # contiguous read, then select
                        h["features"][a:a + len(rows)] = block[rows - rows[0]]
                    h.create_dataset("labels", data=g["labels"][...][keep])
                    h.create_dataset("paths", data=g["paths"][...][keep], dtype=h5py.string_dtype("utf-8"))
                    h.create_dataset("done", data=np.ones(n, dtype=bool))
                dst.attrs["complete"] = True
        except BaseException as exc:
            out.unlink(missing_ok=True)
            reason = out_of_space(exc)
            if reason:
                raise NoSpaceError(out, reason, f"free space in {out.parent} and run the same command again: "
                                   "every row is already computed.") from None
            raise
        return out

    def close(self) -> None:
        if self._file.id.valid:
            _close_quietly(self._file)


def _close_quietly(f: h5py.File) -> None:
    """Close an h5py file whose last write may have failed (a full disk fails the close as well)."""
    try:
        f.close()
    except Exception:  # noqa: BLE001 - the write's own error is the one to report
        pass


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


# --------------------------------------------------------------------------- shards (several processes)
#
# Under torchrun every process writes one shard: the batches of the one-process batch grid that
# shard_batches gives it, as a small cache file of its own (a CacheWriter over just those rows, so a
# shard is crash-safe and resumable exactly as a one-process cache is). When every shard is complete,
# one process copies them into the cache file (merge_shards): the rows, in the order, of one process.


def shard_batches(sizes: Mapping[str, int], batch_size: int, *, rank: int,
                  world_size: int) -> dict[str, list[tuple[int, int]]]:
    """Row ranges [start, stop) of each split that process `rank` of `world_size` extracts.

    The grid is the one-process grid (each split cut from row 0 into batches of batch_size rows),
    so every batch holds the images it holds in one process; its batches, numbered across the splits
    in order, go round-robin: batch b to rank b % world_size.
    """
    out: dict[str, list[tuple[int, int]]] = {}
    b = 0
    for split, n in sizes.items():
        out[split] = []
        for start in range(0, n, batch_size):
            if b % world_size == rank:
                out[split].append((start, min(start + batch_size, n)))
            b += 1
    return out


def shard_path(final: Path, *, rank: int, world_size: int, batch_size: int) -> Path:
    """`<final>.shard-<rank>-of-<world_size>-b<batch_size>.partial`: a complete shard (never a cache)."""
    return final.with_name(f"{final.name}.shard-{rank}-of-{world_size}-b{batch_size}{PARTIAL_SUFFIX}")


def shard_files(final: Path) -> list[Path]:
    """Every shard file of `final` on disk: complete or being written, of any number of processes."""
    return sorted(final.parent.glob(f"{glob.escape(final.name)}.shard-*{PARTIAL_SUFFIX}"))


class ShardWriter:
    """One process's shard, with CacheWriter's interface in rows of the whole split.

    `pending`, `write` and `failed_rows` speak of split rows as CacheWriter's do; the file holds only
    this shard's rows (its batches in order, so the shard's own batch grid is the same batches).
    `finish()` puts the complete shard at `path`; merge_shards copies the shards into the cache.
    """

    def __init__(self, final: Path, *, rank: int, world_size: int, batch_size: int, meta: Mapping,
                 feature_dim: int, dtype: str, splits: Mapping[str, SplitRows]):
        self.final = final
        self.path = shard_path(final, rank=rank, world_size=world_size, batch_size=batch_size)
        self.batch_size = batch_size
        self.batches = shard_batches({s: len(r.labels) for s, r in splits.items()}, batch_size,
                                     rank=rank, world_size=world_size)
        self._splits = splits
        self._batch_number = {s: {a: k for k, (a, _) in enumerate(spans)} for s, spans in self.batches.items()}
        # (M,) int64 per split: shard row -> split row
        self._rows = {s: np.array([i for a, b in spans for i in range(a, b)], dtype=np.int64)
                      for s, spans in self.batches.items()}
        self._writer: CacheWriter | None = None
        if _is_complete_shard(self.path, meta["key"]):
            self.partial = self.path
            self.resumed_rows = sum(len(rows) for rows in self._rows.values())
            return
        self.path.unlink(missing_ok=True)  # of another cache or unreadable: start over
        own = {s: SplitRows(labels=np.asarray(splits[s].labels, dtype=np.int64)[rows],
                            paths=[splits[s].paths[i] for i in rows]) for s, rows in self._rows.items()}
        self._writer = CacheWriter(self.path, meta=meta, feature_dim=feature_dim, dtype=dtype, splits=own)
        self.partial = self._writer.partial
        self.resumed_rows = self._writer.resumed_rows

    def pending(self, split: str, batch_size: int) -> list[tuple[int, int]]:
        """This shard's batches [start, stop) of `split` (split rows) not yet committed."""
        if batch_size != self.batch_size:
            raise ValueError(f"shard of batch size {self.batch_size} asked for batches of {batch_size}")
        if self._writer is None:
            return []
        return [self.batches[split][a // batch_size] for a, _ in self._writer.pending(split, batch_size)]

    def write(self, split: str, start: int, features: np.ndarray, *, failed: Sequence[int] = ()) -> None:
        """Commit the batch starting at split row `start` (as CacheWriter.write; `failed` in split rows)."""
        local = self._batch_number[split][start] * self.batch_size
        self._writer.write(split, local, features, failed=[local + int(r) - start for r in failed])

    def failed_rows(self, split: str) -> np.ndarray:
        """(F,) int64 split rows of this shard committed as unreadable."""
        if self._writer is not None:
            return self._rows[split][self._writer.failed_rows(split)]
        row_of = {p: i for i, p in enumerate(self._splits[split].paths)}
        with h5py.File(self.path, "r", locking=False) as f:
            skipped = _decode_attrs(f.attrs).get("skipped") or []
        return np.array(sorted(row_of[p] for s, p, _ in skipped if s == split), dtype=np.int64)

    def finish(self, *, skipped: Sequence[tuple[str, str, str]] = ()) -> Path:
        """Put the complete shard at `path` (a no-op for a shard completed by an earlier run)."""
        if self._writer is not None:
            self._writer.finish(skipped=skipped)
            self._writer = None
        return self.path

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _is_complete_shard(path: Path, key: str) -> bool:
    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r", locking=False) as f:
            return bool(f.attrs.get("complete", False)) and f.attrs.get("key") == key
    except Exception:  # noqa: BLE001 - unreadable: not complete
        return False


def shards_skipped(shards: Sequence[Path], splits: Mapping[str, SplitRows]) -> list[tuple[str, str, str]]:
    """(split, path, reason) of every image the shards could not read, in one process's order (split, row)."""
    order = {s: i for i, s in enumerate(splits)}
    row_of = {s: {p: i for i, p in enumerate(r.paths)} for s, r in splits.items()}
    out = []
    for shard in shards:
        with h5py.File(shard, "r", locking=False) as f:
            out += [(s, p, reason) for s, p, reason in _decode_attrs(f.attrs).get("skipped") or []]
    return sorted(out, key=lambda x: (order[x[0]], row_of[x[0]][x[1]]))


def merge_shards(final: Path, *, shards: Sequence[Path], meta: Mapping, feature_dim: int, dtype: str,
                 splits: Mapping[str, SplitRows], skipped: Sequence[tuple[str, str, str]]) -> Path:
    """Copy complete shards into the cache `final`, check every row came from exactly one, put it in place.

    The copy goes through a CacheWriter (the one-process layout, partial file and rename); the
    shards are deleted once the cache is in place. `skipped` is shards_skipped(shards, splits).

    Returns:
        `final`.
    """
    partial_path(final).unlink(missing_ok=True)  # a killed merge's copy, or a one-process run's rows: redo
    row_of = {s: {p: i for i, p in enumerate(r.paths)} for s, r in splits.items()}
    covered = {s: np.zeros(len(r.labels), dtype=np.int64) for s, r in splits.items()}
    writer = CacheWriter(final, meta=meta, feature_dim=feature_dim, dtype=dtype, splits=splits)
    try:
        for shard in shards:
            with h5py.File(shard, "r", locking=False) as f:
                if not f.attrs.get("complete", False) or f.attrs.get("key") != meta["key"]:
                    raise RuntimeError(f"{shard.name} is not a complete shard of {final.name}")
                shard_skipped = _decode_attrs(f.attrs).get("skipped") or []
                for split in splits:
                    g = f[split]
                    kept = np.array([row_of[split][p.decode() if isinstance(p, bytes) else p]
                                     for p in g["paths"][...]], dtype=np.int64)  # (M,) rows with features
                    failed = np.array(sorted(row_of[split][p] for s, p, _ in shard_skipped if s == split),
                                      dtype=np.int64)
                    rows = np.sort(np.concatenate([kept, failed]))  # the rows of the shard's batches
                    covered[split][rows] += 1
                    for run in _runs(rows, _COPY_ROWS):  # a batch, or a block of consecutive batches
                        a, b = int(run[0]), int(run[-1]) + 1
                        k0, k1 = np.searchsorted(kept, [a, b])
                        writer.write(split, a, g["features"][int(k0):int(k1)],
                                     failed=failed[(failed >= a) & (failed < b)].tolist())
        for split, counts in covered.items():
            if not (counts == 1).all():
                raise RuntimeError(f"the shards of {final.name} cover {int((counts == 0).sum())} rows of {split} "
                                   f"never and {int((counts > 1).sum())} twice")
        path = writer.finish(skipped=skipped)
    finally:
        writer.close()
    for shard in shards:
        shard.unlink()
    return path


def _runs(rows: np.ndarray, max_len: int) -> list[np.ndarray]:
    """Sorted rows cut into runs of consecutive values, each at most max_len long."""
    if not len(rows):
        return []
    runs = np.split(rows, np.flatnonzero(np.diff(rows) != 1) + 1)
    return [run[i:i + max_len] for run in runs for i in range(0, len(run), max_len)]


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
        raise missing_cache_error(path)
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
    bad_rows = non_finite_rows(features)
    if bad_rows:
        raise non_finite_error(path, split, bad_rows, len(features))
    return features, labels, meta


def non_finite_error(path: str | Path, split: str, bad_rows: int, rows: int) -> CacheError:
    """The error for a split with `bad_rows` of its `rows` holding NaN or inf features."""
    return CacheError(f"{path}: {bad_rows} of {rows} rows of {split} hold NaN or inf features; "
                      "delete it and run featcache extract again.")


def non_finite_rows(features: np.ndarray) -> int:
    """Rows of a (N, D) array with a NaN or inf."""
    return int((~np.isfinite(features)).any(axis=1).sum()) if features.size else 0


# --------------------------------------------------------------------------- read in pieces

def _iov_max() -> int:
    try:
        return max(16, min(int(os.sysconf("SC_IOV_MAX")), 1024))
    except (ValueError, OSError):
        return 16


_MAX_BUFFERS = _iov_max()  # buffers of one os.preadv call
_READ_THREADS = 8  # os.preadv calls in flight for one large take()
_ROWS_PER_THREAD = 1024  # a take() of fewer rows than this per thread uses fewer threads (one below 2048 rows)


class FeatureReader:
    """A complete cache open for reading features in pieces, never all at once (head-train --stream).

    `take(split, rows)` gives any rows in the order asked for, `read(split, start, stop)` a run of
    them. For an uncompressed dataset (what extract writes) h5py says where each chunk lies and the
    rows are read with os.preadv straight into their places in the result, in file order, rows
    that lie next to each other in the file in one call (reading through the gaps between nearby
    rows was up to 5x slower here with the page cache cold), up to _READ_THREADS calls in flight for a
    large take. A dataset stored with HDF5 filters (another tool's compressed copy) goes through
    h5py's indexing: the same values, slower. Thread-safe: featcache.stream reads the next block
    in a thread while the head trains on this one.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.meta = read_meta(self.path)  # CacheError for a partial, foreign or corrupt file
        self._file = h5py.File(self.path, "r")
        self._fd = os.open(self.path, os.O_RDONLY)
        self._pool = ThreadPoolExecutor(max_workers=_READ_THREADS, thread_name_prefix="featcache-read")  # idle till used
        try:
            self._datasets = {s: self._file[s]["features"] for s in self.meta["splits"]}
            self._labels = {s: self._file[s]["labels"][...].astype(np.int64) for s in self._datasets}
            done = {s: bool(self._file[s]["done"][...].all()) for s in self._datasets}
            self._chunks = {s: _chunk_offsets(ds) for s, ds in self._datasets.items()}
            for split, ds in self._datasets.items():  # the byte offsets must read what h5py reads
                ends = np.array(sorted({0, len(ds) - 1}), dtype=np.int64)
                if self._chunks[split] is not None and not np.array_equal(self._pread(split, ends), ds[ends]):
                    self._chunks[split] = None
        except Exception:
            self.close()
            raise self._unreadable() from None
        missing = [split for split, ok in done.items() if not ok]
        if missing:
            self.close()
            raise CacheError(f"{self.path} is missing rows of {missing[0]}; delete it and run featcache extract "
                             "again.")

    def _unreadable(self) -> CacheError:
        return CacheError(f"{self.path} cannot be read (corrupt or truncated); delete it and run featcache extract "
                          "again.")

    def __enter__(self) -> "FeatureReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._pool.shutdown()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._file.close()

    @property
    def feature_dim(self) -> int:
        return int(self.meta["feature_dim"])

    def rows(self, split: str) -> int:
        return int(self.meta["splits"][split])

    def labels(self, split: str) -> np.ndarray:
        """(N,) int64 labels of a split (small: read when the file was opened)."""
        return self._labels[split]

    def raw(self, split: str) -> bool:
        """Whether `split` is read with os.preadv (else through h5py)."""
        return self._chunks[split] is not None

    def read(self, split: str, start: int, stop: int) -> np.ndarray:
        """Rows start..stop-1 of a split's features (M, D) in the file's dtype."""
        if self._chunks[split] is not None or not 0 <= start <= stop <= self.rows(split):
            return self.take(split, np.arange(start, stop, dtype=np.int64))
        try:  # h5py reads a slice far faster than the same rows as a list
            return self._datasets[split][start:stop]
        except (OSError, ValueError):
            raise self._unreadable() from None

    def take(self, split: str, rows: np.ndarray) -> np.ndarray:
        """The features (len(rows), D) of the given rows, in that order, in the file's dtype."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.rows(split)):
            raise IndexError(f"rows outside 0..{self.rows(split) - 1} of {split}")
        try:
            if self._chunks[split] is not None:
                return self._pread(split, rows)
            if not rows.size:
                return np.empty((0, self.feature_dim), dtype=self._datasets[split].dtype)
            unique, inverse = np.unique(rows, return_inverse=True)  # h5py wants increasing, unique rows
            return self._datasets[split][unique][inverse]
        except CacheError:
            raise
        except (OSError, ValueError):
            raise self._unreadable() from None

    def _pread(self, split: str, rows: np.ndarray) -> np.ndarray:
        ds = self._datasets[split]
        chunk_rows, chunk_offsets = self._chunks[split]
        row_bytes = self.feature_dim * ds.dtype.itemsize
        out = np.empty((len(rows), self.feature_dim), dtype=ds.dtype)
        if not out.size:
            return out
        offsets = chunk_offsets[rows // chunk_rows] + (rows % chunk_rows) * row_bytes  # (M,) file positions
        order = np.argsort(offsets, kind="stable")  # rows by file position: forward through the file
        dest = memoryview(out).cast("B")

        def read(part: np.ndarray) -> None:  # rows `part` of `order`, each straight into its place in `out`
            buffers: list[memoryview] = []
            start = end = 0
            for at, i in zip(offsets[part].tolist(), part.tolist()):
                if buffers and (at != end or len(buffers) >= _MAX_BUFFERS):
                    self._preadv(buffers, start)
                    buffers = []
                if not buffers:
                    start = at
                buffers.append(dest[i * row_bytes:(i + 1) * row_bytes])
                end = at + row_bytes
            if buffers:
                self._preadv(buffers, start)

        threads = min(_READ_THREADS, len(order) // _ROWS_PER_THREAD)
        if threads < 2:
            read(order)
        else:  # several reads in flight: a disk answers them together (3x faster cold here with 8)
            list(self._pool.map(read, np.array_split(order, threads)))
        return out

    def _preadv(self, buffers: list[memoryview], start: int) -> None:
        want = sum(len(b) for b in buffers)
        if os.preadv(self._fd, buffers, start) != want:
            raise CacheError(f"{self.path} is truncated; delete it and run featcache extract again.")


def _chunk_offsets(ds: h5py.Dataset) -> tuple[int, np.ndarray] | None:
    """(rows per chunk, (chunks,) int64 file offset of each) of a dataset os.preadv can read, else None.

    None for anything but plain little-endian floats stored without filters and allocated in full.
    """
    if ds.dtype.kind != "f" or not ds.dtype.isnative or ds.ndim != 2 or not ds.shape[0]:
        return None
    if ds.chunks is None:
        offset = ds.id.get_offset()
        return None if offset is None else (ds.shape[0], np.array([offset], dtype=np.int64))
    if ds.chunks[1] != ds.shape[1] or ds.id.get_create_plist().get_nfilters():
        return None
    chunk_rows = ds.chunks[0]
    offsets = np.full(-(-ds.shape[0] // chunk_rows), -1, dtype=np.int64)
    for i in range(ds.id.get_num_chunks()):
        info = ds.id.get_chunk_info(i)
        if info.filter_mask or info.size != chunk_rows * ds.shape[1] * ds.dtype.itemsize:
            return None
        offsets[info.chunk_offset[0] // chunk_rows] = info.byte_offset
    return None if (offsets < 0).any() else (chunk_rows, offsets)


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
                bad_rows = non_finite_rows(features)
                if bad_rows:
                    problems.append(f"{split}: {bad_rows} of {n} rows hold NaN or inf features")
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
                           feature_dim=meta.get("feature_dim"), key=meta.get("key"),
                           dataset_root=meta.get("dataset_root"), dataset_fingerprint=meta.get("dataset_fingerprint"),
                           split_rule=meta.get("split_rule"))  # what extract.dataset_changed compares
                for split in f:
                    done = f[split]["done"][...]
                    row["splits"][split] = {"n": int(len(done)), "done": int(done.sum())}
                if "status" not in row:
                    row["status"] = "complete" if meta.get("complete") else "incomplete"
        except Exception:
            row["status"] = "corrupt"
        rows.append(row)
    return rows
