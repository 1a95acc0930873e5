"""Synthetic features and cache files for the sweep, ridge and shift tests (numpy + h5py only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from featcache.cache import CacheWriter, SplitRows


def gaussian_problem(num_classes: int, n=(70, 30, 30), dim=8, seed=0, shift=0.0):
    """(features (N, dim) float32, labels (N,)) per entry of n: Gaussian rows, class c adds 2 to feature c,
    every feature offset by `shift`."""
    rng = np.random.default_rng(seed)
    out = []
    for rows in n:
        y = rng.integers(0, num_classes, rows)
        x = rng.normal(size=(rows, dim)).astype(np.float32) + np.float32(shift)
        x[np.arange(rows), y] += 2.0
        out.append((x, y))
    return out


def write_cache(path: Path, splits: dict, class_names, *, model: str = "resnet18", dtype: str = "float32") -> Path:
    """A complete cache file holding the given (features, labels) per split, stored as `dtype`; paths
    <split>/<class>/imgNNN.png."""
    dim = next(iter(splits.values()))[0].shape[1]
    meta = {"key": "k" * 64, "model": model, "weights": "none", "weights_sha256": "", "transform": {"crop": 32},
            "class_names": list(class_names), "dataset_root": "/data", "dataset_name": "synthetic",
            "dataset_fingerprint": "f", "split_rule": {}, "versions": {}, "created": ""}
    rows = {s: SplitRows(labels=y, paths=[f"{s}/{class_names[c]}/img{i:03d}.png" for i, c in enumerate(y)])
            for s, (x, y) in splits.items()}
    writer = CacheWriter(Path(path), meta=meta, feature_dim=dim, dtype=dtype, splits=rows)
    for s, (x, _) in splits.items():
        writer.write(s, 0, x.astype(dtype))
    return writer.finish()
