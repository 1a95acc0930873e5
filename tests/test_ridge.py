"""featcache.ridge: the closed-form path equals numpy least squares, λ is selected on val only, the
binary head layout, and `head-train --solver ridge` writes a run that `report` shows."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from featcache import metrics, runs
from featcache.cli import cli
from featcache.errors import UserError
from featcache.reporting import compare_runs
from featcache.ridge import fit_ridge, one_hot, ridge_path

from synthetic import gaussian_problem as _problem, write_cache


def _lstsq(x, y, l2):
    """min ||[X 1] [W; b] - Y||² + l2 ||W||² as ordinary least squares on the augmented system."""
    n, d = x.shape
    a = np.vstack([np.hstack([x, np.ones((n, 1))]), np.hstack([np.sqrt(l2) * np.eye(d), np.zeros((d, 1))])])
    b = np.vstack([y, np.zeros((d, y.shape[1]))])
    sol = np.linalg.lstsq(a, b, rcond=None)[0]
    return sol[:d], sol[d]


@pytest.mark.parametrize("n, d", [(60, 10), (15, 40)])  # primal (D <= N) and dual (D > N) eigendecomposition
def test_path_matches_numpy_least_squares(n, d):
    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, d)) * rng.uniform(0.1, 5, size=d) + 3.0  # uneven scales, off-centre
    y = one_hot(rng.integers(0, 3, n), 3)
    l2s = [1e-3, 0.5, 7.0, 300.0]
    path = ridge_path(x, y, l2s)
    assert path.weights.shape == (4, d, 3) and path.biases.shape == (4, 3)
    for i, l2 in enumerate(l2s):
        w, b = _lstsq(x, y, l2)
        np.testing.assert_allclose(path.weights[i], w, atol=1e-9)
        np.testing.assert_allclose(path.biases[i], b, atol=1e-9)
    np.testing.assert_allclose(path.scores(x[:5])[2], x[:5] @ path.weights[2] + path.biases[2], atol=1e-12)


def test_bad_l2_is_a_user_error():
    with pytest.raises(UserError, match="positive"):
        ridge_path(np.ones((4, 2)), np.eye(2)[[0, 1, 0, 1]], [0.0, 1.0])


@pytest.mark.parametrize("num_classes", [2, 3])
def test_fit_selects_on_val_and_scores_test_with_the_head(num_classes):
    train, val, test = _problem(num_classes, n=(40, 40, 40), dim=30, seed=3)
    l2s = [1e-3, 1e-1, 1.0, 10.0, 100.0, 1e4]
    fit = fit_ridge(train, val, test, num_classes=num_classes, l2s=l2s, standardize=True)
    best = max(fit.val_acc)
    assert fit.val_acc[fit.selected] == best
    ties = [i for i in range(len(l2s)) if fit.val_acc[i] == best]
    assert fit.selected == min(ties, key=lambda i: (fit.val_mse[i], -l2s[i]))

    # head.npz layout: K = 1 logit s1 - s0 for two classes, else C scores; same predictions as the argmax
    x_test = (test[0] - fit.mean) / fit.std
    logits = x_test @ fit.weight.T + fit.bias
    assert fit.weight.shape == ((1 if num_classes == 2 else num_classes), 30)
    scores = ridge_path((train[0] - fit.mean) / fit.std, one_hot(train[1], num_classes), l2s).scores(x_test)
    np.testing.assert_array_equal(metrics.predict(logits, num_classes), scores[fit.selected].argmax(axis=1))
    assert fit.summary.test_acc == pytest.approx(fit.test_acc[fit.selected])
    assert fit.summary.best_val_acc == fit.val_acc[fit.selected] and np.isnan(fit.summary.test_loss)

    wrong = fit_ridge(train, val, (test[0], (test[1] + 1) % num_classes), num_classes=num_classes, l2s=l2s,
                      standardize=True)
    assert wrong.selected == fit.selected and wrong.test_acc[fit.selected] != fit.test_acc[fit.selected]


def test_head_train_solver_ridge_writes_a_run_and_report_row(tmp_path):
    train, val, test = _problem(2, seed=4)
    cache = write_cache(tmp_path / "c" / "resnet18-none-kkkk.h5", {"train": train, "val": val, "test": test},
                        ["normal", "pneumonia"])
    runner = CliRunner()
    result = runner.invoke(cli, ["head-train", "--cache", str(cache), "--solver", "ridge", "--l2", "0.01,1,100",
                                 "--runs-dir", str(tmp_path / "runs"), "--run-name", "ridge"])
    assert result.exit_code == 0, result.output
    assert "Ridge path" in result.output and "◀ selected" in result.output
    run = runs.load_run(tmp_path / "runs" / "ridge")
    assert run.extra["solver"] == "ridge" and run.extra["ridge"]["l2s"] == [0.01, 1.0, 100.0]
    head = runs.load_head(tmp_path / "runs" / "ridge" / "head.npz")
    logits = test[0] @ head["weight"].T + head["bias"]
    assert metrics.accuracy(metrics.predict(logits, 2), test[1]) == run.summary.test_acc
    assert (tmp_path / "runs" / "ridge" / "curves.png").stat().st_size > 0
    text = compare_runs([run.run_dir], format="table")
    assert "head/ridge" in text

    bad = runner.invoke(cli, ["head-train", "--cache", str(cache), "--solver", "ridge", "--seeds", "3"])
    assert bad.exit_code == 2 and "deterministic" in bad.output
    bad = runner.invoke(cli, ["head-train", "--cache", str(cache), "--l2", "1"])
    assert bad.exit_code == 2 and "--solver ridge" in bad.output
    bad = runner.invoke(cli, ["head-train", "--cache", str(cache), "--lr", "0.1,x"])
    assert bad.exit_code == 2 and "comma" in bad.output


def test_ridge_is_numpy_only():
    code = ("import featcache.ridge, featcache.shift, featcache.standardize, sys; "
            "bad = sorted({'jax', 'torch', 'flax', 'optax'} & set(sys.modules)); assert not bad, bad")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
