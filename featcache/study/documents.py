"""The study's files: report.json, report.csv, figures/, and report.md and report.html from one list of blocks:
the answer, the table, the paired differences, the cost, the figures (linked from the Markdown, embedded as
base64 in the HTML)."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from pathlib import Path
from typing import Callable, Sequence

from featcache.files import atomic_write_bytes
from featcache.study.plan import RunSpec, StudyPlan
from featcache.study.report import (TABLE_HEADERS, TABLE_METRICS, Row, Scores, _diff, _num, answer_lines,
                                    build_report, table_rows)

FIGURE_CAPTIONS = {
    "curves": "Validation accuracy and loss per epoch: one panel per backbone, modes overlaid, band over seeds.",
    "test_accuracy": "Test accuracy per row with its 95 % interval over seeds (red: the best row).",
    "accuracy_cost": "Test accuracy against the wall time of the row: which backbone buys the most accuracy per "
                     "second.",
    "roc": "ROC curves on the test images (first seed of each row).",
}


def blocks(report: dict) -> list[tuple]:
    """The report as ("h1"|"h2"|"p"|"table"|"img", ...) blocks, in reading order."""
    plan = report["plan"]
    out: list[tuple] = [("h1", f"Study: {len(report['rows'])} rows on {plan['data']}")]
    out.append(("h2", "The answer"))
    out += [("p", line) for line in answer_lines(report)]
    out.append(("table", TABLE_HEADERS, table_rows(report)))
    out.append(("p", f"{len(report['classes'])} classes, {report['test_images']} test images; {plan['epochs']} "
                     f"epochs (fine-tune {plan['finetune_epochs'] or plan['epochs']}), lr {plan['lr']}, batch "
                     f"{plan['batch_size']}, image size {plan.get('image_size') or 'native'}. Intervals over "
                     "seeds: mean ± 95 % t-interval; differences: paired stratified bootstrap on the same test "
                     "images of the seed-mean metric."))
    if report["frozen_vs_finetune"]:
        out.append(("h2", "Fine-tuning against frozen features, per backbone (paired, same test images)"))
        out.append(("table", ("backbone", "fine-tune", "frozen", "Δ accuracy [95 %]", "Δ AUROC [95 %]",
                              "fine-tune better in"),
                    [[d["model"], d["finetune"], d["frozen"], _diff(d["accuracy"]), _diff(d["auroc"]),
                      _num(d["accuracy"]["a_wins"], 2)] for d in report["frozen_vs_finetune"]]))
    out.append(("h2", "Cost"))
    extractions = ", ".join(f"{k} {v:.1f} s" for k, v in report["cost"]["extractions_s"].items() if v is not None)
    out.append(("p", f"Whole study: {report['cost']['total_s']:.1f} s of training and extraction, each "
                     f"backbone's extraction counted once ({extractions or 'none'}); a cached row's cost shows "
                     "the extraction it shares with the other cached rows of its backbone."))
    if report.get("figures"):
        out.append(("h2", "Figures"))
        out += [("img", path, FIGURE_CAPTIONS[name]) for name, path in report["figures"].items()]
    missing = [r["key"] for r in report["runs"] if r["status"] == "missing"]
    if missing:
        out.append(("p", f"Not finished yet ({len(missing)}): {', '.join(missing)}."))
    return out


def markdown(report: dict) -> str:
    lines = []
    for block in blocks(report):
        kind = block[0]
        if kind in ("h1", "h2"):
            lines += [("# " if kind == "h1" else "## ") + block[1], ""]
        elif kind == "p":
            lines += [block[1], ""]
        elif kind == "table":
            lines.append("| " + " | ".join(block[1]) + " |")
            lines.append("|" + "---|" * len(block[1]))
            lines += ["| " + " | ".join(row) + " |" for row in block[2]] + [""]
        else:
            lines += [f"![{block[2]}]({block[1]})", "", f"*{block[2]}*", ""]
    return "\n".join(lines)


STYLE = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
         "table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ccc;padding:.25em .5em;"
         "text-align:right}td:first-child,td:nth-child(2){text-align:left}img{max-width:100%}"
         "p.answer{font-size:1.05em}")


def page(report: dict, folder: Path) -> str:
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>featcache study</title>"
             f"<style>{STYLE}</style></head><body>"]
    for block in blocks(report):
        kind = block[0]
        if kind in ("h1", "h2"):
            parts.append(f"<{kind}>{e(block[1])}</{kind}>")
        elif kind == "p":
            parts.append(f"<p class='answer'>{e(block[1])}</p>")
        elif kind == "table":
            head = "".join(f"<th>{e(h)}</th>" for h in block[1])
            body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in block[2])
            parts.append(f"<table><tr>{head}</tr>{body}</table>")
        else:
            parts.append(f"<figure><img src='{embedded_png(folder / block[1])}' alt='{e(block[2])}'>"
                         f"<figcaption>{e(block[2])}</figcaption></figure>")
    return "\n".join(parts) + "</body></html>\n"


def write_documents(report: dict, folder: Path) -> None:
    """report.md (figures linked) and report.html (figures embedded) in the study folder."""
    atomic_write_bytes(folder / "report.md", markdown(report).encode())
    atomic_write_bytes(folder / "report.html", page(report, folder).encode())


# --------------------------------------------------------------------------- files


def write_report(plan: StudyPlan, specs: Sequence[RunSpec], *, log: Callable[[str], None]) -> dict:
    """report.json, report.csv, report.md, report.html and figures/ in the study folder; returns report.json's dict."""
    report, rows, scores = build_report(plan, specs)
    out = Path(plan.out)
    report["figures"] = _figures(report, rows, scores, out / "figures")
    atomic_write_bytes(out / "report.json", (json.dumps(report, indent=1) + "\n").encode())
    atomic_write_bytes(out / "report.csv", _csv(report).encode())
    write_documents(report, out)
    log(f"report: {out / 'report.html'} (also report.md, report.csv, report.json)")
    return report


