"""featcache.shift: AUC ~0.5 on a random split of one dataset and ~1 on two different ones, per-class
distances against their chance level, the most foreign rows and their neighbours, and `featcache shift`."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from click.testing import CliRunner

from featcache.cli import cli
from featcache.shift import Side, check_shift
from synthetic import gaussian_problem, write_cache


def _side(name: str, x, y, classes=("a", "b")) -> Side:
    return Side(name=name, features=x, labels=y, class_names=list(classes),
                paths=[f"{name}/{i:04d}.png" for i in range(len(y))])


def _one_dataset_split(seed=0):
    """One dataset (300 rows, 32 features), split at random into train (200) and test (100)."""
    ((x, y),) = gaussian_problem(2, n=(300,), dim=32, seed=seed)
    order = np.random.default_rng(seed).permutation(300)
    return _side("train", x[order[:200]], y[order[:200]]), _side("test", x[order[200:]], y[order[200:]])


def test_random_split_of_one_dataset_is_not_a_shift():
    a, b = _one_dataset_split()
    t0 = time.perf_counter()
    report = check_shift(a, b, permutations=100)
    assert time.perf_counter() - t0 < 10  # seconds, not minutes
    assert abs(report.auc - 0.5) < 0.1 and report.p_value > 0.05 and not report.shifted
    assert len(report.fold_aucs) == 5 and report.permutations == 100
    assert "No detectable shift" in report.verdict()
    for row in report.classes:  # class means differ by sampling noise only
        assert 0.5 < row["ratio"] < 1.5
        assert row["nearest_other_class"] > 2 * row["distance"]


def test_two_different_datasets_are_told_apart():
    ((xa, ya),) = gaussian_problem(2, n=(200,), dim=32, seed=1)
    ((xb, yb),) = gaussian_problem(2, n=(100,), dim=32, seed=2, shift=1.0)  # every feature moved by one std
    report = check_shift(_side("site A", xa, ya), _side("site B", xb, yb), permutations=50)
    assert report.auc > 0.99 and report.p_value == pytest.approx(1 / 51) and report.shifted
    assert "Shift detected" in report.verdict()
    assert all(row["ratio"] > 5 for row in report.classes)


def test_most_foreign_rows_come_first_with_their_nearest_neighbours():
    a, b = _one_dataset_split(seed=3)
    x = b.features.copy()
    x[[7, 42]] += 6.0  # two test rows far outside the training cloud
    b = _side("test", x, b.labels)
    report = check_shift(a, b, permutations=0, top=2, neighbours=3)
    assert {r["path"] for r in report.foreign} == {"test/0007.png", "test/0042.png"}
    assert np.isnan(report.p_value)

    # neighbours: brute force in the z-scored pooled space
    pooled = np.concatenate([a.features, x]).astype(np.float64)
    z = (pooled - pooled.mean(axis=0)) / pooled.std(axis=0)
    za, zb = z[:len(a.labels)], z[len(a.labels):]
    for row in report.foreign:
        i = int(row["path"][5:9])
        d = np.linalg.norm(za - zb[i], axis=1)
        want = np.argsort(d)[:3]
        assert [n["path"] for n in row["neighbours"]] == [f"train/{j:04d}.png" for j in want]
        np.testing.assert_allclose([n["distance"] for n in row["neighbours"]], d[want], rtol=1e-6)
        assert row["neighbours"][0]["distance"] > report.typical_nearest


def test_shift_command_on_caches(tmp_path):
    train, val, test = gaussian_problem(2, n=(120, 30, 60), dim=16, seed=5)
    same = write_cache(tmp_path / "a" / "resnet18-none-aaaa.h5", {"train": train, "val": val, "test": test},
                       ["normal", "pneumonia"])
    moved = [(x + 1.5, y) for x, y in gaussian_problem(2, n=(120, 30, 60), dim=16, seed=6)]
    other = write_cache(tmp_path / "b" / "resnet18-none-bbbb.h5", dict(zip(("train", "val", "test"), moved)),
                        ["normal", "pneumonia"])
    runner = CliRunner()

    result = runner.invoke(cli, ["shift", "--cache", str(same), "--permutations", "50", "--json",
                                 str(tmp_path / "s.json")])
    assert result.exit_code == 0, result.output
    assert "No detectable shift" in result.output and "test/pneumonia/img" in result.output
    doc = json.loads((tmp_path / "s.json").read_text())
    assert doc["a"] == "train" and doc["b"] == "test" and doc["n_a"] == 120 and doc["n_b"] == 60
    assert doc["shifted"] is False and len(doc["foreign"]) == 5 and len(doc["classes"]) == 2

    result = runner.invoke(cli, ["shift", "--between", str(same), str(other), "--permutations", "20"])
    assert result.exit_code == 0, result.output
    assert "Shift detected" in result.output and "(210 rows)" in result.output

    googlenet = write_cache(tmp_path / "g" / "googlenet-none-cccc.h5", {"train": train, "val": val, "test": test},
                            ["normal", "pneumonia"], model="googlenet")
    result = runner.invoke(cli, ["shift", "--between", str(same), str(googlenet)])
    assert result.exit_code == 2 and "not comparable" in result.output
    result = runner.invoke(cli, ["shift"])
    assert result.exit_code == 2 and "--cache" in result.output
