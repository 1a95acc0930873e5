"""Every metric both modes report, defined once (numpy, float64 math).

N = rows, C = classes, K = logits per row (1 for two classes, C otherwise). Logits come in as
(N, K) (or (N,) for two classes); class 1 is the positive class of a binary task.

Definitions (README "Metrics" states the same):
* train loss/acc of an epoch: mean over that epoch's mini-batches weighted by batch size, from
  the logits of each forward pass during training (what a PyTorch loop logs with
  `running_loss += loss.item() * batch_size; running_loss / N`).
* val loss/acc of an epoch: one pass over the val split with the parameters at the end of the epoch.
* selected epoch: best val accuracy; ties go to the lower val loss, then to the earlier epoch.
* summary: train loss/acc of the LAST epoch (as the original study's tables report them);
  best val loss/acc = val loss/acc of the selected epoch; test metrics from the selected
  epoch's parameters; training time = seconds spent training (the caller says what it covers).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Sequence

import numpy as np


def as_logits(logits: np.ndarray, num_classes: int) -> np.ndarray:
    """(N, K) float64 view of logits; (N,) is accepted for two classes."""
    x = np.asarray(logits, dtype=np.float64)
    k = 1 if num_classes == 2 else num_classes
    if x.ndim == 1 and k == 1:
        x = x[:, None]
    if x.ndim != 2 or x.shape[1] != k:
        raise ValueError(f"expected logits of shape (N, {k}) for {num_classes} classes, got {x.shape}")
    return x


def loss_from_logits(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """Mean loss: BCE-with-logits on one logit for two classes, softmax cross-entropy otherwise."""
    x = as_logits(logits, num_classes)
    y = np.asarray(labels, dtype=np.int64)
    if x.shape[0] == 0:
        return float("nan")
    if num_classes == 2:
        z = x[:, 0]
        # max(z, 0) - z*y + log(1 + exp(-|z|)): torch's BCEWithLogitsLoss, stable for any |z|
        per_row = np.maximum(z, 0.0) - z * y + np.log1p(np.exp(-np.abs(z)))
    else:
        m = x.max(axis=1, keepdims=True)
        log_sum_exp = m[:, 0] + np.log(np.exp(x - m).sum(axis=1))
        per_row = log_sum_exp - x[np.arange(len(y)), y]
    return float(per_row.mean())


def predict(logits: np.ndarray, num_classes: int) -> np.ndarray:
    """(N,) int64 predicted classes: logit > 0 for two classes, first argmax otherwise."""
    x = as_logits(logits, num_classes)
    if num_classes == 2:
        return (x[:, 0] > 0).astype(np.int64)
    return x.argmax(axis=1).astype(np.int64)


def probabilities(logits: np.ndarray, num_classes: int) -> np.ndarray:
    """(N, C) float64 class probabilities: [1 - sigmoid, sigmoid] for two classes, softmax otherwise."""
    x = as_logits(logits, num_classes)
    if num_classes == 2:
        z = x[:, 0]
        e = np.exp(-np.abs(z))  # stable sigmoid: never exp of a large positive number
        p = np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
        return np.stack([1.0 - p, p], axis=1)
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows predicted right (nan for no rows)."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    return float((predictions == labels).mean()) if len(labels) else float("nan")


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts; row = true class, column = predicted class."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(labels, dtype=np.int64), np.asarray(predictions, dtype=np.int64)), 1)
    return cm


def _safe_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with 0 where den == 0 (no warnings)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den != 0)


def per_class_scores(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and F1 per class, each (C,) float64; 0 where undefined (0/0)."""
    tp = np.diag(cm).astype(np.float64)
    precision = _safe_ratio(tp, cm.sum(axis=0))
    recall = _safe_ratio(tp, cm.sum(axis=1))
    f1 = _safe_ratio(2 * precision * recall, precision + recall)
    return precision, recall, f1


