"""The clinical metrics wired into runs: every head-train solver writes metrics.clinical_report of its selected
head (extra["clinical"]), test_logits.npz aligned with the cache's test paths, roc.png and calibration.png;
--class-weight, --operating-point and --bootstrap reach the fit and the record; the weighted loss of the JAX
step and of the torch loss is metrics.weighted_loss_from_logits."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import featcache
from featcache import metrics, runs
from featcache.cache import load_paths, load_splits
from featcache.cli import cli
from featcache.head_runs import head_logits
from featcache.plan import class_weights
from synthetic import gaussian_problem, write_cache


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """An imbalanced two-class cache (about 1:4 in train) and a three-class one."""
    tmp = tmp_path_factory.mktemp("clinical")
    train, val, test = gaussian_problem(2, n=(100, 50, 50), dim=8, seed=5)
    keep = np.flatnonzero((train[1] == 0) | (np.arange(len(train[1])) % 4 == 0))
    two = write_cache(tmp / "two.h5", {"train": (train[0][keep], train[1][keep]), "val": val, "test": test},
                      ["negative", "positive"])
    three = write_cache(tmp / "three.h5", dict(zip(("train", "val", "test"), gaussian_problem(3, seed=6))),
                        ["a", "b", "c"])
    return {"two": two, "three": three, "tmp": tmp}


def _reference(run, cache) -> dict:
    """metrics.clinical_report recomputed from head.npz on the cache's val and test rows."""
    head = runs.load_head(run.run_dir / runs.HEAD_FILE)
    weights = runs.HeadWeights(weight=head["weight"], bias=head["bias"],
                               mean=head["mean"] if head["standardized"] else None,
                               std=head["std"] if head["standardized"] else None)
    _, s = load_splits(cache)
    return metrics.clinical_report(val_logits=head_logits(weights, s["val"][0]), val_labels=s["val"][1],
                                   test_logits=head_logits(weights, s["test"][0]), test_labels=s["test"][1],
                                   num_classes=len(run.class_names), operating_point=run.config.operating_point,
                                   bootstrap=runs.bootstrap_resamples(run.config.bootstrap,
                                                                      num_classes=len(run.class_names)),
                                   seed=runs.BOOTSTRAP_SEED)


@pytest.mark.parametrize("solver", ["sgd", "ridge", "stream", "grid"])
def test_every_solver_writes_the_clinical_record_of_its_head(solver, caches):
    cache = caches["two"]
    common = dict(cache=cache, runs_dir=str(caches["tmp"] / solver), bootstrap=100, operating_point="sens=0.9")
    if solver == "ridge":
        run = featcache.train_ridge(**common)
    elif solver == "grid":
        run = featcache.train_grid(lrs=[0.1, 0.03], epochs=4, **common)
    else:
        run = featcache.train_head(epochs=4, lr=0.1, stream=solver == "stream", **common)
    doc = json.loads((run.run_dir / runs.METRICS_FILE).read_text())
    clinical = doc["extra"]["clinical"]
    reference = _reference(run, cache)
    assert clinical["operating_point"]["rule"] == "sens=0.9"
    assert clinical["operating_point"]["threshold"] == pytest.approx(reference["operating_point"]["threshold"],
                                                                     abs=1e-5)
    for key, value in reference["metrics"].items():
        assert clinical["metrics"][key] == pytest.approx(value, abs=1e-9), key
    assert clinical["bootstrap"]["resamples"] == 100 and clinical["bootstrap"]["seed"] == runs.BOOTSTRAP_SEED
    for key, interval in clinical["bootstrap"]["intervals"].items():
        assert interval["low"] <= clinical["metrics"][key] <= interval["high"], key
    assert clinical["metrics"]["accuracy"] == pytest.approx(run.summary.test_acc, abs=1e-12)
    # the test rows, in the cache's order, by path
    scores = runs.load_test_logits(run.run_dir)
    assert list(scores.paths) == load_paths(cache, "test")
    assert np.array_equal(scores.labels, load_splits(cache)[1]["test"][1])
    assert metrics.auroc(scores.logits, scores.labels, 2) == pytest.approx(clinical["metrics"]["auroc"], abs=1e-9)
    for name in (runs.ROC_FILE, runs.CALIBRATION_FILE):
        assert (run.run_dir / name).stat().st_size > 5000, name


