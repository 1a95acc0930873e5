"""featcache.lbfgs: the objective is scikit-learn's LogisticRegression (two classes on one logit, and
multinomial), every C of the grid is the fit a single-C program gives, C is selected on val only, and a
bad C grid is a one-sentence user error."""

from __future__ import annotations

import re

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from featcache import metrics
from featcache.errors import UserError
from featcache.lbfgs import check_cs, fit_lbfgs, lbfgs_path
from featcache.standardize import standardization

from synthetic import gaussian_problem

CS = [0.01, 0.1, 1.0, 10.0]
TIGHT = 1e-6  # gradient tolerance of the comparisons (float32 stops on stalling near 1e-5 at worst)
# Tolerances of the comparison with scikit-learn run to tol 1e-10 in float64; at these sizes a C off by 2x
# already moves the probabilities by > 1e-2 (checked below), so these cannot pass with another objective.
PROB_ATOL = 2e-3
COEF_ATOL = 2e-3


def _problem(num_classes):
    return gaussian_problem(num_classes, n=(80, 40, 40), dim=6, seed=1)


@pytest.fixture(scope="module", params=[2, 3])
def grid(request):
    num_classes = request.param
    train, val, test = _problem(num_classes)
    return num_classes, train, val, lbfgs_path(train, val, num_classes=num_classes, cs=CS, tol=TIGHT, parallel=1)


def _probabilities(x, w, b, num_classes):
    return metrics.probabilities(x.astype(np.float64) @ w.T.astype(np.float64) + b, num_classes)


def test_each_c_matches_sklearn_logistic_regression(grid):
    num_classes, (x, y), (x_val, _), path = grid
    k = 1 if num_classes == 2 else num_classes
    assert path.weights.shape == (len(CS), k, x.shape[1]) and path.biases.shape == (len(CS), k)
    assert path.converged.any() or path.stalled.all()
    for i, c in enumerate(CS):
        ref = LogisticRegression(C=c, tol=1e-10, max_iter=10_000).fit(x.astype(np.float64), y)
        np.testing.assert_allclose(path.weights[i], ref.coef_, atol=COEF_ATOL)
        # multinomial: the unpenalised bias is defined up to a shift shared by the classes
        centre = (lambda b: b - b.mean()) if num_classes > 2 else (lambda b: b)
        np.testing.assert_allclose(centre(path.biases[i]), centre(ref.intercept_), atol=COEF_ATOL)
        np.testing.assert_allclose(_probabilities(x_val, path.weights[i], path.biases[i], num_classes),
                                   ref.predict_proba(x_val), atol=PROB_ATOL)
        off = LogisticRegression(C=2 * c, tol=1e-10, max_iter=10_000).fit(x.astype(np.float64), y)
        assert np.abs(off.predict_proba(x_val) - ref.predict_proba(x_val)).max() > 5 * PROB_ATOL


def test_grid_gives_what_single_c_fits_give(grid):
    num_classes, train, val, path = grid
    for i, c in enumerate(CS):
        one = lbfgs_path(train, val, num_classes=num_classes, cs=[c], tol=TIGHT, parallel=1)
        assert one.iterations[0] == path.iterations[i]
        np.testing.assert_allclose(one.weights[0], path.weights[i], rtol=0, atol=1e-6)
        np.testing.assert_allclose(one.biases[0], path.biases[i], rtol=0, atol=1e-6)
        assert one.val_acc[0] == path.val_acc[i] and one.train_acc[0] == path.train_acc[i]


def test_side_by_side_cs_give_the_sequential_fits(grid):
    num_classes, train, val, path = grid
    x_val = val[0]
    side = lbfgs_path(train, val, num_classes=num_classes, cs=CS, tol=TIGHT, parallel=len(CS))
    assert side.timings["parallel"] == len(CS)
    for i in range(len(CS)):  # vmapped products round differently: the same optimum, to the tolerance
        np.testing.assert_allclose(_probabilities(x_val, side.weights[i], side.biases[i], num_classes),
                                   _probabilities(x_val, path.weights[i], path.biases[i], num_classes),
                                   atol=PROB_ATOL)


def test_path_scores_train_and_val_with_the_metrics_definitions(grid):
    num_classes, (x, y), (x_val, y_val), path = grid
    for i in range(len(CS)):
        for (xs, ys), loss, acc in (((x, y), path.train_loss, path.train_acc),
                                    ((x_val, y_val), path.val_loss, path.val_acc)):
            logits = xs.astype(np.float64) @ path.weights[i].T.astype(np.float64) + path.biases[i]
            ref_loss, ref_acc = metrics.evaluate(logits, ys, num_classes)
            assert acc[i] == ref_acc
            assert loss[i] == pytest.approx(ref_loss, rel=1e-4)


@pytest.mark.parametrize("num_classes", [2, 3])
def test_fit_selects_c_on_val_and_scores_test_with_that_head(num_classes):
    train, val, test = _problem(num_classes)
    fit = fit_lbfgs(train, val, test, num_classes=num_classes, cs=[1e-4, 10.0, 0.01, 1.0], standardize=True,
                    class_names=[f"c{i}" for i in range(num_classes)])
    p = fit.path
    assert p.cs.tolist() == [1e-4, 0.01, 1.0, 10.0]  # sorted: ties go to the smaller C
    best = p.val_acc.max()
    ties = [i for i in range(4) if p.val_acc[i] == best]
    assert fit.selected == min(ties, key=lambda i: (p.val_loss[i], i))
    assert fit.c == p.cs[fit.selected]
    mean, std = standardization(train[0])
    np.testing.assert_array_equal(fit.mean, mean)
    np.testing.assert_array_equal(fit.std, std)
    np.testing.assert_array_equal(fit.weight, p.weights[fit.selected])
    x_test = (test[0] - mean) / std
    np.testing.assert_allclose(fit.test_logits, x_test @ fit.weight.T + fit.bias, atol=1e-5)
    assert fit.weight.shape == (1 if num_classes == 2 else num_classes, 6)
    assert fit.summary.test_acc == metrics.accuracy(metrics.predict(fit.test_logits, num_classes), test[1])
    assert fit.summary.best_val_acc == best and fit.summary.class_names == [f"c{i}" for i in range(num_classes)]
    assert fit.to_dict()["selected_c"] == fit.c and len(fit.to_dict()["val_acc"]) == 4


@pytest.mark.parametrize("cs, shown", [([1.0, 0.0], "got 0"), ([-1e-3], "got -0.001"), ([], "an empty grid"),
                                       ([1.0, float("nan")], "got nan")])
def test_bad_c_grid_is_a_one_sentence_user_error(cs, shown):
    with pytest.raises(UserError, match="positive finite") as err:
        check_cs(cs)
    message = str(err.value)
    assert shown in message and message.endswith(".") and not re.search(r"\.\s+[A-Z]", message)  # one sentence
    with pytest.raises(UserError):
        fit_lbfgs(*_problem(2), num_classes=2, cs=cs)


def test_c_grid_is_sorted_without_repeats():
    np.testing.assert_array_equal(check_cs([10, 1e-3, 10, 1]), [1e-3, 1.0, 10.0])
