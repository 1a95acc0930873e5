"""The study's report: one row per (backbone, mode, solver) over seeds, paired differences, cost, figures.

report.json holds every number (report.csv the rows); report.md and report.html (figures embedded as base64)
open with the answer: the best row, the rows the test set cannot tell from it (paired bootstrap on the same
test images: metrics.paired_bootstrap of the seed-mean metric), fine-tuning against frozen features per
backbone, then the table in the original study's form and the figures. Every metric is metrics.py's.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Sequence

import numpy as np

from featcache import metrics, runs
from featcache.study import store
from featcache.study.plan import PLACE_FIELDS, RunSpec, StudyPlan

REPORT_FORMAT = 1
TABLE_METRICS = ("train_loss", "train_acc", "best_val_loss", "best_val_acc", "test_acc")
MODE_NAMES = {"head": "cached head", "frozen": "frozen loop", "finetune": "fine-tune"}
PAIRED_METRICS = ("accuracy", "auroc")


@dataclass
class Row:
    """One report row: a backbone in one mode (and solver), its finished runs over seeds."""

    label: str
    mode: str
    solver: str
    runs: list  # RunResult of every finished seed (diverged included)

    @property
    def name(self) -> str:
        return f"{self.label} {self.mode}{' ' + self.solver if self.solver else ''}"

    @property
    def ok(self) -> list:
        return [r for r in self.runs if not r.diverged]


def collect(plan: StudyPlan, specs: Sequence[RunSpec]) -> tuple[list[Row], list[dict]]:
    """The rows (plan order: backbone, then mode, then solver) and a status per run (done / diverged / missing)."""
    rows: dict[tuple, Row] = {}
    status = []
    for spec in sorted(specs, key=lambda s: (plan_index(plan, s), ["head", "frozen", "finetune"].index(s.mode))):
        row = rows.setdefault(spec.row, Row(spec.label, spec.mode, spec.solver, []))
        found = store.finished_run(plan.out, spec)
        run = runs.load_run(found) if found else None
        if run is not None:
            row.runs.append(run)
        state = "missing" if run is None else ("diverged" if run.diverged else "done")
        status.append({"key": spec.key, "status": state,
                       "run_dir": None if found is None else str(found.relative_to(plan.out))})
    return [r for r in rows.values() if r.runs], status


def plan_index(plan: StudyPlan, spec: RunSpec) -> int:
    from featcache.study.plan import split_model

    labels = [f"{n}@{w}" for n, w in (split_model(m, plan.weights) for m in plan.models)]
    return labels.index(spec.label) if spec.label in labels else len(labels)


class Scores:
    """Test logits of every finished, non-diverged run, aligned on one order of the test images."""

    def __init__(self, rows: Sequence[Row]):
        from featcache.paired import matched_rows

        self.reference, first = None, ""
        self.by_row: dict[str, np.ndarray] = {}  # row name -> (N, S, K) logits, seeds stacked
        for row in rows:
            stacked = []
            for run in row.ok:
                scored = test_logits(run)
                if scored is None:  # a probe without per-image scores (knn): no paired comparison
                    stacked = []
                    break
                if self.reference is None:
                    self.reference, first = scored, str(run.run_dir)
                order = matched_rows(self.reference, scored, names=(first, str(run.run_dir)))
                stacked.append(scored.logits[order])
            if stacked:
                self.by_row[row.name] = np.stack(stacked, axis=1)

    @property
    def labels(self) -> np.ndarray:
        return self.reference.labels


def test_logits(run) -> runs.ScoredRows | None:
    """The run's test_logits.npz, None when it has none (a k-NN probe keeps no logits)."""
    if not (Path(run.run_dir) / runs.TEST_LOGITS_FILE).is_file():
        return None
    return runs.load_test_logits(run.run_dir)


def _seed_mean(fn: metrics.WeightedMetric) -> metrics.WeightedMetric:
    """The metric of (N, S, K) stacked seeds: the mean of the metric of each seed, per set of row weights."""
    return metrics.WeightedMetric(lambda y, x, w: np.mean([fn.fn(y, x[:, s], w) for s in range(x.shape[1])],
                                                          axis=0))


def paired(scores: Scores, a: str, b: str, *, num_classes: int, resamples: int) -> dict:
    """{metric: PairedDifference dict} of row a - row b (seed means) on the same test images, paired bootstrap."""
    base = metrics.clinical_metric_functions(num_classes=num_classes)
    fns = {name: _seed_mean(base[name]) for name in PAIRED_METRICS}
    diffs = metrics.paired_bootstrap(fns, labels=scores.labels, scores_a=scores.by_row[a],
                                     scores_b=scores.by_row[b], resamples=resamples, seed=0)
    return {name: d.to_dict() for name, d in diffs.items()}


