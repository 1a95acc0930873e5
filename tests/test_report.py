"""featcache report: runs side by side (table, markdown, csv, json) with their real summary numbers,
the comparison figure, the Python API, and directories that are not runs.

The runs are head-train runs on small feature caches written with CacheWriter (no torch, no images).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import featcache
from featcache import runs
from featcache.cache import CacheWriter, SplitRows
from featcache.cli import cli
from featcache.reporting import COLUMNS, HEADERS, IDENTITY, IDENTITY_HEADERS

PNG = b"\x89PNG\r\n\x1a\n"
NUMBERS = ("train_loss", "train_acc", "best_val_loss", "best_val_acc", "test_acc", "training_time")


def _write_cache(path: Path, *, model: str, seed: int, dim: int = 16) -> Path:
    """A complete two-class cache of Gaussian blobs (40 train, 16 val, 16 test rows)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(2, dim))
    splits, features = {}, {}
    for split, n in (("train", 40), ("val", 16), ("test", 16)):
        labels = np.arange(n) % 2
        features[split] = (centres[labels] + rng.normal(scale=1.5, size=(n, dim))).astype(np.float32)
        splits[split] = SplitRows(labels=labels, paths=[f"{split}/{i}.png" for i in range(n)])
    meta = {"key": f"{seed:012d}", "model": model, "weights": "none", "weights_sha256": "", "transform": {},
            "class_names": ["benign", "malignant"], "dataset_root": str(path.parent), "dataset_name": "blobs",
            "dataset_fingerprint": "0" * 16, "split_rule": {}, "versions": {}}
    writer = CacheWriter(path, meta=meta, feature_dim=dim, dtype="float32", splits=splits)
    for split in splits:
        writer.write(split, 0, features[split])
    return writer.finish()


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> list[Path]:
    """Two finished head-train runs: resnet18 (sgd, 4 epochs) and googlenet (adam, 3 epochs)."""
    tmp = tmp_path_factory.mktemp("report")
    a = featcache.train_head(cache=_write_cache(tmp / "a.h5", model="resnet18", seed=1), epochs=4, lr=0.05,
                             runs_dir=str(tmp / "runs"), run_name="a")
    b = featcache.train_head(cache=_write_cache(tmp / "b.h5", model="googlenet", seed=2), epochs=3,
                             optimizer="adam", lr=0.05, runs_dir=str(tmp / "runs"), run_name="b")
    return [a.run_dir, b.run_dir]


def _expected(run_dir: Path) -> dict:
    """The study-table row as metrics.json holds it."""
    doc = json.loads((run_dir / runs.METRICS_FILE).read_text())
    solver = (doc.get("extra") or {}).get("solver")
    return {"model": doc["model"], "mode": f"{doc['mode']}/{solver}" if solver else doc["mode"],
            **{k: doc["summary"][k] for k in NUMBERS},
            "selected_epoch": doc["summary"]["selected_epoch"], "diverged": doc["diverged"], "run_dir": str(run_dir),
            **_expected_identity(doc, run_dir), **_expected_clinical(doc["extra"].get("clinical"))}


def _expected_identity(doc: dict, run_dir: Path) -> dict:
    """What tells runs apart (dataset, optimizer settings, crop size, run name) and the config, from metrics.json."""
    extra, config, trained = doc["extra"], doc["config"], not doc["extra"].get("solver")
    dataset = extra.get("dataset_name") or (Path(extra["dataset_root"]).name if "dataset_root" in extra else None)
    return {"dataset": dataset, "optimizer": config["optimizer"] if trained else None,
            "lr": config["lr"] if trained else None, "weight_decay": config["weight_decay"] if trained else None,
            "standardize": config["standardize"] if doc["mode"] == "head" else None,
            "image_size": extra.get("image_size") or (extra.get("transform") or {}).get("crop"), "run": run_dir.name,
            "config": config, **({"finetune": extra["finetune"]} if "finetune" in extra else {})}


def _expected_clinical(clinical: dict | None) -> dict:
    """The clinical columns: test value and bootstrap interval of each metric, and ECE before/after temperature."""
    if clinical is None:
        return {}
    out = {}
    for key in ("balanced_accuracy", "auroc", "sensitivity", "specificity"):
        if key in clinical["metrics"]:
            interval = clinical["bootstrap"]["intervals"][key]
            out.update({key: clinical["metrics"][key], f"{key}_low": interval["low"], f"{key}_high": interval["high"]})
    return {**out, "ece": clinical["calibration"]["ece_before"], "ece_temperature": clinical["calibration"]["ece_after"]}


def _report(args: list) -> tuple[str, str]:
    result = CliRunner().invoke(cli, ["report", *[str(a) for a in args]])
    assert result.exit_code == 0, result.output
    return result.stdout, result.stderr


def test_json_rows_are_the_runs_summaries(two_runs, tmp_path):
    figure = tmp_path / "cmp.png"
    out, err = _report([*two_runs, "--format", "json", "--figure", figure])
    rows = json.loads(out)
    assert rows == [_expected(d) for d in two_runs]
    assert [r["model"] for r in rows] == ["resnet18", "googlenet"]
    assert rows[0]["best_val_acc"] > 0.6  # the blobs are separable: real numbers, not a constant model
    assert figure.read_bytes()[:8] == PNG and figure.stat().st_size > 10_000
    bars = figure.with_name("cmp-test.png")  # the test-accuracy bars beside the curves
    assert f"figures: {figure} {bars}" in err and bars.read_bytes()[:8] == PNG


