"""Z-scoring of cached features with the train split's mean and std, the one rule that head-train
(--standardize, in memory or streamed) and the ridge solver share (numpy only)."""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

STD_FLOOR = 1e-6  # a constant feature is divided by this, not by 0


def standardization(x_train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), std (D,)) float32 of train features (N, D), computed in float64; std floored at STD_FLOOR.

    Every split is then transformed as (x - mean) / std, and head.npz stores both.
    """
    return blockwise_standardization(lambda: [x_train])


def blockwise_standardization(blocks: Callable[[], Iterable[np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """`standardization` of a split read in row blocks: each call of `blocks()` yields (M, D) pieces that
    together are the split once; it is called twice (the mean, then the squared deviations from it).

    numpy's own two-pass arithmetic (float64 sums, the float64 mean subtracted before squaring), so one
    block gives exactly x.mean / x.std; more blocks differ only in where the float64 sums are split.
    """
    total, rows = None, 0
    for x in blocks():
        part = x.sum(axis=0, dtype=np.float64)  # (D,)
        total, rows = (part if total is None else total + part), rows + len(x)
    if not rows:
        raise ValueError("no rows to standardize")
    mean = total / rows  # (D,) float64
    squares = None
    for x in blocks():
        part = ((x - mean) ** 2).sum(axis=0, dtype=np.float64)
        squares = part if squares is None else squares + part
    std = np.sqrt(squares / rows)
    return mean.astype(np.float32), np.maximum(std, STD_FLOOR).astype(np.float32)
