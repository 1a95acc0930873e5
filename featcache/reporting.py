"""Tables: one run's summary and runs side by side, in the form of the original study's tables (rich)."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import sys
from pathlib import Path
from typing import Callable, Mapping, Sequence

from featcache.files import shell_quoted

# The original study's columns, in its order.
COLUMNS = ("model", "mode", "train_loss", "train_acc", "best_val_loss", "best_val_acc", "test_acc", "training_time")
HEADERS = {"model": "model", "mode": "mode", "train_loss": "train loss", "train_acc": "train acc",
           "best_val_loss": "best val loss", "best_val_acc": "best val acc", "test_acc": "test acc",
           "training_time": "training time (s)"}
# What tells runs apart (after the study's columns): dataset, solver/optimizer settings, image size, run directory.
IDENTITY = ("dataset", "optimizer", "lr", "weight_decay", "standardize", "image_size", "run")
IDENTITY_HEADERS = {"dataset": "dataset", "optimizer": "optimizer", "lr": "lr", "weight_decay": "wd",
                    "standardize": "std", "image_size": "px", "run": "run"}
FORMATS = ("table", "markdown", "csv", "json")  # of compare_runs (and `featcache report --format`)
INTERVALS_TITLE = "Intervals over seeds (mean ± 95 % t-interval)"


def print_table(rows: Sequence[Mapping], *, title: str | None = None) -> None:
    """Print dict rows as a table (columns: the keys of the first row), as wide as its longest cells need, so
    that no cell (a cache's file name) is cut at the terminal's width."""
    columns = list(rows[0]) if rows else []
    natural = sum(max(len(str(c)), *(len(_fmt(r.get(c))) for r in rows)) + 3 for c in columns) + 1
    _console(natural).print(_rich_table(rows, title=title))


def _console(width: int = 0):
    """A rich console on stdout at least 120 (and `width`) columns wide (the study tables are wide)."""
    from rich.console import Console

    return Console(width=max(120, width, Console().width))


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
    transform = record.get("transform") if isinstance(record.get("transform"), Mapping) else {}
    image = f"{transform['crop']} px (resize {transform.get('resize', '?')})" if transform.get("crop") else "?"
    return {"dataset": record["dataset"], "model": record.get("model") or "?",
            "weights": record.get("weights") or "?", "image": image, "splits": splits,
            "D": record.get("feature_dim") or "?",
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
    row.update(identity_values(run))
    row.update(clinical_values(run))
    return row


def identity_values(run) -> dict:
    """The IDENTITY columns of a run: its dataset (the cache's or the fine-tuned folder's name), the optimizer,
    lr and weight decay of a trained head or network (None for ridge, lbfgs, knn and few-shot, which have none),
    whether features were standardized, the crop size in pixels and the run directory's name."""
    extra, config = run.extra, run.config
    dataset = extra.get("dataset_name") or (Path(extra["dataset_root"]).name if extra.get("dataset_root") else None)
    transform = extra.get("transform") if isinstance(extra.get("transform"), Mapping) else {}
    trained = not extra.get("solver")
    return {"dataset": dataset, "optimizer": config.optimizer if trained else None,
            "lr": config.lr if trained else None, "weight_decay": config.weight_decay if trained else None,
            "standardize": config.standardize if run.mode == "head" else None,
            "image_size": extra.get("image_size") or transform.get("crop"), "run": Path(run.run_dir).name}


CLINICAL_TITLE = "Test metrics with 95 % stratified bootstrap intervals (operating point chosen on val)"
CLINICAL_KEYS = ("balanced_accuracy", "auroc", "sensitivity", "specificity")  # with intervals when bootstrapped
CLINICAL_HEADERS = {"balanced_accuracy": "balanced acc", "auroc": "AUROC", "sensitivity": "sensitivity",
                    "specificity": "specificity"}


def clinical_values(run) -> dict:
    """The clinical numbers of a run (metrics.json extra["clinical"]) as flat columns for csv/json: each of
    CLINICAL_KEYS with _low/_high (None without intervals), ece and ece_temperature; {} for an older run."""
    clinical = run.extra.get("clinical")
    if not clinical:
        return {}
    intervals = (clinical.get("bootstrap") or {}).get("intervals") or {}
    out = {}
    for key in CLINICAL_KEYS:
        if key in clinical["metrics"]:
            out[key] = clinical["metrics"][key]
            out[f"{key}_low"] = (intervals.get(key) or {}).get("low")
            out[f"{key}_high"] = (intervals.get(key) or {}).get("high")
    out["ece"] = clinical["calibration"]["ece_before"]
    out["ece_temperature"] = clinical["calibration"]["ece_after"]
    return out


def clinical_rows(runs) -> list[dict]:
    """One row per run that has clinical metrics: balanced acc and AUROC (and, for two classes, sensitivity and
    specificity at the operating point) as 'value [low, high]', the operating point rule and ECE before -> after
    temperature scaling."""
    rows = []
    for run in runs:
        values = clinical_values(run)
        if not values:
            continue
        op = run.extra["clinical"].get("operating_point")
        row = {"model": run.model, "mode": run_row(run)["mode"]}
        for key in CLINICAL_KEYS:
            if key in values:
                low, high = values[f"{key}_low"], values[f"{key}_high"]
                interval = f" [{low:.4f}, {high:.4f}]" if low is not None and high is not None else ""
                row[CLINICAL_HEADERS[key]] = f"{_fmt(values[key])}{interval}"
        if op:
            row["operating point"] = op["rule"]
        row["ECE (T-scaled)"] = f"{_fmt(values['ece'])} ({_fmt(values['ece_temperature'])})"
        row["run"] = Path(run.run_dir).name
        rows.append(row)
    columns = list(dict.fromkeys(k for row in rows for k in row))  # two-class runs beside others: every column
    return [{k: row.get(k, "-") for k in columns} for row in rows]


def run_notes(run) -> list[str]:
    """What a head run warned about as it ended (head_runs): a head far below the ridge reference (underfit),
    a grid or k choice on the edge of its grid."""
    notes = [f"Warning: {(run.extra.get('reference') or {}).get('warning')}"] if (
        run.extra.get("reference") or {}).get("warning") else []
    notes += [f"Note: {run.extra[k]['note']}" for k in ("grid", "knn") if (run.extra.get(k) or {}).get("note")]
    return notes


def print_summary(run, *, notes: bool = False) -> None:
    """Print one run's table row and test details, as head-train and finetune end; notes=True also prints
    run_notes (what head-train --quiet did not say on stderr)."""
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
    for note in run_notes(run) if notes else []:
        console.print(note, markup=False)
    for table in _extra_tables(run):
        console.print(table)
    if clinical := clinical_rows([run]):
        console.print(_rich_table(clinical, title=CLINICAL_TITLE))
    figures = [name for name in ("curves.png", "confusion.png", "roc.png", "grid.png")
               if (Path(run.run_dir) / name).is_file()]
    console.print(f"run: {shell_quoted(run.run_dir)}" + (f"  (figures: {', '.join(figures)})" if figures else ""),
                  markup=False)


def collect_runs(paths, *, note: Callable[[str], object] | None = None) -> list:
    """The finished runs among `paths` (RunResult objects or paths), in order, loaded (runs.load_run).

    A folder that holds run directories (a --runs-dir) stands for those, in name order. A file, or a folder
    that is an unfinished run (crashed or still running: no metrics.json), is skipped with a one-line note
    (`note`, default stderr). A damaged metrics.json is a UserError naming it; nothing left is a UserError.
    """
    from featcache.errors import UserError
    from featcache.runs import RunResult, is_finished, load_run
    from featcache.study.plan import PLAN_FILE

    note = note or (lambda message: print(message, file=sys.stderr, flush=True))
    loaded, ignored = [], []
    for item in paths:
        if isinstance(item, RunResult):
            loaded.append(item)
            continue
        path = Path(item)
        inside = sorted(path.iterdir()) if path.is_dir() and not is_finished(path) else []
        inside = inside if any(p.is_dir() for p in inside) else []  # a folder of runs, not an empty/unfinished run
        for candidate in inside or [path]:
            if is_finished(candidate) or not candidate.exists():
                loaded.append(_checked(load_run(candidate)))  # a missing path: load_run's UserError
            elif candidate.is_file():
                ignored.append(candidate)
            elif (candidate / PLAN_FILE).is_file():
                note(f"Skipping {candidate}: a study folder; read its {candidate / 'report.md'}, or pass "
                     f"{candidate / 'runs'}/*/* to lay its runs out here.")
            else:
                note(f"Skipping {candidate}: an unfinished run (no metrics.json: still running, or stopped).")
    if ignored:
        names = ", ".join(p.name for p in ignored[:5]) + (", ..." if len(ignored) > 5 else "")
        note(f"Ignored {len(ignored)} file{'s' if len(ignored) != 1 else ''} that {'are' if len(ignored) != 1 else 'is'} "
             f"not a run directory ({names}).")
    if not loaded:
        raise UserError(f"No finished runs among {', '.join(str(p) for p in paths)}; pass run directories "
                        "(or the folder holding them) written by featcache.")
    return loaded


def _checked(run):
    """`run`, after building every table of it once: a crafted or damaged extra record in its metrics.json is
    a UserError naming the file, never a traceback."""
    from featcache.errors import UserError
    from featcache.runs import METRICS_FILE

    try:
        run_row(run)
        _extra_tables(run)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise UserError(f"{Path(run.run_dir) / METRICS_FILE} is not a featcache run file (its extra record "
                        f"is damaged: {type(e).__name__} {e}); was it edited by hand?") from None
    return run


def compare_runs(runs, *, format: str = "table", figure: str | Path | None = None,
                 note: Callable[[str], object] | None = None) -> str:
    """Runs side by side as text (table, markdown, csv or json); optionally one comparison figure.

    Args:
        runs: RunResult objects, run directories, or folders of run directories (collect_runs: files and
            unfinished runs are skipped with a note).
        format: one of FORMATS.
        figure: where to write the val accuracy/loss curves of all runs (PNG), or None.
        note: where the notes of skipped paths go; None = stderr.
    """
    loaded = collect_runs(runs, note=note)
    rows = [run_row(r) for r in loaded]
    if figure is not None:
        draw_report_figures(loaded, figure)
    if format == "json":  # strict JSON, as metrics.json: a non-finite number is null
        return json.dumps([_finite({**r, "config": dataclasses.asdict(run.config),
                                    **({"finetune": run.extra["finetune"]} if "finetune" in run.extra else {})})
                           for r, run in zip(rows, loaded)], indent=2, allow_nan=False, default=str)
    if format == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue()
    if format == "markdown":
        cols = [*COLUMNS, *IDENTITY]
        names = {**HEADERS, **IDENTITY_HEADERS}
        lines = ["| " + " | ".join(names[c] for c in cols) + " |",
                 "|" + "|".join("---" if c in ("model", "mode", "dataset", "optimizer", "run") else "---:"
                                for c in cols) + "|"]
        lines += ["| " + " | ".join(_fmt(v) for v in _shown(r).values()) + " |" for r in rows]
        for title, extra in ((INTERVALS_TITLE, interval_rows(loaded)), (CLINICAL_TITLE, clinical_rows(loaded)),
                             (PAIRED_TITLE, paired_rows(loaded))):
            if extra:
                lines += ["", f"{title}:", "",
                          "| " + " | ".join(extra[0]) + " |", "|" + "|".join("---" for _ in extra[0]) + "|"]
                lines += ["| " + " | ".join(_fmt(r.get(k)) for k in extra[0]) + " |" for r in extra]
        return "\n".join(lines) + "\n"
    if format == "table":
        from rich.console import Console

        console = Console(width=200, record=True, file=io.StringIO())
        console.print(_rich_table([_shown(r) for r in rows], title="Runs", headers={**HEADERS, **IDENTITY_HEADERS}))
        intervals = interval_rows(loaded)
        if intervals:
            console.print(_rich_table(intervals, title=INTERVALS_TITLE))
        if clinical := clinical_rows(loaded):
            console.print(_rich_table(clinical, title=CLINICAL_TITLE))
        if paired := paired_rows(loaded):
            console.print(_rich_table(paired, title=PAIRED_TITLE))
        for run in loaded:
            if "grid" in run.extra:
                console.print(_grid_table(run))
        return console.export_text()
    raise ValueError(f"format must be one of {FORMATS}")


def _shown(row: Mapping) -> dict:
    """The study's columns and the IDENTITY columns of a run_row as the table and markdown show them (lr and
    weight decay in %g, which 4 decimals would round to 0)."""
    shown = {c: row[c] for c in (*COLUMNS, *IDENTITY)}
    for c in ("lr", "weight_decay"):
        shown[c] = None if shown[c] is None else f"{shown[c]:g}"
    return shown


def _finite(row: Mapping) -> dict:
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}


