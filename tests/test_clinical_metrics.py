"""Clinical metrics of featcache.metrics (AUROC/AP, operating points, calibration, bootstrap,
weighted loss, clinical_report) against scikit-learn, torch and straightforward re-implementations."""

import json
import math
import re
import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import (average_precision_score, balanced_accuracy_score, confusion_matrix,
                             precision_recall_fscore_support, roc_auc_score, roc_curve)
from sklearn.preprocessing import label_binarize

from featcache import metrics
from featcache.errors import UserError

TOL = 1e-9
SEEDS = (0, 1, 2, 3, 4)


@pytest.fixture(autouse=True)
def _no_warnings():
    """No numpy warnings (0/0, overflow) from any metric here."""
    with warnings.catch_warnings(), np.errstate(divide="raise", invalid="raise", over="raise"):
        warnings.simplefilter("error")
        yield


def make_logits(seed: int, n: int, num_classes: int, *, ties: bool):
    """Logits that carry some signal about the labels; `ties` rounds them so many scores tie."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, n)
    y[:num_classes] = np.arange(num_classes)  # every class present
    k = 1 if num_classes == 2 else num_classes
    x = rng.normal(size=(n, k)) * 1.5
    if num_classes == 2:
        x[:, 0] += 1.2 * (2 * y - 1)
    else:
        x[np.arange(n), y] += 1.5
    if ties:
        x = np.round(x * 2) / 2  # steps of 0.5: many equal scores
    return x, y


CASES = [(seed, c, ties) for seed in SEEDS for c in (2, 4) for ties in (False, True)]


# --------------------------------------------------------------------------- AUROC and AP


@pytest.mark.parametrize("seed,num_classes,ties", CASES)
def test_auroc_matches_sklearn(seed, num_classes, ties):
    x, y = make_logits(seed, 120, num_classes, ties=ties)
    if num_classes == 2:
        ref = roc_auc_score(y, x[:, 0])
        assert metrics.roc_auc(x[:, 0], y) == pytest.approx(ref, abs=TOL)
        assert metrics.auroc(x, y, 2) == pytest.approx(ref, abs=TOL)
        assert metrics.auroc(x, y, 2, average="weighted") == pytest.approx(ref, abs=TOL)
    else:
        p = metrics.probabilities(x, num_classes)
        for average in ("macro", "weighted"):
            ref = roc_auc_score(y, p, multi_class="ovr", average=average)
            assert metrics.auroc(x, y, num_classes, average=average) == pytest.approx(ref, abs=TOL)


@pytest.mark.parametrize("seed,num_classes,ties", CASES)
def test_average_precision_matches_sklearn(seed, num_classes, ties):
    x, y = make_logits(seed, 120, num_classes, ties=ties)
    if num_classes == 2:
        ref = average_precision_score(y, x[:, 0])
        assert metrics.binary_average_precision(x[:, 0], y) == pytest.approx(ref, abs=TOL)
        assert metrics.average_precision(x, y, 2) == pytest.approx(ref, abs=TOL)
    else:
        p = metrics.probabilities(x, num_classes)
        onehot = label_binarize(y, classes=list(range(num_classes)))
        for average in ("macro", "weighted"):
            ref = average_precision_score(onehot, p, average=average)
            assert metrics.average_precision(x, y, num_classes, average=average) == pytest.approx(ref, abs=TOL)


def test_average_precision_by_hand_with_a_tie():
    # scores 3 (pos), 2 (neg), 2 (pos), 1 (neg): thresholds 3 -> P=1, R=1/2; 2 -> P=2/3, R=1; 1 -> R stays 1
    ap = metrics.binary_average_precision(np.array([3.0, 2.0, 2.0, 1.0]), np.array([1, 0, 1, 0]))
    assert ap == pytest.approx(0.5 * 1 + 0.5 * 2 / 3, abs=1e-15)
    assert metrics.roc_auc(np.array([3.0, 2.0, 2.0, 1.0]), np.array([1, 0, 1, 0])) == pytest.approx(0.875)


def test_undefined_auroc_and_ap_are_none():
    x = np.array([[0.1, 0.2, 0.3], [0.3, 0.2, 0.1], [0.0, 1.0, 0.0]])
    assert metrics.auroc(x, np.array([0, 1, 1]), 3) is None  # class 2 absent
    assert metrics.average_precision(x, np.array([0, 1, 1]), 3, average="weighted") is None
    assert metrics.auroc(np.array([0.5, 0.1]), np.array([1, 1]), 2) is None
    assert metrics.binary_average_precision(np.array([0.5, 0.1]), np.array([0, 0])) is None
    assert metrics.auroc(np.array([np.nan, 0.1]), np.array([0, 1]), 2) is None
    assert metrics.average_precision(np.array([[np.inf, 0, 0], [0, 1, 0], [0, 0, 1]]), np.array([0, 1, 2]), 3) is None
    with pytest.raises(ValueError):
        metrics.auroc(x, np.array([0, 1, 2]), 3, average="micro")


@pytest.mark.parametrize("num_classes", [2, 4])
def test_no_rows_give_none_without_warnings(num_classes):
    x, y = np.zeros((0, 1 if num_classes == 2 else num_classes)), np.zeros(0, dtype=int)
    for average in ("macro", "weighted"):
        assert metrics.auroc(x, y, num_classes, average=average) is None
        assert metrics.average_precision(x, y, num_classes, average=average) is None
    for name, fn in metrics.clinical_metric_functions(num_classes=num_classes, threshold=0.0).items():
        assert fn(y, x) is None, name
    assert metrics.expected_calibration_error(x, y, num_classes) is None
    assert metrics.fit_temperature(x, y, num_classes) is None
    report = metrics.clinical_report(val_logits=x, val_labels=y, test_logits=x, test_labels=y,
                                     num_classes=num_classes, bootstrap=10)
    assert set(report["metrics"].values()) == {None} and report["bootstrap"] is None
    json.dumps(report, allow_nan=False)


# --------------------------------------------------------------------------- operating points


def brute_force_threshold(s, y, rule):
    """Reference: every candidate threshold (+inf and each distinct score), rated by sklearn's confusion_matrix."""
    candidates = np.r_[np.inf, np.unique(s)[::-1]]
    rates = []
    for t in candidates:
        tn, fp, fn, tp = confusion_matrix(y, (s >= t).astype(int), labels=[0, 1]).ravel()
        rates.append((tp / (tp + fn), tn / (tn + fp)))
    sens, spec = np.array(rates).T
    if rule == "youden":
        j = sens + spec - 1
        return candidates[np.flatnonzero(j == j.max())].max()
    kind, target = rule.split("=")
    if kind == "sens":
        return candidates[sens >= float(target)].max()
    return candidates[spec >= float(target)].min()


