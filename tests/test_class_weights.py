"""featcache.plan.class_weights: the --class-weight rule, against scikit-learn."""

import re

import numpy as np
import pytest
from sklearn.utils.class_weight import compute_class_weight

from featcache.errors import UserError
from featcache.plan import class_weights, parse_class_weight


@pytest.mark.parametrize("num_classes", [2, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_balanced_matches_sklearn(num_classes, seed):
    rng = np.random.default_rng(seed)
    y = rng.choice(num_classes, size=97, p=np.linspace(1, 4, num_classes) / np.linspace(1, 4, num_classes).sum())
    y[:num_classes] = np.arange(num_classes)
    got = class_weights(labels=y, num_classes=num_classes, spec="balanced")
    ref = compute_class_weight("balanced", classes=np.arange(num_classes), y=y)
    assert got.dtype == np.float64 and got.shape == (num_classes,)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)


def test_balanced_by_hand_and_none_and_explicit():
    y = np.array([0, 0, 0, 1])
    np.testing.assert_allclose(class_weights(labels=y, num_classes=2, spec="balanced"), [4 / 6, 4 / 2])
    assert class_weights(labels=y, num_classes=2, spec="none") is None
    assert class_weights(labels=y, num_classes=2, spec=" None ") is None
    got = class_weights(labels=y, num_classes=3, spec="1, 2.5,1e-1")
    assert got.dtype == np.float64 and got.tolist() == [1.0, 2.5, 0.1]


@pytest.mark.parametrize("spec", ["", "balance", "1,,2", "1,-2", "0,1", "1,nan", "1,inf", "a,b"])
def test_bad_spec_is_one_sentence(spec):
    with pytest.raises(UserError) as info:
        parse_class_weight(spec)
    assert str(info.value).startswith("--class-weight must be none, balanced or W1,W2,...")
    assert str(info.value).endswith(".") and not re.search(r"[.;] [A-Z]", str(info.value))


def test_wrong_count_and_missing_class_are_user_errors():
    with pytest.raises(UserError, match=r"^--class-weight lists 2 weights but the data has 3 classes; .*\.$"):
        class_weights(labels=np.array([0, 1, 2]), num_classes=3, spec="1,2")
    with pytest.raises(UserError, match=r"^--class-weight balanced needs .* class 1 has none; .*\.$"):
        class_weights(labels=np.array([0, 0, 2]), num_classes=3, spec="balanced")