def run_label(run) -> str:
    """A run's short name in figure legends: `<model> <mode> <settings> (<run directory>)`."""
    ident = identity_values(run)
    settings = (f" {ident['optimizer']} lr {ident['lr']:g}" if ident["optimizer"] else "")
    return f"{run.model} {run_row(run)['mode']}{settings} ({ident['run']})"


def test_bars(runs) -> list[dict]:
    """The bars of the report's test figure: one per seed group (mean test acc with its 95 % t-interval,
    interval_rows' grouping) or grid run (its selected cell over seeds), one per other run (its test acc)."""
    from featcache.metrics import mean_interval

    grouped, bars = _seed_groups(runs), []
    seen = set()
    for run in runs:
        if id(run) in seen:
            continue
        members = next((g for g in grouped if any(m is run for m in g)), None)
        if members:
            seen.update(id(m) for m in members)
            d = mean_interval([m.summary.test_acc for m in members]).to_dict()
            label = f"{run_label(run)} x{len(members)} seeds"
        elif "seed_stats" in run.extra:
            d, label = run.extra["seed_stats"]["test_acc"], f"{run_label(run)} x{run.extra['seed_stats']['n']} seeds"
        else:
            bars.append({"label": run_label(run), "value": run.summary.test_acc, "low": None, "high": None})
            continue
        half = d.get("half_width")
        bars.append({"label": label, "value": d.get("mean"), "low": None if half is None else d["mean"] - half,
                     "high": None if half is None else d["mean"] + half})
    return bars