def row_numbers(row: Row, *, num_classes: int, extract_s: float | None) -> dict:
    """A row's numbers: every table metric as mean ± 95 % interval over its seeds, AUROC, time and cost."""
    ok = row.ok
    out = {"name": row.name, "model": row.label, "mode": row.mode, "solver": row.solver, "seeds": len(ok),
           "diverged": len(row.runs) - len(ok)}
    for name in TABLE_METRICS:
        out[name] = _interval([getattr(r.summary, name) for r in ok])
    aurocs = []
    for r in ok:
        scored = test_logits(r)
        aurocs.append(r.summary.roc_auc if scored is None else metrics.auroc(scored.logits, scored.labels,
                                                                             num_classes))
    out["auroc"] = _interval([np.nan if v is None else v for v in aurocs])
    out["training_time"] = _interval([r.summary.training_time for r in ok])
    train_s = float(sum(r.summary.training_time for r in row.runs))
    out["cost"] = {"train_s": round(train_s, 3), "extract_s": extract_s,
                   "total_s": round(train_s + (extract_s or 0.0), 3)}
    return out


def _interval(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "half_width": None, "low": None, "high": None, "n": 0}
    return metrics.mean_interval(values).to_dict()


def build_report(plan: StudyPlan, specs: Sequence[RunSpec]) -> tuple[dict, list[Row], Scores | None]:
    """report.json's content (figures aside) from whatever finished in the study folder."""
    rows, status = collect(plan, specs)
    extractions = store.read_extractions(plan.out)
    num_classes = len(rows[0].runs[0].class_names) if rows else 0
    numbers = [row_numbers(r, num_classes=num_classes,
                           extract_s=(extractions.get(r.label) or {}).get("seconds") if r.mode == "head" else None)
               for r in rows]
    scores = Scores([r for r in rows if r.ok]) if any(r.ok for r in rows) else None
    report = {"format": REPORT_FORMAT, "plan": {f.name: getattr(plan, f.name) for f in fields(StudyPlan)
                                                if f.name not in PLACE_FIELDS},
              "classes": rows[0].runs[0].class_names if rows else [], "test_images": 0, "rows": numbers,
              "best": None, "frozen_vs_finetune": [], "runs": status,
              "cost": {"extractions_s": {k: v.get("seconds") for k, v in sorted(extractions.items())}}}
    report["cost"]["total_s"] = round(sum(n["cost"]["train_s"] for n in numbers)
                                      + sum(v or 0.0 for v in report["cost"]["extractions_s"].values()), 3)
    if scores is not None:
        _add_paired(report, rows, numbers, scores, num_classes=num_classes, resamples=plan.bootstrap)
    return report, rows, scores


def _add_paired(report: dict, rows: list[Row], numbers: list[dict], scores: Scores, *, num_classes: int,
                resamples: int) -> None:
    """The best row, each row against it, and fine-tune against frozen features per backbone."""
    report["test_images"] = int(len(scores.labels))
    scored = [n for n in numbers if n["name"] in scores.by_row]
    best = max(scored, key=lambda n: (n["test_acc"]["mean"], -n["cost"]["total_s"]))
    report["best"] = best["name"]
    for n in numbers:
        n["best"] = n is best
        n["versus_best"] = (paired(scores, n["name"], best["name"], num_classes=num_classes, resamples=resamples)
                            if n in scored and n is not best else None)
    for label in dict.fromkeys(r.label for r in rows):
        mine = {(r.mode, r.solver): r.name for r in rows if r.label == label and r.name in scores.by_row}
        tuned = mine.get(("finetune", ""))
        frozen = mine.get(("head", "sgd")) or mine.get(("frozen", "")) or next(
            (v for (m, _), v in mine.items() if m == "head"), None)
        if tuned and frozen:
            report["frozen_vs_finetune"].append(
                {"model": label, "finetune": tuned, "frozen": frozen,
                 **paired(scores, tuned, frozen, num_classes=num_classes, resamples=resamples)})


# --------------------------------------------------------------------------- text: the first screen and the table