@pytest.mark.parametrize("seed,ties", [(s, t) for s in SEEDS for t in (False, True)])
def test_roc_points_match_sklearn_roc_curve(seed, ties):
    x, y = make_logits(seed, 150, 2, ties=ties)
    thresholds, sens, spec = metrics.roc_points(x[:, 0], y)
    fpr, tpr, ref_thresholds = roc_curve(y, x[:, 0], drop_intermediate=False)
    np.testing.assert_array_equal(thresholds, ref_thresholds)
    np.testing.assert_allclose(sens, tpr, rtol=0, atol=TOL)
    np.testing.assert_allclose(spec, 1 - fpr, rtol=0, atol=TOL)


@pytest.mark.parametrize("rule", ["youden", "sens=0.95", "spec=0.95", "sens=0.8", "spec=0.9", "sens=1", "spec=1"])
@pytest.mark.parametrize("seed,ties", [(s, t) for s in SEEDS for t in (False, True)])
def test_choose_threshold_matches_brute_force(rule, seed, ties):
    x, y = make_logits(seed, 100, 2, ties=ties)
    assert metrics.choose_threshold(x[:, 0], y, rule=rule) == brute_force_threshold(x[:, 0], y, rule)


def test_choose_threshold_by_hand():
    s = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0])
    y = np.array([1, 1, 0, 1, 1, 0, 0, 1, 0, 0])
    # at 0.5: sens 4/5, spec 4/5 -> J = 0.6, the maximum
    assert metrics.choose_threshold(s, y, rule="youden") == 0.5
    assert metrics.choose_threshold(s, y, rule="sens=0.95") == 0.2  # first threshold catching all 5
    assert metrics.choose_threshold(s, y, rule="spec=0.95") == 0.8  # 0.7 would let a negative in
    assert metrics.choose_threshold(s, y, rule="sens=0.8") == 0.5
    # the top score is a negative: only +inf keeps specificity 1
    assert metrics.choose_threshold(np.array([2.0, 1.0, 0.0]), np.array([0, 1, 0]), rule="spec=1") == math.inf
    assert metrics.choose_threshold(s, np.zeros(10), rule="youden") is None


@pytest.mark.parametrize("rule", ["youden", "SENS=0.9", " spec = 0.95 ", "sens=1"])
def test_parse_operating_point_accepts(rule):
    kind, target = metrics.parse_operating_point(rule)
    assert kind in ("youden", "sens", "spec")
    assert target is None if kind == "youden" else 0 < target <= 1