def test_class_weight_balanced_is_the_train_split_rule_and_streaming_follows_it(caches):
    cache = caches["two"]
    common = dict(cache=cache, epochs=3, lr=0.2, bootstrap=0, class_weight="balanced",
                  runs_dir=str(caches["tmp"] / "weighted"))
    memory, streamed = featcache.train_head(**common), featcache.train_head(stream=True, **common)
    plain = featcache.train_head(**{**common, "class_weight": "none"})
    y_train = load_splits(cache)[1]["train"][1]
    counts = np.bincount(y_train)
    assert counts[0] > 3 * counts[1]  # imbalanced
    expected = len(y_train) / (2 * counts)
    assert memory.extra["clinical"]["class_weight"]["weights"] == pytest.approx(expected, rel=1e-12)
    assert memory.extra["clinical"]["bootstrap"] is None
    assert memory.config.class_weight == "balanced"
    for a, b in zip(memory.history, streamed.history):
        assert (a.train_acc, a.val_acc) == (b.train_acc, b.val_acc)
        assert a.train_loss == pytest.approx(b.train_loss, abs=1e-6)
    assert abs(memory.history[-1].train_loss - plain.history[-1].train_loss) > 1e-3
    # up-weighting the rare positive class: more positives called on test than without weights
    pos = [int((runs.load_test_logits(r.run_dir).logits[:, 0] > 0).sum()) for r in (memory, plain)]
    assert pos[0] > pos[1]


def test_jax_step_and_torch_loss_are_the_metrics_weighted_loss():
    import jax.numpy as jnp
    import torch

    from featcache.finetuning import classification_loss
    from featcache.head import masked_loss

    rng = np.random.default_rng(0)
    for c in (2, 4):
        k = 1 if c == 2 else c
        x = rng.normal(size=(13, k)).astype(np.float32) * 3
        y = rng.integers(0, c, 13)
        w = class_weights(labels=y, num_classes=c, spec="balanced" if c == 2 else "1,2,3,0.5")
        ref = metrics.weighted_loss_from_logits(x, y, c, class_weights=w)
        mask = np.ones(16, np.float32)
        mask[13:] = 0  # padded rows of a short batch count for nothing
        xp, yp = np.concatenate([x, np.full((3, k), 50, np.float32)]), np.concatenate([y, [0, 0, 0]])
        jax_loss = float(masked_loss(jnp.asarray(xp), jnp.asarray(yp, jnp.int32), jnp.asarray(mask),
                                     jnp.asarray(w, jnp.float32)))
        torch_loss = float(classification_loss(torch.tensor(x), torch.tensor(y), torch.tensor(w, dtype=torch.float32)))
        assert jax_loss == pytest.approx(ref, rel=1e-6), c
        assert torch_loss == pytest.approx(ref, rel=1e-6), c
        assert abs(ref - metrics.loss_from_logits(x, y, c)) > 1e-3  # the weights matter here


@pytest.mark.parametrize("args, words", [
    (["--class-weight", "heavy"], "--class-weight must be"),
    (["--class-weight", "1,2,3"], "lists 3 weights but the data has 2 classes"),
    (["--operating-point", "sens=2"], "--operating-point must be"),
])
def test_bad_options_are_one_sentence_exit_2(args, words, caches, tmp_path):
    out = CliRunner().invoke(cli, ["head-train", "--cache", str(caches["two"]), "--epochs", "2",
                                   "--runs-dir", str(tmp_path), *args])
    assert out.exit_code == 2, out.output
    assert words in out.output and "Traceback" not in out.output
    assert not any(tmp_path.iterdir())  # refused before a run directory was made


def test_report_shows_auroc_and_intervals_and_multiclass_runs_get_one_vs_rest(caches):
    run = featcache.train_head(cache=caches["three"], epochs=3, lr=0.1, bootstrap=-1,
                               runs_dir=str(caches["tmp"] / "three"))
    clinical = run.extra["clinical"]
    assert clinical["operating_point"] is None and clinical["bootstrap"]["resamples"] == 1000  # auto: <= 4 classes
    assert {"auroc_weighted", "average_precision_weighted"} <= set(clinical["metrics"])
    text = featcache.report([run], format="table")
    line = next(x for x in text.splitlines() if "resnet18" in x and "[" in x)
    low = clinical["bootstrap"]["intervals"]["auroc"]["low"]
    assert "AUROC" in text and f"{clinical['metrics']['auroc']:.4f} [{low:.4f}," in line
    assert runs.bootstrap_resamples(-1, num_classes=10) == 200 and runs.bootstrap_resamples(7, num_classes=10) == 7
