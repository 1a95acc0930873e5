"""Figures: training curves, ROC curves, reliability diagrams, confusion matrices, grid heat maps and the report's
comparison figures (matplotlib inside the functions; PNG by Agg).

Every function takes plain data (numbers, lists, numpy arrays, EpochRecords) and writes one PNG;
draw_run_figures draws every figure of one run directory from one picklable spec, so the caller may
draw them in this process or hand the spec to another one.
"""

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


def _fixed_figure(ncols: int, width: float, height: float, *, title: str, suptitle: bool):
    """A figure with fixed margins, for the figures every run draws (curves, ROC, calibration): without a layout
    engine a figure draws in about half the time (0.23 against 0.5 s for curves.png here). The top margin
    makes room for the title's lines (as suptitle above the axes' own titles, or as the axes' title)."""
    from matplotlib.figure import Figure

    lines = title.count("\n") + 1 + (1 if suptitle else 0)  # + the axes' one-line titles under a suptitle
    fig = Figure(figsize=(width, height))
    fig.subplots_adjust(left=0.8 / width, right=1.0 - 0.25 / width, bottom=0.6 / height,
                        top=1.0 - (0.2 + 0.25 * lines) / height, wspace=0.25)
    return fig, fig.subplots(1, ncols)


def _save(fig, path: str | Path) -> None:
    """Save as PNG through files.atomic_write: a half-drawn figure never has the final name, a full disk is
    a NoSpaceError (exit 6) and a read-only folder a one-sentence UserError."""
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))


LINE_STYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "v", "D", "x", "P", "*")


