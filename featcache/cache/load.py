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

from featcache.cache.layout import (PARTIAL_SUFFIX, not_a_cache_error, READABLE_VERSIONS, check_labels, check_rows, decode_attrs,
                                    decode_path, missing_rows_error, non_finite_error, non_finite_rows, stored_checksums,
                                    unreadable_cache_error)
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
    try:
        if "format_version" not in f.attrs and "key" not in f.attrs:  # an HDF5 file of some other program
            raise not_a_cache_error(path)
        if f.attrs.get("format_version") not in READABLE_VERSIONS or not f.attrs.get("complete", False):
            raise CacheError(f"{path} is not a complete featcache cache (format {f.attrs.get('format_version')}); "
                             "delete it and run featcache extract again.")
        _check_layout(f, path)
    except BaseException:
        f.close()
        raise
    return f


def _check_layout(f: h5py.File, path: str | Path) -> None:
    """CacheError (one sentence) unless the attributes decode and every split has (N, D) features, (N,) labels
    and (N,) done."""
    try:
        meta = decode_attrs(f.attrs)
    except Exception as exc:  # noqa: BLE001 - a damaged attribute, whatever h5py or json says
        raise CacheError(f"{path} has damaged attributes ({exc.__class__.__name__}); delete it and run "
                         "featcache extract again.") from None
    dim = meta.get("feature_dim")
    for split in f:
        g = f[split]
        shapes = {d: g[d].shape if isinstance(g, h5py.Group) and isinstance(g.get(d), h5py.Dataset) else None
                  for d in ("features", "labels", "done")}
        n = shapes["labels"][0] if shapes["labels"] and len(shapes["labels"]) == 1 else None
        if n is None or shapes["features"] != (n, dim) or shapes["done"] != (n,):
            raise CacheError(f"{path} has a damaged split {split} (features {shapes['features']}, labels "
                             f"{shapes['labels']}, done {shapes['done']}, D={dim}); delete it and run featcache "
                             "extract again.")


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
        sums, labels_sum = stored_checksums(g)
    except Exception:
        raise unreadable_cache_error(path) from None
    if not done.all():
        raise missing_rows_error(path, split)
    bad_rows = non_finite_rows(features)
    if bad_rows:
        raise non_finite_error(path, split, bad_rows, len(features))
    check_labels(path, split, labels, labels_sum)
    check_rows(path, split, features, np.arange(len(features)), sums)
    return features, labels


def load_paths(path: str | Path, split: str) -> list[str]:
    """The image paths (relative to the dataset root) of one split, in row order."""
    with open_cache(path) as f:
        return [decode_path(p) for p in f[split]["paths"][...]]
