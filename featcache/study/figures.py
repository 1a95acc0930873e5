"""The study report's figures (matplotlib inside the functions; PNG by Agg, written atomically).

val_curves: validation accuracy and loss per epoch, one panel per backbone, the modes overlaid, a band
between the lowest and highest seed; test_metric: each row's test accuracy with its 95 % interval over seeds;
accuracy_cost: test accuracy against the row's wall-time cost. The ROC figure is plots.plot_roc's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from featcache.files import atomic_write

MODE_STYLES = {"head": "-", "frozen": "--", "finetune": "-"}


def _save(fig, path: str | Path) -> Path:
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    return Path(path)


def val_curves(panels: Mapping[str, Mapping[str, Sequence[Sequence]]], path: str | Path) -> Path:
    """panels: backbone -> row name -> one history (EpochRecords) per seed; two figure rows (val acc, val loss)."""
    import numpy as np
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    n = max(len(panels), 1)
    fig = Figure(figsize=(4.2 * n, 6.4), layout="constrained")
    axes = np.array(fig.subplots(2, n, squeeze=False))
    for col, (backbone, rows) in enumerate(panels.items()):
        for name, histories in rows.items():
            epochs = min(len(h) for h in histories)
            if epochs == 0:
                continue
            x = np.arange(1, epochs + 1)
            style = MODE_STYLES.get(name.split(" ")[1] if " " in name else "", "-")
            for ax, field in zip(axes[:, col], ("val_acc", "val_loss")):
                values = np.array([[getattr(r, field) for r in h[:epochs]] for h in histories], dtype=float)
                line, = ax.plot(x, np.nanmean(values, axis=0), style, lw=1.5, label=name.split(" ", 1)[1])
                if len(histories) > 1:
                    ax.fill_between(x, np.nanmin(values, axis=0), np.nanmax(values, axis=0), alpha=0.2,
                                    color=line.get_color())
        axes[0, col].set_title(backbone, fontsize="medium")
        axes[0, col].set_ylabel("val accuracy")
        axes[1, col].set_ylabel("val loss")
        axes[1, col].set_xlabel("epoch")
        axes[0, col].legend(fontsize="small")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle("Validation curves (mean over seeds; band: lowest to highest seed)")
    return _save(fig, path)


def test_metric(rows: Sequence[Mapping], path: str | Path, *, metric: str = "test_acc",
                label: str = "test accuracy") -> Path:
    """rows: report rows (name, metric interval dict); one horizontal bar per row with its 95 % interval."""
    from matplotlib.figure import Figure

    shown = [r for r in rows if r[metric]["mean"] is not None]
    fig = Figure(figsize=(7.5, 0.42 * len(shown) + 1.4), layout="constrained")
    ax = fig.subplots()
    for i, r in enumerate(shown):
        d = r[metric]
        err = [[d["half_width"] or 0.0], [d["half_width"] or 0.0]]
        ax.errorbar(d["mean"], i, xerr=err, fmt="o", capsize=4, color="C0" if not r.get("best") else "C3")
    ax.set_yticks(range(len(shown)), [r["name"] for r in shown], fontsize="small")
    ax.invert_yaxis()
    ax.set_xlabel(f"{label} (mean ± 95 % interval over seeds)")
    ax.grid(alpha=0.3, axis="x")
    return _save(fig, path)


def accuracy_cost(rows: Sequence[Mapping], path: str | Path) -> Path:
    """Test accuracy (mean ± interval) against each row's cost in wall seconds (log scale): accuracy per second."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    fig = Figure(figsize=(7.0, 4.8), layout="constrained")
    ax = fig.subplots()
    for i, r in enumerate(x for x in rows if x["test_acc"]["mean"] is not None and x["cost"]["total_s"]):
        d = r["test_acc"]
        ax.errorbar(r["cost"]["total_s"], d["mean"], yerr=d["half_width"] or 0.0, fmt="o", capsize=3,
                    color=f"C{i % 10}", label=r["name"])
    ax.set_xscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.tick_params(axis="x", which="minor", labelsize="x-small")
    ax.set_xlabel("cost: wall seconds of the row (all seeds; a cached row includes its extraction)")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small", loc="best")
    return _save(fig, path)
