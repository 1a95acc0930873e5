"""The HDF5 feature cache: layout, key, atomic and resumable writes, lock, read (h5py + numpy only).

One module per job; import the names from here (`from featcache.cache import load_features`):

* layout    the file's rules: format version, key, file names, attributes, the errors of a bad file
* lock      the writer lock (flock) and who holds it
* writer    CacheWriter: a partial file allocated up front, committed per batch, renamed when complete
* shards    one shard file per torchrun process and their merge into the one cache file
* load      reading a complete cache whole (metadata, splits, paths), one open per call
* reader    FeatureReader: a complete cache read in pieces (head-train --stream)
* inventory `cache verify` and `cache ls`

The file format and its write protocol are described in layout.py and writer.py.
"""

from featcache.cache.inventory import list_caches, verify_cache
from featcache.cache.layout import (FORMAT_VERSION, LOCK_SUFFIX, PARTIAL_SUFFIX, REQUIRED_ATTRS, cache_key,
                                    cache_path, compact_path, failures_path, lock_path, missing_rows_error, non_finite_error,
                                    non_finite_rows, partial_path, unreadable_cache_error)
from featcache.cache.load import load_features, load_paths, load_splits, open_cache, read_meta
from featcache.cache.lock import LOCK_GRACE_S, lock_holder, missing_cache_error, write_lock
from featcache.cache.reader import FeatureReader
from featcache.cache.shards import ShardWriter, merge_shards, shard_batches, shard_files, shard_path, shards_skipped
from featcache.cache.writer import CacheWriter, SplitRows
from featcache.config import SPLITS
from featcache.errors import CacheError, LockedError, NoSpaceError

__all__ = [
    "SPLITS", "FORMAT_VERSION", "PARTIAL_SUFFIX", "LOCK_SUFFIX", "REQUIRED_ATTRS", "LOCK_GRACE_S",
    "CacheError", "LockedError", "NoSpaceError",
    # layout
    "cache_key", "cache_path", "compact_path", "partial_path", "lock_path", "failures_path",
    "unreadable_cache_error", "missing_rows_error", "non_finite_error", "non_finite_rows",
    # lock
    "write_lock", "lock_holder", "missing_cache_error",
    # writer, shards
    "SplitRows", "CacheWriter", "ShardWriter", "shard_batches", "shard_path", "shard_files", "shards_skipped",
    "merge_shards",
    # load, reader, inventory
    "open_cache", "read_meta", "load_features", "load_splits", "load_paths", "FeatureReader",
    "verify_cache", "list_caches",
]
