"""Shards: under torchrun every process writes one small cache of its batches; one process merges them.

Several processes (featcache.extraction under featcache.distributed) write one shard each,
`<final>.shard-R-of-N-bB.partial`: the batches of the one-process batch grid that shard_batches
gives it, as a small cache file of its own (a CacheWriter over just those rows, so a shard is
crash-safe and resumable exactly as a one-process cache is). When every shard is complete, one
process copies them into the cache file through a CacheWriter (merge_shards): the rows, in the
order, of one process, so the result is the file one process writes.
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Callable, Mapping, Sequence

import h5py
import numpy as np

from featcache.cache.layout import (PARTIAL_SUFFIX, check_rows, decode_attrs, decode_path, partial_path,
                                    stored_checksums)
from featcache.cache.writer import COPY_ROWS, CacheWriter, SplitRows


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
            skipped = decode_attrs(f.attrs).get("skipped") or []
        return np.array(sorted(row_of[p] for s, p, _ in skipped if s == split), dtype=np.int64)

    def finish(self, *, skipped: Sequence[tuple[str, str, str]] = (), extraction: Mapping | None = None) -> Path:
        """Put the complete shard at `path` (a no-op for a shard completed by an earlier run)."""
        if self._writer is not None:
            self._writer.finish(skipped=skipped, extraction=extraction)
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
            out += [(s, p, reason) for s, p, reason in decode_attrs(f.attrs).get("skipped") or []]
    return sorted(out, key=lambda x: (order[x[0]], row_of[x[0]][x[1]]))


def merge_shards(final: Path, *, shards: Sequence[Path], meta: Mapping, feature_dim: int, dtype: str,
                 splits: Mapping[str, SplitRows], skipped: Sequence[tuple[str, str, str]],
                 extraction: Callable[[], Mapping] | None = None) -> Path:
    """Copy complete shards into the cache `final`, check every row came from exactly one, put it in place.

    The copy goes through a CacheWriter (the one-process layout, partial file and rename); the
    shards are deleted once the cache is in place. `skipped` is shards_skipped(shards, splits).
    `extraction`, called once every row is copied, gives the attribute `extraction` of the cache
    (CacheWriter.finish), so a measurement can include the copy.

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
                shard_skipped = decode_attrs(f.attrs).get("skipped") or []
                for split in splits:
                    g = f[split]
                    kept = np.array([row_of[split][decode_path(p)]
                                     for p in g["paths"][...]], dtype=np.int64)  # (M,) rows with features
                    failed = np.array(sorted(row_of[split][p] for s, p, _ in shard_skipped if s == split),
                                      dtype=np.int64)
                    rows = np.sort(np.concatenate([kept, failed]))  # the rows of the shard's batches
                    sums = stored_checksums(g)[0]  # (M,) uint32
                    covered[split][rows] += 1
                    for run in _runs(rows, COPY_ROWS):  # a batch, or a block of consecutive batches
                        a, b = int(run[0]), int(run[-1]) + 1
                        k0, k1 = np.searchsorted(kept, [a, b])
                        block = g["features"][int(k0):int(k1)]  # (M', D) checked against the shard's sums
                        check_rows(shard, split, block, np.arange(int(k0), int(k1)), sums)
                        writer.write(split, a, block,
                                     failed=failed[(failed >= a) & (failed < b)].tolist())
        for split, counts in covered.items():
            if not (counts == 1).all():
                raise RuntimeError(f"the shards of {final.name} cover {int((counts == 0).sum())} rows of {split} "
                                   f"never and {int((counts > 1).sum())} twice")
        path = writer.finish(skipped=skipped, extraction=extraction() if extraction else None)
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
