"""featcache compare: the paired bootstrap of two runs on the same test images (matched by path), reproducible
for a seed; different test sets are refused with one sentence; a run against itself differs by exactly 0."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import featcache
from featcache import metrics, runs
from featcache.cli import cli
from featcache.paired import compare_paired
from featcache.config import CompareConfig
from synthetic import gaussian_problem, write_cache

RESAMPLES = 300


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two head runs (different lr) on one cache, and a run on a cache with another test set."""
    tmp = tmp_path_factory.mktemp("compare")
    train, val, test = gaussian_problem(2, n=(80, 40, 40), dim=8, seed=3)
    cache = write_cache(tmp / "a.h5", {"train": train, "val": val, "test": test}, ["neg", "pos"])
    other_test = gaussian_problem(2, n=(80, 40, 30), dim=8, seed=4)
    other = write_cache(tmp / "b.h5", dict(zip(("train", "val", "test"), other_test)), ["neg", "pos"])
    common = dict(epochs=4, runs_dir=str(tmp / "runs"), bootstrap=200)
    a = featcache.train_head(cache=cache, lr=0.1, run_name="a", **common)
    b = featcache.train_head(cache=cache, lr=0.02, run_name="b", **common)
    c = featcache.train_head(cache=other, lr=0.1, run_name="c", **common)
    return a.run_dir, b.run_dir, c.run_dir


def test_paired_interval_is_printed_reproducible_and_matches_the_metrics(two_runs, tmp_path):
    a, b, _ = two_runs
    args = ["compare", str(a), str(b), "--bootstrap", RESAMPLES, "--seed", 7]
    first = CliRunner().invoke(cli, [str(x) for x in args])
    second = CliRunner().invoke(cli, [str(x) for x in args])
    assert first.exit_code == 0, first.output
    assert first.output == second.output
    assert "40 shared test images" in first.output and "A wins" in first.output
    line = next(x for x in first.output.splitlines() if x.startswith("auroc "))
    assert "[" in line and "]" in line

    result = compare_paired(a, b, config=CompareConfig(bootstrap=RESAMPLES, seed=7, figure=str(tmp_path / "roc.png")))
    assert (tmp_path / "roc.png").stat().st_size > 1000
    sa, sb = runs.load_test_logits(a), runs.load_test_logits(b)
    assert list(sa.paths) == list(sb.paths)
    # the point difference is the metrics of each run on all rows; the interval is metrics.paired_bootstrap's
    assert result.values_a["auroc"] == pytest.approx(metrics.auroc(sa.logits, sa.labels, 2), abs=1e-12)
    d = result.differences["auroc"]
    assert d.point == pytest.approx(result.values_a["auroc"] - result.values_b["auroc"], abs=1e-12)
    assert d.low <= d.point <= d.high and d.defined == RESAMPLES and 0 <= d.a_wins <= 1
    assert f"[{d.low:+.4f}, {d.high:+.4f}]" in line
    fns = metrics.clinical_metric_functions(num_classes=2)
    direct = metrics.paired_bootstrap(fns, labels=sa.labels, scores_a=sa.logits, scores_b=sb.logits,
                                      resamples=RESAMPLES, seed=7)
    assert (direct["accuracy"].low, direct["accuracy"].high) == (result.differences["accuracy"].low,
                                                                 result.differences["accuracy"].high)
    # both runs' operating-point metrics are compared, each at its own val threshold
    assert {"sensitivity", "specificity", "ppv", "npv", "f1"} <= set(result.differences)
    doc = json.loads(CliRunner().invoke(cli, [str(x) for x in args + ["--format", "json"]]).output)
    assert doc["differences"]["auroc"]["low"] == d.low and doc["rows"] == 40


def test_rows_are_matched_by_path_not_by_order(two_runs, tmp_path):
    a, b, _ = two_runs
    shuffled = tmp_path / "b-shuffled"
    shuffled.mkdir()
    for name in (runs.METRICS_FILE,):
        (shuffled / name).write_bytes((b / name).read_bytes())
    sb = runs.load_test_logits(b)
    perm = np.random.default_rng(0).permutation(len(sb.labels))
    runs.save_test_logits(shuffled / runs.TEST_LOGITS_FILE, logits=sb.logits[perm], labels=sb.labels[perm],
                          paths=list(sb.paths[perm]))
    config = CompareConfig(bootstrap=RESAMPLES, seed=1)
    assert compare_paired(a, shuffled, config=config).to_dict() != {}
    x, y = compare_paired(a, b, config=config).to_dict(), compare_paired(a, shuffled, config=config).to_dict()
    x.pop("run_b"), y.pop("run_b")
    assert x == y


def test_runs_over_different_test_sets_are_refused_with_one_sentence(two_runs):
    a, _, c = two_runs
    out = CliRunner().invoke(cli, ["compare", str(a), str(c)])
    assert out.exit_code == 2
    lines = [x for x in out.output.splitlines() if x.strip()]
    assert len(lines) == 1 and "not tested on the same images" in lines[0], out.output
    assert "Traceback" not in out.output


def test_a_run_compared_with_itself_differs_by_zero(two_runs):
    a, _, _ = two_runs
    result = featcache.compare(a, a, bootstrap=RESAMPLES, seed=0)
    for name, d in result.differences.items():
        assert d.point == 0.0 and d.low == 0.0 and d.high == 0.0, name
        assert d.a_wins == 0.0 and d.ties == 1.0, name


def test_a_run_without_test_logits_is_a_user_error(two_runs, tmp_path):
    a, b, _ = two_runs
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / runs.METRICS_FILE).write_bytes((b / runs.METRICS_FILE).read_bytes())
    out = CliRunner().invoke(cli, ["compare", str(a), str(bare)])
    assert out.exit_code == 2 and runs.TEST_LOGITS_FILE in out.output and "Traceback" not in out.output


def test_report_pairs_runs_that_share_a_test_set(two_runs):
    a, b, c = two_runs
    out = CliRunner().invoke(cli, ["report", str(a), str(b), str(c), "--format", "markdown", "--figure", ""])
    assert out.exit_code == 0, out.output
    assert "Paired against the best run" in out.output
    section = out.output.split("Paired against the best run")[1]
    lines = [x for x in section.splitlines() if x.startswith(("| a | b |", "| b | a |", "| c |", "| a | c |"))]
    assert len(lines) == 1  # a and b share a test set (one pair); c, another test set, is left out
    best, other = lines[0].split(" | ")[0].strip("| "), lines[0].split(" | ")[1]
    d = compare_paired(Path(a).parent / best, Path(a).parent / other,
                       config=CompareConfig(bootstrap=1000)).differences["accuracy"]
    assert f"{d.point:+.4f} [{d.low:+.4f}, {d.high:+.4f}]" in lines[0]