@pytest.mark.parametrize("rule", ["", "youden=1", "sens", "sens=", "sens=0", "sens=1.5", "spec=-0.1",
                                  "ppv=0.9", "sens=abc", "sens=nan", "0.95"])
def test_parse_operating_point_rejects_with_one_sentence(rule):
    with pytest.raises(UserError) as info:
        metrics.parse_operating_point(rule)
    message = str(info.value)
    assert message.startswith("--operating-point must be youden, sens=X or spec=X")
    assert message.endswith(".") and not re.search(r"[.;] [A-Z]", message)


@pytest.mark.parametrize("seed,ties", [(s, t) for s in SEEDS for t in (False, True)])
def test_operating_point_metrics_match_sklearn(seed, ties):
    x_val, y_val = make_logits(seed, 100, 2, ties=ties)
    x_test, y_test = make_logits(seed + 100, 80, 2, ties=ties)
    for rule in ("youden", "sens=0.95", "spec=0.95"):
        t = metrics.choose_threshold(x_val[:, 0], y_val, rule=rule)
        got = metrics.operating_point_metrics(x_test[:, 0], y_test, threshold=t)
        pred = (x_test[:, 0] >= t).astype(int)
        tn, fp, fn, tp = confusion_matrix(y_test, pred, labels=[0, 1]).ravel()
        assert (got["tn"], got["fp"], got["fn"], got["tp"]) == (tn, fp, fn, tp)
        p, r, f, _ = precision_recall_fscore_support(y_test, pred, labels=[0, 1], zero_division=np.nan)
        for key, ref in (("ppv", p[1]), ("npv", p[0]), ("sensitivity", r[1]), ("specificity", r[0]), ("f1", f[1])):
            assert (got[key] is None) == bool(np.isnan(ref)), key
            if got[key] is not None:
                assert got[key] == pytest.approx(ref, abs=TOL), key
        assert got["accuracy"] == pytest.approx(np.mean(pred == y_test), abs=TOL)


def test_operating_point_metrics_undefined_ratios_are_none():
    s, y = np.array([0.1, 0.2, 0.9]), np.array([0, 0, 1])
    nothing = metrics.operating_point_metrics(s, y, threshold=math.inf)
    assert nothing == {"tp": 0, "fp": 0, "tn": 2, "fn": 1, "sensitivity": 0.0, "specificity": 1.0,
                       "ppv": None, "npv": 2 / 3, "f1": 0.0, "accuracy": 2 / 3}
    only_neg = metrics.operating_point_metrics(np.array([0.1, 0.2]), np.array([0, 0]), threshold=0.15)
    assert only_neg["sensitivity"] is None and only_neg["specificity"] == 0.5 and only_neg["npv"] == 1.0
    assert only_neg["ppv"] == 0.0 and only_neg["f1"] == 0.0
    assert set(metrics.operating_point_metrics(s, y, threshold=None).values()) == {None}
    assert set(metrics.operating_point_metrics(np.array([np.nan, 1, 2]), y, threshold=0.5).values()) == {None}
    empty = metrics.operating_point_metrics(np.array([]), np.array([]), threshold=0.5)
    assert empty["tp"] == 0 and empty["accuracy"] is None and empty["f1"] is None


# --------------------------------------------------------------------------- calibration


def reference_ece(logits, labels, num_classes, bins=15):
    """Guo et al.'s loop: bin_lower < confidence <= bin_upper, |acc - conf| weighted by the bin's share."""
    p = metrics.probabilities(logits, num_classes)
    confidence = p.max(axis=1)
    correct = metrics.predict(logits, num_classes) == labels
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lower, upper in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > lower) & (confidence <= upper)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return ece


def test_ece_by_hand():
    # two classes, logits -> confidences: 0 -> 0.5 (pred 0), ln 3 -> 0.75 (pred 1), -ln 9 -> 0.9 (pred 0)
    z = np.array([0.0, math.log(3), -math.log(9), math.log(3)])
    y = np.array([0, 0, 0, 1])
    # bins of width 1/15: 0.5 in bin 7 (7/15 < 0.5 <= 8/15), 0.75 in bin 11, 0.9 in bin 13
    # bin 7: acc 1, conf 0.5; bin 11: acc 1/2, conf 0.75; bin 13: acc 1, conf 0.9
    expected = 0.25 * 0.5 + 0.5 * 0.25 + 0.25 * 0.1
    assert metrics.expected_calibration_error(z, y, 2) == pytest.approx(expected, abs=1e-12)
    # a confidence exactly on an edge goes to the lower bin: 2 classes, p = 0.6 = 9/15
    z_edge = np.array([math.log(0.6 / 0.4)])
    assert metrics.expected_calibration_error(z_edge, np.array([1]), 2) == pytest.approx(0.4, abs=1e-12)


