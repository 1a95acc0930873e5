"""The figures of a run directory and of `report --figure` (issue 16, item 5): confusion matrix with per-class
precision/recall/F1 (numbers from featcache.metrics, checked against scikit-learn), ROC, chance line, titles with
dataset and settings, whole-epoch ticks, the lr x weight-decay heat map, distinct comparison lines, test bars."""

from __future__ import annotations

import json

import numpy as np
import pytest

from featcache import metrics, plots, runs
from featcache.metrics import EpochRecord
from synthetic import gaussian_problem, write_cache
from cli_helpers import invoke

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture()
def captured(monkeypatch):
    """The matplotlib Figures the plots functions save, by file name (nothing is written)."""
    figures = {}
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.__setitem__(str(path).rsplit("/", 1)[-1], fig))
    return figures


def _history(epochs: int, seed: int = 0) -> list[EpochRecord]:
    rng = np.random.default_rng(seed)
    return [EpochRecord(epoch=e + 1, lr=0.1, train_loss=float(rng.random()), train_acc=float(rng.random()),
                        val_loss=float(rng.random()), val_acc=float(rng.random()), seconds=0.01)
            for e in range(epochs)]


def test_per_class_precision_recall_f1_and_chance_agree_with_scikit_learn():
    from sklearn.dummy import DummyClassifier
    from sklearn.metrics import precision_recall_fscore_support

    rng = np.random.default_rng(3)
    y = rng.integers(0, 4, 200)
    pred = np.where(rng.random(200) < 0.6, y, rng.integers(0, 4, 200))
    pred[pred == 3] = 2  # class 3 is never predicted: precision 0/0, which both define as 0
    cm = metrics.confusion_matrix(y, pred, 4)
    precision, recall, f1 = metrics.per_class_scores(cm)
    want = precision_recall_fscore_support(y, pred, labels=range(4), zero_division=0)
    for ours, theirs in zip((precision, recall, f1, cm.sum(axis=1)), want):
        np.testing.assert_allclose(ours, theirs, atol=1e-12)
    dummy = DummyClassifier(strategy="most_frequent").fit(np.zeros((200, 1)), y)
    assert metrics.chance_accuracy(np.bincount(y)) == pytest.approx(dummy.score(np.zeros((200, 1)), y))
    assert metrics.chance_accuracy([0, 0]) is None


def test_curves_have_whole_epoch_ticks_a_chance_line_and_the_title_given(captured, tmp_path):
    plots.plot_curves(_history(5), tmp_path / "curves.png", "resnet18 head on digits\nsgd lr 0.001", selected=2,
                      chance=0.25)
    fig = captured["curves.png"]
    ax_acc, ax_loss = fig.axes
    for ax in (ax_acc, ax_loss):
        ticks = [t for t in ax.get_xticks() if 1 <= t <= 5]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    chance = [line for line in ax_acc.get_lines() if line.get_label().startswith("chance")]
    assert len(chance) == 1 and list(chance[0].get_ydata()) == [0.25, 0.25]
    assert fig._suptitle.get_text() == "resnet18 head on digits\nsgd lr 0.001"


def test_identical_runs_stay_apart_in_the_comparison_figure(captured, tmp_path):
    history = _history(4)
    run = runs.RunResult(run_dir=tmp_path / "a", mode="head", model="resnet18", config=runs.TrainConfig(),
                         summary=None, history=history, timings={}, class_names=["a", "b"])
    twin = runs.RunResult(**{**run.__dict__, "run_dir": tmp_path / "b"})
    plots.plot_comparison([run, twin, run], tmp_path / "cmp.png", labels=["x", "x", "y"])
    ax_acc, ax_loss = captured["cmp.png"].axes
    lines = ax_acc.get_lines()
    assert [line.get_label() for line in lines] == ["x", "x (2)", "y"]  # unique legend labels
    styles = {(line.get_linestyle(), line.get_marker()) for line in lines}
    assert len(styles) == 3  # the same curve drawn three times is three visibly different lines
    assert [t.get_text() for t in ax_loss.get_legend().get_texts()] == ["x", "x (2)", "y"]


def _grid_cache(tmp_path, classes=3):
    splits = dict(zip(("train", "val", "test"), gaussian_problem(classes, n=(60, 30, 30), dim=6, seed=1)))
    return write_cache(tmp_path / "cache" / "synthetic" / "m.h5", splits, [f"c{i}" for i in range(classes)])


