"""What `featcache cache verify` and `featcache cache ls` show: every problem of one file, a row per file."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from featcache.cache.layout import (LOCK_SUFFIX, PARTIAL_SUFFIX, REQUIRED_ATTRS, check_labels, check_rows, decode_attrs,
                                    non_finite_rows, stored_checksums)
from featcache.cache.load import open_cache
from featcache.errors import CacheError


def verify_cache(path: str | Path) -> list[str]:
    """Every problem found in one cache file (empty list: the file is sound)."""
    path = Path(path)
    try:
        with open_cache(path) as f:
            problems = [f"attribute {a!r} missing" for a in REQUIRED_ATTRS if a not in f.attrs]
            meta = decode_attrs(f.attrs)
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
                problems += _checksum_problems(path, split, g, features, labels)
                if n and (labels.min() < 0 or labels.max() >= n_classes):
                    problems.append(f"{split}: labels outside 0..{n_classes - 1}")
                bad_rows = non_finite_rows(features)
                if bad_rows:
                    problems.append(f"{split}: {bad_rows} of {n} rows hold NaN or inf features")
    except CacheError as exc:
        return [str(exc)]
    return problems


def _checksum_problems(path: Path, split: str, g: h5py.Group, features, labels) -> list[str]:
    """The checksum mismatches of one split (features (N, D), labels (N,)), or that it carries none (format 1)."""
    sums, labels_sum = stored_checksums(g)
    if sums is None:
        return [f"{split}: carries no checksums (format 1, written before featcache stored them), so damaged "
                "values cannot be detected; run featcache extract again to get a checked cache"]
    problems = []
    for check in (lambda: check_labels(path, split, labels, labels_sum),
                  lambda: check_rows(path, split, features, np.arange(len(features)), sums)):
        try:
            check()
        except CacheError as exc:
            problems.append(str(exc))
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
                meta = decode_attrs(f.attrs)
                row.update(model=meta.get("model"), weights=meta.get("weights"), dtype=meta.get("dtype"),
                           transform=meta.get("transform"),  # resize, crop, interpolation, mean, std
                           feature_dim=meta.get("feature_dim"), key=meta.get("key"),
                           dataset_root=meta.get("dataset_root"), dataset_fingerprint=meta.get("dataset_fingerprint"),
                           split_rule=meta.get("split_rule"),  # what extract.dataset_changed compares
                           key_mode=meta.get("key_mode", "stat"))  # stat: size+mtime; content: file bytes
                for split in f:
                    done = f[split]["done"][...]
                    row["splits"][split] = {"n": int(len(done)), "done": int(done.sum())}
                if "status" not in row:
                    row["status"] = "complete" if meta.get("complete") else "incomplete"
        except Exception:
            row["status"] = "corrupt"
        rows.append(row)
    return rows
