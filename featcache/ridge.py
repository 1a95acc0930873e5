"""Closed-form ridge-regression heads on one-hot targets: every L2 strength from ONE eigendecomposition (numpy).

The approach of big_vision's few-shot evaluator: a fast, deterministic reference beside the
optax heads. N = train rows, D = feature dim, C = classes, L = L2 strengths.

With centred features Xc = X - x̄ (N, D) and centred one-hot targets Yc = Y - ȳ (N, C), the head
for strength λ minimises ||X W + 1 b' - Y||² + λ ||W||² (the bias is not penalised):

    W(λ) = (Xc'Xc + λ I)^-1 Xc'Yc = Xc' (Xc Xc' + λ I)^-1 Yc,    b(λ) = ȳ - x̄ W(λ)

The smaller Gram matrix (Xc'Xc, D x D, when D <= N, else Xc Xc', N x N) is eigendecomposed once
(Q Λ Q'), after which each λ costs a diagonal scaling: W(λ) = Q (Λ + λ)^-1 Q' Xc'Yc, or
Xc' Q (Λ + λ)^-1 Q' Yc. Everything runs in float64.

Selection: the λ with the best val accuracy; ties to the lower val mean squared error (against the
one-hot targets), then to the larger λ. Test data never takes part. Predictions: argmax of the C
scores. head.npz keeps featcache's logit layout (K = plan.num_outputs_for(C) logits): with one logit,
s1 - s0 (class 1 iff it is > 0), else the C scores. Loss columns are left empty (the scores are not logits of a
likelihood, so a cross-entropy of them would mean nothing); accuracies, balanced accuracy,
per-class scores and ROC-AUC (of s1 - s0) are those of featcache.metrics.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from featcache import metrics
from featcache.errors import UserError
from featcache.metrics import EpochRecord, RunSummary
from featcache.plan import num_outputs_for
from featcache.runs import HeadWeights
from featcache.standardize import Arrays, prepare_splits

DEFAULT_L2S = tuple(2.0 ** k for k in range(-10, 21))  # 2^-10 ... 2^20


@dataclass(frozen=True)
class RidgePath:
    """Ridge heads for every λ of a grid: weights (L, D, C) float64, biases (L, C)."""

    l2s: np.ndarray  # (L,)
    weights: np.ndarray  # (L, D, C)
    biases: np.ndarray  # (L, C)

    def scores(self, x: np.ndarray) -> np.ndarray:
        """(L, M, C) scores of rows x (M, D) under every λ."""
        x = np.asarray(x, dtype=np.float64)
        return np.einsum("md,ldc->lmc", x, self.weights) + self.biases[:, None, :]


def ridge_path(x: np.ndarray, targets: np.ndarray, l2s: Sequence[float]) -> RidgePath:
    """Ridge regression of targets (N, C) on features (N, D) for every λ in l2s, bias unpenalised.

    One eigendecomposition of the smaller Gram matrix serves every λ (see the module docstring).
    """
    l2 = np.asarray(l2s, dtype=np.float64)  # (L,)
    if l2.ndim != 1 or len(l2) == 0 or not (l2 > 0).all() or not np.isfinite(l2).all():
        raise UserError("Ridge L2 strengths must be positive finite numbers; give e.g. --l2 0.1,1,10.")
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(targets, dtype=np.float64)
    x_mean, y_mean = x.mean(axis=0), y.mean(axis=0)  # (D,), (C,)
    xc, yc = x - x_mean, y - y_mean
    n, d = xc.shape
    if d <= n:
        evals, q = np.linalg.eigh(xc.T @ xc)  # (D,), (D, D)
        rhs = q.T @ (xc.T @ yc)  # (D, C)
        scaled = rhs[None] / (np.maximum(evals, 0.0)[None, :, None] + l2[:, None, None])  # (L, D, C)
        weights = np.einsum("de,lec->ldc", q, scaled)
    else:
        evals, q = np.linalg.eigh(xc @ xc.T)  # (N,), (N, N)
        rhs = q.T @ yc  # (N, C)
        scaled = rhs[None] / (np.maximum(evals, 0.0)[None, :, None] + l2[:, None, None])  # (L, N, C)
        weights = np.einsum("nd,nm,lmc->ldc", xc, q, scaled, optimize=True)
    biases = y_mean[None] - np.einsum("d,ldc->lc", x_mean, weights)
    return RidgePath(l2s=l2, weights=weights, biases=biases)


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(N, C) float64 one-hot targets."""
    return np.eye(num_classes)[np.asarray(labels, dtype=np.int64)]