def report_figure_paths(figure: str | Path) -> tuple[Path, Path]:
    """(the val-curves figure, the test-accuracy bars beside it: X.png -> X-test.png) of `report --figure X.png`."""
    figure = Path(figure)
    return figure, figure.with_name(f"{figure.stem}-test{figure.suffix or '.png'}")


def draw_report_figures(runs, figure: str | Path) -> list[Path]:
    """`report --figure X.png`: X.png (val curves of every run, plots.plot_comparison) and X-test.png (test
    accuracy per run or seed group, plots.plot_test_bars)."""
    from featcache.plots import plot_comparison, plot_test_bars

    figure, bars_path = report_figure_paths(figure)
    datasets = sorted({str(identity_values(r)["dataset"]) for r in runs})
    where = f" on {', '.join(datasets)}" if len(datasets) <= 3 else f" on {len(datasets)} datasets"
    return [plot_comparison(runs, figure, f"Validation curves of {len(runs)} runs{where}",
                            labels=[run_label(r) for r in runs]),
            plot_test_bars(test_bars(runs), bars_path, f"Test accuracy of {len(runs)} runs{where}")]


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
    rows = []
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
    for members in _seed_groups(runs):
        first = members[0]
        rows.append({"model": first.model, "mode": run_row(first)["mode"], "setting": _setting(first.config),
                     "seeds": len(members),
                     "best val acc": _mean_interval([r.summary.best_val_acc for r in members]),
                     "test acc": _mean_interval([r.summary.test_acc for r in members]),
                     "from": f"{len(members)} runs, seeds {', '.join(str(r.config.seed) for r in members)}"})
    return rows