def balanced_accuracy(cm: np.ndarray) -> float:
    """Mean recall over the classes present in the labels (sklearn's definition)."""
    support = cm.sum(axis=1)
    present = support > 0
    if not present.any():
        return float("nan")
    return float((np.diag(cm)[present] / support[present]).mean())


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """ROC-AUC of a binary task from any score increasing with class 1 (Mann-Whitney U, ties count 1/2).

    None when one class is absent or a score is not finite.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1) == 1
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0 or not np.isfinite(s).all():
        return None
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    # average 1-based rank of each distinct value: rows below it + (its count + 1) / 2
    avg_rank = np.cumsum(counts) - counts + (counts + 1) / 2.0
    ranks = avg_rank[inverse]
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def epoch_train_metrics(batch_loss_sums: Sequence[float], batch_correct: Sequence[int],
                        batch_sizes: Sequence[int]) -> tuple[float, float]:
    """Train (loss, acc) of one epoch from its mini-batches.

    Args:
        batch_loss_sums: per batch, mean loss of the batch times its size.
        batch_correct: per batch, rows predicted right by that batch's forward pass.
        batch_sizes: per batch, rows in it (the last one may be short).
    """
    n = float(np.sum(np.asarray(batch_sizes, dtype=np.float64)))
    loss = float(np.sum(np.asarray(batch_loss_sums, dtype=np.float64)) / n)
    acc = float(np.sum(np.asarray(batch_correct, dtype=np.float64)) / n)
    return loss, acc


def evaluate(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[float, float]:
    """(loss, accuracy) of one pass over a split."""
    return loss_from_logits(logits, labels, num_classes), accuracy(predict(logits, num_classes), labels)


def _finite_or_none(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _none_to_nan(x: float | None) -> float:
    return float("nan") if x is None else float(x)


@dataclass(frozen=True)
class EpochRecord:
    """One epoch of the history; `epoch` counts from 1."""

    epoch: int
    lr: float
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    seconds: float

    def to_dict(self) -> dict:
        """JSON-safe dict (non-finite numbers as None)."""
        d = asdict(self)
        return {k: v if k == "epoch" else _finite_or_none(v) for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "EpochRecord":
        return cls(**{f.name: int(d[f.name]) if f.name == "epoch" else _none_to_nan(d[f.name])
                      for f in fields(cls)})


DIVERGENCE_FACTOR = 10.0  # a train loss this many times above the best so far (and above chance) ...
BLOWUP_FACTOR = 100.0  # ... or this many times the chance level, even in the first epoch


def chance_loss(num_classes: int) -> float:
    """The loss of a head that predicts the uniform distribution: ln 2 (one logit, BCE) or ln C."""
    return math.log(num_classes)


def divergence_reason(previous: Sequence[EpochRecord], record: EpochRecord, *, num_classes: int) -> str | None:
    """Why `record` (the epoch after `previous`) counts as diverged, or None.

    Diverged: its train or val loss is NaN/inf; or its train loss is above BLOWUP_FACTOR times
    the chance-level loss (a blow-up, even in the first epoch); or it jumped above
    DIVERGENCE_FACTOR times the lowest train loss of the previous epochs while above chance level.
    """
    if not (math.isfinite(record.train_loss) and math.isfinite(record.val_loss)):
        return f"loss became NaN/inf in epoch {record.epoch}"
    chance = chance_loss(num_classes)
    if record.train_loss > BLOWUP_FACTOR * chance:
        return (f"train loss reached {record.train_loss:.4g} in epoch {record.epoch}, "
                f"over {BLOWUP_FACTOR:g}x the chance level {chance:.3g}")
    finite = [r.train_loss for r in previous if math.isfinite(r.train_loss)]
    if finite:
        best = min(finite)
        if record.train_loss > max(DIVERGENCE_FACTOR * best, chance):
            return (f"train loss jumped to {record.train_loss:.4g} in epoch {record.epoch}, "
                    f"over {DIVERGENCE_FACTOR:g}x its best {best:.4g}")
    return None


def is_diverged(history: Sequence[EpochRecord], *, num_classes: int) -> bool:
    """True when some epoch of `history` diverged by `divergence_reason`."""
    return any(divergence_reason(history[:i], r, num_classes=num_classes) for i, r in enumerate(history))


def select_epoch(history: Sequence[EpochRecord]) -> int:
    """INDEX into `history` of the selected epoch: best val acc, then lower val loss, then earliest."""
    if not history:
        raise ValueError("empty history")

    def key(i: int):
        r = history[i]
        acc = r.val_acc if math.isfinite(r.val_acc) else -math.inf
        loss = r.val_loss if math.isfinite(r.val_loss) else math.inf
        return (-acc, loss, i)

    return min(range(len(history)), key=key)


@dataclass(frozen=True)
class RunSummary:
    """The run's table row (the original study's columns first) and the test details."""

    train_loss: float  # last epoch
    train_acc: float  # last epoch
    best_val_loss: float  # selected epoch
    best_val_acc: float  # selected epoch
    test_acc: float  # selected epoch's parameters
    training_time: float  # seconds
    test_loss: float
    balanced_accuracy: float
    precision: list[float]  # per class, in class_names order
    recall: list[float]
    f1: list[float]
    support: list[int]  # test rows per class
    confusion_matrix: list[list[int]]  # row = true, column = predicted
    roc_auc: float | None  # two classes only
    selected_epoch: int  # counts from 1
    epochs: int
    class_names: list[str]
    diverged: bool

    def to_dict(self) -> dict:
        """JSON-safe dict (non-finite numbers as None)."""
        d = asdict(self)
        for k in ("train_loss", "train_acc", "best_val_loss", "best_val_acc", "test_acc", "training_time",
                  "test_loss", "balanced_accuracy", "roc_auc"):
            d[k] = _finite_or_none(d[k])
        for k in ("precision", "recall", "f1"):
            d[k] = [_finite_or_none(v) for v in d[k]]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RunSummary":
        d = dict(d)
        for k in ("train_loss", "train_acc", "best_val_loss", "best_val_acc", "test_acc", "training_time",
                  "test_loss", "balanced_accuracy"):
            d[k] = _none_to_nan(d[k])
        for k in ("precision", "recall", "f1"):
            d[k] = [_none_to_nan(v) for v in d[k]]
        return cls(**{f.name: d[f.name] for f in fields(cls)})


def summarize(history: Sequence[EpochRecord], selected: int, *, test_logits: np.ndarray,
              test_labels: np.ndarray, class_names: Sequence[str], train_seconds: float,
              diverged: bool | None = None) -> RunSummary:
    """The run summary.

    Args:
        history: one EpochRecord per epoch, in order.
        selected: index into history from `select_epoch`.
        test_logits: (N_test, K) logits of the selected epoch's parameters.
        test_labels: (N_test,) int.
        class_names: C names; C = number of classes.
        train_seconds: stored as training_time.
        diverged: whether the run stopped on divergence; None = judge from history.
    """
    num_classes = len(class_names)
    labels = np.asarray(test_labels, dtype=np.int64)
    logits = as_logits(test_logits, num_classes)
    pred = predict(logits, num_classes)
    cm = confusion_matrix(labels, pred, num_classes)
    precision, recall, f1 = per_class_scores(cm)
    last, best = history[-1], history[selected]
    scored = bool(np.isfinite(logits).all())  # no test score from NaN/inf logits (a diverged run)
    nan = float("nan")
    return RunSummary(
        train_loss=last.train_loss,
        train_acc=last.train_acc,
        best_val_loss=best.val_loss,
        best_val_acc=best.val_acc,
        test_acc=accuracy(pred, labels) if scored else nan,
        training_time=float(train_seconds),
        test_loss=loss_from_logits(logits, labels, num_classes),
        balanced_accuracy=balanced_accuracy(cm) if scored else nan,
        precision=precision.tolist(),
        recall=recall.tolist(),
        f1=f1.tolist(),
        support=cm.sum(axis=1).tolist(),
        confusion_matrix=cm.tolist(),
        roc_auc=roc_auc(logits[:, 0], labels) if num_classes == 2 and scored else None,
        selected_epoch=best.epoch,
        epochs=len(history),
        class_names=[str(c) for c in class_names],
        diverged=is_diverged(history, num_classes=num_classes) if diverged is None else bool(diverged),
    )


# --------------------------------------------------------------------------- intervals over seeds

# Two-sided 95 % quantiles of Student's t, t_{0.975, df}, for df = 1..30 (4 decimals, as printed tables).
T_975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
         2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
         2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)
Z_975 = 1.959963984540054  # the normal quantile t tends to


def t_quantile_975(df: int) -> float:
    """t_{0.975, df}: the table for df <= 30, beyond it the Cornish-Fisher expansion around the normal
    quantile (error < 1e-4 for df > 30)."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if df <= len(T_975):
        return T_975[df - 1]
    z = Z_975
    g1 = (z ** 3 + z) / 4
    g2 = (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96
    g3 = (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384
    return z + g1 / df + g2 / df ** 2 + g3 / df ** 3


@dataclass(frozen=True)
class Interval:
    """Mean of n values (one per seed) with its 95 % t-interval: mean ± half_width.

    half_width = t_{0.975, n-1} * s / sqrt(n), s the sample standard deviation (ddof 1); nan for
    n = 1 (no interval from one value). A non-finite value makes mean and half_width nan.
    """

    mean: float
    half_width: float
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def to_dict(self) -> dict:
        """JSON-safe dict (non-finite numbers as None), low and high included."""
        return {"mean": _finite_or_none(self.mean), "half_width": _finite_or_none(self.half_width),
                "low": _finite_or_none(self.low), "high": _finite_or_none(self.high), "n": self.n}

    @classmethod
    def from_dict(cls, d: dict) -> "Interval":
        return cls(mean=_none_to_nan(d["mean"]), half_width=_none_to_nan(d["half_width"]), n=int(d["n"]))


def mean_interval(values: Sequence[float]) -> Interval:
    """Mean and 95 % t-interval of `values` (e.g. test accuracy of K seeds); see Interval."""
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(x) == 0:
        raise ValueError("no values")
    if not np.isfinite(x).all():
        return Interval(mean=float("nan"), half_width=float("nan"), n=len(x))
    if len(x) == 1:
        return Interval(mean=float(x[0]), half_width=float("nan"), n=1)
    half = t_quantile_975(len(x) - 1) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return Interval(mean=float(x.mean()), half_width=half, n=len(x))
