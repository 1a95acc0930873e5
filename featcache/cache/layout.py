"""The cache file's rules: format version, key, file names, attributes and the messages of a bad file.

Layout of one cache file (see README "The cache file"):

    / attrs: format_version, key, model, weights, weights_sha256, transform (json), feature_dim,
             class_names (json), dataset_root, dataset_name, dataset_fingerprint, split_rule (json),
             dtype, versions (json), created, complete, skipped (json), extraction (json),
             key_mode ("stat": the fingerprint covers size+mtime; "content": each file's sha256),
             precision ("fp32" | "bf16": the forward's arithmetic, part of the key)
    /<split>/features  (N, D) float16|float32, chunked by rows, allocated up front
    /<split>/labels    (N,) int64
    /<split>/paths     (N,) utf-8 strings, relative to the dataset root
    /<split>/done      (N,) bool: rows whose features are written (what resume trusts)
    /<split>/checksums (N,) uint32: crc32 of each row's feature bytes, written with the row (format 2)
    /<split>/labels attrs: crc32 of the labels' int64 little-endian bytes (format 2)

Every reader checks the checksums of what it reads before handing it on (`check_rows`,
`check_labels`); a mismatch is a CacheError naming the file, split and rows. Format 1 files
(before checksums) are read unchecked; `cache verify` says so.

`extraction` is the measurement of the run that finished the file (images, seconds, images_per_s,
device, batch_size, num_workers, processes); like `created` it describes the run, not the
features, so it is not part of the key.
"""

from __future__ import annotations

import hashlib
import json
import time
import zlib
from pathlib import Path
from typing import Mapping, Sequence

import h5py
import numpy as np

from featcache.errors import CacheError, UserError
from featcache.files import model_file_part

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # format 1: written before checksums, read unchecked
PARTIAL_SUFFIX = ".partial"
LOCK_SUFFIX = ".lock"
REQUIRED_ATTRS = (
    "format_version", "key", "model", "weights", "weights_sha256", "transform", "feature_dim",
    "class_names", "dataset_root", "dataset_name", "dataset_fingerprint", "split_rule", "dtype",
    "versions", "created", "complete",
)
JSON_ATTRS = ("transform", "class_names", "split_rule", "versions", "skipped", "extraction")


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
    precision: str = "fp32",
) -> str:
    """The sha256 over everything that changes the cached features (and nothing else).

    precision: the forward's arithmetic, resolved ("fp32" | "bf16", featcache.precision.resolve).
    """
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
        "precision": precision,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def cache_path(cache_dir: str | Path, *, dataset_name: str, model: str, weights: str, key: str) -> Path:
    """`<cache_dir>/<dataset>/<model>-<weights>-<key12>.h5`; `weights` is a short tag.

    A model that is a path (a backbone file) is named by its file name; `timm/<name>` becomes `timm-<name>`.
    """
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in weights)
    safe_model = model_file_part(model)
    return Path(cache_dir) / dataset_name / f"{safe_model}-{safe}-{key[:12]}.h5"


def partial_path(final: Path) -> Path:
    """`<final>.partial`: where the cache `final` is written until it is complete."""
    return final.with_name(final.name + PARTIAL_SUFFIX)


def compact_path(final: Path) -> Path:
    """`<final>.compact.partial`: the copy of a partial file without its unreadable rows, renamed into place."""
    return final.with_name(final.name + ".compact" + PARTIAL_SUFFIX)


def lock_path(final: Path) -> Path:
    """`<final>.lock`: the file whose flock a writer of `final` holds."""
    return final.with_name(final.name + LOCK_SUFFIX)


def failures_path(final: Path) -> Path:
    """`<cache stem>.failures.csv` beside the cache: the images extraction could not read (split, path, reason)."""
    return final.with_name(final.stem + ".failures.csv")


def symlink_error(path: Path) -> CacheError:
    """The error for a lock or partial file that is a symbolic link (never followed: it could point anywhere)."""
    return CacheError(f"{path} is a symbolic link; remove it and run the same command again.")


def refuse_symlink(path: Path) -> None:
    """Raise symlink_error if `path` is a symbolic link (dangling or not); h5py would write at its target."""
    if path.is_symlink():
        raise symlink_error(path)


def folder_error(folder: Path, exc: OSError) -> UserError:
    """The error for a cache folder featcache cannot write in (read-only, no permission)."""
    return UserError(f"cannot write in {folder} ({exc.strerror or exc.__class__.__name__}); choose a writable "
                     "--cache-dir or fix its permissions.")


def encode_paths(paths: Sequence[str]) -> list[bytes]:
    """Image paths as stored in /<split>/paths: UTF-8, a file name's undecodable bytes kept as they are on disk."""
    return [p.encode("utf-8", "surrogateescape") for p in paths]


def decode_path(stored: bytes | str) -> str:
    """A stored path back as the str os functions take (undecodable bytes as surrogates, like os.fsdecode)."""
    return stored.decode("utf-8", "surrogateescape") if isinstance(stored, bytes) else stored


def encode_attr(name: str, value):
    """The value stored for attribute `name` (JSON text for the JSON_ATTRS)."""
    return json.dumps(value) if name in JSON_ATTRS else value


def decode_attrs(attrs: h5py.AttributeManager) -> dict:
    """A file's attributes as Python values: text decoded, numpy scalars unwrapped, JSON_ATTRS parsed."""
    meta = {}
    for name, value in attrs.items():
        if isinstance(value, bytes):
            value = value.decode()
        if isinstance(value, np.generic):
            value = value.item()
        if name in JSON_ATTRS and isinstance(value, str):
            value = json.loads(value)
        meta[name] = value
    return meta