def test_csv_rows_round_trip_the_numbers(two_runs, tmp_path):
    out, _ = _report([*two_runs, "--format", "csv", "--figure", tmp_path / "f.png"])
    rows = list(csv.DictReader(io.StringIO(out)))
    assert list(rows[0])[:len(COLUMNS)] == list(COLUMNS)
    for row, run_dir in zip(rows, two_runs, strict=True):
        want = _expected(run_dir)
        assert {k: float(row[k]) for k in NUMBERS} == {k: want[k] for k in NUMBERS}
        assert (row["model"], row["mode"], int(row["selected_epoch"]), row["diverged"], row["run_dir"]) == \
            (want["model"], want["mode"], want["selected_epoch"], str(want["diverged"]), want["run_dir"])


def test_markdown_and_table_show_the_study_columns(two_runs, tmp_path):
    out, _ = _report([*two_runs, "--format", "markdown", "--figure", ""])
    lines = out.strip().splitlines()
    assert lines[0].startswith("| " + " | ".join(HEADERS[c] for c in COLUMNS) + " |")  # then what tells runs apart
    assert lines[0].endswith(" | ".join(IDENTITY_HEADERS[c] for c in IDENTITY) + " |")
    assert lines[1].count("|") == len(COLUMNS) + len(IDENTITY) + 1
    for line, run_dir in zip(lines[2:4], two_runs, strict=True):
        want = _expected(run_dir)
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[:len(COLUMNS)] == [want["model"], want["mode"], *(f"{want[k]:.4f}" for k in NUMBERS)]
        assert cells[-1] == run_dir.name

    out, _ = _report([*two_runs, "--figure", ""])  # default: a rich table
    for run_dir in two_runs:
        want = _expected(run_dir)
        assert want["model"] in out and f"{want['test_acc']:.4f}" in out and f"{want['train_loss']:.4f}" in out
    assert "best val acc" in out
    assert not list(tmp_path.iterdir())  # --figure '' writes no figure


def test_python_api(two_runs, tmp_path):
    loaded = runs.load_run(two_runs[1])
    text = featcache.report([two_runs[0], loaded], format="json", figure=tmp_path / "api.png")
    assert json.loads(text) == [_expected(d) for d in two_runs]
    assert (tmp_path / "api.png").read_bytes()[:8] == PNG
    assert "googlenet" in featcache.report(two_runs)  # the table by default


def test_json_stays_strict_for_a_run_with_nan_losses(two_runs, tmp_path):
    # a run that diverged to NaN: metrics.json stores null; the report's json must not print NaN
    run = runs.load_run(two_runs[0])
    summary = dataclasses.replace(run.summary, train_loss=float("nan"), best_val_loss=float("nan"), diverged=True)
    run_dir = runs.new_run_dir(runs_dir=tmp_path, mode="finetune", model="resnet18", name="nan")
    runs.finish_run(run_dir, mode="finetune", model="resnet18", config=run.config, summary=summary,
                    history=run.history, timings=run.timings, versions={})
    out, _ = _report([run_dir, "--format", "json", "--figure", ""])
    row = json.loads(out, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))[0]
    assert row["train_loss"] is None and row["best_val_loss"] is None and row["diverged"] is True
    out, _ = _report([run_dir, "--format", "markdown", "--figure", ""])
    assert "| nan |" in out


@pytest.mark.parametrize("what", ["empty", "unfinished", "missing"])
def test_a_directory_that_is_not_a_finished_run_is_skipped_with_a_note_or_exits_2(what, two_runs, tmp_path):
    # issue 15: `report runs/*` reports the finished runs and notes the unfinished ones (crashed or still
    # running); a path that does not exist, or nothing finished at all, is still a one-line error, exit 2
    bad = tmp_path / what
    if what != "missing":
        bad.mkdir()
    if what == "unfinished":  # a run directory without metrics.json (crashed or still running)
        (bad / runs.HISTORY_FILE).write_text("epoch\n")
    result = CliRunner().invoke(cli, ["report", str(two_runs[0]), str(bad), "--figure", str(tmp_path / "f.png")])
    if what == "missing":
        assert result.exit_code == 2
        assert isinstance(result.exception, SystemExit)  # a message, not a traceback
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith("Error: ") and str(bad) in line and "does not exist" in line
        assert not (tmp_path / "f.png").exists()
    else:
        assert result.exit_code == 0, result.output
        assert result.stderr.splitlines() == [
            f"Skipping {bad}: an unfinished run (no metrics.json: still running, or stopped).",
            f"figures: {tmp_path / 'f.png'} {tmp_path / 'f-test.png'}"]
        assert "resnet18" in result.stdout and "googlenet" not in result.stdout  # the one finished run
        assert (tmp_path / "f.png").is_file()
    alone = CliRunner().invoke(cli, ["report", str(bad), "--figure", str(tmp_path / "g.png")])
    assert alone.exit_code == 2 and isinstance(alone.exception, SystemExit)
    (line,) = alone.stderr.strip().splitlines()[-1:]
    assert line.startswith("Error: ") and str(bad) in line
    assert not (tmp_path / "g.png").exists()