def _epoch_ticks(ax) -> None:
    """Whole epochs only on the x axis (no 2.5 for a five-epoch run)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _chance_line(ax, chance: float | None) -> None:
    if chance is not None:
        ax.axhline(chance, color="black", ls="--", lw=0.8, alpha=0.6, label=f"chance (majority class) {chance:.2f}")


def plot_curves(history: Sequence[EpochRecord], path: str | Path, title: str, *, selected: int | None = None,
                chance: float | None = None) -> Path:
    """curves.png: accuracy evolution and loss evolution, train and val, per epoch.

    Args:
        history: the run's EpochRecords.
        path: the PNG to write.
        title: figure title (model, mode, dataset, key settings).
        selected: index into history of the selected epoch, marked with a dotted line; None = no mark.
        chance: the accuracy of always predicting the most frequent class (metrics.chance_accuracy), drawn as
            a dashed line on the accuracy panel; None = no line.
    """
    epochs = [r.epoch for r in history]
    fig, (ax_acc, ax_loss) = _fixed_figure(2, 11.0, 4.2, title=title, suptitle=True)
    for ax, key, name in ((ax_acc, "acc", "Accuracy"), (ax_loss, "loss", "Loss")):
        ax.plot(epochs, [getattr(r, f"train_{key}") for r in history], "o-", ms=3, label=f"train {key}")
        ax.plot(epochs, [getattr(r, f"val_{key}") for r in history], "s-", ms=3, label=f"val {key}")
        if selected is not None:
            ax.axvline(history[selected].epoch, color="grey", ls=":", lw=1, label="selected epoch")
        if key == "acc":
            _chance_line(ax, chance)
        ax.set_title(f"{name} evolution")
        ax.set_xlabel("epoch")
        ax.set_ylabel(name.lower())
        _epoch_ticks(ax)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    _save(fig, path)
    return Path(path)


def unique_labels(labels: Sequence[str]) -> list[str]:
    """The labels with " (2)", " (3)", ... added to repeats, so that no two legend entries read the same."""
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label} ({seen[label]})")
    return out


def plot_comparison(runs: Sequence, path: str | Path, title: str = "Validation curves", *,
                    labels: Sequence[str] | None = None) -> Path:
    """Val accuracy and val loss per epoch of several runs (runs.RunResult) on two panels, one line per run.

    Each run gets its own line style and marker (identical curves stay visible) and a legend label of its
    own (`labels`, made unique; default: the run directory's name).
    """
    fig, (ax_acc, ax_loss) = _figure(2, width=12.0, height=4.8)
    names = unique_labels(labels if labels is not None else [Path(run.run_dir).name for run in runs])
    for i, (run, label) in enumerate(zip(runs, names)):
        epochs = [r.epoch for r in run.history]
        style = dict(ls=LINE_STYLES[i % len(LINE_STYLES)], marker=MARKERS[i % len(MARKERS)], ms=4,
                     markevery=max(1, len(epochs) // 10), alpha=0.85, label=label)
        line, = ax_acc.plot(epochs, [r.val_acc for r in run.history], **style)
        ax_loss.plot(epochs, [r.val_loss for r in run.history], color=line.get_color(), **style)
    for ax, name in ((ax_acc, "val accuracy"), (ax_loss, "val loss")):
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        _epoch_ticks(ax)
        ax.grid(alpha=0.3)
    ax_loss.legend(fontsize="x-small", loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(title)
    _save(fig, path)
    return Path(path)


def plot_seed_curves(histories: Sequence[Sequence[EpochRecord]], path: str | Path, title: str, *,
                     chance: float | None = None) -> Path:
    """curves.png of one setting trained with several seeds: mean per epoch, shaded min-max over the seeds.

    Args:
        histories: one history per seed, all of the same length.
        path: the PNG to write.
        title: figure title.
        chance: as plot_curves.
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
        if key == "acc":
            _chance_line(ax, chance)
        ax.set_title(f"{name} evolution")
        ax.set_xlabel("epoch")
        ax.set_ylabel(name.lower())
        _epoch_ticks(ax)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    _save(fig, path)
    return Path(path)


def plot_accuracy_path(values: Sequence[float], curves: Mapping[str, Sequence[float]], path: str | Path, title: str,
                       *, name: str, description: str, axis_label: str, selected: int | None = None,
                       chance: float | None = None) -> Path:
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
        chance: as plot_curves.
    """
    fig, ax = _figure(1, width=6.5)
    for (label, accuracy), marker in zip(curves.items(), ("o-", "s-", "^-", "d-", "v-")):
        ax.semilogx(values, accuracy, marker, ms=3, label=label)
    if selected is not None:
        ax.axvline(values[selected], color="grey", ls=":", lw=1, label=f"selected {name}")
    _chance_line(ax, chance)
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

    fig, ax = _fixed_figure(1, 6.0, 5.5, title=title, suptitle=False)
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
    fig, ax = _fixed_figure(1, 6.0, 5.5, title=title, suptitle=False)
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


def plot_confusion(confusion, class_names: Sequence[str], path: str | Path, title: str, *,
                   scores: Mapping[str, Sequence[float]]) -> Path:
    """confusion.png: the test confusion matrix (rows true class, columns predicted; counts and row shares) and,
    under it, a table of per-class precision, recall, F1 and support.

    Args:
        confusion: (C, C) counts (metrics.confusion_matrix; RunSummary.confusion_matrix).
        class_names: the C class names.
        path: the PNG to write; title: figure title.
        scores: "precision", "recall", "f1" (C floats each, metrics.per_class_scores) and "support" (C ints).
    """
    import numpy as np

    cm = np.asarray(confusion, dtype=np.int64)  # (C, C)
    c = len(class_names)
    side = min(12.0, 3.5 + 0.55 * c)
    fig, (ax, ax_table) = _figure_rows(side, side + 0.35 * (c + 1) + 0.6, table_rows=c + 1)
    shares = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)  # row-normalised: recall on the diagonal
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, label="share of the true class", shrink=0.8)
    if c <= 20:
        for i in range(c):
            for j in range(c):
                ax.text(j, i, f"{cm[i, j]}\n{shares[i, j]:.0%}", ha="center", va="center", fontsize=7,
                        color="white" if shares[i, j] > 0.6 else "black")
    ax.set_xticks(range(c), [str(n) for n in class_names], rotation=45 if c > 4 else 0, ha="right" if c > 4 else "center")
    ax.set_yticks(range(c), [str(n) for n in class_names])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"Confusion matrix (test, {int(cm.sum())} images)")
    rows = [[str(name), f"{p:.3f}", f"{r:.3f}", f"{f:.3f}", str(int(n))]
            for name, p, r, f, n in zip(class_names, scores["precision"], scores["recall"], scores["f1"],
                                        scores["support"])]
    ax_table.axis("off")
    table = ax_table.table(cellText=rows, colLabels=["class", "precision", "recall", "F1", "support"],
                           loc="upper center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    fig.suptitle(title)
    _save(fig, path)
    return Path(path)


def _figure_rows(width: float, height: float, *, table_rows: int):
    """A figure of a square plot above a table of `table_rows` rows."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    table_share = min(0.6, 0.3 * table_rows / max(width, 1.0) + 0.08)
    return fig, fig.subplots(2, 1, height_ratios=[1.0 - table_share, table_share])


def plot_grid_heatmap(grid: Mapping, path: str | Path, title: str) -> Path:
    """grid.png: mean val accuracy of every (lr, weight decay) cell of a grid run as a heat map, the selected
    cell outlined.

    Args:
        grid: the grid as metrics.json stores it (sweep.GridFit.to_dict): lrs, weight_decays, cells (lr-major,
            each with val_acc {"mean", "half_width"}) and selected {"lr", "weight_decay"}.
        path: the PNG to write; title: figure title.
    """
    import numpy as np
    from matplotlib.patches import Rectangle

    lrs, wds = list(grid["lrs"]), list(grid["weight_decays"])
    acc = np.full((len(lrs), len(wds)), np.nan)  # (L, W)
    for cell in grid["cells"]:
        mean = cell["val_acc"].get("mean")
        acc[lrs.index(cell["lr"]), wds.index(cell["weight_decay"])] = np.nan if mean is None else mean
    fig, ax = _figure(1, width=max(5.0, 1.2 * len(wds) + 3.0), height=max(3.5, 0.8 * len(lrs) + 2.0))
    image = ax.imshow(acc, cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax, label="mean val accuracy over seeds")
    for i in range(len(lrs)):
        for j in range(len(wds)):
            ax.text(j, i, "-" if np.isnan(acc[i, j]) else f"{acc[i, j]:.3f}", ha="center", va="center", fontsize=8,
                    color="white")
    sel = grid["selected"]
    i, j = lrs.index(sel["lr"]), wds.index(sel["weight_decay"])
    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", lw=2.5, label="selected"))
    ax.set_xticks(range(len(wds)), [f"{w:g}" for w in wds])
    ax.set_yticks(range(len(lrs)), [f"{v:g}" for v in lrs])
    ax.set_xlabel("weight decay")
    ax.set_ylabel("learning rate")
    ax.set_title("Mean val accuracy per (lr, weight decay)")
    ax.legend(loc="upper right", fontsize="small")
    fig.suptitle(title)
    _save(fig, path)
    return Path(path)


def plot_test_bars(bars: Sequence[Mapping], path: str | Path, title: str) -> Path:
    """The report's test-metric bar chart: one bar per run or seed group, a 95 % interval where one exists.

    Args:
        bars: {"label": str, "value": float, "low": float | None, "high": float | None} each (None: no interval).
        path: the PNG to write; title: figure title.
    """
    import numpy as np

    labels = unique_labels([b["label"] for b in bars])
    values = np.array([np.nan if b["value"] is None else b["value"] for b in bars], dtype=float)
    fig, ax = _figure(1, width=max(6.0, 0.9 * len(bars) + 3.0), height=4.8)
    x = np.arange(len(bars))
    ax.bar(x, values, color=["C0" if b.get("low") is None else "C1" for b in bars])
    for i, b in enumerate(bars):
        if b.get("low") is not None and b.get("high") is not None:
            low, high = max(0.0, b["low"]), min(1.0, b["high"])  # an accuracy's interval ends inside [0, 1]
            ax.errorbar(i, values[i], yerr=[[values[i] - low], [high - values[i]]], color="black", capsize=5, lw=1.2)
        if np.isfinite(values[i]):
            ax.text(i, values[i] / 2, f"{values[i]:.3f}", ha="center", va="center", fontsize=8, color="white",
                    rotation=90 if len(bars) > 8 else 0)
    ax.set_xticks(x, labels, rotation=30 if len(bars) > 2 else 0, ha="right" if len(bars) > 2 else "center",
                  fontsize="small")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("test accuracy")
    ax.set_title("Test accuracy (orange: mean over seeds with 95 % t-interval; blue: one run)")
    ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title)
    _save(fig, path)
    return Path(path)