@dataclass(frozen=True)
class RidgeFit:
    """The ridge path scored on every split and the λ selected on val."""

    l2s: np.ndarray  # (L,)
    train_acc: np.ndarray  # (L,)
    val_acc: np.ndarray  # (L,)
    val_mse: np.ndarray  # (L,) mean over rows of the squared error summed over the C targets
    test_acc: np.ndarray  # (L,) reported only; never used to select
    selected: int  # index into l2s
    weight: np.ndarray  # (K, D) float32 of the selected λ, nn.Linear layout (K = plan.num_outputs_for(C))
    bias: np.ndarray  # (K,)
    mean: np.ndarray | None  # (D,) with standardize, else None
    std: np.ndarray | None
    summary: RunSummary
    history: list[EpochRecord]  # one record: the selected λ (lr, losses nan)
    seconds: float

    @property
    def l2(self) -> float:
        return float(self.l2s[self.selected])

    @property
    def head_weights(self) -> HeadWeights:
        """The selected λ's head, as head.npz stores it."""
        return HeadWeights(weight=self.weight, bias=self.bias, mean=self.mean, std=self.std)

    def to_dict(self) -> dict:
        """The path as metrics.json stores it under extra["ridge"]."""
        return {"l2s": self.l2s.tolist(), "selected_l2": self.l2,
                "rule": "best val acc; ties: lower val MSE, then larger l2",
                "train_acc": self.train_acc.tolist(), "val_acc": self.val_acc.tolist(),
                "val_mse": self.val_mse.tolist(), "test_acc": self.test_acc.tolist()}


def fit_ridge(train: Arrays, val: Arrays, test: Arrays, *, num_classes: int, l2s: Sequence[float] = DEFAULT_L2S,
              standardize: bool = False, class_names: Sequence[str] | None = None) -> RidgeFit:
    """Fit ridge heads for every λ, select λ on val accuracy, score test with it.

    Args:
        train, val, test: (features (N, D), labels (N,) int in [0, num_classes)).
        num_classes: C >= 2.
        l2s: the L2 strengths λ (> 0).
        standardize: z-score features with the train mean/std first (featcache.standardize).
        class_names: C names for the summary.

    Returns:
        RidgeFit (summary.training_time = seconds of the solve and scoring).
    """
    num_outputs = num_outputs_for(num_classes)
    t0 = time.perf_counter()
    data = prepare_splits(train, val, test, num_classes=num_classes, standardize=standardize, class_names=class_names)
    x_train, x_val, x_test = data.x_train, data.x_val, data.x_test  # (N, D) float32, z-scored under standardize
    y_train, y_val, y_test = data.y_train, data.y_val, data.y_test
    path = ridge_path(x_train, one_hot(y_train, num_classes), l2s)
    s_train, s_val, s_test = (path.scores(x) for x in (x_train, x_val, x_test))  # (L, M, C) each
    train_acc, val_acc, test_acc = ((s.argmax(axis=2) == y[None]).mean(axis=1)
                                    for s, y in ((s_train, y_train), (s_val, y_val), (s_test, y_test)))
    val_mse = ((s_val - one_hot(y_val, num_classes)[None]) ** 2).sum(axis=2).mean(axis=1)
    selected = min(range(len(path.l2s)), key=lambda i: (-val_acc[i], val_mse[i], -path.l2s[i]))

    w, b = path.weights[selected], path.biases[selected]  # (D, C), (C,)
    if num_outputs == 1:  # one logit s1 - s0, featcache's binary layout
        weight, bias = (w[:, 1] - w[:, 0])[None], np.array([b[1] - b[0]])
    else:
        weight, bias = w.T, b
    weight, bias = weight.astype(np.float32), bias.astype(np.float32)
    seconds = time.perf_counter() - t0
    nan = float("nan")
    history = [EpochRecord(epoch=1, lr=nan, train_loss=nan, train_acc=float(train_acc[selected]), val_loss=nan,
                           val_acc=float(val_acc[selected]), seconds=seconds)]
    test_logits = x_test.astype(np.float64) @ weight.T.astype(np.float64) + bias
    summary = metrics.summarize(history, 0, test_logits=test_logits, test_labels=y_test, class_names=data.class_names,
                                train_seconds=seconds, diverged=False)
    summary = dataclasses.replace(summary, test_loss=nan)
    return RidgeFit(l2s=path.l2s, train_acc=train_acc, val_acc=val_acc, val_mse=val_mse, test_acc=test_acc,
                    selected=selected, weight=weight, bias=bias, mean=data.mean, std=data.std, summary=summary,
                    history=history, seconds=seconds)


def l2_is_on_edge(fit: RidgeFit) -> bool:
    """True when the selected λ is the smallest or largest of the grid (widen the grid)."""
    return metrics.on_grid_edge(fit.selected, len(fit.l2s))