def _seed_groups(runs) -> list[list]:
    """interval_rows' seed groups: lists of two or more runs that differ only in their seed (first run per seed)."""
    groups = {}
    for run in runs:
        if "seed_stats" in run.extra or "fewshot" in run.extra or run.extra.get("solver"):
            continue  # grid runs and draws carry their own intervals; ridge, lbfgs, knn are deterministic
        config = dataclasses.asdict(run.config)
        config.pop("seed")
        config.pop("runs_dir", None)
        key = json.dumps({"model": run.model, "mode": run.mode, "config": config, "cache": run.cache.get("key"),
                          "finetune": run.extra.get("finetune"),
                          "dataset": run.extra.get("dataset_fingerprint")}, sort_keys=True, default=str)
        groups.setdefault(key, {}).setdefault(run.config.seed, run)
    return [list(by_seed.values()) for by_seed in groups.values() if len(by_seed) >= 2]


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


PAIRED_TITLE = "Paired against the best run on the same test images (95 % paired bootstrap interval of the difference)"
PAIRED_RESAMPLES = 1000


def paired_rows(loaded) -> list[dict]:
    """Each run against the run of best test accuracy, paired on their shared test images (paired.compare_paired,
    seed 0): the difference in test accuracy and AUROC, its interval and how often the best run wins. Runs
    without test_logits.npz, or tested on other images or classes, are left out; fewer than two: no rows."""
    from featcache.config import CompareConfig
    from featcache.errors import UserError
    from featcache.paired import compare_paired
    from featcache.runs import TEST_LOGITS_FILE

    scored = [r for r in loaded if (Path(r.run_dir) / TEST_LOGITS_FILE).is_file() and not r.diverged]
    if len(scored) < 2:
        return []
    best = max(scored, key=lambda r: r.summary.test_acc)
    rows = []
    for run in scored:
        if run is best:
            continue
        try:
            result = compare_paired(best.run_dir, run.run_dir, config=CompareConfig(bootstrap=PAIRED_RESAMPLES))
        except UserError:  # another test set, other classes: nothing to pair
            continue
        row = {"best run": Path(best.run_dir).name, "run": Path(run.run_dir).name}
        for name in ("accuracy", "auroc"):
            d = result.differences.get(name)
            if d is None or d.point is None:
                continue
            interval = "" if d.low is None else f" [{d.low:+.4f}, {d.high:+.4f}]"
            row[f"{name} best - run"] = f"{d.point:+.4f}{interval}"
            row[f"best wins ({name})"] = None if d.a_wins is None else round(d.a_wins, 3)
        rows.append(row)
    return rows
