"""featcache.metrics against values computed by hand on tiny arrays."""

import json
import math
import warnings

import numpy as np
import pytest
import torch

from featcache import metrics
from featcache.metrics import EpochRecord, RunSummary


@pytest.fixture(autouse=True)
def _no_warnings():
    """Every metric here must run without numpy warnings (0/0, overflow; underflow to 0 is fine)."""
    with warnings.catch_warnings(), np.errstate(divide="raise", invalid="raise", over="raise"):
        warnings.simplefilter("error")
        yield


def test_binary_loss_by_hand():
    logits = np.array([[0.0], [2.0], [-1.0]], dtype=np.float32)
    labels = np.array([1, 1, 0])
    expected = (math.log(2) + math.log1p(math.exp(-2)) + math.log1p(math.exp(-1))) / 3
    assert metrics.loss_from_logits(logits, labels, 2) == pytest.approx(expected, rel=1e-12)
    assert metrics.loss_from_logits(logits[:, 0], labels, 2) == pytest.approx(expected, rel=1e-12)  # (N,) accepted


def test_binary_loss_is_stable_for_huge_logits():
    logits = np.array([1000.0, -1000.0, 1000.0])
    labels = np.array([1, 0, 0])
    assert metrics.loss_from_logits(logits, labels, 2) == pytest.approx(1000.0 / 3)


def test_cross_entropy_by_hand():
    logits = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    labels = np.array([2, 0])
    lse = math.log(math.exp(1) + math.exp(2) + math.exp(3))
    expected = ((lse - 3) + math.log(3)) / 2
    assert metrics.loss_from_logits(logits, labels, 3) == pytest.approx(expected, rel=1e-12)
    big = np.array([[1000.0, 0.0, -1000.0]])
    assert metrics.loss_from_logits(big, np.array([1]), 3) == pytest.approx(1000.0)


def test_losses_agree_with_torch():
    rng = np.random.default_rng(0)
    x2, y2 = rng.normal(size=(50, 1)) * 5, rng.integers(0, 2, 50)
    x4, y4 = rng.normal(size=(50, 4)) * 5, rng.integers(0, 4, 50)
    ref2 = torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor(x2[:, 0]), torch.tensor(y2).double())
    ref4 = torch.nn.functional.cross_entropy(torch.tensor(x4), torch.tensor(y4))
    assert metrics.loss_from_logits(x2, y2, 2) == pytest.approx(ref2.item(), rel=1e-12)
    assert metrics.loss_from_logits(x4, y4, 4) == pytest.approx(ref4.item(), rel=1e-12)


def test_predictions_and_probabilities():
    assert metrics.predict(np.array([[-0.5], [0.0], [0.1]]), 2).tolist() == [0, 0, 1]  # logit 0 -> class 0
    assert metrics.predict(np.array([[1.0, 3.0, 3.0], [2.0, 1.0, 0.0]]), 3).tolist() == [1, 0]  # tie -> first
    p2 = metrics.probabilities(np.array([[0.0], [800.0], [-800.0]]), 2)
    np.testing.assert_allclose(p2, [[0.5, 0.5], [0.0, 1.0], [1.0, 0.0]])
    p3 = metrics.probabilities(np.array([[0.0, 0.0, math.log(2)]]), 3)
    np.testing.assert_allclose(p3, [[0.25, 0.25, 0.5]])


def test_wrong_logit_shape_is_a_bug():
    with pytest.raises(ValueError):
        metrics.predict(np.zeros((3, 2)), 2)


def test_confusion_and_per_class_with_a_never_predicted_class():
    labels = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 0, 0])  # class 2 never predicted
    cm = metrics.confusion_matrix(labels, pred, 3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [2, 0, 0]]
    precision, recall, f1 = metrics.per_class_scores(cm)
    np.testing.assert_allclose(precision, [1 / 3, 2 / 3, 0.0])
    np.testing.assert_allclose(recall, [0.5, 1.0, 0.0])
    np.testing.assert_allclose(f1, [2 * (1 / 3) * 0.5 / (1 / 3 + 0.5), 0.8, 0.0])
    assert metrics.accuracy(pred, labels) == pytest.approx(0.5)
    assert metrics.balanced_accuracy(cm) == pytest.approx(0.5)


def test_class_missing_from_the_labels():
    labels = np.array([0, 0, 1, 1])  # class 2 absent
    pred = np.array([0, 2, 1, 1])
    cm = metrics.confusion_matrix(labels, pred, 3)
    precision, recall, f1 = metrics.per_class_scores(cm)
    np.testing.assert_allclose(recall, [0.5, 1.0, 0.0])
    np.testing.assert_allclose(precision, [1.0, 1.0, 0.0])
    assert metrics.balanced_accuracy(cm) == pytest.approx(0.75)  # mean over the 2 present classes


def test_roc_auc_by_hand_and_with_ties():
    assert metrics.roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    # positives {0.5, 0.9}, negatives {0.5, 0.5}: (0.5 + 0.5 + 1 + 1) / 4
    assert metrics.roc_auc(np.array([0.5, 0.5, 0.5, 0.9]), np.array([0, 1, 0, 1])) == pytest.approx(0.75)
    assert metrics.roc_auc(np.array([1.0, 1.0, 2.0, 2.0]), np.array([0, 1, 0, 1])) == pytest.approx(0.5)
    assert metrics.roc_auc(np.array([3.0, 1.0]), np.array([0, 1])) == 0.0
    assert metrics.roc_auc(np.array([0.2, 0.3]), np.array([1, 1])) is None  # one class only


