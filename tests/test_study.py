"""`featcache study`: the plan's checks, --list, the report, resume after SIGKILL, a rerun that trains nothing."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from featcache.study.plan import StudyPlan, expand, plan_from, read_toml, to_toml
from tests.cli_helpers import invoke, one_error_line

MODELS = "resnet18@none,squeezenet1_0@none"
TIMED = ("training_time", "cost", "train_s", "extract_s", "total_s")  # wall times: differ between any two runs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The demo images, 32 px, 12/6/6 per class: a study of 2 backbones trains in seconds."""
    from featcache import demo

    return demo.make_demo_dataset(tmp_path_factory.mktemp("data") / "tiny", n_per_class=(8, 5, 5), image_size=32)


@pytest.fixture(scope="module")
def whole(tmp_path_factory, tiny):
    """An uninterrupted study (2 backbones x cached head, fine-tune x 1 seed): its folder and cache folder."""
    root = tmp_path_factory.mktemp("whole")
    result = invoke(*_args(tiny, root / "study", root / "cache"))
    assert result.exit_code == 0, result.output
    return root / "study", root / "cache"


def _args(data, out, cache, *extra):
    return ["study", "--data", data, "--models", MODELS, "--modes", "head,finetune", "--seeds", "1",
            "--epochs", "2", "--image-size", "32", "--lr", "0.01", "--bootstrap", "200", "--out", out,
            "--cache-dir", cache, "--quiet", *extra]


def _numbers(report: dict):
    """report.json without wall times and run folder names (which differ between two studies)."""
    if isinstance(report, dict):
        return {k: _numbers(v) for k, v in report.items() if k not in TIMED and k != "run_dir"}
    if isinstance(report, list):
        return [_numbers(v) for v in report]
    return report


# --------------------------------------------------------------------------- the plan


def test_plan_expands_cheap_first_and_round_trips_through_toml(tmp_path):
    plan = StudyPlan(data="demo", out=str(tmp_path), models=("resnet18@none", "googlenet"), weights="imagenet",
                     modes=("finetune", "head", "frozen"), solvers=("sgd", "knn"), seeds=2, image_size=32)
    specs = expand(plan)
    assert [s.mode for s in specs] == ["head"] * 6 + ["frozen"] * 4 + ["finetune"] * 4  # cheap first
    assert [(s.label, s.solver, s.seed) for s in specs[:6]] == [
        ("resnet18@none", "sgd", 0), ("resnet18@none", "sgd", 1), ("resnet18@none", "knn", 0),
        ("googlenet@imagenet", "sgd", 0), ("googlenet@imagenet", "sgd", 1), ("googlenet@imagenet", "knn", 0)]
    assert len({s.key for s in specs}) == len(specs)
    (tmp_path / "plan.toml").write_text(to_toml(plan))
    again = plan_from({}, plan_file=tmp_path / "plan.toml")
    assert again == plan
    assert read_toml(tmp_path / "plan.toml")["models"] == ("resnet18@none", "googlenet")


@pytest.mark.parametrize("extra, words", [
    (["--models", "resnet18,nosuchnet"], "Unknown model 'nosuchnet'"),
    (["--models", "alexnet"], "alexnet needs images of at least 63 px, not --image-size 32"),
    (["--modes", "finetune", "--solvers", "knn"], "--solvers knn chooses the heads of mode head"),
    (["--solvers", "sgd,svm"], "Unknown solver 'svm'"),
    (["--modes", "head,probe"], "Unknown mode probe"),
])
def test_bad_input_is_one_sentence_before_anything_runs(tmp_path, extra, words):
    result = invoke("study", "--data", "demo", "--image-size", "32", "--out", tmp_path / "s", *extra)
    line = one_error_line(result, 2)
    assert words in line, line
    assert not (tmp_path / "s").exists()


def test_a_folder_of_another_plan_is_refused_until_force(tmp_path, tiny):
    out, cache = tmp_path / "s", tmp_path / "cache"
    first = invoke(*_args(tiny, out, cache, "--list"))
    assert first.exit_code == 0, first.output
    lines = first.output.splitlines()
    assert len(lines) == 4  # 2 models x (head sgd, finetune) x 1 seed
    assert lines[0].startswith("featcache extract --model resnet18 --weights none --image-size 32")
    assert " && featcache head-train --model resnet18 " in lines[0] and "--solver sgd" in lines[0]
    assert lines[3].startswith("featcache finetune --model squeezenet1_0 --weights none")
    from featcache.cli import cli
    for line in lines:  # runnable as they are: every command parses
        for part in line.split(" && "):
            argv = shlex.split(part)[1:]
            cli.commands[argv[0]].make_context(argv[0], argv[1:])
    changed = invoke(*_args(tiny, out, cache, "--list", "--epochs", "3"))
    assert one_error_line(changed, 2) == (
        f"Error: Study folder {out} was made by a different plan (epochs 2 there, 3 here); run it with the same "
        "settings, choose another --out, or pass --force to start over.")
    extended = invoke(*_args(tiny, out, cache, "--list", "--seeds", "2"))  # more seeds: the same study, extended
    assert extended.exit_code == 0 and len(extended.output.splitlines()) == 8
    forced = invoke(*_args(tiny, out, cache, "--list", "--epochs", "3", "--force"))
    assert forced.exit_code == 0 and "epochs = 3" in (out / "plan.toml").read_text()


