"""Tables: one run's summary and runs side by side, in the form of the original study's tables (rich)."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from pathlib import Path
from typing import Callable, Mapping, Sequence

# The original study's columns, in its order.
COLUMNS = ("model", "mode", "train_loss", "train_acc", "best_val_loss", "best_val_acc", "test_acc", "training_time")
HEADERS = {"model": "model", "mode": "mode", "train_loss": "train loss", "train_acc": "train acc",
           "best_val_loss": "best val loss", "best_val_acc": "best val acc", "test_acc": "test acc",
           "training_time": "training time (s)"}
FORMATS = ("table", "markdown", "csv", "json")  # of compare_runs (and `featcache report --format`)
INTERVALS_TITLE = "Intervals over seeds (mean ± 95 % t-interval)"


def print_table(rows: Sequence[Mapping], *, title: str | None = None) -> None:
    """Print dict rows as a table (columns: the keys of the first row)."""
    _console().print(_rich_table(rows, title=title))


def _console():
    """A rich console on stdout at least 120 columns wide (the study tables are wide)."""
    from rich.console import Console

    return Console(width=max(120, Console().width))


def _rich_table(rows: Sequence[Mapping], *, title: str | None = None, headers: Mapping | None = None):
    from rich.table import Table

    table = Table(title=title)
    columns = list(rows[0]) if rows else []
    for c in columns:
        table.add_column(str((headers or {}).get(c, c)), justify="right" if _is_number(rows[0][c]) else "left")
    for r in rows:
        table.add_row(*(_fmt(r.get(c)) for c in columns))
    return table


def cache_row(record: Mapping, *, dataset_changed: Callable[[Mapping], bool | None]) -> dict:
    """The `featcache cache ls` row of one cache (a record of cache.list_caches).

    A complete cache whose dataset_changed(record) since extraction is "stale": a re-run extracts a new
    cache and this one is never used again.
    """
    splits = " ".join(f"{s}={v['n']}" if v["n"] == v["done"] else f"{s}={v['done']}/{v['n']}"
                      for s, v in record["splits"].items())
    return {"dataset": record["dataset"], "model": record.get("model") or "?",
            "weights": record.get("weights") or "?", "splits": splits, "D": record.get("feature_dim") or "?",
            "dtype": record.get("dtype") or "?", "size": f"{record['size'] / 1e6:.1f} MB",
            "status": "stale" if record["status"] == "complete" and dataset_changed(record) else record["status"],
            "file": Path(record["path"]).name}


def run_row(run) -> dict:
    """The study-table row of one RunResult (plus its selected epoch and run directory)."""
    s = run.summary
    mode = f"{run.mode}/{run.extra['solver']}" if run.extra.get("solver") else run.mode  # e.g. head/ridge
    row = {"model": run.model, "mode": mode, "train_loss": s.train_loss, "train_acc": s.train_acc,
           "best_val_loss": s.best_val_loss, "best_val_acc": s.best_val_acc, "test_acc": s.test_acc,
           "training_time": s.training_time}
    solver = str(run.extra.get("solver") or "")
    if solver == "ridge" or "knn" in solver:  # closed form / votes: no loss of a likelihood, no epochs
        row.update(train_loss=None, best_val_loss=None)
    if "-shot-" in solver:  # few-shot: no train or val loss of one model
        row.update(train_loss=None, train_acc=None, best_val_loss=None)
    row["selected_epoch"] = s.selected_epoch
    row["diverged"] = s.diverged
    row["run_dir"] = str(run.run_dir)
    return row


def print_summary(run) -> None:
    """Print one run's table row and test details, as head-train and finetune end."""
    row = {k: v for k, v in run_row(run).items() if k in COLUMNS}
    console = _console()
    console.print(_rich_table([row], title=f"{run.model} — {run.mode}", headers=HEADERS))
    s = run.summary
    auc = f", ROC-AUC {s.roc_auc:.4f}" if s.roc_auc is not None else ""
    if "ridge" in run.extra:
        console.print(f"selected l2 {run.extra['ridge']['selected_l2']:g} (best val acc, ties to lower val MSE); "
                      f"balanced acc {s.balanced_accuracy:.4f}{auc}")
    elif "lbfgs" in run.extra:
        console.print(f"selected C {run.extra['lbfgs']['selected_c']:g} of {len(run.extra['lbfgs']['cs'])} (best "
                      f"val acc, ties to lower val loss); test loss {s.test_loss:.4f}, balanced acc "
                      f"{s.balanced_accuracy:.4f}{auc}")
        if run.extra["lbfgs"].get("note"):
            console.print(run.extra["lbfgs"]["note"])
    elif "knn" in run.extra:
        console.print(f"selected k {run.extra['knn']['selected_k']} of {run.extra['knn']['ks']} (best val acc, ties "
                      f"to the smaller k); balanced acc {s.balanced_accuracy:.4f}{auc}")
    elif "fewshot" in run.extra:
        f = run.extra["fewshot"]
        console.print(f"{f['shots']}-shot {f['solver']} over {f['draws']} draws (mean ± 95 % t-interval): test acc "
                      f"{format_interval(f['test_acc'])}, balanced acc {format_interval(f['balanced_accuracy'])}")
    else:
        console.print(f"selected epoch {s.selected_epoch}/{s.epochs} (best val acc, ties to lower val loss); "
                      f"test loss {s.test_loss:.4f}, balanced acc {s.balanced_accuracy:.4f}{auc}")
    if s.diverged:
        console.print("[bold red]diverged[/]: the run stopped early; see metrics.json")
    for table in _extra_tables(run):
        console.print(table)
    curves = Path(run.run_dir) / "curves.png"
    console.print(f"run: {run.run_dir}" + (f"  (curves: {curves})" if curves.is_file() else ""))


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
    if format == "json":  # strict JSON, as metrics.json: a non-finite number is null
        return json.dumps([{k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in r.items()}
                           for r in rows], indent=2, allow_nan=False)
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
        intervals = interval_rows(loaded)
        if intervals:
            lines += ["", f"{INTERVALS_TITLE}:", "",
                      "| " + " | ".join(intervals[0]) + " |", "|" + "|".join("---" for _ in intervals[0]) + "|"]
            lines += ["| " + " | ".join(_fmt(v) for v in r.values()) + " |" for r in intervals]
        return "\n".join(lines) + "\n"
    if format == "table":
        from rich.console import Console

        console = Console(width=140, record=True, file=io.StringIO())
        console.print(_rich_table([{c: r[c] for c in COLUMNS} for r in rows], title="Runs", headers=HEADERS))
        intervals = interval_rows(loaded)
        if intervals:
            console.print(_rich_table(intervals, title=INTERVALS_TITLE))
        for run in loaded:
            if "grid" in run.extra:
                console.print(_grid_table(run))
        return console.export_text()
    raise ValueError(f"format must be one of {FORMATS}")