def test_train_epoch_metrics_weight_the_short_last_batch():
    batch_means, sizes = np.array([0.5, 1.0, 2.0]), np.array([4, 4, 2])
    loss, acc = metrics.epoch_train_metrics(batch_means * sizes, [3, 4, 1], sizes)
    assert loss == pytest.approx(10 / 10)  # (2 + 4 + 4) / 10, not the plain mean of means 7/6
    assert acc == pytest.approx(8 / 10)


def _record(epoch, val_acc, val_loss, train_loss=1.0):
    return EpochRecord(epoch=epoch, lr=0.1, train_loss=train_loss, train_acc=0.5, val_loss=val_loss,
                       val_acc=val_acc, seconds=0.01)


def test_select_epoch_ties():
    history = [_record(1, 0.8, 0.5), _record(2, 0.9, 0.4), _record(3, 0.9, 0.3), _record(4, 0.9, 0.3)]
    assert metrics.select_epoch(history) == 2  # equal acc: lower loss wins; equal both: earlier wins
    assert metrics.select_epoch([_record(1, 0.9, math.nan), _record(2, 0.9, 0.7)]) == 1
    assert metrics.select_epoch([_record(1, 0.5, 0.1)]) == 0


def test_summarize_by_hand():
    history = [_record(1, 0.5, 0.9, train_loss=0.8), _record(2, 0.75, 0.6, train_loss=0.6),
               _record(3, 0.75, 0.7, train_loss=0.5)]
    selected = metrics.select_epoch(history)
    assert selected == 1
    logits = np.array([[2.0], [-1.0], [0.5], [-3.0]])
    labels = np.array([1, 0, 0, 1])
    s = metrics.summarize(history, selected, test_logits=logits, test_labels=labels, class_names=["neg", "pos"],
                          train_seconds=1.5)
    assert (s.train_loss, s.train_acc) == (0.5, 0.5)  # last epoch
    assert (s.best_val_loss, s.best_val_acc, s.selected_epoch) == (0.6, 0.75, 2)
    assert s.test_acc == 0.5 and s.training_time == 1.5 and s.epochs == 3
    assert s.confusion_matrix == [[1, 1], [1, 1]] and s.support == [2, 2]
    assert s.precision == [0.5, 0.5] and s.recall == [0.5, 0.5] and s.balanced_accuracy == 0.5
    assert s.roc_auc == pytest.approx(0.5)  # pos {2, -3} vs neg {-1, 0.5}: 2 of 4 pairs
    assert s.test_loss == pytest.approx(metrics.loss_from_logits(logits, labels, 2))
    assert not s.diverged
    d = json.loads(json.dumps(s.to_dict(), allow_nan=False))
    assert RunSummary.from_dict(d) == s


def test_summary_of_a_diverged_run_is_json_safe():
    history = [_record(1, 0.5, math.nan, train_loss=math.inf), _record(2, 0.5, math.nan, train_loss=math.nan)]
    s = metrics.summarize(history, 0, test_logits=np.zeros((2, 3)), test_labels=np.array([0, 2]),
                          class_names=["a", "b", "c"], train_seconds=0.1)
    assert s.diverged and s.roc_auc is None
    d = json.loads(json.dumps(s.to_dict(), allow_nan=False))
    assert d["train_loss"] is None and d["diverged"] is True
    assert math.isnan(RunSummary.from_dict(d).train_loss)
    r = EpochRecord.from_dict(json.loads(json.dumps(history[1].to_dict(), allow_nan=False)))
    assert math.isnan(r.train_loss) and r.epoch == 2


def _rec(epoch, train_loss, val_loss=0.5):
    from featcache.metrics import EpochRecord

    return EpochRecord(epoch=epoch, lr=0.1, train_loss=train_loss, train_acc=0.5, val_loss=val_loss,
                       val_acc=0.5, seconds=1.0)


def test_divergence_rule():
    from featcache.metrics import divergence_reason, is_diverged

    # NaN/inf in train or val loss
    assert "NaN" in divergence_reason([], _rec(1, float("nan")), num_classes=2)
    assert "NaN" in divergence_reason([], _rec(1, 0.5, float("inf")), num_classes=2)
    # a blow-up in the very first epoch: 100x the chance level ln 2 = 69.3
    assert divergence_reason([], _rec(1, 70.0), num_classes=2)
    assert divergence_reason([], _rec(1, 60.0), num_classes=2) is None
    # a jump over 10x the best earlier epoch, above chance level
    assert "jumped" in divergence_reason([_rec(1, 0.2), _rec(2, 0.5)], _rec(3, 2.1), num_classes=2)
    assert divergence_reason([_rec(1, 0.2)], _rec(2, 1.9), num_classes=2) is None  # < 10 x 0.2
    assert divergence_reason([_rec(1, 0.01)], _rec(2, 0.5), num_classes=2) is None  # below chance ln 2
    assert divergence_reason([_rec(1, 0.01)], _rec(2, 1.05), num_classes=3) is None  # below chance ln 3 = 1.0986
    assert is_diverged([_rec(1, 0.3), _rec(2, 0.2), _rec(3, 5.0)], num_classes=2)
    assert not is_diverged([_rec(1, 5.8), _rec(2, 14.7), _rec(3, 2.4)], num_classes=2)  # unstable, recovers