@pytest.mark.parametrize("seed,num_classes,ties", CASES)
def test_ece_matches_reference_loop(seed, num_classes, ties):
    x, y = make_logits(seed, 300, num_classes, ties=ties)
    got = metrics.expected_calibration_error(x, y, num_classes)
    assert got == pytest.approx(reference_ece(x, y, num_classes), abs=TOL)
    assert metrics.expected_calibration_error(x, y, num_classes, bins=10) == pytest.approx(
        reference_ece(x, y, num_classes, bins=10), abs=TOL)


def test_ece_undefined_is_none():
    assert metrics.expected_calibration_error(np.zeros((0, 3)), np.zeros(0), 3) is None
    assert metrics.expected_calibration_error(np.array([np.nan, 1.0]), np.array([0, 1]), 2) is None


def calibrated_data(seed, n, num_classes, scale):
    """Labels drawn from softmax(true logits) (a calibrated model), logits returned multiplied by `scale`."""
    rng = np.random.default_rng(seed)
    k = 1 if num_classes == 2 else num_classes
    true = rng.normal(size=(n, k)) * 2.0
    p = metrics.probabilities(true, num_classes)
    u = rng.random(n)[:, None]
    y = (u > np.cumsum(p, axis=1)).sum(axis=1)
    return true * scale, y


@pytest.mark.parametrize("num_classes", [2, 4])
@pytest.mark.parametrize("scale", [0.4, 2.5])
def test_temperature_recovers_a_known_scale(num_classes, scale):
    val_x, val_y = calibrated_data(0, 20000, num_classes, scale)
    test_x, test_y = calibrated_data(1, 20000, num_classes, scale)
    t = metrics.fit_temperature(val_x, val_y, num_classes)
    assert t == pytest.approx(scale, rel=0.05)
    cal = metrics.calibration(val_logits=val_x, val_labels=val_y, test_logits=test_x, test_labels=test_y,
                              num_classes=num_classes)
    assert cal["temperature"] == t and cal["bins"] == 15
    assert cal["ece_after"] <= cal["ece_before"] and cal["ece_after"] < 0.02
    assert cal["nll_after"] <= cal["nll_before"]
    assert cal["nll_before"] == pytest.approx(metrics.loss_from_logits(test_x, test_y, num_classes), abs=TOL)
    assert cal["ece_after"] == pytest.approx(reference_ece(test_x / t, test_y, num_classes), abs=TOL)


@pytest.mark.parametrize("seed,num_classes", [(s, c) for s in (0, 1) for c in (2, 4)])
def test_temperature_is_the_nll_minimiser(seed, num_classes):
    """The fitted T beats every T on a fine grid, and the NLL's derivative there is ~0 (torch autograd)."""
    x, y = make_logits(seed, 400, num_classes, ties=False)
    t = metrics.fit_temperature(x, y, num_classes)
    nll = metrics.loss_from_logits(x / t, y, num_classes)
    grid = np.exp(np.linspace(np.log(t) - 0.5, np.log(t) + 0.5, 201))
    assert nll <= min(metrics.loss_from_logits(x / g, y, num_classes) for g in grid) + 1e-12
    inv_t = torch.tensor(1.0 / t, dtype=torch.float64, requires_grad=True)
    xt, yt = torch.tensor(x), torch.tensor(y)
    if num_classes == 2:
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xt[:, 0] * inv_t, yt.double())
    else:
        loss = torch.nn.functional.cross_entropy(xt * inv_t, yt)
    loss.backward()
    assert abs(inv_t.grad.item()) < 1e-9


def test_temperature_edge_cases():
    t_min, t_max = metrics.TEMPERATURE_RANGE
    separable = np.array([-3.0, -1.0, 2.0, 4.0])
    assert metrics.fit_temperature(separable, np.array([0, 0, 1, 1]), 2) == t_min  # NLL falls as T -> 0
    assert metrics.fit_temperature(separable, np.array([1, 1, 0, 0]), 2) == t_max  # all wrong: flatten
    assert metrics.fit_temperature(np.zeros((0, 3)), np.zeros(0), 3) is None
    assert metrics.fit_temperature(np.array([np.inf, 1.0]), np.array([0, 1]), 2) is None
    cal = metrics.calibration(val_logits=np.array([np.nan, 1.0]), val_labels=np.array([0, 1]),
                              test_logits=np.array([0.5, 1.0]), test_labels=np.array([0, 1]), num_classes=2)
    assert cal["temperature"] is None and cal["ece_after"] is None and cal["nll_after"] is None
    assert cal["ece_before"] is not None