def timestamp() -> str:
    """Local time as the attribute `created` and the lock file store it."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# --------------------------------------------------------------------------- what a bad file is told


CACHE_SUFFIXES = (".h5", ".hdf5", ".h5.partial")  # a file named so and unreadable is a damaged cache
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"  # at offset 0, or 512, 1024, ... after a user block


def is_hdf5(path: str | Path) -> bool:
    """True when the file carries the HDF5 signature (at 0 or at a power-of-two offset from 512), i.e. it is an
    HDF5 file, whole or damaged; False for any other file (a PNG, a JSON, ...) or one that cannot be read."""
    try:
        with open(path, "rb") as f:
            offset = 0
            while True:
                f.seek(offset)
                head = f.read(len(HDF5_SIGNATURE))
                if head == HDF5_SIGNATURE:
                    return True
                if len(head) < len(HDF5_SIGNATURE):
                    return False
                offset = 512 if offset == 0 else offset * 2
    except OSError:
        return False


def not_a_cache_error(path: str | Path) -> UserError:
    """The error for a file that is not a featcache cache at all (another file given as --cache): bad input,
    exit 2; nothing to delete."""
    return UserError(f"{path} is not a featcache cache file (not an HDF5 file written by featcache extract); pass a "
                     ".h5 file from the cache folder (featcache cache ls lists them) or use --model and --data.")


def unreadable_cache_error(path: str | Path) -> UserError:
    """The error for a file that cannot be read as a cache: a file that is neither named like a cache (.h5) nor
    HDF5 at all, e.g. a PNG or JSON given as --cache (not_a_cache_error, exit 2), or else a cache file that is
    corrupt or truncated (a CacheError, exit 3: delete it and extract again)."""
    path = Path(path)
    if path.is_file() and not path.name.endswith(CACHE_SUFFIXES) and not is_hdf5(path):
        return not_a_cache_error(path)
    return CacheError(f"{path} is not a readable cache (corrupt or truncated); delete it and run featcache extract "
                      "again.")


def missing_rows_error(path: str | Path, split: str) -> CacheError:
    """The error for a cache file with rows of `split` never written."""
    return CacheError(f"{path} is missing rows of {split}; delete it and run featcache extract again.")


def non_finite_error(path: str | Path, split: str, bad_rows: int, rows: int) -> CacheError:
    """The error for a split with `bad_rows` of its `rows` holding NaN or inf features."""
    return CacheError(f"{path}: {bad_rows} of {rows} rows of {split} hold NaN or inf features; "
                      "delete it and run featcache extract again.")


def non_finite_rows(features: np.ndarray) -> int:
    """Rows of a (N, D) array with a NaN or inf."""
    return int((~np.isfinite(features)).any(axis=1).sum()) if features.size else 0


# --------------------------------------------------------------------------- checksums (format 2)


def row_checksums(features: np.ndarray) -> np.ndarray:
    """(N,) uint32: the crc32 of each row's bytes of a (N, D) float16|float32 array."""
    rows = np.ascontiguousarray(features)
    return np.fromiter((zlib.crc32(row) for row in rows), dtype=np.uint32, count=len(rows))


def labels_checksum(labels: np.ndarray) -> int:
    """The crc32 of (N,) labels as int64 little-endian bytes."""
    return zlib.crc32(np.ascontiguousarray(labels, dtype="<i8"))


def damaged_error(path: str | Path, split: str, what: str) -> CacheError:
    """The error for a cache whose stored bytes differ from what was written (`what`: e.g. "features rows 3-9")."""
    return CacheError(f"{path} is damaged (checksum mismatch in {split}/{what}); delete it and run featcache "
                      "extract again.")


def check_rows(path: str | Path, split: str, features: np.ndarray, rows: np.ndarray,
               checksums: np.ndarray | None) -> None:
    """Raise damaged_error unless every row of `features` (M, D) matches its stored checksum.

    `rows` (M,) are the row numbers of `features`; `checksums` (N,) uint32 the split's stored ones
    (None for a format 1 file: nothing to check). Rows with NaN or inf are not reported here: every
    reader refuses them with non_finite_error.
    """
    if checksums is None or not len(features):
        return
    # a row holding NaN or inf is left to the non-finite check every reader makes (its own message, counts whole
    # splits); any other difference is damage
    rows = np.asarray(rows)
    bad = np.flatnonzero(row_checksums(features) != checksums[rows])
    bad = rows[bad[np.isfinite(features[bad]).all(axis=1)]] if bad.size else bad
    if bad.size:
        raise damaged_error(path, split, f"features rows {int(bad.min())}-{int(bad.max())}")


def check_labels(path: str | Path, split: str, labels: np.ndarray, stored: int | None) -> None:
    """Raise damaged_error unless (N,) `labels` match their stored checksum (None: a format 1 file)."""
    if stored is not None and labels_checksum(labels) != int(stored):
        raise damaged_error(path, split, "labels")


def stored_checksums(group: h5py.Group) -> tuple[np.ndarray | None, int | None]:
    """A split group's ((N,) uint32 row checksums, labels checksum); (None, None) in a format 1 file."""
    if "checksums" not in group:
        return None, None
    return group["checksums"][...], group["labels"].attrs.get("crc32")