# --------------------------------------------------------------------------- resume and rerun


def _wait_for_checkpoint(proc, out: Path, timeout: float = 120) -> Path:
    """The first fine-tune's last.pt (its first epoch done), polled while the study runs."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        found = sorted(out.glob("runs/*-finetune-s0/*/last.pt"))
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no fine-tune checkpoint appeared (exit {proc.poll()})")


@pytest.mark.slow  # three small studies: one whole, one killed by SIGKILL in its first fine-tune, that one resumed
def test_killed_in_its_fine_tunes_and_rerun_gives_the_uninterrupted_report(tmp_path, tiny, whole):
    cache = whole[1]  # the extractions are shared; the runs are not
    expected = json.loads((whole[0] / "report.json").read_text())

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "featcache", *map(str, _args(tiny, out, cache))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    checkpoint = _wait_for_checkpoint(proc, out)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (checkpoint.parent / "metrics.json").exists() and not (out / "report.json").exists()
    resumed = invoke(*_args(tiny, out, cache))
    assert resumed.exit_code == 0, resumed.output
    report = json.loads((out / "report.json").read_text())
    assert _numbers(report) == _numbers(expected)
    run_dirs = {r["key"]: r["run_dir"] for r in report["runs"]}
    assert run_dirs["resnet18--none-finetune-s0"] == str(checkpoint.parent.relative_to(out))  # killed, resumed
    assert [r["status"] for r in report["runs"]] == ["done"] * 4


def test_a_finished_study_run_again_trains_nothing(whole, monkeypatch):
    from featcache import api

    out = whole[0]
    report = json.loads((out / "report.json").read_text())
    import featcache.finetuning
    import featcache.head_runs
    for module, name in ((featcache.finetuning, "finetune"), (featcache.head_runs, "head_train")):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("a finished study trained again"))
    t0 = time.perf_counter()
    again = api.run_study(plan_file=out / "plan.toml")
    assert again.trained == [] and time.perf_counter() - t0 < 30
    assert _numbers(json.loads(json.dumps(again.report))) == _numbers(report)
    assert again.report["rows"][0]["cost"] == report["rows"][0]["cost"]  # the recorded times, not new ones


# --------------------------------------------------------------------------- the report


def test_report_holds_the_table_the_paired_differences_and_the_figures(whole):
    from featcache import runs

    out = whole[0]
    report = json.loads((out / "report.json").read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == ["resnet18@none head sgd", "resnet18@none finetune", "squeezenet1_0@none head sgd",
                          "squeezenet1_0@none finetune"]
    head, tuned = rows["resnet18@none head sgd"], rows["resnet18@none finetune"]
    (run_dir,) = [r["run_dir"] for r in report["runs"] if r["key"] == "resnet18--none-finetune-s0"]
    assert tuned["test_acc"]["mean"] == runs.load_run(out / run_dir).summary.test_acc and tuned["seeds"] == 1
    # the extraction is shared by the cached rows of a backbone and counted once in the study's total
    assert head["cost"]["extract_s"] == report["cost"]["extractions_s"]["resnet18@none"] > 0
    assert tuned["cost"]["extract_s"] is None
    (paired,) = [d for d in report["frozen_vs_finetune"] if d["model"] == "resnet18@none"]
    assert paired["accuracy"]["point"] == pytest.approx(tuned["test_acc"]["mean"] - head["test_acc"]["mean"])
    assert paired["accuracy"]["low"] <= paired["accuracy"]["point"] <= paired["accuracy"]["high"]
    total = sum(r["cost"]["train_s"] for r in report["rows"]) + sum(report["cost"]["extractions_s"].values())
    assert report["cost"]["total_s"] == pytest.approx(total, abs=1e-2)
    best = rows[report["best"]]
    assert best["test_acc"]["mean"] == max(r["test_acc"]["mean"] for r in report["rows"])
    for r in report["rows"]:
        assert (r["versus_best"] is None) == (r is best)
        if r is not best:
            assert r["versus_best"]["accuracy"]["point"] == pytest.approx(r["test_acc"]["mean"]
                                                                           - best["test_acc"]["mean"])
    figures = report["figures"]
    assert sorted(figures) == ["accuracy_cost", "curves", "roc", "test_accuracy"]
    for path in figures.values():
        assert (out / path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "Best row: " in page
    md = (out / "report.md").read_text()
    assert md.index("## The answer") < md.index("| model | mode | seeds |") < md.index("## Figures")
    csv_rows = (out / "report.csv").read_text().splitlines()
    assert len(csv_rows) == 1 + len(report["rows"]) and csv_rows[0].startswith("model,mode,solver,seeds")
