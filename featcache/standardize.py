"""The splits every head-train solver fits on: checked, in float32, and z-scored with the train split's mean
and std under --standardize. One rule shared by the trained head (in memory, streamed, grid), ridge and
the solvers to come (numpy only).

N = rows of a split, D = feature dim, C = classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np

from featcache.errors import UserError

_EPS = np.finfo(np.float64).eps  # the variances are float64 sums

Arrays = tuple[np.ndarray, np.ndarray]  # features (N, D), labels (N,)


def standardization(x_train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), std (D,)) float32 of train features (N, D), computed in float64.

    scikit-learn's StandardScaler rule: a feature whose train variance is indistinguishable from 0 given
    float64 rounding (`constant_features`) gets std 1, so it is only centred; every other feature, however
    small its scale (1e-10 is common for randomly initialised backbones), is divided by its own std.
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
    var = squares / rows  # (D,) float64
    std = np.where(constant_features(var, mean, rows), 1.0, np.sqrt(var)).astype(np.float32)
    std[~(std > 0)] = 1.0  # a std that only float32 cannot hold (below 1e-45) is a constant feature too
    return mean.astype(np.float32), std


def constant_features(var: np.ndarray, mean: np.ndarray, rows: int) -> np.ndarray:
    """(D,) bool: features whose float64 two-pass variance (D,) over `rows` rows is within its rounding error
    of 0 (scikit-learn's _is_constant_feature, after Chan, Golub and LeVeque): var <= n eps var + (n mean eps)^2.
    """
    return var <= rows * _EPS * var + (rows * mean * _EPS) ** 2


def check_labels(split: str, labels: np.ndarray, num_classes: int) -> None:
    """UserError for an empty split or labels outside 0..num_classes-1 (every head-train path checks this)."""
    if len(labels) == 0:
        raise UserError(f"The {split} split is empty; the head needs train, val and test rows.")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise UserError(f"The {split} labels fall outside the {num_classes} classes; the cache is inconsistent, "
                        "extract it again.")


@dataclass(frozen=True)
class HeadData:
    """The three splits checked and in float32, z-scored with the train mean/std when asked."""

    x_train: np.ndarray  # (N, D) float32
    y_train: np.ndarray  # (N,) int64
    x_val: np.ndarray  # (Nv, D)
    y_val: np.ndarray  # (Nv,)
    x_test: np.ndarray  # (Nt, D)
    y_test: np.ndarray  # (Nt,)
    mean: np.ndarray | None  # (D,) float32 when standardized, else None
    std: np.ndarray | None  # (D,)
    class_names: list[str]  # C names

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def as_features(x: np.ndarray) -> np.ndarray:
    """(N, D) float32, contiguous: float16 caches are fitted in float32."""
    return np.ascontiguousarray(x, dtype=np.float32)


def prepare_splits(train: Arrays, val: Arrays, test: Arrays, *, num_classes: int, standardize: bool,
                   class_names: Sequence[str] | None = None) -> HeadData:
    """Check the splits (user errors for empty splits and foreign labels), cast them and standardize them if asked.

    Args:
        train, val, test: (features (N, D) float32|float16, labels (N,) int in [0, num_classes)).
        num_classes: C.
        standardize: z-score every split with the train mean/std (`standardization`).
        class_names: C names; default "0", "1", ...
    """
    names = [str(i) for i in range(num_classes)] if class_names is None else [str(c) for c in class_names]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} classes")
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = [
        (as_features(x), np.asarray(y, dtype=np.int64)) for x, y in (train, val, test)]
    for split, (x, y) in zip(("train", "val", "test"), ((x_train, y_train), (x_val, y_val), (x_test, y_test))):
        check_labels(split, y, num_classes)
        if x.ndim != 2 or x.shape[0] != len(y) or x.shape[1] != x_train.shape[1]:
            raise ValueError(f"{split}: features {x.shape} do not match labels {y.shape} / train dim")

    mean = std = None
    if standardize:
        mean, std = standardization(x_train)
        x_train, x_val, x_test = [(x - mean) / std for x in (x_train, x_val, x_test)]
    return HeadData(x_train=x_train, y_train=y_train, x_val=x_val, y_val=y_val, x_test=x_test, y_test=y_test,
                    mean=mean, std=std, class_names=names)
