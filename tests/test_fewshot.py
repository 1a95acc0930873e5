"""featcache.fewshot: draws are stratified, seeded and from train only; every draw of every K in the one
program gives what the full-data probe gives on that draw's rows; the interval is metrics' t-interval over
the draws; too many shots for a class is a one-sentence user error naming the class."""

from __future__ import annotations

import numpy as np
import pytest

from featcache.errors import UserError
from featcache.fewshot import check_shots, draw_shots, fewshot_knn, fewshot_lbfgs
from featcache.knn import fit_knn
from featcache.lbfgs import fit_lbfgs
from featcache.metrics import mean_interval

from synthetic import gaussian_problem

CS = [0.01, 1.0]


@pytest.fixture(scope="module")
def data():
    return gaussian_problem(3, n=(90, 45, 45), dim=6, seed=4)


def test_draws_are_stratified_distinct_seeded_and_stable(data):
    (_, y), _, _ = data
    rows = draw_shots(y, shots=4, draws=3, seed=7, num_classes=3)
    assert rows.shape == (3, 12) and rows.dtype == np.int64
    for draw in rows:
        assert len(set(draw.tolist())) == 12 and draw.min() >= 0 and draw.max() < len(y)
        assert y[draw].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert len({tuple(d) for d in rows.tolist()}) == 3  # the draws differ
    np.testing.assert_array_equal(draw_shots(y, shots=4, draws=3, seed=7, num_classes=3), rows)
    np.testing.assert_array_equal(draw_shots(y, shots=4, draws=2, seed=7, num_classes=3), rows[:2])
    assert not np.array_equal(draw_shots(y, shots=4, draws=3, seed=8, num_classes=3), rows)


def test_more_shots_than_the_smallest_class_is_a_user_error_naming_it():
    y = np.array([0] * 10 + [1] * 3 + [2] * 8)
    with pytest.raises(UserError) as err:
        draw_shots(y, shots=4, draws=2, seed=0, num_classes=3, class_names=["cat", "dog", "eel"])
    assert str(err.value) == ("4 shots per class is more than class 'dog' has in train (3 rows); "
                              "give at most 3 shots.")
    assert draw_shots(y, shots=3, draws=1, seed=0, num_classes=3).shape == (1, 9)
    with pytest.raises(UserError, match="at least 1"):
        check_shots([0, 2], 3)
    with pytest.raises(UserError, match="Draws must be at least 1"):
        check_shots([2], 0)


def _subset(train, rows):
    x, y = train
    return x[rows], y[rows]


def test_lbfgs_draws_in_one_program_equal_the_probe_on_each_draw(data):
    train, val, test = data
    fit = fewshot_lbfgs(train, val, test, num_classes=3, shots=[5, 2], draws=3, seed=1, cs=CS)
    assert [r.shots for r in fit.results] == [2, 5] and fit.solver == "lbfgs"
    for result in fit.results:
        assert result.rows.shape == (3, result.shots * 3)
        np.testing.assert_array_equal(result.rows, draw_shots(train[1], shots=result.shots, draws=3, seed=1,
                                                              num_classes=3))
        for d, rows in enumerate(result.rows):
            # the draw alone (no padding rows, no other problems beside it) selects the same C, same scores
            alone = fit_lbfgs(_subset(train, rows), val, test, num_classes=3, cs=CS)
            assert result.selected[d] == alone.c
            assert result.val_acc[d] == alone.summary.best_val_acc
            assert result.summaries[d].test_acc == alone.summary.test_acc
        accs = [s.test_acc for s in result.summaries]
        assert result.test_acc == mean_interval(accs) and result.test_acc.n == 3
    assert fit.to_dict()["results"][0]["test_acc"]["n"] == 3


def test_knn_draws_in_one_program_equal_the_probe_on_each_draw(data):
    train, val, test = data
    fit = fewshot_knn(train, val, test, num_classes=3, shots=[1, 4], draws=3, seed=2, ks=[1, 3, 20])
    assert [r.shots for r in fit.results] == [1, 4]
    for result in fit.results:
        ks = sorted({min(k, result.shots * 3) for k in (1, 3, 20)})  # k clipped to K * C
        for d, rows in enumerate(result.rows):
            alone = fit_knn(_subset(train, rows), val, test, num_classes=3, ks=ks)
            assert result.selected[d] == alone.k
            assert result.val_acc[d] == alone.val_acc[alone.selected]
            assert result.summaries[d].test_acc == alone.summary.test_acc
        assert result.test_acc == mean_interval([s.test_acc for s in result.summaries])
        assert result.test_acc.half_width > 0


def test_the_probe_modules_never_import_torch():
    import subprocess
    import sys

    code = "import featcache.fewshot, featcache.knn, featcache.lbfgs, sys; print(' '.join(sys.modules))"
    mods = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split())
    assert "featcache.lbfgs" in mods and not {"torch", "torchvision", "timm", "sklearn"} & mods
