"""Training-curve figures (matplotlib imported inside the functions; PNG drawn by Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

from featcache.files import atomic_write
from featcache.metrics import EpochRecord

if TYPE_CHECKING:
    from featcache.runs import RunResult


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


def plot_comparison(runs: Sequence["RunResult"], path: str | Path, title: str = "Validation curves") -> Path:
    """Val accuracy and val loss per epoch of several runs on two panels, one line per run (model/mode)."""
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
