"""featcache.head: optax chains vs torch.optim, the whole fit vs a plain PyTorch loop on the same plan,
accuracy on separable features, determinism, and the import boundary (no torch on the JAX side)."""

import collections
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

import featcache.cache
from featcache import metrics, runs
from featcache.config import TrainConfig
from featcache.head import fit_head, linear_from_params, masked_loss, params_from_linear, update_direction
from featcache.head_runs import train_head
from featcache.plan import make_plan, num_outputs_for

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)


def test_head_and_what_it_imports_never_import_torch():
    r = _python("import featcache.head, featcache.stream, featcache.plots, sys; assert 'torch' not in sys.modules, 'torch imported'; "
                "assert 'matplotlib' not in sys.modules, 'matplotlib imported at module level'")
    assert r.returncode == 0, r.stderr


def test_numpy_modules_import_neither_jax_nor_torch():
    r = _python("import featcache.plan, featcache.metrics, featcache.runs, sys; "
                "bad = sorted({'jax', 'torch', 'flax', 'optax', 'matplotlib'} & set(sys.modules)); assert not bad, bad")
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------- optax chains vs torch.optim, step by step

OPTIMIZER_CASES = [
    dict(optimizer="sgd", momentum=0.0),
    dict(optimizer="sgd", momentum=0.9),
    dict(optimizer="sgd", momentum=0.9, nesterov=True, weight_decay=0.05),
    dict(optimizer="sgd", momentum=0.5, weight_decay=0.1),
    dict(optimizer="adam"),
    dict(optimizer="adam", weight_decay=0.05),
    dict(optimizer="adamw", weight_decay=0.1),
]
STEP_LRS = [0.1, 0.05, 0.2, 0.01, 0.15, 0.08, 0.3]  # changes every step


def _torch_optimizer(params, config: TrainConfig):
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
                               weight_decay=config.weight_decay)
    cls = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=config.lr, weight_decay=config.weight_decay)


def _torch_loss(out: torch.Tensor, y: torch.Tensor, num_outputs: int) -> torch.Tensor:
    if num_outputs == 1:
        return torch.nn.functional.binary_cross_entropy_with_logits(out[:, 0], y.float())
    return torch.nn.functional.cross_entropy(out, y)


@pytest.mark.parametrize("num_classes", [2, 3])
@pytest.mark.parametrize("opt", OPTIMIZER_CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_optax_chain_steps_like_torch_optim(opt, num_classes):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, 8)).astype(np.float32)
    y = rng.integers(0, num_classes, 40)
    k = num_outputs_for(num_classes)
    config = TrainConfig(**opt)
    w0 = rng.normal(size=(k, 8)).astype(np.float32) * 0.3
    b0 = rng.normal(size=(k,)).astype(np.float32) * 0.3

    lin = torch.nn.Linear(8, k)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(w0))
        lin.bias.copy_(torch.from_numpy(b0))
    t_opt = _torch_optimizer(lin.parameters(), config)
    for lr in STEP_LRS:
        for group in t_opt.param_groups:
            group["lr"] = lr
        t_opt.zero_grad()
        _torch_loss(lin(torch.from_numpy(x)), torch.from_numpy(y), k).backward()
        t_opt.step()

    from featcache.head import LinearHead

    model, tx = LinearHead(k), update_direction(config)
    mask = np.ones(40, np.float32)

    @jax.jit
    def step(params, state, lr):
        grads = jax.grad(lambda p: masked_loss(model.apply(p, x), y.astype(np.int32), mask))(params)
        direction, state = tx.update(grads, state, params)
        return jax.tree.map(lambda p, d: p - lr * d, params, direction), state

    params = params_from_linear(w0, b0)
    state = tx.init(params)
    for lr in STEP_LRS:
        params, state = step(params, state, np.float32(lr))
    w, b = linear_from_params(params)
    np.testing.assert_allclose(w, lin.weight.detach().numpy(), atol=1e-6, rtol=0)
    np.testing.assert_allclose(b, lin.bias.detach().numpy(), atol=1e-6, rtol=0)


# ---------------------------------------------------------------- whole fit vs a plain PyTorch loop

