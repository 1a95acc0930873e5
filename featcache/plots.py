"""Figures: training curves, ROC curves, reliability diagrams (matplotlib inside the functions; PNG by Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from featcache.files import atomic_write
from featcache.metrics import EpochRecord


def _figure(ncols: int, width: float = 11.0, height: float = 4.2):
    # A bare Figure (no pyplot) is drawn by the Agg renderer on savefig, without switching the
    # process-wide backend or touching a display.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(1, ncols)


def _save(fig, path: str | Path) -> None:
    """Save as PNG through files.atomic_write: a half-drawn figure never has the final name, a full disk is
    a NoSpaceError (exit 6) and a read-only folder a one-sentence UserError."""
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))


def plot_curves(history: Sequence[EpochRecord], path: str | Path, title: str, *, selected: int | None = None) -> Path:
    """curves.png: accuracy evolution and loss evolution, train and val, per epoch.

    Args:
        history: the run's EpochRecords.
        path: the PNG to write.
        title: figure title (model, mode, dataset).
        selected: index into history of the selected epoch, marked with a dotted line; None = no mark.
    """
    epochs = [r.epoch for r in history]
    fig, (ax_acc, ax_loss) = _figure(2)
    for ax, key, name in ((ax_acc, "acc", "Accuracy"), (ax_loss, "loss", "Loss")):
        ax.plot(epochs, [getattr(r, f"train_{key}") for r in history], "o-", ms=3, label=f"train {key}")
        ax.plot(epochs, [getattr(r, f"val_{key}") for r in history], "s-", ms=3, label=f"val {key}")
        if selected is not None:
            ax.axvline(history[selected].epoch, color="grey", ls=":", lw=1, label="selected epoch")
        ax.set_title(f"{name} evolution")
        ax.set_xlabel("epoch")
        ax.set_ylabel(name.lower())
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    _save(fig, path)
    return Path(path)


def plot_comparison(runs: Sequence, path: str | Path, title: str = "Validation curves") -> Path:
    """Val accuracy and val loss per epoch of several runs (runs.RunResult) on two panels, one line per run."""
    fig, (ax_acc, ax_loss) = _figure(2)
    for run in runs:
        epochs = [r.epoch for r in run.history]
        label = f"{run.model}/{run.mode}"
        ax_acc.plot(epochs, [r.val_acc for r in run.history], "-", label=label)
        ax_loss.plot(epochs, [r.val_loss for r in run.history], "-", label=label)
    for ax, name in ((ax_acc, "val accuracy"), (ax_loss, "val loss")):
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    _save(fig, path)
    return Path(path)


def plot_seed_curves(histories: Sequence[Sequence[EpochRecord]], path: str | Path, title: str) -> Path:
    """curves.png of one setting trained with several seeds: mean per epoch, shaded min-max over the seeds.

    Args:
        histories: one history per seed, all of the same length.
        path: the PNG to write.
        title: figure title.
    """
    import numpy as np

    epochs = [r.epoch for r in histories[0]]
    fig, (ax_acc, ax_loss) = _figure(2)
    for ax, key, name in ((ax_acc, "acc", "Accuracy"), (ax_loss, "loss", "Loss")):
        for split, marker in (("train", "o-"), ("val", "s-")):
            values = np.array([[getattr(r, f"{split}_{key}") for r in h] for h in histories], dtype=float)  # (R, E)
            line, = ax.plot(epochs, values.mean(axis=0), marker, ms=3, label=f"{split} {key} (mean)")
            if len(histories) > 1:
                ax.fill_between(epochs, values.min(axis=0), values.max(axis=0), color=line.get_color(), alpha=0.2,
                                label=f"{split} {key} (min-max, {len(histories)} seeds)")
        ax.set_title(f"{name} evolution")
        ax.set_xlabel("epoch")
        ax.set_ylabel(name.lower())
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    _save(fig, path)
    return Path(path)


def plot_accuracy_path(values: Sequence[float], curves: Mapping[str, Sequence[float]], path: str | Path, title: str,
                       *, name: str, description: str, axis_label: str, selected: int | None = None) -> Path:
    """curves.png of a solver fitted once per value of one strength (ridge's l2, an L2 grid's C): accuracy
    curves against it, log axis.

    Args:
        values: the strengths (L,), all > 0.
        curves: legend label -> accuracy at each value (L,), e.g. {"train acc": ..., "val acc": ...}.
        path: the PNG to write.
        title: figure title.
        name: the strength's short name, for the mark of the selected value ("selected l2").
        description: what the axes title calls it ("Accuracy against the L2 strength").
        axis_label: the x axis label ("l2 (ridge strength)").
        selected: index into values of the selected strength, marked with a dotted line; None = no mark.
    """
    fig, ax = _figure(1, width=6.5)
    for (label, accuracy), marker in zip(curves.items(), ("o-", "s-", "^-", "d-", "v-")):
        ax.semilogx(values, accuracy, marker, ms=3, label=label)
    if selected is not None:
        ax.axvline(values[selected], color="grey", ls=":", lw=1, label=f"selected {name}")
    ax.set_title(f"Accuracy against {description}")
    ax.set_xlabel(axis_label)
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.suptitle(title)
    _save(fig, path)
    return Path(path)


def plot_roc(curves: Mapping[str, tuple], path: str | Path, title: str, *, num_classes: int) -> Path:
    """roc.png: ROC curves (sensitivity against 1 - specificity) of one or more runs on one plot.

    Args:
        curves: legend label (a run) -> (logits (N, K), labels (N,)) of its test rows.
        path: the PNG to write.
        title: figure title.
        num_classes: C; two classes: one curve per run on the one logit; more: one-vs-rest on the softmax
            probabilities, one curve per class per run (metrics.roc_points draws each; AUROC from metrics.auroc).
    """
    import numpy as np

    from featcache import metrics

    fig, ax = _figure(1, width=6.0, height=5.5)
    for label, (logits, labels) in curves.items():
        y = np.asarray(labels).reshape(-1)
        if num_classes == 2:
            tasks = [("", metrics.as_logits(logits, 2)[:, 0], y)]
        else:
            p = metrics.probabilities(logits, num_classes)  # (N, C)
            tasks = [(f" class {c}", p[:, c], (y == c).astype(np.int64)) for c in range(num_classes)]
        for suffix, scores, positive in tasks:
            points = metrics.roc_points(scores, positive)
            if points is None:
                continue
            _, sens, spec = points
            auc = metrics.roc_auc(scores, positive)
            ax.plot(1 - spec, sens, "-", lw=1.3, label=f"{label}{suffix} (AUROC {auc:.3f})")
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=1)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    _save(fig, path)
    return Path(path)


def plot_calibration(logits, labels, path: str | Path, title: str, *, num_classes: int, bins: int = 15,
                     temperature: float | None = None) -> Path:
    """calibration.png: reliability diagram of test rows, accuracy against confidence in the equal-width bins
    of metrics.expected_calibration_error (before, and after temperature scaling when `temperature` is given).

    Args:
        logits: (N, K) test logits; labels: (N,) int.
        path: the PNG to write; title: figure title.
        num_classes: C. bins: the ECE bins. temperature: the one fitted on val (metrics.fit_temperature) or None.
    """
    import numpy as np

    from featcache import metrics

    x, y = metrics.as_logits(logits, num_classes), np.asarray(labels).reshape(-1)
    fig, ax = _figure(1, width=6.0, height=5.5)
    edges = np.linspace(0.0, 1.0, bins + 1)
    for name, scaled in (("before", x), ("after temperature", None if temperature is None else x / temperature)):
        if scaled is None or len(y) == 0 or not np.isfinite(scaled).all():
            continue
        confidence = metrics.probabilities(scaled, num_classes).max(axis=1)
        correct = metrics.predict(scaled, num_classes) == y
        b = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
        counts = np.bincount(b, minlength=bins)
        used = counts > 0
        conf = np.bincount(b, weights=confidence, minlength=bins)[used] / counts[used]
        acc = np.bincount(b, weights=correct, minlength=bins)[used] / counts[used]
        ece = metrics.expected_calibration_error(scaled, y, num_classes, bins=bins)
        ax.plot(conf, acc, "o-", ms=4, label=f"{name} (ECE {ece:.3f})")
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=1, label="perfect calibration")
    ax.set_xlabel("confidence (probability of the predicted class)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    _save(fig, path)
    return Path(path)