def format_interval(d: Mapping | None) -> str:
    """'mean ± half width' of an Interval dict (metrics.Interval.to_dict); the mean alone for one value."""
    if not d or d.get("mean") is None:
        return "-"
    if d.get("half_width") is None:
        return f"{d['mean']:.4f}"
    return f"{d['mean']:.4f} ± {d['half_width']:.4f}"


def _setting(config) -> str:
    return f"{config.optimizer} lr {config.lr:g} wd {config.weight_decay:g}"


def interval_rows(runs) -> list[dict]:
    """Rows of mean ± 95 % CI over seeds: one per grid run (its selected cell) and one per seed group.

    A seed group = two or more runs with different seeds that differ in nothing else: same model, mode,
    training settings, cache and fine-tuning settings (the first run of each seed counts; grid runs carry
    their own intervals; ridge runs are deterministic and never grouped).
    """
    rows, groups = [], {}
    for run in runs:
        if "seed_stats" in run.extra:
            st = run.extra["seed_stats"]
            rows.append({"model": run.model, "mode": run.mode, "setting": _setting(run.config), "seeds": st["n"],
                         "best val acc": format_interval(st["best_val_acc"]),
                         "test acc": format_interval(st["test_acc"]), "from": f"grid run {Path(run.run_dir).name}"})
            continue
        if "fewshot" in run.extra:
            f = run.extra["fewshot"]
            rows.append({"model": run.model, "mode": run_row(run)["mode"], "setting": f"{f['shots']} shots",
                         "seeds": f["draws"], "best val acc": _mean_interval(f["val_acc"]),
                         "test acc": format_interval(f["test_acc"]), "from": f"{f['draws']} draws, one run"})
            continue
        if run.extra.get("solver"):  # ridge, lbfgs, knn: deterministic, never grouped by seed
            continue
        config = dataclasses.asdict(run.config)
        config.pop("seed")
        config.pop("runs_dir", None)
        key = json.dumps({"model": run.model, "mode": run.mode, "config": config, "cache": run.cache.get("key"),
                          "finetune": run.extra.get("finetune"),
                          "dataset": run.extra.get("dataset_fingerprint")}, sort_keys=True, default=str)
        groups.setdefault(key, {}).setdefault(run.config.seed, run)
    for by_seed in groups.values():
        members = list(by_seed.values())
        if len(members) < 2:
            continue
        first = members[0]
        rows.append({"model": first.model, "mode": run_row(first)["mode"], "setting": _setting(first.config),
                     "seeds": len(members),
                     "best val acc": _mean_interval([r.summary.best_val_acc for r in members]),
                     "test acc": _mean_interval([r.summary.test_acc for r in members]),
                     "from": f"{len(members)} runs, seeds {', '.join(str(r.config.seed) for r in members)}"})
    return rows


def _mean_interval(values) -> str:
    from featcache.metrics import mean_interval

    return format_interval(mean_interval(values).to_dict())


def _grid_table(run):
    grid = run.extra["grid"]
    sel = grid["selected"]
    rows = [{"lr": f"{c['lr']:g}", "weight decay": f"{c['weight_decay']:g}",
             "best val acc": format_interval(c["val_acc"]), "test acc": format_interval(c["test_acc"]),
             "selected": "◀ selected" if (c["lr"], c["weight_decay"]) == (sel["lr"], sel["weight_decay"]) else ""}
            for c in grid["cells"]]
    return _rich_table(rows, title=f"Grid of {run.model} heads ({grid['heads']} heads in one program; mean ± 95 % "
                                   f"t-interval over {len(grid['seeds'])} seeds; head.npz: selected, seed "
                                   f"{sel['saved_seed']})")


def _extra_tables(run) -> list:
    """The grid, seed-interval and ridge tables print_summary adds when the run has them."""
    tables = []
    if "grid" in run.extra:
        tables.append(_grid_table(run))
    if "seed_stats" in run.extra:
        tables.append(_rich_table(interval_rows([run]), title="Selected setting over seeds"))
    if "ridge" in run.extra:
        r = run.extra["ridge"]
        rows = [{"l2": l2, "train acc": tr, "val acc": va, "val MSE": mse, "test acc": te,
                 "selected": "◀ selected" if l2 == r["selected_l2"] else ""}
                for l2, tr, va, mse, te in zip(r["l2s"], r["train_acc"], r["val_acc"], r["val_mse"], r["test_acc"])]
        tables.append(_rich_table(rows, title="Ridge path (closed form, one eigendecomposition; "
                                              "selected on val acc)"))
    return tables


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if v != v else f"{v:.4f}"
    return str(v)