def torch_reference_fit(train, val, *, num_classes: int, config: TrainConfig):
    """The PyTorch tutorial loop on a frozen backbone's features, fed by the same plan as the head.

    Returns per epoch (train_loss, train_acc, val_loss, val_acc, weight (K, D)).
    """
    x, y = torch.tensor(train[0]), torch.tensor(train[1])
    k = num_outputs_for(num_classes)
    plan = make_plan(n_train=len(y), feature_dim=x.shape[1], num_outputs=k, config=config)
    lin = torch.nn.Linear(x.shape[1], k)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(plan.weight))
        lin.bias.copy_(torch.tensor(plan.bias))
    opt = _torch_optimizer(lin.parameters(), config)
    out = []
    for epoch in range(plan.epochs):
        for group in opt.param_groups:
            group["lr"] = float(plan.lrs[epoch])
        loss_sums, correct, sizes = [], [], []
        for rows in plan.batches(epoch):
            rows = torch.from_numpy(rows)
            logits = lin(x[rows])
            loss = _torch_loss(logits, y[rows], k)
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss_sums.append(loss.item() * len(rows))
            correct.append(int((metrics.predict(logits.detach().numpy(), num_classes) == y[rows].numpy()).sum()))
            sizes.append(len(rows))
        with torch.no_grad():
            val_logits = lin(torch.tensor(val[0])).numpy()
        out.append((*metrics.epoch_train_metrics(loss_sums, correct, sizes),
                    *metrics.evaluate(val_logits, val[1], num_classes), lin.weight.detach().numpy().copy()))
    return out


