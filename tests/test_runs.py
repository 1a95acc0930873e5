"""featcache.runs (run directory written atomically, metrics.json last, read back) and featcache.plots."""

import csv
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from featcache import metrics, runs
from featcache.config import TrainConfig
from featcache.errors import UserError
from featcache.metrics import EpochRecord
from featcache.plots import plot_comparison, plot_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _history(n=3, diverge=False):
    return [EpochRecord(epoch=e + 1, lr=0.1 / (e + 1), train_loss=math.nan if diverge and e == n - 1 else 1.0 / (e + 1),
                        train_acc=0.5 + 0.1 * e, val_loss=1.2 / (e + 1), val_acc=0.4 + 0.1 * e, seconds=0.01)
            for e in range(n)]


def _summary(history):
    return metrics.summarize(history, metrics.select_epoch(history), test_logits=np.array([[1.0], [-1.0], [2.0]]),
                             test_labels=np.array([1, 0, 0]), class_names=["cat", "dog"], train_seconds=0.5)


def _write_run(tmp_path, history, **kw):
    run_dir = runs.new_run_dir(runs_dir=tmp_path / "runs", mode="head", model="resnet18", **kw)
    runs.save_head(run_dir / runs.HEAD_FILE, weight=np.ones((1, 4)), bias=np.zeros(1), class_names=["cat", "dog"])
    runs.write_history_csv(run_dir / runs.HISTORY_FILE, history)
    result = runs.finish_run(run_dir, mode="head", model="resnet18", config=TrainConfig(epochs=len(history)),
                             summary=_summary(history), history=history,
                             timings={"load_s": 0.1, "compile_s": 0.2, "train_s": 0.3},
                             versions={"python": "3.11", "numpy": np.__version__}, cache_key="k" * 12,
                             cache_path="cache/a.h5")
    return result


def test_write_then_load_a_run(tmp_path):
    history = _history()
    result = _write_run(tmp_path, history)
    loaded = runs.load_run(result.run_dir)
    assert loaded == result
    assert loaded.timings == {"load_s": 0.1, "compile_s": 0.2, "train_s": 0.3}
    assert loaded.cache == {"key": "kkkkkkkkkkkk", "path": "cache/a.h5"}
    doc = json.loads((result.run_dir / "metrics.json").read_text())
    assert doc["config"]["epochs"] == 3 and doc["summary"]["selected_epoch"] == 3 and doc["diverged"] is False
    assert not list(result.run_dir.glob("*.tmp"))  # no temporary file left behind


def test_history_csv(tmp_path):
    result = _write_run(tmp_path, _history())
    with open(result.run_dir / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert float(rows[1]["val_acc"]) == pytest.approx(0.5)
    assert list(rows[0]) == ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "seconds"]


def test_head_npz_loads_with_numpy_alone(tmp_path):
    result = _write_run(tmp_path, _history())
    with np.load(result.run_dir / "head.npz", allow_pickle=False) as z:
        assert z["weight"].shape == (1, 4) and z["weight"].dtype == np.float32
        assert z["class_names"].dtype.kind == "U" and z["class_names"].tolist() == ["cat", "dog"]
        np.testing.assert_array_equal(z["mean"], np.zeros(4))
        np.testing.assert_array_equal(z["std"], np.ones(4))
        assert not bool(z["standardized"])


def test_metrics_json_is_written_last_and_marks_the_run_finished(tmp_path, monkeypatch):
    order = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (order.append(Path(dst).name), real_replace(src, dst)))
    result = _write_run(tmp_path, _history())
    assert order == ["head.npz", "history.csv", "metrics.json"]
    assert runs.is_finished(result.run_dir)


def test_unfinished_run_is_refused(tmp_path):
    run_dir = runs.new_run_dir(runs_dir=tmp_path, mode="frozen", model="googlenet")
    runs.write_history_csv(run_dir / runs.HISTORY_FILE, _history())
    assert not runs.is_finished(run_dir)
    with pytest.raises(UserError, match="not a finished run"):
        runs.load_run(run_dir)
    with pytest.raises(UserError, match="does not exist"):
        runs.load_run(tmp_path / "nope")


def test_diverged_run_is_strict_json(tmp_path):
    result = _write_run(tmp_path, _history(diverge=True))
    doc = json.loads((result.run_dir / "metrics.json").read_text())  # no NaN tokens
    assert doc["diverged"] is True and doc["history"][-1]["train_loss"] is None
    loaded = runs.load_run(result.run_dir)
    assert loaded.diverged and math.isnan(loaded.history[-1].train_loss)


def test_run_dir_names(tmp_path):
    a = runs.new_run_dir(runs_dir=tmp_path, mode="head", model="timm/vit_small_patch14_dinov2.lvd142m")
    b = runs.new_run_dir(runs_dir=tmp_path, mode="head", model="timm/vit_small_patch14_dinov2.lvd142m")
    assert a != b and a.parent == b.parent == tmp_path
    assert a.name.endswith("-head-timm-vit_small_patch14_dinov2.lvd142m") and b.name.endswith(".lvd142m-2")
    file_run = runs.new_run_dir(runs_dir=tmp_path, mode="frozen", model="/data/models/my backbone.pt2")
    assert file_run.name.endswith("-frozen-my-backbone.pt2")  # a backbone file by its file name, not its path
    named = runs.new_run_dir(runs_dir=tmp_path, mode="finetune", model="x", name="mine")
    assert named == tmp_path / "mine"
    with pytest.raises(UserError, match="already exists"):
        runs.new_run_dir(runs_dir=tmp_path, mode="finetune", model="x", name="mine")


def test_plots_write_pngs(tmp_path):
    history = _history(5)
    path = plot_curves(history, tmp_path / "curves.png", "resnet18 head", selected=2)
    assert path.read_bytes()[:8] == PNG_MAGIC
    result = _write_run(tmp_path, history)
    other = _write_run(tmp_path, _history(4))
    cmp = plot_comparison([result, other], tmp_path / "compare.png")
    assert cmp.read_bytes()[:8] == PNG_MAGIC
