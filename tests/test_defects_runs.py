"""Issue 15 defects on the run side: --standardize by scikit-learn's rule, damaged run files, run names that
leave --runs-dir, file modes under the umask, report over a runs folder, the divergence check's cost."""

from __future__ import annotations

import csv
import io
import json
import os
import stat
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from featcache import metrics, runs
from featcache.config import SPLITS, TrainConfig
from featcache.errors import UserError
from featcache.head_runs import diverged_message, train_head
from featcache.standardize import prepare_splits, standardization

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import gaussian_problem, write_cache  # noqa: E402


from cli_helpers import invoke as _invoke, one_error_line as _one_error_line  # noqa: E402


# --------------------------------------------------------------------------- 2: --standardize


def _awkward_splits(seed: int = 0):
    """Two classes; feature 0 constant on train but not on val/test, feature 1 of scale 1e-10 carrying the
    class, feature 2 constant everywhere, the rest noise of scale 1."""
    out = []
    for split, (x, y) in zip(SPLITS, gaussian_problem(2, n=(200, 100, 100), dim=8, seed=seed)):
        x = x.astype(np.float32)
        rng = np.random.default_rng(len(split))
        # a dead ReLU unit on train, now and then a little above 0 on val/test (1e4 x that with the old 1e-6 floor)
        x[:, 0] = 0.0 if split == "train" else np.maximum(rng.normal(size=len(x)), 0) * 0.05
        x[:, 1] = ((y * 2.0 - 1.0) + rng.normal(size=len(x)) * 0.5) * 1e-10  # tiny scale, informative
        x[:, 2] = 5.0
        x[:, 3:] = rng.normal(size=(len(x), 5))
        out.append((x, y))
    return out


def test_standardization_equals_scikit_learns_standard_scaler():
    from sklearn.preprocessing import StandardScaler

    train, val, test = _awkward_splits()
    mean, std = standardization(train[0])
    scaler = StandardScaler().fit(train[0].astype(np.float64))
    np.testing.assert_allclose(mean, scaler.mean_, rtol=1e-6, atol=1e-20)
    np.testing.assert_allclose(std, scaler.scale_, rtol=1e-6)
    assert std[0] == 1.0 and std[2] == 1.0 and std[1] == pytest.approx(scaler.scale_[1], rel=1e-6)
    assert 1e-11 < std[1] < 1e-9  # divided by its own scale, not floored
    data = prepare_splits(train, val, test, num_classes=2, standardize=True)
    for got, (x, _) in zip((data.x_train, data.x_val, data.x_test), (train, val, test)):
        want = scaler.transform(x.astype(np.float64))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.abs(data.x_val[:, 0]).max() < 20  # not 1e5 as with the old 1e-6 floor


def test_blockwise_standardization_uses_the_same_rule():
    from featcache.standardize import blockwise_standardization

    train = _awkward_splits()[0][0]
    mean, std = blockwise_standardization(lambda: [train[:70], train[70:150], train[150:]])
    whole = standardization(train)
    np.testing.assert_allclose(mean, whole[0], rtol=1e-6, atol=1e-20)
    np.testing.assert_allclose(std, whole[1], rtol=1e-6)
    assert std[0] == std[2] == 1.0


