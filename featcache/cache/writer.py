"""Writing one cache file: allocated in full up front, committed per batch, renamed into place when complete.

A cache is written to `<final>.partial` and renamed into place only when every row is done, so
a reader never sees a partial file under a final name. Datasets are allocated in full when the
partial file is created and never change shape afterwards: a write only touches raw data, which
is what lets a file survive SIGKILL at any moment and be resumed.

An image that cannot be decoded is never stored: the partial file has one more dataset,
`/<split>/failed` (N,) bool, set (before `done`) for such rows. At `finish()` a file without
failed rows is renamed as it is (`failed` deleted first); otherwise it is copied without them
into `<final>.compact.partial`, which is renamed into place. The attribute `skipped` (json) lists
(split, path, reason) of the rows left out.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import h5py
import numpy as np

from featcache.cache.layout import (FORMAT_VERSION, compact_path, encode_attr, encode_paths, labels_checksum,
                                    partial_path, refuse_symlink, row_checksums, timestamp)
from featcache.errors import NoSpaceError, out_of_space
from featcache.files import fsync_dir

ROWS_PER_CHUNK = 256  # HDF5 chunk height; writes are committed per batch
COPY_ROWS = 8192  # rows per block when a file is copied (without its failed rows, or from shards)


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
        refuse_symlink(self.partial)  # h5py follows links: a planted one would be written at its target
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
            f.attrs[name] = encode_attr(name, value)
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["feature_dim"] = feature_dim
        f.attrs["dtype"] = dtype
        f.attrs["complete"] = False
        for split, rows in splits.items():
            n = len(rows.labels)
            g = f.create_group(split)
            _create_allocated(g, "features", (n, feature_dim), np.dtype(dtype),
                              chunk_rows=min(ROWS_PER_CHUNK, max(n, 1)))
            labels = g.create_dataset("labels", data=np.asarray(rows.labels, dtype=np.int64))
            labels.attrs["crc32"] = labels_checksum(labels[...])
            g.create_dataset("paths", data=encode_paths(rows.paths), dtype=h5py.string_dtype("utf-8"))
            _create_allocated(g, "checksums", (n,), np.dtype(np.uint32), chunk_rows=None)
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
        crc = np.zeros(stop - start, dtype=np.uint32)
        crc[~bad] = row_checksums(features)  # (B,) written with the rows, before `done`
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
            if "checksums" in g:
                g["checksums"][start:stop] = crc
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

    def finish(self, *, skipped: Sequence[tuple[str, str, str]] = (), extraction: Mapping | None = None) -> Path:
        """Check every row is done, mark complete, and put the file in place without its failed rows.

        Args:
            skipped: (split, path, reason) of every failed row, stored in the attribute `skipped`.
            extraction: the measurement of the run that computed the rows (images, seconds, ...), stored as the
                JSON attribute `extraction`; it describes the run, so it is no part of the key.
        """
        n_failed = 0
        for split in self._file:
            if not self._file[split]["done"][...].all():
                raise RuntimeError(f"finish() with rows of {split} not written")
            n_failed += len(self.failed_rows(split))
        if n_failed != len(skipped):
            raise RuntimeError(f"finish() with {n_failed} failed rows but {len(skipped)} reasons")
        closing = {"skipped": [list(row) for row in skipped], "created": timestamp()}
        if extraction is not None:
            closing["extraction"] = dict(extraction)
        if n_failed:
            compact = self._copy_without_failed(closing)
            self._file.close()
            os.replace(compact, self.final)
            self.partial.unlink()
        else:
            for split in self._file:
                if "failed" in self._file[split]:
                    del self._file[split]["failed"]
            _set_attrs(self._file, closing)
            self._file.attrs["complete"] = True
            self._file.close()
            os.replace(self.partial, self.final)
        fsync_dir(self.final.parent)
        return self.final

    def _copy_without_failed(self, closing: Mapping) -> Path:
        """Write `<final>.compact.partial`: the partial file's attributes, then `closing`'s, and its readable rows."""
        src = self._file
        out = compact_path(self.final)
        refuse_symlink(out)
        try:
            with h5py.File(out, "w", track_order=True, locking=False) as dst:
                for name, value in src.attrs.items():
                    dst.attrs[name] = value
                _set_attrs(dst, closing)
                for split in src:
                    g = src[split]
                    keep = np.flatnonzero(~g["failed"][...])  # (N',)
                    n, dim = len(keep), g["features"].shape[1]
                    h = dst.create_group(split)
                    _create_allocated(h, "features", (n, dim), g["features"].dtype,
                                      chunk_rows=min(ROWS_PER_CHUNK, max(n, 1)))
                    for a in range(0, n, COPY_ROWS):
                        rows = keep[a:a + COPY_ROWS]
                        block = g["features"][int(rows[0]):int(rows[-1]) + 1]  # contiguous read, then select
                        h["features"][a:a + len(rows)] = block[rows - rows[0]]
                    labels = h.create_dataset("labels", data=g["labels"][...][keep])
                    labels.attrs["crc32"] = labels_checksum(labels[...])
                    h.create_dataset("checksums", data=g["checksums"][...][keep])
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


def _set_attrs(f: h5py.File, attrs: Mapping) -> None:
    for name, value in attrs.items():
        f.attrs[name] = encode_attr(name, value)


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