def _problem(num_classes: int, n: int = 230, d: int = 12, seed: int = 0):
    """Noisy linear labels: not separable, so losses keep moving for every epoch."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x @ rng.normal(size=(d, num_classes)) + 1.5 * rng.normal(size=(n, num_classes))).argmax(1)
    if num_classes == 2:
        y = (x @ rng.normal(size=d) + rng.normal(size=n) > 0).astype(np.int64)
    return (x[:150], y[:150]), (x[150:200], y[150:200]), (x[200:], y[200:])


FIT_CASES = [
    (2, dict(epochs=5, batch_size=16, lr=0.05)),  # sgd momentum, cosine, last batch of 6
    (2, dict(epochs=4, batch_size=32, optimizer="adam", lr=0.01, weight_decay=0.01, scheduler="none")),
    (3, dict(epochs=5, batch_size=20, lr=0.05, nesterov=True, weight_decay=0.01)),
    (3, dict(epochs=4, batch_size=64, optimizer="adamw", lr=0.02, weight_decay=0.1)),
]


@pytest.mark.parametrize("num_classes,opt", FIT_CASES)
def test_fit_head_equals_plain_pytorch_loop_on_the_same_plan(num_classes, opt):
    config = TrainConfig(**opt)
    train, val, test = _problem(num_classes)
    fit = fit_head(train, val, test, num_classes=num_classes, config=config)
    ref = torch_reference_fit(train, val, num_classes=num_classes, config=config)
    assert len(fit.history) == len(ref) == config.epochs
    for e, (rec, (t_loss, t_acc, v_loss, v_acc, weight)) in enumerate(zip(fit.history, ref)):
        assert rec.train_loss == pytest.approx(t_loss, abs=1e-5), e
        assert rec.val_loss == pytest.approx(v_loss, abs=1e-5), e
        assert (rec.train_acc, rec.val_acc) == (t_acc, v_acc), e
        np.testing.assert_allclose(fit.epoch_weights[e], weight, atol=1e-5, rtol=0)
    # the losses really moved (the comparison is not between two untouched inits)
    assert fit.history[-1].train_loss < fit.history[0].train_loss


# ---------------------------------------------------------------- behaviour

def _blobs(num_classes: int, n: int = 2800, d: int = 64, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(num_classes, d)) * 1.5
    y = rng.integers(0, num_classes, n)
    x = (centers[y] + rng.normal(size=(n, d))).astype(np.float32)
    return (x[:2000], y[:2000]), (x[2000:2300], y[2000:2300]), (x[2300:], y[2300:])


@pytest.mark.parametrize("num_classes", [2, 3])
def test_separable_features_reach_99_percent(num_classes):
    fit = fit_head(*_blobs(num_classes), num_classes=num_classes, config=TrainConfig())  # the study's defaults
    assert fit.summary.test_acc >= 0.99
    assert fit.summary.best_val_acc >= 0.99
    assert fit.weight.shape == (num_outputs_for(num_classes), 64)
    assert fit.epoch_weights.shape == (30, num_outputs_for(num_classes), 64)
    np.testing.assert_array_equal(fit.weight, fit.epoch_weights[fit.selected])
    assert fit.summary.selected_epoch == fit.history[fit.selected].epoch
    assert (fit.summary.roc_auc is not None) == (num_classes == 2)
    assert fit.timings["compile_s"] > 0 and fit.timings["train_s"] > 0


def test_same_seed_same_history_other_seed_other_history():
    data = _problem(3)
    config = TrainConfig(epochs=3, batch_size=16, lr=0.05)
    a = fit_head(*data, num_classes=3, config=config)
    b = fit_head(*data, num_classes=3, config=config)
    c = fit_head(*data, num_classes=3, config=TrainConfig(epochs=3, batch_size=16, lr=0.05, seed=1))

    def numbers(fit):
        return [(r.train_loss, r.train_acc, r.val_loss, r.val_acc) for r in fit.history]

    assert numbers(a) == numbers(b)
    np.testing.assert_array_equal(a.epoch_weights, b.epoch_weights)
    assert numbers(a) != numbers(c)


def test_a_second_fit_of_the_same_program_and_shapes_reuses_its_compiled_program(monkeypatch):
    from featcache import head

    data = _problem(3)
    monkeypatch.setattr(head, "_COMPILED", collections.OrderedDict())
    config = TrainConfig(epochs=3, batch_size=16, lr=0.05)
    fit_head(*data, num_classes=3, config=config)
    reused = fit_head(*data, num_classes=3, config=dataclasses.replace(config, seed=1, runs_dir="x"))  # arguments
    assert len(head._COMPILED) == 1
    fit_head(*data, num_classes=3, config=dataclasses.replace(config, momentum=0.5))  # another program
    fit_head(*[(x[:40], y[:40]) for x, y in data], num_classes=3, config=config)  # other shapes
    assert len(head._COMPILED) == 3
    head._COMPILED.clear()
    fresh = fit_head(*data, num_classes=3, config=dataclasses.replace(config, seed=1))
    np.testing.assert_array_equal(reused.epoch_weights, fresh.epoch_weights)


def test_float16_features_and_standardize():
    (x, y), val, test = _problem(2, d=6)
    x = x * 50 + 7
    x[:, 0] = 3.0  # a constant feature: std 1 (scikit-learn's rule), only centred
    val, test = (val[0] * 50 + 7, val[1]), (test[0] * 50 + 7, test[1])
    half = [(a.astype(np.float16), b) for a, b in ((x, y), val, test)]
    fit = fit_head(*half, num_classes=2, config=TrainConfig(epochs=3, standardize=True))
    assert fit.mean.shape == fit.std.shape == (6,) and fit.mean.dtype == np.float32
    assert fit.std[0] == 1.0 and fit.mean[0] == pytest.approx(3.0)
    assert np.isfinite([r.train_loss for r in fit.history]).all()
    # the stored mean/std and weights reproduce the test logits from raw features
    raw = test[0].astype(np.float16).astype(np.float32)
    logits = ((raw - fit.mean) / fit.std) @ fit.weight.T + fit.bias
    np.testing.assert_allclose(logits, fit.test_logits, rtol=1e-4, atol=1e-4)


def test_divergence_is_recorded_not_raised():
    (x, y), (xv, yv), (xt, yt) = _problem(2)
    with np.errstate(all="ignore"):
        fit = fit_head((x * 1e18, y), (xv * 1e18, yv), (xt * 1e18, yt), num_classes=2,
                       config=TrainConfig(epochs=2, lr=1e15))
    assert fit.diverged and fit.summary.diverged
    json.dumps(fit.summary.to_dict(), allow_nan=False)


def test_empty_split_is_a_user_error():
    from featcache.errors import UserError

    train, val, test = _problem(2)
    with pytest.raises(UserError, match="val split is empty"):
        fit_head(train, (val[0][:0], val[1][:0]), test, num_classes=2, config=TrainConfig(epochs=1))


# ---------------------------------------------------------------- train_head: cache in, run directory out

META = {"class_names": ["normal", "pneumonia"], "model": "resnet18", "weights": "imagenet", "key": "abc123def456",
        "dataset_name": "xray", "feature_dim": 12, "dtype": "float32", "path": "cache/x.h5"}


def _fake_cache(monkeypatch, data):
    """featcache.cache.read_meta / load_features / load_splits answering from in-memory splits (the cache
    package has its own tests)."""
    meta = dict(META, splits={s: len(y) for s, (_, y) in data.items()})
    monkeypatch.setattr(featcache.cache, "load_features", lambda path, split: (*data[split], dict(meta)))
    monkeypatch.setattr(featcache.cache, "load_paths",
                        lambda path, split: [f"{split}/{i}.png" for i in range(len(data[split][1]))])
    monkeypatch.setattr(featcache.cache, "load_splits",
                        lambda path, splits=tuple(data): (dict(meta), {s: tuple(data[s][:2]) for s in splits}))
    monkeypatch.setattr(featcache.cache, "read_meta", lambda path: dict(meta))


def test_train_head_writes_a_finished_run(tmp_path, monkeypatch):
    data = dict(zip(("train", "val", "test"), _problem(2)))
    _fake_cache(monkeypatch, data)
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (replaced.append(Path(dst).name), real_replace(src, dst)))

    config = TrainConfig(epochs=4, batch_size=16, lr=0.05, standardize=True, runs_dir=str(tmp_path / "runs"))
    result = train_head(cache="cache/x.h5", config=config, progress=False)

    assert result.run_dir.parent == tmp_path / "runs" and result.run_dir.name.endswith("-head-resnet18")
    assert replaced[-1] == "metrics.json"  # metrics.json marks a finished run: written last
    assert {"head.npz", "history.csv", "curves.png"} <= set(replaced)
    assert set(result.timings) == {"load_s", "compile_s", "train_s", "first_batch_at", "last_batch_at"}
    assert result.timings["last_batch_at"] - result.timings["first_batch_at"] == pytest.approx(result.timings["train_s"], abs=1e-5)
    loaded = runs.load_run(result.run_dir)
    assert loaded.summary == result.summary and loaded.history == result.history and loaded.config == config
    assert loaded.cache == {"key": "abc123def456", "path": "cache/x.h5"}
    assert loaded.class_names == ["normal", "pneumonia"]
    doc = json.loads((result.run_dir / "metrics.json").read_text())
    assert doc["mode"] == "head" and doc["diverged"] is False and "jax" in doc["versions"]

    head = runs.load_head(result.run_dir / "head.npz")
    x_test, y_test = data["test"]
    logits = ((x_test - head["mean"]) / head["std"]) @ head["weight"].T + head["bias"]
    assert metrics.accuracy(metrics.predict(logits, 2), y_test) == result.summary.test_acc
    assert head["class_names"].tolist() == ["normal", "pneumonia"] and bool(head["standardized"])


def test_train_head_records_a_diverged_run(tmp_path, monkeypatch, capsys):
    data = {s: (x * 1e18, y) for s, (x, y) in zip(("train", "val", "test"), _problem(2))}
    _fake_cache(monkeypatch, data)
    with np.errstate(all="ignore"):
        result = train_head(cache="cache/x.h5", config=TrainConfig(epochs=2, lr=1e15, runs_dir=str(tmp_path)))
    assert result.diverged and runs.load_run(result.run_dir).diverged
    assert "diverged" in capsys.readouterr().err


# ---------------------------------------------------------------- head_runs: one writer, one router


def test_head_runs_and_head_import_what_their_layers_allow():
    r = _python("import featcache.head_runs, sys; "
                "bad = sorted({'jax', 'torch', 'numpy', 'h5py'} & set(sys.modules)); assert not bad, bad")
    assert r.returncode == 0, r.stderr  # featcache --help imports head_runs for the --solver choices
    r = _python("import featcache.head, sys; "
                "bad = sorted({'featcache.stream', 'featcache.head_runs', 'featcache.cache'} & set(sys.modules)); "
                "assert not bad, bad")
    assert r.returncode == 0, r.stderr  # pure fitting on arrays: no cache, no run directory, no streaming


def test_write_head_run_of_a_solver_without_epochs_or_linear_head(tmp_path):
    from featcache.head_runs import run_title, write_head_run
    from featcache.reporting import compare_runs

    labels = np.array([0, 1, 1, 0, 1])
    history = [metrics.EpochRecord(epoch=1, lr=float("nan"), train_loss=float("nan"), train_acc=1.0,
                                   val_loss=float("nan"), val_acc=0.75, seconds=0.5)]
    summary = metrics.summarize(history, 0, test_logits=np.where(labels == 1, 2.0, -2.0)[:, None], test_labels=labels,
                                class_names=["normal", "pneumonia"], train_seconds=0.5)
    meta = dict(META, splits={"train": 9, "val": 4, "test": 5})
    path_curve = {"kind": "path", "values": [10, 20], "curves": {"val acc": [0.5, 0.75]}, "name": "k",
                  "description": "k", "axis_label": "k", "selected": 1}  # a plots.draw_run_figures entry
    result = write_head_run(cache="cache/x.h5", meta=meta, config=TrainConfig(runs_dir=str(tmp_path)), summary=summary,
                            timings={"load_s": 0.1, "train_s": 0.5}, figures={"curves": path_curve},
                            solver="knn", extra={"knn": {"k": 20}}, run_name="knn", progress=False)

    # no head.npz, history.csv, test_logits.npz, roc.png: the confusion matrix comes from the summary alone
    assert sorted(p.name for p in result.run_dir.iterdir()) == ["confusion.png", "curves.png", "metrics.json"]
    loaded = runs.load_run(tmp_path / "knn")
    assert loaded.history == [] and loaded.summary.to_dict() == summary.to_dict() and loaded.mode == "head"
    assert loaded.extra == {"solver": "knn", "weights": "imagenet", "dataset_name": "xray", "feature_dim": 12,
                            "cache_dtype": "float32", "image_size": None, "rows": {"train": 9, "val": 4, "test": 5},
                            "knn": {"k": 20}}
    assert loaded.cache == {"key": "abc123def456", "path": "cache/x.h5"} and "numpy" in loaded.versions
    assert "head/knn" in compare_runs([loaded], format="table")
    assert run_title(meta, "knn") == "resnet18 knn on xray"


def test_head_train_refuses_options_that_do_not_combine_before_reading_the_cache(tmp_path):
    from featcache.errors import UserError
    from featcache.head_runs import head_train

    config = TrainConfig(runs_dir=str(tmp_path))
    missing = tmp_path / "absent.h5"  # each error must come before the cache is opened
    cases = [(dict(stream=True, seeds=3), "--stream trains one head with --solver sgd"),
             (dict(stream=True, lrs=[0.1, 0.2]), "--stream trains one head"),
             (dict(stream=True, solver="ridge"), "--stream trains one head"),
             (dict(l2s=[1.0]), "--l2 sets the strengths of --solver ridge"),
             (dict(solver="ridge", seeds=2), "--solver ridge is deterministic"),
             (dict(solver="ridge", weight_decays=[0.0, 0.1]), "--solver ridge is deterministic"),
             (dict(solver="lasso"), "Unknown solver 'lasso'; choose one of sgd, ridge, lbfgs, knn.")]
    for options, message in cases:
        with pytest.raises(UserError) as info:
            head_train(cache=missing, config=config, progress=False, **options)
        assert message in str(info.value), options
        assert len(str(info.value).splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_head_train_routes_to_the_solver_the_options_ask_for(tmp_path, monkeypatch):
    from featcache import api

    data = dict(zip(("train", "val", "test"), _problem(2)))
    _fake_cache(monkeypatch, data)
    options = dict(cache="cache/x.h5", epochs=2, batch_size=16, lr=0.05, seed=3, runs_dir=str(tmp_path))
    one = api.train_head(run_name="one", **options)
    assert "grid" not in one.extra and "solver" not in one.extra and one.config.seed == 3
    # api.train_grid always writes the grid's run, even of one cell: the same head as the single run
    cell = api.train_grid(lrs=[0.05], run_name="cell", **{k: v for k, v in options.items() if k != "lr"})
    assert cell.extra["grid"]["seeds"] == [3] and cell.extra["seed_stats"]["n"] == 1
    assert cell.summary.test_acc == one.summary.test_acc and cell.history[-1].val_acc == one.history[-1].val_acc
    np.testing.assert_allclose(runs.load_head(cell.run_dir / "head.npz")["weight"],
                               runs.load_head(one.run_dir / "head.npz")["weight"], atol=1e-6)

    from featcache.head_runs import head_train

    alias = head_train(cache="cache/x.h5", config=one.config, solver="optax", run_name="alias", progress=False)
    assert alias.summary == dataclasses.replace(one.summary, training_time=alias.summary.training_time)
    ridge = api.train_ridge(cache="cache/x.h5", l2s=[0.1, 10.0], runs_dir=str(tmp_path), run_name="ridge")
    assert ridge.extra["solver"] == "ridge" and ridge.extra["ridge"]["l2s"] == [0.1, 10.0]