# --------------------------------------------------------------------------- bootstrap


def test_stratified_indices_keep_class_counts_and_are_reproducible():
    y = np.array([0] * 7 + [1] * 3 + [2] * 5)
    blocks = list(metrics.stratified_bootstrap_indices(y, resamples=250, seed=3))
    assert [b.shape for b in blocks] == [(100, 15), (100, 15), (50, 15)]
    idx = np.concatenate(blocks)
    for row in idx:
        assert np.bincount(y[row], minlength=3).tolist() == [7, 3, 5]
    again = np.concatenate(list(metrics.stratified_bootstrap_indices(y, resamples=250, seed=3)))
    np.testing.assert_array_equal(idx, again)
    other = np.concatenate(list(metrics.stratified_bootstrap_indices(y, resamples=250, seed=4)))
    assert not np.array_equal(idx, other)
    assert len(np.unique(idx, axis=0)) > 200  # resamples differ from each other


@pytest.mark.parametrize("num_classes", [2, 4])
def test_bootstrap_intervals_reproducible_and_contain_the_point(num_classes):
    val_x, val_y = make_logits(7, 150, num_classes, ties=False)
    x, y = make_logits(8, 200, num_classes, ties=True)
    threshold = metrics.choose_threshold(val_x[:, 0], val_y, rule="youden") if num_classes == 2 else None
    fns = metrics.clinical_metric_functions(num_classes=num_classes, threshold=threshold)
    expected = {"accuracy", "balanced_accuracy", "auroc"}
    expected |= {"sensitivity", "specificity", "ppv", "npv", "f1"} if num_classes == 2 else set()
    assert set(fns) == expected
    a = metrics.bootstrap_intervals(fns, labels=y, scores=x, resamples=300, seed=11)
    b = metrics.bootstrap_intervals(fns, labels=y, scores=x, resamples=300, seed=11)
    c = metrics.bootstrap_intervals(fns, labels=y, scores=x, resamples=300, seed=12)
    assert a == b and a != c
    for name, iv in a.items():
        assert iv.resamples == 300 and iv.defined == 300, name
        assert iv.low <= iv.point <= iv.high and iv.low < iv.high, name
    pred = metrics.predict(x, num_classes)
    assert a["accuracy"].point == pytest.approx(np.mean(pred == y), abs=TOL)
    assert a["balanced_accuracy"].point == pytest.approx(balanced_accuracy_score(y, pred), abs=TOL)


def test_bootstrap_interval_is_the_percentile_of_the_resampled_values():
    x, y = make_logits(5, 90, 2, ties=False)
    fns = {"accuracy": metrics.clinical_metric_functions(num_classes=2)["accuracy"]}
    values = metrics.bootstrap_values(fns, labels=y, scores=x, resamples=500, seed=1)["accuracy"]
    # reference: the same index matrices, accuracy by hand
    idx = np.concatenate(list(metrics.stratified_bootstrap_indices(y, resamples=500, seed=1)))
    correct = ((x[:, 0] > 0).astype(int) == y).astype(float)
    np.testing.assert_allclose(values, correct[idx].mean(axis=1), rtol=0, atol=TOL)
    iv = metrics.bootstrap_intervals(fns, labels=y, scores=x, resamples=500, seed=1)["accuracy"]
    assert (iv.low, iv.high) == tuple(np.percentile(values, [2.5, 97.5]))


def test_resample_weights_count_the_draws():
    idx = np.array([[0, 0, 2], [1, 2, 2]])
    np.testing.assert_array_equal(metrics.resample_weights(idx, 4), [[2, 0, 1, 0], [0, 1, 2, 0]])


