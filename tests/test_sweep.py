"""featcache.sweep: the vmapped grid equals each cell trained alone, selection on val only, the run
directory and report of a grid, intervals over seeds (metrics.mean_interval), finetune --seeds."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from featcache import metrics, runs
from featcache.cli import cli
from featcache.config import TrainConfig
from featcache.head import fit_head
from featcache.metrics import Interval, mean_interval, t_quantile_975
from featcache.reporting import compare_runs, format_interval
from featcache.sweep import GridCell, fit_grid, select_cell
from synthetic import gaussian_problem as _problem, write_cache


# ---------------------------------------------------------------- intervals on known values


def test_mean_interval_on_known_values():
    iv = mean_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    # s = sqrt(2.5), t(0.975, 4) = 2.7764: half width = 2.7764 * sqrt(2.5) / sqrt(5)
    assert iv.mean == 3.0 and iv.n == 5
    assert iv.half_width == pytest.approx(2.7764 * math.sqrt(0.5), abs=1e-12)
    assert (iv.low, iv.high) == pytest.approx((3 - 1.963211, 3 + 1.963211), abs=1e-6)
    two = mean_interval([0.8, 0.9])  # s = 0.0707107, t(0.975, 1) = 12.7062
    assert two.mean == pytest.approx(0.85) and two.half_width == pytest.approx(12.7062 * 0.05, abs=1e-9)
    assert mean_interval([7.0, 7.0, 7.0]).half_width == 0.0
    one = mean_interval([0.75])
    assert one.mean == 0.75 and math.isnan(one.half_width)
    assert math.isnan(mean_interval([0.5, float("nan")]).mean)
    assert Interval.from_dict(iv.to_dict()) == iv and json.dumps(one.to_dict())  # strict-JSON safe
    assert format_interval(iv.to_dict()) == "3.0000 ± 1.9632" and format_interval(one.to_dict()) == "0.7500"


def test_t_quantiles_table_and_beyond():
    assert t_quantile_975(1) == 12.7062 and t_quantile_975(30) == 2.0423
    for df, t in ((31, 2.0395), (40, 2.0211), (60, 2.0003), (120, 1.9799), (1000, 1.9623)):
        assert t_quantile_975(df) == pytest.approx(t, abs=1e-4)
    stats = pytest.importorskip("scipy.stats")  # scipy comes with jax; not a featcache dependency
    for df in range(1, 500):
        assert t_quantile_975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-4)


# ---------------------------------------------------------------- the grid in one program


@pytest.mark.parametrize("num_classes, optimizer, lrs, wds, checked", [
    # momentum + nesterov, softmax CE; the cells trained alone cover every lr, every wd and both seeds
    (3, "sgd", (0.01, 0.1), (0.0, 0.01), [(0, 0), (1, 3), (2, 3), (3, 0)]),
    # decoupled decay, BCE; wd 0 is a traced 0 in the grid, an absent term alone
    (2, "adamw", (0.003,), (0.0, 0.05), [(0, 0), (1, 3)]),
])
def test_grid_equals_each_cell_trained_alone(num_classes, optimizer, lrs, wds, checked):
    train, val, test = _problem(num_classes)
    config = TrainConfig(epochs=4, batch_size=16, optimizer=optimizer, nesterov=optimizer == "sgd")
    grid = fit_grid(train, val, test, num_classes=num_classes, config=config, lrs=lrs, weight_decays=wds,
                    seeds=(0, 3))
    assert [(c.lr, c.weight_decay) for c in grid.cells] == [(lr, wd) for lr in lrs for wd in wds]
    for index, seed in checked:  # each fit_head compiles its own program: a covering subset keeps this fast
        cell = grid.cells[index]
        got = cell.fits[grid.seeds.index(seed)]
        alone = fit_head(train, val, test, num_classes=num_classes,
                         config=dataclasses.replace(config, lr=cell.lr, weight_decay=cell.weight_decay, seed=seed))
        np.testing.assert_allclose(got.epoch_weights, alone.epoch_weights, rtol=0, atol=1e-5)
        np.testing.assert_allclose(got.epoch_biases, alone.epoch_biases, rtol=0, atol=1e-5)
        np.testing.assert_allclose(got.test_logits, alone.test_logits, rtol=0, atol=1e-5)
        for a, b in zip(got.history, alone.history):
            assert (a.epoch, a.lr) == (b.epoch, b.lr)
            for k in ("train_loss", "train_acc", "val_loss", "val_acc"):
                assert getattr(a, k) == pytest.approx(getattr(b, k), abs=1e-5), k
        assert got.selected == alone.selected and got.summary.test_acc == alone.summary.test_acc
        assert cell.val_acc == mean_interval([f.summary.best_val_acc for f in cell.fits])
        assert cell.test_acc == mean_interval([f.summary.test_acc for f in cell.fits])


def _cell(val_acc, val_loss, i):
    iv = lambda m: Interval(mean=m, half_width=0.01, n=3)  # noqa: E731
    return GridCell(lr=float(i), weight_decay=0.0, fits=(), val_acc=iv(val_acc), val_loss=iv(val_loss),
                    test_acc=iv(1.0 - val_acc))


def test_selection_is_best_mean_val_acc_then_lower_val_loss():
    cells = [_cell(0.8, 0.3, 0), _cell(0.9, 0.5, 1), _cell(0.9, 0.4, 2), _cell(0.9, 0.4, 3), _cell(math.nan, 0.1, 4)]
    assert select_cell(cells) == 2  # best val acc; tie -> lower val loss; tie -> earlier; nan never wins


def test_test_labels_never_change_the_selection():
    train, val, test = _problem(3, seed=1)
    kwargs = dict(num_classes=3, config=TrainConfig(epochs=3, batch_size=16), lrs=(0.001, 0.03, 0.3),
                  weight_decays=(0.0,), seeds=(0, 1))
    a = fit_grid(train, val, test, **kwargs)
    b = fit_grid(train, val, (test[0], (test[1] + 1) % 3), **kwargs)  # every test label wrong
    assert a.selected == b.selected and [c.val_acc for c in a.cells] == [c.val_acc for c in b.cells]
    assert a.selected_cell.test_acc != b.selected_cell.test_acc


def test_grid_rejects_repeated_values():
    from featcache.errors import UserError

    train, val, test = _problem(2)
    with pytest.raises(UserError, match="twice"):
        fit_grid(train, val, test, num_classes=2, config=TrainConfig(epochs=1), lrs=(0.1, 0.1), weight_decays=(0,),
                 seeds=(0,))


# ---------------------------------------------------------------- head-train grid: run directory and report


def test_head_train_grid_run_directory_and_report(tmp_path):
    train, val, test = _problem(2, seed=2)
    cache = write_cache(tmp_path / "c" / "resnet18-none-kkkk.h5", {"train": train, "val": val, "test": test},
                        ["normal", "pneumonia"])
    runs_dir = tmp_path / "runs"
    result = CliRunner().invoke(cli, ["head-train", "--cache", str(cache), "--lr", "0.01,0.1", "--weight-decay",
                                      "0,1e-3", "--seeds", "3", "--seed", "5", "--epochs", "3", "--batch-size", "16",
                                      "--runs-dir", str(runs_dir), "--run-name", "grid"])
    assert result.exit_code == 0, result.output
    assert "12 heads in one program" in result.output and "◀ selected" in result.output and "±" in result.output

    run = runs.load_run(runs_dir / "grid")
    grid = run.extra["grid"]
    assert grid["lrs"] == [0.01, 0.1] and grid["weight_decays"] == [0.0, 0.001] and grid["seeds"] == [5, 6, 7]
    assert len(grid["cells"]) == 4 and all(len(c["seeds"]) == 3 for c in grid["cells"])
    sel = grid["selected"]
    best = max(grid["cells"], key=lambda c: c["val_acc"]["mean"])
    assert best["val_acc"]["mean"] == next(c for c in grid["cells"] if (c["lr"], c["weight_decay"]) ==
                                           (sel["lr"], sel["weight_decay"]))["val_acc"]["mean"]
    assert (run.config.lr, run.config.weight_decay, run.config.seed) == (sel["lr"], sel["weight_decay"], 5)
    assert run.extra["seed_stats"]["n"] == 3 and (runs_dir / "grid" / "curves.png").stat().st_size > 0

    # head.npz = the selected cell's first seed: exactly what head-train --lr --weight-decay --seed writes
    alone = fit_head(train, val, test, num_classes=2, config=dataclasses.replace(run.config, runs_dir="runs"))
    head = runs.load_head(runs_dir / "grid" / "head.npz")
    np.testing.assert_allclose(head["weight"], alone.weight, atol=1e-5)
    assert run.summary.test_acc == alone.summary.test_acc and run.history[-1].val_acc == alone.history[-1].val_acc

    text = compare_runs([runs_dir / "grid"], format="table")
    assert "Intervals over seeds" in text and "grid run grid" in text and "Grid of resnet18 heads" in text
    assert format_interval(run.extra["seed_stats"]["test_acc"]) in text


def _fake_run(tmp_path, name: str, *, seed: int, test_acc: float, val_acc: float, lr: float = 0.01):
    history = [metrics.EpochRecord(epoch=1, lr=lr, train_loss=0.5, train_acc=0.8, val_loss=0.4, val_acc=val_acc,
                                   seconds=1.0)]
    labels = np.array([0, 1, 1, 0] * 5)
    wrong = int(round((1 - test_acc) * len(labels)))
    logits = np.where(labels == 1, 1.0, -1.0)[:, None]
    logits[:wrong] *= -1
    summary = metrics.summarize(history, 0, test_logits=logits, test_labels=labels, class_names=["a", "b"],
                                train_seconds=1.0)
    run_dir = runs.new_run_dir(runs_dir=tmp_path, mode="finetune", model="resnet18", name=name)
    return runs.finish_run(run_dir, mode="finetune", model="resnet18", config=TrainConfig(seed=seed, lr=lr),
                           summary=summary, history=history, timings={}, versions={},
                           extra={"finetune": {"model": "resnet18"}, "dataset_fingerprint": "fp"})


def test_report_shows_intervals_for_seed_groups(tmp_path):
    group = [_fake_run(tmp_path, f"s{s}", seed=s, test_acc=acc, val_acc=0.9) for s, acc in ((0, 0.8), (1, 0.9), (2, 0.85))]
    rerun = _fake_run(tmp_path, "s0-again", seed=0, test_acc=0.5, val_acc=0.9)  # same seed twice: counted once
    other = _fake_run(tmp_path, "lr", seed=0, test_acc=0.6, val_acc=0.7, lr=0.1)  # another setting: no group of 2
    text = compare_runs([r.run_dir for r in group + [rerun, other]], format="table")
    expected = format_interval(mean_interval([0.8, 0.9, 0.85]).to_dict())
    assert expected == "0.8500 ± 0.1242"
    assert expected in text and "3 runs, seeds 0, 1, 2" in text and "0.9000" in text
    md = compare_runs([r.run_dir for r in group], format="markdown")
    assert "Intervals over seeds" in md and expected in md
    assert "Intervals" not in compare_runs([other.run_dir], format="table")


@pytest.mark.slow  # a PyTorch loop per seed (still tiny: 16 images of 32 px, 1 epoch)
def test_finetune_seeds_runs_each_seed_and_reports_intervals(tmp_path):
    from featcache.demo import make_demo_dataset

    root = make_demo_dataset(tmp_path / "d", n_per_class=(8, 4, 4), image_size=32)
    runs_dir = tmp_path / "runs"
    result = CliRunner().invoke(cli, ["finetune", "--model", "resnet18", "--data", str(root), "--weights", "none",
                                      "--image-size", "32", "--epochs", "1", "--freeze-backbone", "--num-workers", "0",
                                      "--seeds", "2", "--seed", "3", "--runs-dir", str(runs_dir), "--quiet"])
    assert result.exit_code == 0, result.output
    done = [runs.load_run(p) for p in sorted(runs_dir.iterdir())]
    assert sorted(r.config.seed for r in done) == [3, 4]
    assert "Intervals over seeds" in result.output and "2 runs, seeds 3, 4" in result.output
    bad = CliRunner().invoke(cli, ["finetune", "--model", "resnet18", "--data", str(root), "--seeds", "2",
                                   "--resume", str(runs_dir)])
    assert bad.exit_code == 2 and "--resume continues one run" in bad.output


def test_sweep_never_imports_torch():
    import subprocess
    import sys

    code = "import featcache.sweep, sys; assert 'torch' not in sys.modules, 'torch imported'"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