def test_a_grid_run_draws_curves_heat_map_confusion_roc_and_calibration(tmp_path):
    cache = _grid_cache(tmp_path)
    result = invoke("head-train", "--cache", cache, "--epochs", "3", "--lr", "0.01,0.1", "--weight-decay", "0,1e-3",
                    "--runs-dir", tmp_path / "runs", "--run-name", "grid", "--bootstrap", "0")
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / "grid"
    for name in ("curves.png", "grid.png", "confusion.png", "roc.png", "calibration.png"):
        assert (run_dir / name).read_bytes()[:8] == PNG and (run_dir / name).stat().st_size > 10_000, name
    # the per-class table under the confusion matrix: metrics.json's numbers, as scikit-learn counts them
    from sklearn.metrics import precision_recall_fscore_support

    doc = json.loads((run_dir / "metrics.json").read_text())
    scored = runs.load_test_logits(run_dir)
    pred = metrics.predict(scored.logits, 3)
    want = precision_recall_fscore_support(scored.labels, pred, labels=range(3), zero_division=0)
    for key, theirs in zip(("precision", "recall", "f1", "support"), want):
        np.testing.assert_allclose(doc["summary"][key], theirs, atol=1e-12)
    assert "run: " in result.stdout and "confusion.png" in result.stdout


def test_draw_run_figures_titles_carry_dataset_and_settings(captured, tmp_path):
    from featcache.head_runs import run_title
    from featcache.config import TrainConfig

    meta = {"model": "resnet18", "dataset_name": "digits", "transform": {"crop": 32}}
    title = run_title(meta, config=TrainConfig(lr=0.01, weight_decay=1e-4, epochs=7, standardize=True))
    assert title == "resnet18 head on digits, 32 px\nsgd lr 0.01 wd 0.0001, 7 epochs, batch 32, standardized"
    summary = metrics.summarize(_history(3), 1, test_logits=np.array([[2.0], [-1.0], [0.5]]),
                                test_labels=np.array([1, 0, 0]), class_names=["a", "b"], train_seconds=1.0,
                                diverged=False)
    spec = {"title": title, "chance": 2 / 3, "curves": {"kind": "epochs", "history": _history(3), "selected": 1},
            "test": runs.test_figures(summary, logits=np.array([[2.0], [-1.0], [0.5]]), labels=[1, 0, 0])}
    written = plots.draw_run_figures(tmp_path, spec)
    assert [p.name for p in written] == ["curves.png", "confusion.png", "roc.png", "calibration.png"]
    for name, fig in captured.items():
        assert title in (fig._suptitle.get_text() if fig._suptitle else "") + fig.axes[0].get_title(), name
    table = captured["confusion.png"].axes[1].tables[0]
    cells = {(r, c): cell.get_text().get_text() for (r, c), cell in table.get_celld().items()}
    assert [cells[(0, c)] for c in range(5)] == ["class", "precision", "recall", "F1", "support"]
    assert [cells[(2, c)] for c in range(5)] == ["b", "0.500", "1.000", "0.667", "1"]  # b: 1 of 2 predicted right


def test_report_figure_adds_test_bars_with_the_seed_interval(tmp_path):
    cache = _grid_cache(tmp_path, classes=2)
    for seed in (0, 1):
        result = invoke("head-train", "--cache", cache, "--epochs", "2", "--lr", "0.05", "--seed", seed,
                        "--runs-dir", tmp_path / "runs", "--run-name", f"s{seed}", "--bootstrap", "0", "--quiet")
        assert result.exit_code == 0, result.output
    from featcache.reporting import collect_runs, test_bars

    loaded = collect_runs([tmp_path / "runs"])
    (bar,) = test_bars(loaded)
    interval = metrics.mean_interval([r.summary.test_acc for r in loaded])
    assert bar["value"] == pytest.approx(interval.mean)
    assert bar["high"] - bar["low"] == pytest.approx(2 * interval.half_width)
    from featcache.reporting import draw_report_figures

    written = draw_report_figures(loaded, tmp_path / "cmp.png")  # `report --figure cmp.png` (CLI: test_report)
    assert [p.name for p in written] == ["cmp.png", "cmp-test.png"]
    assert all(p.read_bytes()[:8] == PNG for p in written)