@pytest.mark.parametrize("num_classes", [2, 4])
def test_weighted_metrics_equal_the_metric_on_each_resampled_set(num_classes):
    """The vectorised path (row weights = draw counts) gives what the metric gives on each resampled set."""
    x, y = make_logits(6, 90, num_classes, ties=True)
    c = num_classes
    fns = metrics.clinical_metric_functions(num_classes=c, threshold=0.5 if c == 2 else None)
    fns["average_precision"] = metrics.WeightedMetric(lambda yy, xx, w: metrics.weighted_average_precision(xx, yy, c, w))
    fns["auroc_weighted"] = metrics.WeightedMetric(
        lambda yy, xx, w: metrics.weighted_auroc(xx, yy, c, w, average="weighted"))
    fast = metrics.bootstrap_values(fns, labels=y, scores=x, resamples=120, seed=8)
    plain = {name: (lambda f: lambda yy, xx: f(yy, xx))(f) for name, f in fns.items()}  # not WeightedMetric
    slow = metrics.bootstrap_values(plain, labels=y, scores=x, resamples=120, seed=8)
    idx = np.concatenate(list(metrics.stratified_bootstrap_indices(y, resamples=120, seed=8)))
    for name in fns:
        np.testing.assert_allclose(fast[name], slow[name], rtol=0, atol=TOL, err_msg=name)
    # and against scikit-learn on a few resampled sets directly
    for i, row in enumerate(idx[:5]):
        yy, xx = y[row], x[row]
        pred = metrics.predict(xx, num_classes)
        assert fast["balanced_accuracy"][i] == pytest.approx(balanced_accuracy_score(yy, pred), abs=TOL)
        if num_classes == 2:
            assert fast["auroc"][i] == pytest.approx(roc_auc_score(yy, xx[:, 0]), abs=TOL)
            assert fast["average_precision"][i] == pytest.approx(average_precision_score(yy, xx[:, 0]), abs=TOL)
            assert fast["ppv"][i] == pytest.approx(np.mean(yy[xx[:, 0] >= 0.5] == 1), abs=TOL)
        else:
            p = metrics.probabilities(xx, num_classes)
            assert fast["auroc_weighted"][i] == pytest.approx(
                roc_auc_score(yy, p, multi_class="ovr", average="weighted"), abs=TOL)
            assert fast["average_precision"][i] == pytest.approx(average_precision_score(
                label_binarize(yy, classes=list(range(num_classes))), p, average="macro"), abs=TOL)


def test_bootstrap_skips_undefined_resamples():
    # PPV at a threshold only one row passes: undefined in resamples that miss that row
    y = np.array([0] * 10 + [1] * 10)
    s = np.r_[np.linspace(-2, -1, 10), np.linspace(-1.5, 0.5, 9), [5.0]]
    ppv = {"ppv": lambda yy, xx: metrics.operating_point_metrics(xx, yy, threshold=4.0)["ppv"]}
    iv = metrics.bootstrap_intervals(ppv, labels=y, scores=s, resamples=400, seed=0)["ppv"]
    assert iv.point == 1.0 and 220 < iv.defined < 300  # P(miss) = 0.9^10 ~ 0.35
    assert iv.low == iv.high == 1.0
    none = {"none": lambda yy, xx: None}
    iv = metrics.bootstrap_intervals(none, labels=y, scores=s, resamples=50, seed=0)["none"]
    assert (iv.point, iv.low, iv.high, iv.defined) == (None, None, None, 0)


@pytest.mark.parametrize("num_classes", [2, 4])
def test_paired_bootstrap_of_a_run_with_itself_is_exactly_zero(num_classes):
    x, y = make_logits(2, 150, num_classes, ties=True)
    fns = metrics.clinical_metric_functions(num_classes=num_classes, threshold=0.0 if num_classes == 2 else None)
    out = metrics.paired_bootstrap(fns, labels=y, scores_a=x, scores_b=x.copy(), resamples=200, seed=5)
    for name, d in out.items():
        assert (d.point, d.low, d.high, d.a_wins, d.ties, d.defined) == (0.0, 0.0, 0.0, 0.0, 1.0, 200), name


@pytest.mark.parametrize("num_classes", [2, 4])
def test_paired_bootstrap_a_known_better_run_wins(num_classes):
    good, y = make_logits(3, 300, num_classes, ties=False)
    rng = np.random.default_rng(9)
    bad = good + rng.normal(size=good.shape) * 4.0  # the same signal drowned in noise
    fns = metrics.clinical_metric_functions(num_classes=num_classes)
    out = metrics.paired_bootstrap(fns, labels=y, scores_a=good, scores_b=bad, resamples=500, seed=0)
    for name in ("accuracy", "balanced_accuracy", "auroc"):
        d = out[name]
        assert d.point > 0 and d.low > 0 and d.a_wins >= 0.99, name
        a, b = fns[name](y, good), fns[name](y, bad)
        assert d.point == pytest.approx(a - b, abs=TOL)
    swapped = metrics.paired_bootstrap(fns, labels=y, scores_a=bad, scores_b=good, resamples=500, seed=0)
    assert swapped["auroc"].a_wins <= 0.01
    assert swapped["auroc"].low == pytest.approx(-out["auroc"].high, abs=TOL)


