"""Tables: one run's summary and runs side by side, in the form of the original study's tables (rich)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Mapping, Sequence

# The original study's columns, in its order.
COLUMNS = ("model", "mode", "train_loss", "train_acc", "best_val_loss", "best_val_acc", "test_acc", "training_time")
HEADERS = {"model": "model", "mode": "mode", "train_loss": "train loss", "train_acc": "train acc",
           "best_val_loss": "best val loss", "best_val_acc": "best val acc", "test_acc": "test acc",
           "training_time": "training time (s)"}
FORMATS = ("table", "markdown", "csv", "json")


def print_table(rows: Sequence[Mapping], *, title: str | None = None) -> None:
    """Print dict rows as a table (columns: the keys of the first row)."""
    from rich.console import Console

    Console(width=max(120, Console().width)).print(_rich_table(rows, title=title))


def _rich_table(rows: Sequence[Mapping], *, title: str | None = None, headers: Mapping | None = None):
    from rich.table import Table

    table = Table(title=title)
    columns = list(rows[0]) if rows else []
    for c in columns:
        table.add_column(str((headers or {}).get(c, c)), justify="right" if _is_number(rows[0][c]) else "left")
    for r in rows:
        table.add_row(*(_fmt(r.get(c)) for c in columns))
    return table


def run_row(run) -> dict:
    """The study-table row of one RunResult (plus its selected epoch and run directory)."""
    s = run.summary
    row = {"model": run.model, "mode": run.mode, "train_loss": s.train_loss, "train_acc": s.train_acc,
           "best_val_loss": s.best_val_loss, "best_val_acc": s.best_val_acc, "test_acc": s.test_acc,
           "training_time": s.training_time}
    row["selected_epoch"] = s.selected_epoch
    row["diverged"] = s.diverged
    row["run_dir"] = str(run.run_dir)
    return row


def print_summary(run) -> None:
    """Print one run's table row and test details, as head-train and finetune end."""
    from rich.console import Console

    row = {k: v for k, v in run_row(run).items() if k in COLUMNS}
    console = Console(width=max(120, Console().width))
    console.print(_rich_table([row], title=f"{run.model} — {run.mode}", headers=HEADERS))
    s = run.summary
    auc = f", ROC-AUC {s.roc_auc:.4f}" if s.roc_auc is not None else ""
    console.print(f"selected epoch {s.selected_epoch}/{s.epochs} (best val acc, ties to lower val loss); "
                  f"test loss {s.test_loss:.4f}, balanced acc {s.balanced_accuracy:.4f}{auc}")
    if s.diverged:
        console.print("[bold red]diverged[/]: the run stopped early; see metrics.json")
    console.print(f"run: {run.run_dir}  (curves: {Path(run.run_dir) / 'curves.png'})")


def compare_runs(runs, *, format: str = "table", figure: str | Path | None = None) -> str:
    """Runs side by side as text (table, markdown, csv or json); optionally one comparison figure.

    Args:
        runs: RunResult objects or run directories.
        format: one of FORMATS.
        figure: where to write the val accuracy/loss curves of all runs (PNG), or None.
    """
    from featcache.runs import RunResult, load_run

    loaded = [r if isinstance(r, RunResult) else load_run(r) for r in runs]
    rows = [run_row(r) for r in loaded]
    if figure is not None:
        from featcache.plots import plot_comparison

        plot_comparison(loaded, figure)
    if format == "json":
        return json.dumps(rows, indent=2)
    if format == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue()
    if format == "markdown":
        cols = list(COLUMNS)
        lines = ["| " + " | ".join(HEADERS[c] for c in cols) + " |",
                 "|" + "|".join("---" if c in ("model", "mode") else "---:" for c in cols) + "|"]
        lines += ["| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for r in rows]
        return "\n".join(lines) + "\n"
    if format == "table":
        from rich.console import Console

        console = Console(width=140, record=True, file=io.StringIO())
        console.print(_rich_table([{c: r[c] for c in COLUMNS} for r in rows], title="Runs", headers=HEADERS))
        return console.export_text()
    raise ValueError(f"format must be one of {FORMATS}")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if v != v else f"{v:.4f}"
    return str(v)
