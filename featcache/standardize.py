"""Z-scoring of cached features with the train split's mean and std, the one rule that head-train
(--standardize) and the ridge solver share (numpy only)."""

from __future__ import annotations

import numpy as np

STD_FLOOR = 1e-6  # a constant feature is divided by this, not by 0


def standardization(x_train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), std (D,)) float32 of train features (N, D), computed in float64; std floored at STD_FLOOR.

    Every split is then transformed as (x - mean) / std, and head.npz stores both.
    """
    mean = x_train.mean(axis=0, dtype=np.float64).astype(np.float32)
    std = np.maximum(x_train.std(axis=0, dtype=np.float64), STD_FLOOR).astype(np.float32)
    return mean, std
