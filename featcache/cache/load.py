"""Reading a complete cache whole: its metadata, the features and labels of its splits, its image paths.

Each function opens the file once. A partial, corrupt, foreign or incomplete file is a CacheError
that says what to do; so is a split with rows never written or with NaN/inf features.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import h5py
import numpy as np

from featcache.cache.layout import (FORMAT_VERSION, PARTIAL_SUFFIX, decode_attrs, missing_rows_error,
                                    non_finite_error, non_finite_rows, unreadable_cache_error)
from featcache.cache.lock import missing_cache_error
from featcache.config import SPLITS
from featcache.errors import CacheError


def open_complete(path: str | Path) -> h5py.File:
    """The open h5py.File of a COMPLETE cache (the caller closes it); a partial, corrupt or foreign file is a
    CacheError."""
    path = Path(path)
    if path.name.endswith(PARTIAL_SUFFIX):
        raise CacheError(f"{path} is an unfinished cache; run the same featcache extract again to finish it.")
    if not path.is_file():
        raise missing_cache_error(path)
    try:
        f = h5py.File(path, "r")
    except Exception:
        raise unreadable_cache_error(path) from None
    if f.attrs.get("format_version") != FORMAT_VERSION or not f.attrs.get("complete", False):
        version = f.attrs.get("format_version")
        f.close()
        raise CacheError(f"{path} is not a complete featcache cache (format {version}); "
                         "delete it and run featcache extract again.")
    return f


@contextmanager
def open_cache(path: str | Path) -> Iterator[h5py.File]:
    """Open a COMPLETE cache for reading; a partial, corrupt or foreign file is a CacheError."""
    f = open_complete(path)
    try:
        yield f
    finally:
        f.close()


def meta_of(f: h5py.File, path: str | Path) -> dict:
    """The attributes of an open cache, JSON fields decoded, plus `splits` ({split: rows}) and `path`."""
    meta = decode_attrs(f.attrs)
    meta["splits"] = {s: int(f[s]["labels"].shape[0]) for s in f}
    meta["path"] = str(path)
    return meta


def read_meta(path: str | Path) -> dict:
    """The file attributes of a complete cache, JSON fields decoded, plus split sizes and `path`.

    `read_meta(path)["extraction"]` is the measurement of the run that finished it (images, seconds,
    images_per_s, device, batch_size, num_workers, processes), absent in caches written before it existed.
    """
    with open_cache(path) as f:
        return meta_of(f, path)


def load_features(path: str | Path, split: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """Features (N, D), labels (N,) int64 and the file's metadata for one split of a complete cache."""
    with open_cache(path) as f:
        meta = meta_of(f, path)
        features, labels = _read_split(f, path, split, meta)
    return features, labels, meta


def load_splits(path: str | Path, splits: Sequence[str] = SPLITS) -> tuple[dict, dict[str, tuple[np.ndarray,
                                                                                                  np.ndarray]]]:
    """The metadata and every split's (features (N, D), labels (N,) int64) of a complete cache, from ONE open.

    Checks each split exactly as load_features does, with the same messages.

    Args:
        path: the cache file.
        splits: the splits to load, in this order (all three by default).

    Returns:
        (meta, {split: (features, labels)}); meta as read_meta gives it.
    """
    with open_cache(path) as f:
        meta = meta_of(f, path)
        return meta, {split: _read_split(f, path, split, meta) for split in splits}


def _read_split(f: h5py.File, path: str | Path, split: str, meta: dict) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, D) float16|float32, labels (N,) int64) of one split of an open cache, checked."""
    if split not in meta["splits"]:
        raise CacheError(f"{path} has no split {split!r} (it has {', '.join(meta['splits'])}).")
    g = f[split]
    try:
        features = g["features"][...]  # (N, D) float16|float32
        labels = g["labels"][...].astype(np.int64)  # (N,)
        done = g["done"][...]
    except Exception:
        raise unreadable_cache_error(path) from None
    if not done.all():
        raise missing_rows_error(path, split)
    bad_rows = non_finite_rows(features)
    if bad_rows:
        raise non_finite_error(path, split, bad_rows, len(features))
    return features, labels


def load_paths(path: str | Path, split: str) -> list[str]:
    """The image paths (relative to the dataset root) of one split, in row order."""
    with open_cache(path) as f:
        return [p.decode() if isinstance(p, bytes) else p for p in f[split]["paths"][...]]