def test_head_train_standardize_on_awkward_features_matches_scikit_learn(tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    splits = dict(zip(SPLITS, _awkward_splits()))
    cache = write_cache(tmp_path / "c.h5", splits, ["a", "b"])
    config = TrainConfig(epochs=30, optimizer="adam", lr=0.01, standardize=True, runs_dir=str(tmp_path / "runs"))
    run = train_head(cache=cache, config=config, progress=False)
    scaler = StandardScaler().fit(splits["train"][0])
    reference = LogisticRegression().fit(scaler.transform(splits["train"][0]), splits["train"][1])
    sk_acc = reference.score(scaler.transform(splits["test"][0]), splits["test"][1])
    assert sk_acc > 0.85  # the tiny-scale feature separates the classes
    assert run.summary.test_acc >= sk_acc - 0.05
    assert run.summary.best_val_loss < 1.0  # was ~10 with the train-constant feature blown up to 1e5
    head = runs.load_head(run.run_dir / runs.HEAD_FILE)
    assert head["std"][0] == 1.0 and head["std"][1] < 1e-9  # export folds exactly these into its Linear


# --------------------------------------------------------------------------- 1: damaged run files


def _finished_run(tmp_path: Path) -> Path:
    splits = dict(zip(SPLITS, gaussian_problem(3, n=(60, 30, 30), dim=6)))
    cache = write_cache(tmp_path / "c.h5", splits, ["a", "b", "c"])
    run = train_head(cache=cache, config=TrainConfig(epochs=2, runs_dir=str(tmp_path / "runs")), progress=False)
    return run.run_dir


def _edit_metrics(run_dir: Path, edit) -> None:
    path = run_dir / runs.METRICS_FILE
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


METRICS_DAMAGE = {
    "not json": lambda p: p.write_text("{not json"),
    "a list": lambda p: p.write_text("[1, 2]"),
    "NaN": lambda p: p.write_text(p.read_text().replace('"train_loss": ', '"train_loss": NaN, "x": ', 1)),
    "1e999": lambda p: p.write_text(p.read_text().replace('"training_time": ', '"training_time": 1e999, "x": ', 1)),
    "binary": lambda p: p.write_bytes(b"\xff\xfe\x00garbage"),
}
METRICS_EDITS = {
    "no summary": lambda d: d.pop("summary"),
    "mode": lambda d: d.update(mode="evil"),
    "class_names string": lambda d: d.update(class_names="abc"),
    "epochs string": lambda d: d["config"].update(epochs="30"),
    "test_acc list": lambda d: d["summary"].update(test_acc=[1]),
    "confusion": lambda d: d["summary"].update(confusion_matrix=[[1]]),
    "history item": lambda d: d["history"].__setitem__(0, "x"),
    "history value": lambda d: d["history"][0].update(val_loss="low"),
    "timings": lambda d: d.update(timings={"train_s": "fast"}),
    "cache path": lambda d: d.update(cache={"path": 5}),
    "extra grid": lambda d: d["extra"].update(grid={"cells": 3}),
    "extra ridge": lambda d: d["extra"].update(ridge={"l2s": [1]}),
}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    return _finished_run(tmp_path_factory.mktemp("finished"))


@pytest.mark.parametrize("damage", [*METRICS_DAMAGE, *METRICS_EDITS])
def test_a_damaged_metrics_json_is_one_sentence_naming_it(damage, finished, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    if damage in METRICS_DAMAGE:
        METRICS_DAMAGE[damage](run_dir / runs.METRICS_FILE)
    else:
        _edit_metrics(run_dir, METRICS_EDITS[damage])
    error = _one_error_line(_invoke("report", run_dir, "--figure", ""), 2)
    assert f"{run_dir / runs.METRICS_FILE} is not a featcache run file" in error, error
    if not damage.startswith("extra"):  # export reads no grid or ridge record
        error = _one_error_line(_invoke("export", run_dir, "--out", tmp_path / "m.pt"), 2)
        assert str(run_dir / runs.METRICS_FILE) in error, error


HEAD_DAMAGE = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[:100]),
    "empty": lambda p: p.write_bytes(b""),
    "npy": lambda p: p.write_bytes(_npy(np.zeros(3))),
    "pickle": lambda p: _resave(p, "weight", np.array([object()], dtype=object)),
    "no std": lambda p: _resave(p, "std", None),
    "weight 1-D": lambda p: _resave(p, "weight", np.zeros(6, np.float32)),
    "bias shape": lambda p: _resave(p, "bias", np.zeros(7, np.float32)),
    "mean shape": lambda p: _resave(p, "mean", np.zeros(2, np.float32)),
    "int weight": lambda p: _resave(p, "weight", np.zeros((3, 6), np.int64)),
    "names": lambda p: _resave(p, "class_names", np.array(["a", "b"])),
    "nan std": lambda p: _resave(p, "std", np.full(6, np.nan, np.float32)),
    "zero std": lambda p: _resave(p, "std", np.zeros(6, np.float32)),
    "inf weight": lambda p: _resave(p, "weight", np.full((3, 6), np.inf, np.float32)),
}


def _resave(path: Path, key: str, value) -> None:
    """head.npz again with `key` set to `value` (None: left out)."""
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays.pop(key)
    if value is not None:
        arrays[key] = value
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _npy(array) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


