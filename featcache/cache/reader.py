"""Reading a complete cache in pieces, never all at once (head-train --stream): FeatureReader."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np

from featcache.cache.layout import check_labels, check_rows, missing_rows_error, stored_checksums, unreadable_cache_error
from featcache.cache.load import meta_of, open_complete
from featcache.errors import CacheError


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
    h5py's indexing: the same values, slower. Every row read is checked against its stored crc32
    before it is returned (a format 2 file; a mismatch is a CacheError naming the rows), the labels
    when the file is opened. Thread-safe: featcache.stream reads the next block in a thread while
    the head trains on this one.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file = open_complete(self.path)  # CacheError for a partial, foreign or corrupt file
        try:
            self.meta = meta_of(self._file, self.path)
        except BaseException:
            self._file.close()
            raise
        self._fd = os.open(self.path, os.O_RDONLY)
        self._pool = ThreadPoolExecutor(max_workers=_READ_THREADS, thread_name_prefix="featcache-read")  # idle till used
        try:
            self._datasets = {s: self._file[s]["features"] for s in self.meta["splits"]}
            self._labels = {s: self._file[s]["labels"][...].astype(np.int64) for s in self._datasets}
            stored = {s: stored_checksums(self._file[s]) for s in self._datasets}
            self._sums = {s: sums for s, (sums, _) in stored.items()}  # (N,) uint32 each, or None (format 1)
            done = {s: bool(self._file[s]["done"][...].all()) for s in self._datasets}
            self._chunks = {s: _chunk_offsets(ds) for s, ds in self._datasets.items()}
            for split, ds in self._datasets.items():  # the byte offsets must read what h5py reads
                ends = np.array(sorted({0, len(ds) - 1}), dtype=np.int64)
                if self._chunks[split] is not None and not np.array_equal(self._pread(split, ends), ds[ends]):
                    self._chunks[split] = None
        except Exception:
            self.close()
            raise unreadable_cache_error(self.path) from None
        missing = [split for split, ok in done.items() if not ok]
        if missing:
            self.close()
            raise missing_rows_error(self.path, missing[0])
        try:
            for split, (_, labels_sum) in stored.items():
                check_labels(self.path, split, self._labels[split], labels_sum)
        except CacheError:
            self.close()
            raise

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
            out = self._datasets[split][start:stop]
        except (OSError, ValueError):
            raise unreadable_cache_error(self.path) from None
        check_rows(self.path, split, out, np.arange(start, stop), self._sums[split])
        return out

    def take(self, split: str, rows: np.ndarray) -> np.ndarray:
        """The features (len(rows), D) of the given rows, in that order, in the file's dtype."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.rows(split)):
            raise IndexError(f"rows outside 0..{self.rows(split) - 1} of {split}")
        try:
            if self._chunks[split] is not None:
                out = self._pread(split, rows)
            elif not rows.size:
                return np.empty((0, self.feature_dim), dtype=self._datasets[split].dtype)
            else:
                unique, inverse = np.unique(rows, return_inverse=True)  # h5py wants increasing, unique rows
                out = self._datasets[split][unique][inverse]
            check_rows(self.path, split, out, rows, self._sums[split])  # before anything trains on it
            return out
        except CacheError:
            raise
        except (OSError, ValueError):
            raise unreadable_cache_error(self.path) from None

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
            raise unreadable_cache_error(self.path)


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