def test_paired_bootstrap_uses_the_same_rows_for_both_runs():
    x, y = make_logits(4, 120, 2, ties=False)
    acc = {"accuracy": metrics.clinical_metric_functions(num_classes=2)["accuracy"]}
    flipped = x.copy()
    flipped[:10] *= -1  # B differs from A on 10 rows only
    d = metrics.paired_bootstrap(acc, labels=y, scores_a=x, scores_b=flipped, resamples=300, seed=2)["accuracy"]
    va = metrics.bootstrap_values(acc, labels=y, scores=x, resamples=300, seed=2)["accuracy"]
    vb = metrics.bootstrap_values(acc, labels=y, scores=flipped, resamples=300, seed=2)["accuracy"]
    assert (d.low, d.high) == tuple(np.percentile(va - vb, [2.5, 97.5]))
    assert d.a_wins == pytest.approx(np.mean(va > vb)) and d.ties == pytest.approx(np.mean(va == vb))
    with pytest.raises(ValueError):
        metrics.paired_bootstrap(acc, labels=y, scores_a=x, scores_b=x[:-1])


# --------------------------------------------------------------------------- weighted loss


@pytest.mark.parametrize("seed", SEEDS)
def test_weighted_loss_matches_torch(seed):
    rng = np.random.default_rng(seed)
    x4, y4 = rng.normal(size=(60, 4)) * 3, rng.integers(0, 4, 60)
    w4 = rng.uniform(0.2, 5.0, 4)
    ref4 = torch.nn.functional.cross_entropy(torch.tensor(x4), torch.tensor(y4), weight=torch.tensor(w4))
    assert metrics.weighted_loss_from_logits(x4, y4, 4, class_weights=w4) == pytest.approx(ref4.item(), abs=TOL)
    x2, y2 = rng.normal(size=(60, 1)) * 3, rng.integers(0, 2, 60)
    w2 = rng.uniform(0.2, 5.0, 2)
    row_w = torch.tensor(w2[y2])
    ref2 = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.tensor(x2[:, 0]), torch.tensor(y2).double(), weight=row_w, reduction="sum") / row_w.sum()
    assert metrics.weighted_loss_from_logits(x2, y2, 2, class_weights=w2) == pytest.approx(ref2.item(), abs=TOL)
    assert metrics.weighted_loss_from_logits(x2[:, 0], y2, 2, class_weights=w2) == pytest.approx(ref2.item(), abs=TOL)


def test_weighted_loss_reduces_to_the_plain_loss():
    x, y = make_logits(0, 50, 4, ties=False)
    plain = metrics.loss_from_logits(x, y, 4)
    assert metrics.weighted_loss_from_logits(x, y, 4, class_weights=None) == plain
    assert metrics.weighted_loss_from_logits(x, y, 4, class_weights=np.full(4, 3.0)) == pytest.approx(plain, abs=TOL)
    assert math.isnan(metrics.weighted_loss_from_logits(np.zeros((0, 4)), np.zeros(0), 4, class_weights=np.ones(4)))
    # by hand: two rows, losses l0 (class 0, weight 1) and l1 (class 2, weight 3)
    x = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 2.0]])
    l0, l1 = math.log(3), math.log(math.e + 1 + math.e ** 2) - 2
    got = metrics.weighted_loss_from_logits(x, np.array([0, 2]), 3, class_weights=np.array([1.0, 9.0, 3.0]))
    assert got == pytest.approx((l0 + 3 * l1) / 4, abs=1e-12)


# --------------------------------------------------------------------------- clinical_report