@pytest.mark.parametrize("damage", HEAD_DAMAGE)
def test_a_damaged_head_npz_is_one_sentence_naming_it(damage, finished, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    head = run_dir / runs.HEAD_FILE
    assert runs.load_head(head)["weight"].shape == (3, 6)
    HEAD_DAMAGE[damage](head)
    with pytest.raises(UserError, match=f"^{head} is not a (readable|valid) head file .*; train the head again.$"):
        runs.load_head(head)
    error = _one_error_line(_invoke("export", run_dir, "--out", tmp_path / "m.pt"), 2)
    assert f"{head} is not a" in error, error


# --------------------------------------------------------------------------- 4: run names, file modes


@pytest.mark.parametrize("name", ["../../x", "a/b", "/tmp/abs", "..", ".", ""])
def test_a_run_name_that_leaves_runs_dir_is_refused(name, tmp_path):
    with pytest.raises(UserError, match="is not a plain folder name"):
        runs.new_run_dir(runs_dir=tmp_path / "runs", mode="head", model="m", name=name)
    assert list(tmp_path.rglob("*")) in ([], [tmp_path / "runs"])
    assert runs.new_run_dir(runs_dir=tmp_path / "runs", mode="head", model="m", name="ok..name").name == "ok..name"


def test_head_train_with_an_escaping_run_name_exits_2_and_writes_nothing(tmp_path):
    splits = dict(zip(SPLITS, gaussian_problem(2, n=(40, 20, 20), dim=4)))
    cache = write_cache(tmp_path / "c.h5", splits, ["a", "b"])
    outside = tmp_path / "escaped"
    error = _one_error_line(_invoke("head-train", "--cache", cache, "--epochs", 1, "--runs-dir",
                                    tmp_path / "a" / "runs", "--run-name", "../../escaped"), 2)
    assert "'../../escaped' is not a plain folder name" in error
    assert not outside.exists()


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_run_files_honour_the_umask(umask, tmp_path):
    from featcache.files import atomic_write_bytes

    old = os.umask(umask)
    try:
        run_dir = _finished_run(tmp_path)
        atomic_write_bytes(tmp_path / "predictions.csv", b"x\n")
    finally:
        os.umask(old)
    files = [p for p in run_dir.iterdir()] + [tmp_path / "predictions.csv"]
    assert {p.name for p in run_dir.iterdir()} == {"head.npz", "history.csv", "curves.png", "metrics.json",
                                                 "test_logits.npz", "roc.png", "calibration.png",
                                                 "confusion.png"}
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask, p


def test_a_read_only_runs_folder_is_one_sentence(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    splits = dict(zip(SPLITS, gaussian_problem(2, n=(40, 20, 20), dim=4)))
    cache = write_cache(tmp_path / "c.h5", splits, ["a", "b"])
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    runs_dir.chmod(0o555)
    try:
        error = _one_error_line(_invoke("head-train", "--cache", cache, "--epochs", 1, "--runs-dir", runs_dir), 2)
        nested = _one_error_line(_invoke("head-train", "--cache", cache, "--epochs", 1, "--runs-dir",
                                         runs_dir / "sub"), 2)
    finally:
        runs_dir.chmod(0o755)
    assert error == f"Error: Cannot write {runs_dir} (Permission denied); make its folder writable or choose " \
                    "another folder."
    assert "Cannot write" in nested and "Permission denied" in nested


def test_a_read_only_file_system_is_one_sentence(tmp_path, monkeypatch):
    """Read-only as root sees it too (EROFS: a read-only mount), for the run directory and for any file."""
    import errno
    import tempfile

    from featcache.files import atomic_write_bytes

    splits = dict(zip(SPLITS, gaussian_problem(2, n=(40, 20, 20), dim=4)))
    cache = write_cache(tmp_path / "c.h5", splits, ["a", "b"])
    runs_dir = tmp_path / "runs"
    real_mkdir = Path.mkdir

    def read_only_mkdir(self, *args, **kwargs):
        if str(self).startswith(str(runs_dir)):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)
    monkeypatch.setattr(Path, "mkdir", read_only_mkdir)
    error = _one_error_line(_invoke("head-train", "--cache", cache, "--epochs", 1, "--runs-dir", runs_dir), 2)
    assert error == f"Error: Cannot write {runs_dir} (Read-only file system); make its folder writable or " \
                    "choose another folder."
    monkeypatch.undo()

    def read_only_mkstemp(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(tempfile, "mkstemp", read_only_mkstemp)
    with pytest.raises(UserError, match=f"^Cannot write {tmp_path / 'p.csv'} \\(Read-only file system\\); "):
        atomic_write_bytes(tmp_path / "p.csv", b"x")
    assert not (tmp_path / "p.csv").exists()


# --------------------------------------------------------------------------- 7: report, divergence cost


def test_report_skips_unfinished_runs_and_files_and_takes_a_runs_folder(finished, tmp_path):
    import shutil

    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    shutil.copytree(finished, runs_dir / "a-finished")
    shutil.copytree(finished, runs_dir / "b-finished")
    (runs_dir / "c-unfinished").mkdir()
    (runs_dir / "c-unfinished" / "finetune.json").write_text("{}")
    (runs_dir / "demo-comparison.png").write_bytes(b"png")
    listed = sorted(runs_dir.iterdir())
    result = _invoke("report", *listed, "--format", "csv", "--figure", "")
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [
        f"Skipping {runs_dir / 'c-unfinished'}: an unfinished run (no metrics.json: still running, or stopped).",
        "Ignored 1 file that is not a run directory (demo-comparison.png)."]
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [r["run_dir"] for r in rows] == [str(runs_dir / "a-finished"), str(runs_dir / "b-finished")]
    folder = _invoke("report", runs_dir, "--format", "csv", "--figure", "")
    assert folder.exit_code == 0 and folder.stdout == result.stdout, folder.output
    assert folder.stderr.splitlines() == result.stderr.splitlines()  # the folder's files are counted too
    nothing = _one_error_line(_invoke("report", runs_dir / "c-unfinished", "--figure", ""), 2)
    assert "No finished runs among" in nothing


def test_the_divergence_check_of_100000_epochs_is_linear():
    history = [metrics.EpochRecord(epoch=i + 1, lr=0.1, train_loss=1.0 / (i + 1), train_acc=0.5, val_loss=0.7,
                                   val_acc=0.5, seconds=0.0) for i in range(100_000)]
    t0 = time.perf_counter()
    assert not metrics.is_diverged(history, num_classes=2)
    jumped = history + [metrics.EpochRecord(epoch=100_001, lr=0.1, train_loss=0.9, train_acc=0.5, val_loss=0.7,
                                            val_acc=0.5, seconds=0.0)]
    reason = metrics.first_divergence(jumped, num_classes=2)
    elapsed = time.perf_counter() - t0
    assert reason == metrics.divergence_reason(jumped[:-1], jumped[-1], num_classes=2)
    assert reason.startswith("train loss jumped to 0.9 in epoch 100001, over 10x its best 1e-05")
    assert elapsed < 0.5, elapsed  # the quadratic check took minutes


def test_diverged_message_of_a_long_history_names_the_first_diverged_epoch(tmp_path):
    history = [metrics.EpochRecord(epoch=i + 1, lr=0.1, train_loss=0.5, train_acc=0.5, val_loss=0.7, val_acc=0.5,
                                   seconds=0.0) for i in range(100_000)]
    history[70_000] = metrics.EpochRecord(epoch=70_001, lr=0.1, train_loss=float("nan"), train_acc=0.5,
                                          val_loss=0.7, val_acc=0.5, seconds=0.0)

    class Result:
        run_dir = tmp_path
        class_names = ["a", "b"]
    Result.history = history
    t0 = time.perf_counter()
    message = diverged_message(Result)
    assert time.perf_counter() - t0 < 0.5
    assert message.startswith("Training diverged (loss became NaN/inf in epoch 70001); lower --lr.")


def test_an_exported_model_and_predictions_honour_the_umask(tmp_path):
    import featcache
    from featcache.demo import make_demo_dataset

    data = make_demo_dataset(tmp_path / "demo", num_classes=2, n_per_class=(6, 3, 3), image_size=32)
    old = os.umask(0o027)
    try:
        cache = featcache.extract(model="resnet18", data=str(data), weights="none", image_size=32, num_workers=0,
                                  cache_dir=str(tmp_path / "cache"))
        run = featcache.train_head(cache=cache, runs_dir=str(tmp_path / "runs"), epochs=2)
        model = tmp_path / "model.pt"
        exported = _invoke("export", run.run_dir, "--out", model)
        predicted = _invoke("predict", "--model-file", model, "--num-workers", 0, "--out", tmp_path / "p.csv",
                            data / "test")
    finally:
        os.umask(old)
    assert exported.exit_code == 0 and predicted.exit_code == 0, exported.output + predicted.output
    for path in (model, tmp_path / "p.csv", run.run_dir / runs.METRICS_FILE, Path(cache)):
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path