# The files draw_run_figures may write into a run directory, by the spec entry that asks for them.
CURVES_PNG = "curves.png"
GRID_PNG = "grid.png"
CONFUSION_PNG = "confusion.png"
ROC_PNG = "roc.png"
CALIBRATION_PNG = "calibration.png"


def draw_run_figures(run_dir: str | Path, spec: Mapping) -> list[Path]:
    """Draw every figure of one run directory from plain, picklable data; the one entry point the runs call.

    Args:
        run_dir: the run directory.
        spec: "title" (str: model, mode, dataset, key settings) and any of
            "curves": {"kind": "epochs", "history": [EpochRecord], "selected": int | None}
                | {"kind": "seeds", "histories": [[EpochRecord]]}
                | {"kind": "path", "values", "curves", "name", "description", "axis_label", "selected"}
                (plot_accuracy_path) -> curves.png;
            "chance": float | None, the majority-class accuracy line on the accuracy curves;
            "grid": the grid's record (sweep.GridFit.to_dict) -> grid.png;
            "test": {"logits" (N, K) or None, "labels" (N,), "num_classes", "class_names", "confusion" (C, C),
                "scores" (precision/recall/f1/support), "bins", "temperature"} (runs.test_figures) ->
                confusion.png, and roc.png and calibration.png when there are logits and every one is finite.

    Returns:
        The PNGs written, in that order.
    """
    import numpy as np

    run_dir, title, chance = Path(run_dir), spec["title"], spec.get("chance")
    written = []
    curves = spec.get("curves")
    if curves is not None:
        path, kind = run_dir / CURVES_PNG, curves["kind"]
        if kind == "epochs":
            written.append(plot_curves(curves["history"], path, title, selected=curves.get("selected"), chance=chance))
        elif kind == "seeds":
            written.append(plot_seed_curves(curves["histories"], path, title, chance=chance))
        else:
            options = {k: curves[k] for k in ("name", "description", "axis_label", "selected")}
            written.append(plot_accuracy_path(curves["values"], curves["curves"], path, title, chance=chance,
                                              **options))
    if spec.get("grid") is not None:
        written.append(plot_grid_heatmap(spec["grid"], run_dir / GRID_PNG, title))
    test = spec.get("test")
    if test is not None:
        written.append(plot_confusion(test["confusion"], test["class_names"], run_dir / CONFUSION_PNG,
                                      f"Test, {title}", scores=test["scores"]))
        logits = test.get("logits")
        if logits is not None and np.isfinite(np.asarray(logits, dtype=np.float64)).all():  # diverged: no curves
            written.append(plot_roc({"test": (test["logits"], test["labels"])}, run_dir / ROC_PNG, f"ROC, {title}",
                                    num_classes=test["num_classes"]))
            written.append(plot_calibration(test["logits"], test["labels"], run_dir / CALIBRATION_PNG,
                                            f"Reliability, {title}", num_classes=test["num_classes"],
                                            bins=test["bins"], temperature=test["temperature"]))
    return written