def _figures(report: dict, rows: list[Row], scores: Scores | None, folder: Path) -> dict[str, str]:
    """Draw the figures; {name: path relative to the study folder}."""
    from featcache.study import figures

    if not report["rows"]:
        return {}
    folder.mkdir(parents=True, exist_ok=True)
    panels: dict[str, dict] = {}
    for r in rows:
        if r.ok and (r.mode != "head" or r.solver == "sgd"):  # the other solvers have no epochs
            panels.setdefault(r.label, {})[r.name] = [x.history for x in r.ok]
    made = {"curves": figures.val_curves(panels, folder / "val_curves.png"),
            "test_accuracy": figures.test_metric(report["rows"], folder / "test_accuracy.png"),
            "accuracy_cost": figures.accuracy_cost(report["rows"], folder / "accuracy_cost.png")}
    if scores is not None and len(report["classes"]) == 2:
        from featcache.plots import plot_roc

        curves = {name: (x[:, 0], scores.labels) for name, x in scores.by_row.items()}
        made["roc"] = plot_roc(curves, folder / "roc.png", "ROC on the test images (first seed of each row)",
                               num_classes=2)
    return {k: str(Path(v).relative_to(folder.parent)) for k, v in made.items()}


CSV_METRICS = (*TABLE_METRICS, "auroc", "training_time")


def _csv(report: dict) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    header = ["model", "mode", "solver", "seeds", "diverged"]
    for m in CSV_METRICS:
        header += [f"{m}_mean", f"{m}_low", f"{m}_high"]
    header += ["train_s", "extract_s", "cost_s", "best", "vs_best_acc", "vs_best_acc_low", "vs_best_acc_high"]
    writer.writerow(header)
    for n in report["rows"]:
        line = [n["model"], n["mode"], n["solver"], n["seeds"], n["diverged"]]
        for m in CSV_METRICS:
            line += [n[m]["mean"], n[m]["low"], n[m]["high"]]
        vs = (n.get("versus_best") or {}).get("accuracy") or {}
        line += [n["cost"]["train_s"], n["cost"]["extract_s"], n["cost"]["total_s"], bool(n.get("best")),
                 vs.get("point"), vs.get("low"), vs.get("high")]
        writer.writerow(["" if v is None else v for v in line])
    return buf.getvalue()


def embedded_png(path: Path) -> str:
    """A PNG as a data: URI (report.html carries its figures)."""
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()