def _num(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _mean_pm(d: dict, digits: int = 3) -> str:
    if d["mean"] is None:
        return "-"
    return _num(d["mean"], digits) + ("" if d["half_width"] is None else f" ± {d['half_width']:.{digits}f}")


def _diff(d: dict | None) -> str:
    if not d or d["point"] is None:
        return "-"
    interval = "" if d["low"] is None else f" [{d['low']:+.3f}, {d['high']:+.3f}]"
    return f"{d['point']:+.3f}{interval}"


def _wins(d: dict) -> str:
    """'fine-tune better in 0.91, worse in 0.05 of resamples' (the rest ties)."""
    if d["a_wins"] is None:
        return "no resample defined"
    worse = 1.0 - d["a_wins"] - d["ties"]
    return f"fine-tune better in {d['a_wins']:.2f}, worse in {worse:.2f} of resamples (ties: the rest)"


def answer_lines(report: dict) -> list[str]:
    """The answer in a few sentences: best row, rows not distinguishable from it, fine-tune vs frozen."""
    rows = {n["name"]: n for n in report["rows"]}
    if report["best"] is None:
        return ["No run has finished yet; run the study (or the --list commands) and report again."]
    best = rows[report["best"]]
    seeds = best["seeds"]
    lines = [f"Best row: {best['name']}: test accuracy {_mean_pm(best['test_acc'])} (mean ± 95 % interval over "
             f"{seeds} seed{'s' if seeds != 1 else ''}), cost {best['cost']['total_s']:.1f} s."]
    compared = [n for n in report["rows"] if n["versus_best"] and n["versus_best"]["accuracy"]["low"] is not None]
    close = [n for n in compared if n["versus_best"]["accuracy"]["low"] <= 0 <= n["versus_best"]["accuracy"]["high"]]
    if close:
        cheapest = min([best, *close], key=lambda n: n["cost"]["total_s"])
        lines.append(f"Not distinguishable from it on these {report['test_images']} test images (paired 95 % "
                     f"interval of the accuracy difference holds 0): "
                     + "; ".join(f"{n['name']} {_diff(n['versus_best']['accuracy'])}" for n in close) + "."
                     + ("" if cheapest is best else f" Cheapest of them: {cheapest['name']} "
                                                    f"({cheapest['cost']['total_s']:.1f} s)."))
    elif compared:
        lines.append(f"Every other row is worse on these {report['test_images']} test images (paired 95 % "
                     "intervals of the accuracy difference below 0).")
    unpaired = [n["name"] for n in report["rows"] if n is not best and not n["versus_best"]]
    if unpaired:
        lines.append(f"Not paired with it (no per-image test scores): {', '.join(unpaired)}.")
    for d in report["frozen_vs_finetune"]:
        lines.append(f"{d['model']}: fine-tune minus frozen features ({d['frozen'].split(' ', 1)[1]}) accuracy "
                     f"{_diff(d['accuracy'])}, AUROC {_diff(d['auroc'])}; {_wins(d['accuracy'])}.")
    return lines


TABLE_HEADERS = ("model", "mode", "seeds", "train loss", "train acc", "best val loss", "best val acc", "test acc",
                 "AUROC", "time/run (s)", "row cost (s)", "Δ acc vs best [95 %]")


def table_rows(report: dict) -> list[list[str]]:
    """The table in the original study's form (plus AUROC, cost and the paired difference to the best row)."""
    out = []
    for n in report["rows"]:
        mode = MODE_NAMES[n["mode"]] + (f" ({n['solver']})" if n["solver"] else "")
        seeds = str(n["seeds"]) + (f" (+{n['diverged']} diverged)" if n["diverged"] else "")
        cost = n["cost"]
        shown_cost = (f"{cost['train_s']:.1f} + {cost['extract_s']:.1f} extract (shared)"
                      if cost["extract_s"] is not None else f"{cost['total_s']:.1f}")
        versus = "best" if n.get("best") else _diff((n.get("versus_best") or {}).get("accuracy"))
        out.append([n["model"], mode, seeds, *(_mean_pm(n[m]) for m in TABLE_METRICS), _mean_pm(n["auroc"]),
                    _mean_pm(n["training_time"], 1), shown_cost, versus])
    return out


SCREEN_COLUMNS = (0, 1, 2, 6, 7, 8, 10, 11)  # of TABLE_HEADERS: the first screen's short table


def first_screen(report: dict) -> str:
    """What `featcache study` prints at the end: the answer, then the table's main columns (all in report.md)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="mean ± 95 % interval over seeds; Δ: paired, same test images (all columns: report.md)")
    for i in SCREEN_COLUMNS:
        table.add_column(TABLE_HEADERS[i], no_wrap=i < 2)
    for r in table_rows(report):
        table.add_row(*(r[i] for i in SCREEN_COLUMNS))
    console = Console(file=io.StringIO(), width=160, force_terminal=False)
    console.print("\n".join(answer_lines(report)))
    console.print(table)
    return console.file.getvalue().rstrip("\n")
