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
from typing import Callable, Mapping, Sequence

import numpy as np

from featcache.errors import UserError


def as_logits(logits: np.ndarray, num_classes: int) -> np.ndarray:
    """(N, K) float64 view of logits; (N,) is accepted for two classes."""
    x = np.asarray(logits, dtype=np.float64)
    k = 1 if num_classes == 2 else num_classes
    if x.ndim == 1 and k == 1:
        x = x[:, None]
    if x.ndim != 2 or x.shape[1] != k:
        raise ValueError(f"expected logits of shape (N, {k}) for {num_classes} classes, got {x.shape}")
    return x


def per_row_loss(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(N,) float64 loss of each row: BCE-with-logits on one logit for two classes, softmax cross-entropy otherwise."""
    x = as_logits(logits, num_classes)
    y = np.asarray(labels, dtype=np.int64)
    if num_classes == 2:
        z = x[:, 0]
        # max(z, 0) - z*y + log(1 + exp(-|z|)): torch's BCEWithLogitsLoss, stable for any |z|
        return np.maximum(z, 0.0) - z * y + np.log1p(np.exp(-np.abs(z)))
    m = x.max(axis=1, keepdims=True)
    log_sum_exp = m[:, 0] + np.log(np.exp(x - m).sum(axis=1))
    return log_sum_exp - x[np.arange(len(y)), y]


def loss_from_logits(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """Mean loss: BCE-with-logits on one logit for two classes, softmax cross-entropy otherwise."""
    if as_logits(logits, num_classes).shape[0] == 0:
        return float("nan")
    return float(per_row_loss(logits, labels, num_classes).mean())


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


def chance_accuracy(counts) -> float | None:
    """The accuracy of always predicting the most frequent class: max(counts) / sum(counts) of per-class row
    counts (C,), e.g. RunSummary.support; None for no rows. The "chance" line of the accuracy figures."""
    counts = np.asarray(counts, dtype=np.float64).reshape(-1)
    total = counts.sum()
    return float(counts.max() / total) if counts.size and total > 0 else None


def on_grid_edge(selected: int, size: int) -> bool:
    """True when the value selected from a grid of `size` values (index `selected`, grid sorted) is its
    smallest or largest, so that a wider grid might select beyond it; never for a grid of one value."""
    return size > 1 and selected in (0, size - 1)


def edge_note(name: str, values, selected: int, *, option: str) -> str | None:
    """The one-line note a sweep prints when its choice lies on the edge of its grid (on_grid_edge), else None.

    values: the grid, sorted ascending; selected: the index chosen; option: the flag that sets the grid."""
    values = list(values)
    if not on_grid_edge(selected, len(values)):
        return None
    side = "smallest" if selected == 0 else "largest"
    return (f"the selected {name} {values[selected]:g} is the {side} of the grid ({values[0]:g} ... {values[-1]:g}); "
            f"widen {option} past it.")


def balanced_accuracy(cm: np.ndarray) -> float:
    """Mean recall over the classes present in the labels (sklearn's definition)."""
    support = cm.sum(axis=1)
    present = support > 0
    if not present.any():
        return float("nan")
    return float((np.diag(cm)[present] / support[present]).mean())


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """ROC-AUC of a binary task from any score increasing with class 1 (Mann-Whitney U, ties count 1/2;
    defined once in `weighted_binary_auroc`).

    None when one class is absent or a score is not finite.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    return _single(weighted_binary_auroc(s, labels, _ones(len(s))))


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
        # plain attribute reads: dataclasses.asdict deep-copies and costs ~0.5 ms a record (100000 epochs: a minute)
        return {name: getattr(self, name) if name == "epoch" else _finite_or_none(getattr(self, name))
                for name in _EPOCH_FIELDS}

    @classmethod
    def from_dict(cls, d: dict) -> "EpochRecord":
        return cls(**{f.name: int(d[f.name]) if f.name == "epoch" else _none_to_nan(d[f.name])
                      for f in fields(cls)})


_EPOCH_FIELDS = tuple(f.name for f in fields(EpochRecord))

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
    finite = [r.train_loss for r in previous if math.isfinite(r.train_loss)]
    return _reason(record, min(finite) if finite else None, chance_loss(num_classes))


def _reason(record: EpochRecord, best: float | None, chance: float) -> str | None:
    """`divergence_reason` of `record` given the lowest finite train loss before it (None: no such epoch)."""
    if not (math.isfinite(record.train_loss) and math.isfinite(record.val_loss)):
        return f"loss became NaN/inf in epoch {record.epoch}"
    if record.train_loss > BLOWUP_FACTOR * chance:
        return (f"train loss reached {record.train_loss:.4g} in epoch {record.epoch}, "
                f"over {BLOWUP_FACTOR:g}x the chance level {chance:.3g}")
    if best is not None and record.train_loss > max(DIVERGENCE_FACTOR * best, chance):
        return (f"train loss jumped to {record.train_loss:.4g} in epoch {record.epoch}, "
                f"over {DIVERGENCE_FACTOR:g}x its best {best:.4g}")
    return None


def first_divergence(history: Sequence[EpochRecord], *, num_classes: int) -> str | None:
    """`divergence_reason` of the first diverged epoch of `history`, or None: one pass, the lowest train
    loss so far carried along (linear in epochs, so 100000 epochs take milliseconds)."""
    chance, best = chance_loss(num_classes), None
    for record in history:
        reason = _reason(record, best, chance)
        if reason:
            return reason
        best = record.train_loss if best is None else min(best, record.train_loss)  # finite: not diverged
    return None


def is_diverged(history: Sequence[EpochRecord], *, num_classes: int) -> bool:
    """True when some epoch of `history` diverged by `divergence_reason`."""
    return first_divergence(history, num_classes=num_classes) is not None


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


# --------------------------------------------------------------------------- clinical metrics
#
# What a medical imaging paper reports beyond accuracy. Scores: for two classes the one logit
# (class 1 is the positive class; any score increasing with it ranks the same); for C > 2 the
# softmax probabilities of `probabilities`, column c scoring class c against the rest, as
# scikit-learn's roc_auc_score(multi_class="ovr") and average_precision_score rank them.
#
# Row weights: each metric below is defined ONCE on rows with non-negative integer weights
# w (B, N) float64 (row i counted w[b, i] times in set b) and returns (B,) float64, nan where
# undefined (a class absent, a zero denominator, a non-finite score). The full set is
# w = ones((1, N)); a bootstrap resample is w = how often it drew each row, so one call scores
# B resamples at once and the point estimate and the resamples share one definition. The
# scalar functions (auroc, average_precision, operating_point_metrics, ...) return None, never
# nan, where undefined; each equals its scikit-learn reference within 1e-9
# (tests/test_clinical_metrics.py).

Metric = Callable[[np.ndarray, np.ndarray], "float | None"]  # (labels (N,), logits (N, K)) -> value or None


def weighted_loss_from_logits(logits: np.ndarray, labels: np.ndarray, num_classes: int, *,
                              class_weights: np.ndarray | None) -> float:
    """Class-weighted mean loss: sum_i w[y_i] * l_i / sum_i w[y_i], l_i from `per_row_loss`.

    This is the rule both training loops must implement (per mini-batch) for --class-weight:
    * C > 2: torch's F.cross_entropy(x, y, weight=w) with reduction "mean" (it divides by sum_i w[y_i]).
    * two classes (one logit): the same rule with w = (w_class0, w_class1), i.e.
      F.binary_cross_entropy_with_logits(z, y, weight=w[y], reduction="sum") / w[y].sum();
      NOT reduction "mean" with weight= (that divides by N) and NOT pos_weight= (that leaves class 0 at 1).
    * JAX head: (w[y] * l).sum() / w[y].sum() over the batch's rows.
    class_weights None (or all equal) gives `loss_from_logits`. nan for no rows.

    Args:
        logits: (N, K) or (N,) for two classes.
        labels: (N,) int class indices.
        class_weights: (C,) positive float weights (from plan.class_weights) or None.
    """
    if class_weights is None:
        return loss_from_logits(logits, labels, num_classes)
    y = np.asarray(labels, dtype=np.int64)
    if len(y) == 0:
        return float("nan")
    w = np.asarray(class_weights, dtype=np.float64)[y]  # (N,)
    return float((w * per_row_loss(logits, y, num_classes)).sum() / w.sum())


def _ratio_or_nan(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den elementwise (float64), nan where den == 0 (no warnings)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.full(np.broadcast(num, den).shape, np.nan), where=den != 0)


def _single(values: np.ndarray) -> float | None:
    """The one value of a (1,) result as a float, None when nan."""
    return _finite_or_none(float(values[0]))


def _ones(n: int) -> np.ndarray:
    return np.ones((1, n), dtype=np.float64)


def resample_weights(indices: np.ndarray, num_rows: int) -> np.ndarray:
    """(B, num_rows) float64 row weights from (B, M) row indices: how often each resample drew each row."""
    b = indices.shape[0]
    flat = (indices + num_rows * np.arange(b)[:, None]).ravel()
    return np.bincount(flat, minlength=b * num_rows).reshape(b, num_rows).astype(np.float64)


def _score_curve(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray):
    """(thresholds (U,), tps (U, B), fps (U, B)): the distinct scores from high to low and the weight of
    class-1 and other rows scoring >= each (scikit-learn's _binary_clf_curve, one column per weight row)."""
    order = np.argsort(-scores, kind="mergesort")
    s = scores[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last row of each run of equal scores
    w = weights.T[order]  # (N, B): cumulative sums run down contiguous columns
    tps = np.cumsum(np.where(positive[order, None], w, 0.0), axis=0)[last]
    return s[last], tps, np.cumsum(w, axis=0)[last] - tps


def _binary_curve_or_nan(scores, labels, weights):
    """_score_curve of a binary task, or None when there are no rows or a score is not finite."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(s) == 0 or not np.isfinite(s).all():
        return None
    return _score_curve(s, np.asarray(labels).reshape(-1) == 1, weights)


def weighted_binary_auroc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(B,) ROC-AUC of "class 1 scores higher" per weight row: sum over positive rows of the negatives
    scoring lower plus half those tying, over n_pos * n_neg (Mann-Whitney U; scikit-learn's trapezoids).
    Exact integer arithmetic until the one division; nan when a class has no weight."""
    curve = _binary_curve_or_nan(scores, labels, weights)
    if curve is None:
        return np.full(len(weights), np.nan)
    _, tps, fps = curve
    pos, neg = np.diff(tps, axis=0, prepend=0.0), np.diff(fps, axis=0, prepend=0.0)  # weight AT each score
    n_pos, n_neg = tps[-1], fps[-1]
    # negatives scoring strictly lower than a score: n_neg - fps; tying: neg (counted 1/2)
    return _ratio_or_nan((pos * (n_neg - fps + 0.5 * neg)).sum(axis=0), n_pos * n_neg)


def weighted_binary_average_precision(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(B,) average precision per weight row, step-wise as scikit-learn's average_precision_score:
    sum over the distinct scores t, high to low, of (R(t) - R(previous t)) * P(t), P and R the precision
    and recall of "score >= t". nan when class 1 has no weight (or no rows, or a non-finite score)."""
    curve = _binary_curve_or_nan(scores, labels, weights)
    if curve is None:
        return np.full(len(weights), np.nan)
    _, tps, fps = curve
    precision = np.nan_to_num(_ratio_or_nan(tps, tps + fps))  # 0/0 only where no row scored yet
    pos = np.diff(tps, axis=0, prepend=0.0)  # the recall step at t is pos_t / n_pos
    return _ratio_or_nan((pos * precision).sum(axis=0), tps[-1])


def _weighted_one_vs_rest(binary, logits, labels, num_classes: int, weights: np.ndarray, average: str):
    """(B,) `binary` metric of class c vs the rest on p_c, averaged over the C classes: "macro" (plain
    mean) or "weighted" (by each class's weight, its prevalence); nan when a class has no weight."""
    if average not in ("macro", "weighted"):
        raise ValueError(f"average must be 'macro' or 'weighted', got {average!r}")
    x = as_logits(logits, num_classes)
    if not np.isfinite(x).all():
        return np.full(len(weights), np.nan)
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    p = probabilities(x, num_classes)  # (N, C)
    values = np.stack([binary(p[:, c], y == c, weights) for c in range(num_classes)], axis=1)  # (B, C)
    if average == "macro":
        return values.mean(axis=1)
    support = np.stack([weights @ (y == c) for c in range(num_classes)], axis=1)  # (B, C)
    return _ratio_or_nan((values * support).sum(axis=1), support.sum(axis=1))


def weighted_auroc(logits: np.ndarray, labels: np.ndarray, num_classes: int, weights: np.ndarray, *,
                   average: str = "macro") -> np.ndarray:
    """(B,) `auroc` per row of weights (B, N)."""
    if num_classes == 2:
        return weighted_binary_auroc(as_logits(logits, 2)[:, 0], labels, weights)
    return _weighted_one_vs_rest(weighted_binary_auroc, logits, labels, num_classes, weights, average)


def weighted_average_precision(logits: np.ndarray, labels: np.ndarray, num_classes: int, weights: np.ndarray, *,
                               average: str = "macro") -> np.ndarray:
    """(B,) `average_precision` per row of weights (B, N)."""
    if num_classes == 2:
        return weighted_binary_average_precision(as_logits(logits, 2)[:, 0], labels, weights)
    return _weighted_one_vs_rest(weighted_binary_average_precision, logits, labels, num_classes, weights, average)


def auroc(logits: np.ndarray, labels: np.ndarray, num_classes: int, *, average: str = "macro") -> float | None:
    """ROC-AUC: for two classes that of the one logit (average ignored; = `roc_auc`); for C > 2 one-vs-rest
    on the softmax probabilities, "macro" (mean over classes) or "weighted" (by prevalence), as
    roc_auc_score(multi_class="ovr", average=...). None when a class is absent or a logit is not finite."""
    return _single(weighted_auroc(logits, labels, num_classes, _ones(len(labels)), average=average))


def average_precision(logits: np.ndarray, labels: np.ndarray, num_classes: int, *,
                      average: str = "macro") -> float | None:
    """Average precision: for two classes that of class 1 on the one logit (average ignored); for C > 2
    one-vs-rest on the softmax probabilities, "macro" or "weighted" (by prevalence), as
    average_precision_score(label_binarize(y), p, average=...). None when a class is absent."""
    return _single(weighted_average_precision(logits, labels, num_classes, _ones(len(labels)), average=average))


def binary_average_precision(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Average precision of class 1 on any score increasing with it (see weighted_binary_average_precision)."""
    s = np.asarray(scores).reshape(-1)
    return _single(weighted_binary_average_precision(s, labels, _ones(len(s))))


def weighted_accuracy(logits: np.ndarray, labels: np.ndarray, num_classes: int, weights: np.ndarray) -> np.ndarray:
    """(B,) fraction of the weight on rows `predict` gets right; nan for no weight."""
    correct = (predict(logits, num_classes) == np.asarray(labels)).astype(np.float64)
    return _ratio_or_nan(weights @ correct, weights.sum(axis=1))


def weighted_confusion(labels: np.ndarray, predictions: np.ndarray, num_classes: int,
                       weights: np.ndarray) -> np.ndarray:
    """(B, C, C) `confusion_matrix` per weight row (float64 counts; row = true, column = predicted)."""
    cell = np.asarray(labels, dtype=np.int64) * num_classes + np.asarray(predictions, dtype=np.int64)
    onehot = np.zeros((len(cell), num_classes * num_classes))
    onehot[np.arange(len(cell)), cell] = 1.0
    return (weights @ onehot).reshape(-1, num_classes, num_classes)


def weighted_balanced_accuracy(logits: np.ndarray, labels: np.ndarray, num_classes: int,
                               weights: np.ndarray) -> np.ndarray:
    """(B,) `balanced_accuracy` of the weighted confusion matrix of `predict`."""
    cms = weighted_confusion(labels, predict(logits, num_classes), num_classes, weights)
    return np.array([balanced_accuracy(cm) for cm in cms])


# --------------------------------------------------------------------------- operating points (two classes)

OPERATING_POINT_RULES = "youden, sens=X or spec=X"


def parse_operating_point(rule: str) -> tuple[str, float | None]:
    """("youden", None), ("sens", X) or ("spec", X) from --operating-point youden | sens=X | spec=X, 0 < X <= 1."""
    text = str(rule).strip().lower().replace(" ", "")
    if text == "youden":
        return "youden", None
    name, sep, value = text.partition("=")
    try:
        target = float(value)
    except ValueError:
        target = float("nan")
    if sep and name in ("sens", "spec") and 0 < target <= 1:
        return name, target
    raise UserError(f"--operating-point must be {OPERATING_POINT_RULES} with X between 0 and 1 "
                    f"(for example sens=0.95), got {rule!r}.")


def roc_points(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(thresholds, sensitivity, specificity), each (T + 1,) float64, as roc_curve(drop_intermediate=False)
    lists them: +inf first, then every distinct score from high to low; a row counts as positive when
    score >= threshold. None when one class is absent or a score is not finite."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    curve = _binary_curve_or_nan(s, labels, _ones(len(s)))
    if curve is None or curve[1][-1, 0] == 0 or curve[2][-1, 0] == 0:
        return None
    thresholds, tps, fps = curve
    tps, fps = np.r_[0.0, tps[:, 0]], np.r_[0.0, fps[:, 0]]
    sensitivity = tps / tps[-1]
    specificity = (fps[-1] - fps) / fps[-1]  # from counts: exact, no 1 - fpr rounding
    return np.r_[np.inf, thresholds], sensitivity, specificity


def choose_threshold(scores: np.ndarray, labels: np.ndarray, *, rule: str) -> float | None:
    """The threshold on the score (for featcache: the one logit) picked on VAL by `rule`, to freeze for test.

    Candidates are `roc_points`' thresholds; a row is called positive when score >= threshold.
    * "youden": max sensitivity + specificity - 1 (ties: the highest such threshold).
    * "sens=X": the highest threshold whose sensitivity >= X.
    * "spec=X": the lowest threshold whose specificity >= X.
    +inf (call nothing positive) is a candidate, so "spec=X" always has one. None when a class is
    absent from these rows or a score is not finite.
    """
    kind, target = parse_operating_point(rule)
    points = roc_points(scores, labels)
    if points is None:
        return None
    thresholds, sensitivity, specificity = points
    if kind == "youden":
        i = int(np.argmax(sensitivity + specificity - 1.0))  # argmax: the first, i.e. highest threshold
    elif kind == "sens":
        i = int(np.argmax(sensitivity >= target))  # sensitivity ends at 1, so some threshold reaches it
    else:
        i = int(np.flatnonzero(specificity >= target)[-1])  # +inf has specificity 1
    return float(thresholds[i])


OPERATING_POINT_COUNTS = ("tp", "fp", "tn", "fn")
OPERATING_POINT_RATES = ("sensitivity", "specificity", "ppv", "npv", "f1", "accuracy")


def weighted_operating_point(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray, *,
                             threshold: float) -> dict[str, np.ndarray]:
    """{name: (B,) float64} of "positive when score >= threshold" per weight row: the counts tp, fp, tn,
    fn and sensitivity tp/(tp+fn), specificity tn/(tn+fp), ppv tp/(tp+fp), npv tn/(tn+fn),
    f1 2tp/(2tp+fp+fn), accuracy (tp+tn)/(tp+fp+tn+fn); a rate is nan where its denominator is 0,
    everything nan when a score is not finite."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if not np.isfinite(s).all():
        return {k: np.full(len(weights), np.nan) for k in OPERATING_POINT_COUNTS + OPERATING_POINT_RATES}
    y = np.asarray(labels).reshape(-1) == 1
    called = s >= threshold
    tp, fp = weights @ (called & y), weights @ (called & ~y)
    fn, tn = weights @ (~called & y), weights @ (~called & ~y)
    return {"tp": tp, "fp": fp, "tn": tn, "fn": fn,
            "sensitivity": _ratio_or_nan(tp, tp + fn), "specificity": _ratio_or_nan(tn, tn + fp),
            "ppv": _ratio_or_nan(tp, tp + fp), "npv": _ratio_or_nan(tn, tn + fn),
            "f1": _ratio_or_nan(2 * tp, 2 * tp + fp + fn), "accuracy": _ratio_or_nan(tp + tn, tp + fp + tn + fn)}


def operating_point_metrics(scores: np.ndarray, labels: np.ndarray, *, threshold: float | None) -> dict:
    """Counts and rates of "positive when score >= threshold" on these rows (for featcache: TEST, at the
    threshold `choose_threshold` froze on VAL).

    Returns:
        {"tp", "fp", "tn", "fn": int, "sensitivity", "specificity", "ppv", "npv", "f1", "accuracy": float}
        as `weighted_operating_point` defines them; a rate is None where its denominator is 0;
        everything None when threshold is None or a score is not finite.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if threshold is None or not np.isfinite(s).all():
        return dict.fromkeys(OPERATING_POINT_COUNTS + OPERATING_POINT_RATES)
    values = weighted_operating_point(s, labels, _ones(len(s)), threshold=threshold)
    out = {k: int(values[k][0]) for k in OPERATING_POINT_COUNTS}
    out.update({k: _single(values[k]) for k in OPERATING_POINT_RATES})
    return out


# --------------------------------------------------------------------------- calibration

ECE_BINS = 15
TEMPERATURE_RANGE = (1e-2, 1e2)  # fitted temperatures are clipped to this range


def expected_calibration_error(logits: np.ndarray, labels: np.ndarray, num_classes: int, *,
                               bins: int = ECE_BINS) -> float | None:
    """Expected calibration error (Guo et al. 2017) with `bins` equal-width bins on the confidence.

    Definition: confidence_i = max_c p_ic, the probability of the predicted class (p from
    `probabilities`; for two classes max(sigmoid(z), 1 - sigmoid(z))); correct_i = [predict_i == y_i].
    Bin b = 0..bins-1 holds the rows with edges[b] < confidence <= edges[b+1], edges =
    np.linspace(0, 1, bins + 1). ECE = sum_b (n_b / N) * |mean(correct in b) - mean(confidence in b)|,
    an empty bin adding 0. None for no rows or a non-finite logit.
    """
    x = as_logits(logits, num_classes)
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(y) == 0 or not np.isfinite(x).all():
        return None
    confidence = probabilities(x, num_classes).max(axis=1)  # (N,)
    correct = (predict(x, num_classes) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    b = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    # n_b/N * |acc_b - conf_b| = |sum of correct in b - sum of confidence in b| / N
    gap = np.bincount(b, weights=correct, minlength=bins) - np.bincount(b, weights=confidence, minlength=bins)
    return float(np.abs(gap).sum() / len(y))


def _two_or_more_columns(logits: np.ndarray, num_classes: int) -> np.ndarray:
    """(N, C) logits whose softmax is `probabilities`: [0, z] for the one logit z of two classes."""
    x = as_logits(logits, num_classes)
    return np.concatenate([np.zeros_like(x), x], axis=1) if num_classes == 2 else x


def _nll_slope(x: np.ndarray, y: np.ndarray, s: float) -> tuple[float, float]:
    """First and second derivative in s of the mean NLL of logits s * x ((N, C) form): mean(E_p[x] - x_y)
    and mean(Var_p[x]), p = softmax(s * x)."""
    z = s * x
    e = np.exp(z - z.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    mean_x = (p * x).sum(axis=1)
    variance = np.maximum((p * (x - mean_x[:, None]) ** 2).sum(axis=1), 0.0)
    return float((mean_x - x[np.arange(len(y)), y]).mean()), float(variance.mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> float | None:
    """Temperature T > 0 minimising the mean NLL (`loss_from_logits`) of logits / T on these rows (VAL).

    The NLL is convex in s = 1/T, so its minimiser is the root of the derivative: a safeguarded
    Newton search on s, kept inside a sign-change bracket (bisection in log s when a Newton step
    leaves it), stopped at relative change 1e-12. T is clipped to TEMPERATURE_RANGE (separable val
    data have no minimiser: the NLL falls as T -> 0). None for no rows or a non-finite logit.
    """
    x = _two_or_more_columns(logits, num_classes)
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(y) == 0 or not np.isfinite(x).all():
        return None
    t_min, t_max = TEMPERATURE_RANGE
    lo, hi = 1.0 / t_max, 1.0 / t_min
    if _nll_slope(x, y, lo)[0] >= 0:
        return t_max
    if _nll_slope(x, y, hi)[0] <= 0:
        return t_min
    s = 1.0
    for _ in range(200):
        slope, curvature = _nll_slope(x, y, s)
        if slope == 0:
            break
        lo, hi = (s, hi) if slope < 0 else (lo, s)
        step = s - slope / curvature if curvature > 0 else float("nan")
        s_next = step if lo < step < hi else math.sqrt(lo * hi)
        done = abs(s_next - s) <= 1e-12 * s
        s = s_next
        if done:
            break
    return float(1.0 / s)


def calibration(*, val_logits: np.ndarray, val_labels: np.ndarray, test_logits: np.ndarray,
                test_labels: np.ndarray, num_classes: int, bins: int = ECE_BINS) -> dict:
    """Temperature scaling fitted on val, applied to test; ECE and NLL on test before and after.

    Returns:
        {"temperature", "ece_before", "ece_after", "nll_before", "nll_after": float or None, "bins": int}.
    """
    temperature = fit_temperature(val_logits, val_labels, num_classes)
    test = as_logits(test_logits, num_classes)
    scaled = test / temperature if temperature is not None else None

    def nll(x):
        return None if x is None else _finite_or_none(loss_from_logits(x, test_labels, num_classes))

    def ece(x):
        return None if x is None else expected_calibration_error(x, test_labels, num_classes, bins=bins)

    return {"temperature": temperature, "ece_before": ece(test), "ece_after": ece(scaled),
            "nll_before": nll(test), "nll_after": nll(scaled), "bins": int(bins)}


# --------------------------------------------------------------------------- bootstrap on one test set

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_BLOCK = 100  # resamples per index matrix (bounds memory: BLOCK x N)


@dataclass(frozen=True)
class WeightedMetric:
    """A metric defined on weighted rows, so that one call scores many resamples.

    fn(labels (N,), logits (N, K), weights (B, N)) -> (B,) float64, nan where undefined. Called as
    metric(labels, logits) it is a plain `Metric`: its value on all rows, float or None.
    """

    fn: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]

    def __call__(self, labels: np.ndarray, logits: np.ndarray) -> float | None:
        return _single(self.fn(np.asarray(labels), np.asarray(logits), _ones(len(labels))))


def stratified_bootstrap_indices(labels: np.ndarray, *, resamples: int, seed: int):
    """Yield (B, N) int64 index matrices, B <= BOOTSTRAP_BLOCK, `resamples` rows in all: each row one
    resample drawing, with replacement, as many rows of each class as `labels` holds (so every
    resample keeps the class counts). One numpy Generator seeded with `seed`: the same labels and
    seed give the same indices, which is what makes a paired bootstrap paired."""
    y = np.asarray(labels).reshape(-1)
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(y == c) for c in np.unique(y)]
    for start in range(0, resamples, BOOTSTRAP_BLOCK):
        b = min(BOOTSTRAP_BLOCK, resamples - start)
        blocks = [rows[rng.integers(0, len(rows), size=(b, len(rows)))] for rows in groups]
        yield np.concatenate(blocks, axis=1) if blocks else np.zeros((b, 0), dtype=np.int64)


def bootstrap_values(metrics: Mapping[str, Metric], *, labels: np.ndarray, scores: np.ndarray,
                     resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict[str, np.ndarray]:
    """Each metric on each stratified resample: {name: (resamples,) float64, nan where undefined}.

    A WeightedMetric scores a whole block of resamples in one call (row weights = draw counts);
    any other metric(labels (n,), scores (n, ...)) -> float or None is called once per resample.

    Args:
        metrics: name -> metric.
        labels: (N,) int; the strata.
        scores: (N, ...) per-row scores (logits), indexed along the first axis.
    """
    y, x = np.asarray(labels), np.asarray(scores)
    values = {name: np.full(resamples, np.nan) for name in metrics}
    start = 0
    for block in stratified_bootstrap_indices(y, resamples=resamples, seed=seed):
        stop = start + len(block)
        weights = resample_weights(block, len(y))
        for name, metric in metrics.items():
            if isinstance(metric, WeightedMetric):
                values[name][start:stop] = metric.fn(y, x, weights)
            else:
                for row, idx in enumerate(block):
                    v = metric(y[idx], x[idx])
                    values[name][start + row] = np.nan if v is None else v
        start = stop
    return values


@dataclass(frozen=True)
class BootstrapInterval:
    """A metric on the full set (`point`) and its 95 % percentile interval over stratified resamples.

    low/high = the 2.5th/97.5th percentiles (numpy's linear interpolation) of the metric over the
    resamples where it is defined (`defined` of `resamples`); None when none is.
    """

    point: float | None
    low: float | None
    high: float | None
    resamples: int
    defined: int

    def to_dict(self) -> dict:
        return asdict(self)


def _percentile_interval(values: np.ndarray) -> tuple[float | None, float | None, int]:
    ok = values[np.isfinite(values)]
    if len(ok) == 0:
        return None, None, 0
    low, high = np.percentile(ok, [2.5, 97.5])
    return float(low), float(high), len(ok)


def bootstrap_intervals(metrics: Mapping[str, Metric], *, labels: np.ndarray, scores: np.ndarray,
                        resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict[str, BootstrapInterval]:
    """{name: BootstrapInterval} of each metric (see `bootstrap_values`); the point is the metric on all rows."""
    values = bootstrap_values(metrics, labels=labels, scores=scores, resamples=resamples, seed=seed)
    out = {}
    for name, metric in metrics.items():
        low, high, defined = _percentile_interval(values[name])
        point = _finite_or_none(metric(np.asarray(labels), np.asarray(scores)))
        out[name] = BootstrapInterval(point=point, low=low, high=high, resamples=resamples, defined=defined)
    return out


@dataclass(frozen=True)
class PairedDifference:
    """metric(A) - metric(B) on the same test rows, with its paired bootstrap.

    point: the difference on all rows; low/high: 2.5th/97.5th percentiles of the difference over the
    resamples where both are defined (`defined` of `resamples`), the SAME rows drawn for A and B;
    a_wins / ties: fractions of those resamples with difference > 0 / == 0 (B wins the rest).
    Higher is better for every metric featcache bootstraps.
    """

    point: float | None
    low: float | None
    high: float | None
    a_wins: float | None
    ties: float | None
    resamples: int
    defined: int

    def to_dict(self) -> dict:
        return asdict(self)


def paired_bootstrap(metrics_a: Mapping[str, Metric], *, labels: np.ndarray, scores_a: np.ndarray,
                     scores_b: np.ndarray, metrics_b: Mapping[str, Metric] | None = None,
                     resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict[str, PairedDifference]:
    """Paired bootstrap of metric(A) - metric(B) for two runs' scores on the same rows in the same order.

    Args:
        metrics_a: name -> metric for run A; metrics_b: the same names for run B (e.g. at B's own
            val-chosen threshold), default metrics_a.
        labels: (N,) int, shared; scores_a, scores_b: (N, ...) each run's logits for those rows.
    """
    metrics_b = metrics_a if metrics_b is None else metrics_b
    y = np.asarray(labels)
    if not len(y) == len(scores_a) == len(scores_b):
        raise ValueError(f"paired runs need scores for the same rows: {len(y)} labels, "
                         f"{len(scores_a)} and {len(scores_b)} score rows")
    va = bootstrap_values(metrics_a, labels=y, scores=scores_a, resamples=resamples, seed=seed)
    vb = bootstrap_values(metrics_b, labels=y, scores=scores_b, resamples=resamples, seed=seed)
    out = {}
    for name in metrics_a:
        diff = va[name] - vb[name]
        low, high, defined = _percentile_interval(diff)
        ok = diff[np.isfinite(diff)]
        a, b = metrics_a[name](y, np.asarray(scores_a)), metrics_b[name](y, np.asarray(scores_b))
        point = None if a is None or b is None else _finite_or_none(a - b)
        out[name] = PairedDifference(point=point, low=low, high=high,
                                     a_wins=float(np.mean(ok > 0)) if defined else None,
                                     ties=float(np.mean(ok == 0)) if defined else None,
                                     resamples=resamples, defined=defined)
    return out


# --------------------------------------------------------------------------- one call for a run's report


def clinical_metric_functions(*, num_classes: int, threshold: float | None = None) -> dict[str, WeightedMetric]:
    """The test metrics featcache reports with bootstrap intervals, each a WeightedMetric of (labels, logits (N, K)).

    accuracy and balanced_accuracy (of `predict`), auroc (`auroc`: binary, or one-vs-rest macro for
    C > 2) and, for two classes with a threshold (from `choose_threshold` on val): sensitivity,
    specificity, ppv, npv and f1 at it. All higher-is-better; None for NaN/inf logits (a diverged run).
    """
    c = num_classes
    fns = {
        "accuracy": lambda y, x, w: weighted_accuracy(x, y, c, w),
        "balanced_accuracy": lambda y, x, w: weighted_balanced_accuracy(x, y, c, w),
        "auroc": lambda y, x, w: weighted_auroc(x, y, c, w),
    }
    if c == 2 and threshold is not None:
        for key in ("sensitivity", "specificity", "ppv", "npv", "f1"):
            fns[key] = (lambda k: lambda y, x, w: weighted_operating_point(
                as_logits(x, 2)[:, 0], y, w, threshold=threshold)[k])(key)

    def finite_only(fn):
        return lambda y, x, w: fn(y, x, w) if np.isfinite(x).all() else np.full(len(w), np.nan)

    return {name: WeightedMetric(finite_only(fn)) for name, fn in fns.items()}


def ranking_metrics(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, float | None]:
    """The ranking metrics reported without intervals: average_precision (binary, or one-vs-rest macro)
    and, for C > 2, auroc_weighted and average_precision_weighted (by prevalence)."""
    out = {"average_precision": average_precision(logits, labels, num_classes)}
    if num_classes > 2:
        out["auroc_weighted"] = auroc(logits, labels, num_classes, average="weighted")
        out["average_precision_weighted"] = average_precision(logits, labels, num_classes, average="weighted")
    return out


def _operating_point_report(*, rule: str, threshold: float | None, val_scores: np.ndarray,
                            val_labels: np.ndarray, test_scores: np.ndarray, test_labels: np.ndarray) -> dict:
    """The operating point `choose_threshold` chose on val by `rule`, and its metrics on val and on test."""
    kind, target = parse_operating_point(rule)
    finite = threshold is not None and math.isfinite(threshold)
    return {"rule": kind if target is None else f"{kind}={target:g}",
            "threshold": threshold if finite else None,
            "threshold_probability": float(probabilities(np.array([threshold]), 2)[0, 1]) if finite else None,
            "val": operating_point_metrics(val_scores, val_labels, threshold=threshold),
            "test": operating_point_metrics(test_scores, test_labels, threshold=threshold)}


def clinical_report(*, val_logits: np.ndarray, val_labels: np.ndarray, test_logits: np.ndarray,
                    test_labels: np.ndarray, num_classes: int, operating_point: str = "youden",
                    bootstrap: int = BOOTSTRAP_RESAMPLES, seed: int = 0, bins: int = ECE_BINS) -> dict:
    """Everything of this section for one run, as a JSON-safe dict (floats, ints, str or None).

    Args:
        val_logits, test_logits: (N_val, K), (N_test, K) logits (K = 1 for two classes) of the
            selected epoch's parameters; val_labels, test_labels: (N_val,), (N_test,) int.
        operating_point: rule for `choose_threshold` (two classes; validated for any C).
        bootstrap: stratified resamples for the test intervals; 0 = no intervals.
        seed: the bootstrap's seed.

    Returns:
        {"num_classes", "n_val", "n_test",
         "metrics": {name: test value or None for each of `clinical_metric_functions` and `ranking_metrics`},
         "operating_point": None for C > 2, else {"rule", "threshold" (logit; None when it could not be
             chosen or is +inf, i.e. nothing is called positive), "threshold_probability",
             "val": {...}, "test": {...}} with `operating_point_metrics`' keys,
         "calibration": `calibration`'s dict,
         "bootstrap": None when bootstrap == 0, else {"resamples", "seed", "confidence": 0.95,
             "stratified": True, "intervals": {name: {"low", "high", "defined"}} for each of
             `clinical_metric_functions`}}.
    """
    parse_operating_point(operating_point)
    if not (isinstance(bootstrap, (int, np.integer)) and bootstrap >= 0):
        raise UserError(f"--bootstrap must be 0 (no intervals) or a positive number of resamples, got {bootstrap!r}.")
    val_x, test_x = as_logits(val_logits, num_classes), as_logits(test_logits, num_classes)
    val_y, test_y = np.asarray(val_labels, dtype=np.int64), np.asarray(test_labels, dtype=np.int64)
    op = threshold = None
    if num_classes == 2:
        threshold = choose_threshold(val_x[:, 0], val_y, rule=operating_point)
        op = _operating_point_report(rule=operating_point, threshold=threshold, val_scores=val_x[:, 0],
                                     val_labels=val_y, test_scores=test_x[:, 0], test_labels=test_y)
    fns = clinical_metric_functions(num_classes=num_classes, threshold=threshold)
    report = {"num_classes": int(num_classes), "n_val": len(val_y), "n_test": len(test_y),
              "metrics": {**{name: fn(test_y, test_x) for name, fn in fns.items()},
                          **ranking_metrics(test_x, test_y, num_classes)},
              "operating_point": op,
              "calibration": calibration(val_logits=val_x, val_labels=val_y, test_logits=test_x,
                                         test_labels=test_y, num_classes=num_classes, bins=bins),
              "bootstrap": None}
    if bootstrap and len(test_y):
        intervals = bootstrap_intervals(fns, labels=test_y, scores=test_x, resamples=int(bootstrap), seed=seed)
        report["bootstrap"] = {"resamples": int(bootstrap), "seed": int(seed), "confidence": 0.95, "stratified": True,
                               "intervals": {k: {"low": v.low, "high": v.high, "defined": v.defined}
                                             for k, v in intervals.items()}}
    return report