@pytest.mark.parametrize("num_classes", [2, 4])
def test_clinical_report_is_json_safe_and_agrees_with_the_parts(num_classes):
    val_x, val_y = make_logits(20, 150, num_classes, ties=False)
    test_x, test_y = make_logits(21, 120, num_classes, ties=True)
    report = metrics.clinical_report(val_logits=val_x, val_labels=val_y, test_logits=test_x, test_labels=test_y,
                                     num_classes=num_classes, operating_point=" SENS=0.90", bootstrap=200, seed=4)
    assert json.loads(json.dumps(report, allow_nan=False)) == report
    assert set(report) == {"num_classes", "n_val", "n_test", "metrics", "operating_point", "calibration", "bootstrap"}
    assert (report["num_classes"], report["n_val"], report["n_test"]) == (num_classes, 150, 120)
    m = report["metrics"]
    if num_classes == 2:
        assert m["auroc"] == pytest.approx(roc_auc_score(test_y, test_x[:, 0]), abs=TOL)
        op = report["operating_point"]
        t = metrics.choose_threshold(val_x[:, 0], val_y, rule="sens=0.9")
        assert op["rule"] == "sens=0.9" and op["threshold"] == t
        assert m["average_precision"] == pytest.approx(average_precision_score(test_y, test_x[:, 0]), abs=TOL)
        assert op["threshold_probability"] == pytest.approx(1 / (1 + math.exp(-t)), abs=1e-15)
        assert op["val"]["sensitivity"] >= 0.9
        assert op["test"] == metrics.operating_point_metrics(test_x[:, 0], test_y, threshold=t)
        for key in ("sensitivity", "specificity", "ppv", "npv", "f1"):
            assert m[key] == op["test"][key]
    else:
        p = metrics.probabilities(test_x, num_classes)
        assert m["auroc_weighted"] == pytest.approx(roc_auc_score(test_y, p, multi_class="ovr",
                                                                  average="weighted"), abs=TOL)
        onehot = label_binarize(test_y, classes=list(range(num_classes)))
        for key, average in (("average_precision", "macro"), ("average_precision_weighted", "weighted")):
            assert m[key] == pytest.approx(average_precision_score(onehot, p, average=average), abs=TOL)
        assert m["auroc"] == pytest.approx(roc_auc_score(test_y, p, multi_class="ovr"), abs=TOL)
        assert report["operating_point"] is None
    assert m["balanced_accuracy"] == pytest.approx(
        balanced_accuracy_score(test_y, metrics.predict(test_x, num_classes)), abs=TOL)
    assert report["calibration"] == metrics.calibration(val_logits=val_x, val_labels=val_y, test_logits=test_x,
                                                        test_labels=test_y, num_classes=num_classes)
    boot = report["bootstrap"]
    assert (boot["resamples"], boot["seed"], boot["confidence"], boot["stratified"]) == (200, 4, 0.95, True)
    ranking = {"average_precision"} | ({"auroc_weighted", "average_precision_weighted"} if num_classes > 2 else set())
    assert set(boot["intervals"]) == set(m) - ranking
    for name, iv in boot["intervals"].items():
        assert iv["low"] <= m[name] <= iv["high"], name
    again = metrics.clinical_report(val_logits=val_x, val_labels=val_y, test_logits=test_x, test_labels=test_y,
                                    num_classes=num_classes, operating_point="sens=0.9", bootstrap=200, seed=4)
    assert again == report


def test_clinical_report_without_bootstrap_and_with_broken_inputs():
    val_x, val_y = make_logits(0, 60, 2, ties=False)
    test_x, test_y = make_logits(1, 60, 2, ties=False)
    report = metrics.clinical_report(val_logits=val_x, val_labels=val_y, test_logits=test_x, test_labels=test_y,
                                     num_classes=2, bootstrap=0)
    assert report["bootstrap"] is None and report["operating_point"]["rule"] == "youden"
    # val without positives: no threshold, no operating-point numbers, no crash
    one_class = metrics.clinical_report(val_logits=val_x, val_labels=np.zeros(60, dtype=int), test_logits=test_x,
                                        test_labels=test_y, num_classes=2, bootstrap=20)
    assert one_class["operating_point"]["threshold"] is None
    assert set(one_class["operating_point"]["test"].values()) == {None}
    assert "sensitivity" not in one_class["metrics"]
    # a diverged run: NaN logits give None everywhere, JSON-safe
    nan_x = np.full_like(test_x, np.nan)
    broken = metrics.clinical_report(val_logits=nan_x, val_labels=val_y, test_logits=nan_x, test_labels=test_y,
                                     num_classes=2, bootstrap=20)
    json.dumps(broken, allow_nan=False)
    assert set(broken["metrics"].values()) == {None}
    assert broken["calibration"]["ece_before"] is None and broken["calibration"]["temperature"] is None
    assert all(iv["low"] is None and iv["defined"] == 0 for iv in broken["bootstrap"]["intervals"].values())


def test_clinical_report_rejects_bad_options_with_one_sentence():
    x, y = make_logits(0, 30, 4, ties=False)
    with pytest.raises(UserError, match="^--operating-point must be"):
        metrics.clinical_report(val_logits=x, val_labels=y, test_logits=x, test_labels=y, num_classes=4,
                                operating_point="spec=95")
    with pytest.raises(UserError, match="^--bootstrap must be 0"):
        metrics.clinical_report(val_logits=x, val_labels=y, test_logits=x, test_labels=y, num_classes=4,
                                bootstrap=-1)
