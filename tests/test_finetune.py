"""featcache finetune: the frozen loop reports what extract + head-train report, BatchNorm stays frozen,
the full fine-tune writes its run, a run killed with SIGKILL resumes to the history of a clean run,
the divergence guard, and the errors a user can cause.

Tiny demo data (24 train, 12 val, 12 test images, 32 px), weights "none", CPU, --num-workers 0 in
this process (JAX is loaded here, and DataLoader workers fork); runs with workers go to subprocesses.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import featcache
from featcache import runs
from featcache.backbones import build_backbone
from featcache.cli import cli
from featcache.config import TrainConfig
from featcache.demo import make_demo_dataset
from featcache.plan import make_plan

SIZE = 32  # googlenet's smallest input
EPOCHS = 3  # parity runs
LOSS_TOL = 1e-4  # the parity bound
N_PER_CLASS = (12, 6, 6)  # train, val, test images per class

# name: (model, classes, training options). Learning rates that move the head far enough for the
# accuracies to change between epochs (checked below), so agreement is not that of a constant model.
PARITY = {
    "resnet18-2c-sgd": ("resnet18", 2, dict(optimizer="sgd", lr=0.5, batch_size=8)),
    "googlenet-2c-adam": ("googlenet", 2, dict(optimizer="adam", lr=0.05, batch_size=8)),
    "resnet18-3c-adamw-wd": ("resnet18", 3, dict(optimizer="adamw", lr=0.05, weight_decay=0.1, batch_size=8)),
    "resnet18-2c-nesterov-wd": ("resnet18", 2, dict(optimizer="sgd", lr=0.3, nesterov=True, weight_decay=0.01,
                                                    batch_size=8)),
}


def _invoke(args: list[str]):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _only_run_dir(runs_dir: Path) -> Path:
    (run_dir,) = [p for p in Path(runs_dir).iterdir() if p.is_dir()]
    return run_dir


# ---------------------------------------------------------------- shared data, caches and runs


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("finetune")


@pytest.fixture(scope="module")
def datasets(work) -> dict[int, Path]:
    return {c: make_demo_dataset(work / f"demo{c}", num_classes=c, n_per_class=N_PER_CLASS, image_size=SIZE)
            for c in (2, 3)}


@pytest.fixture(scope="module")
def weights(work) -> dict[str, str]:
    """--weights per model. googlenet gets a state_dict with He-initialised convolutions: torchvision's own
    init (truncated normal, std 0.01) under eval-mode BatchNorm gives penultimate features of ~1e-12, which
    would leave only the head's bias to compare."""
    import torchvision

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=False)
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = work / "googlenet-he.pt"
    torch.save(net.state_dict(), path)
    return {"resnet18": "none", "googlenet": str(path)}


@pytest.fixture(scope="module")
def parity_runs(work, datasets, weights):
    """case -> (head-train RunResult, frozen-loop RunResult), computed on first use."""
    caches, done = {}, {}

    def get(case: str):
        if case not in done:
            model, classes, options = PARITY[case]
            common = dict(model=model, data=str(datasets[classes]), weights=weights[model], image_size=SIZE,
                          num_workers=0)
            if (model, classes) not in caches:
                caches[model, classes] = featcache.extract(**common, cache_dir=str(work / "cache"))
            runs_dir = str(work / "parity" / case)
            head = featcache.train_head(cache=caches[model, classes], epochs=EPOCHS, runs_dir=runs_dir, **options)
            frozen = featcache.finetune(**common, freeze_backbone=True, epochs=EPOCHS, runs_dir=runs_dir,
                                        cache_dir=str(work / "cache"), **options)
            done[case] = head, frozen
        return done[case]

    return get


# ---------------------------------------------------------------- parity with extract + head-train


def _max_loss_diff(a: list[dict], b: list[dict]) -> float:
    return max(abs(x[k] - y[k]) for x, y in zip(a, b) for k in ("train_loss", "val_loss"))


def _assert_same_history(head: list[dict], frozen: list[dict]) -> None:
    assert [r["epoch"] for r in head] == [r["epoch"] for r in frozen] == list(range(1, EPOCHS + 1))
    for h, f in zip(head, frozen):
        assert h["lr"] == f["lr"]
        assert h["train_acc"] == f["train_acc"], (h, f)
        assert h["val_acc"] == f["val_acc"], (h, f)
        assert h["train_loss"] == pytest.approx(f["train_loss"], abs=LOSS_TOL)
        assert h["val_loss"] == pytest.approx(f["val_loss"], abs=LOSS_TOL)


@pytest.mark.parametrize("case", list(PARITY))
def test_frozen_loop_reports_what_extract_and_head_train_report(case, parity_runs):
    head, frozen = parity_runs(case)
    assert (head.mode, frozen.mode) == ("head", "frozen")
    assert not head.diverged and not frozen.diverged
    h = [r.to_dict() for r in head.history]
    f = [r.to_dict() for r in frozen.history]
    _assert_same_history(h, f)
    # not a constant model: losses move and some accuracy changes from epoch to epoch
    for key in ("train_loss", "val_loss"):
        assert max(r[key] for r in h) - min(r[key] for r in h) > 1e-2
    assert len({r["train_acc"] for r in h}) > 1

    hs, fs = head.summary, frozen.summary
    assert hs.selected_epoch == fs.selected_epoch
    assert (hs.best_val_acc, hs.test_acc, hs.train_acc) == (fs.best_val_acc, fs.test_acc, fs.train_acc)
    assert hs.confusion_matrix == fs.confusion_matrix
    assert hs.test_loss == pytest.approx(fs.test_loss, abs=LOSS_TOL)
    assert hs.best_val_loss == pytest.approx(fs.best_val_loss, abs=LOSS_TOL)
    print(f"{case}: max |loss diff| over epochs {_max_loss_diff(h, f):.3g}, "
          f"test loss diff {abs(hs.test_loss - fs.test_loss):.3g}")

    # the files say the same: metrics.json (same config), head.npz of the selected epoch
    docs = [json.loads((r.run_dir / runs.METRICS_FILE).read_text()) for r in (head, frozen)]
    assert docs[0]["config"] == docs[1]["config"]
    _assert_same_history(docs[0]["history"], docs[1]["history"])
    for k in ("selected_epoch", "best_val_acc", "test_acc", "train_acc", "confusion_matrix", "diverged"):
        assert docs[0]["summary"][k] == docs[1]["summary"][k], k
    assert docs[0]["summary"]["test_loss"] == pytest.approx(docs[1]["summary"]["test_loss"], abs=LOSS_TOL)
    # Adam's step is ~lr wherever a gradient is ~0, so a weight may differ by more than the logits do
    heads = [runs.load_head(r.run_dir / runs.HEAD_FILE) for r in (head, frozen)]
    for k in ("weight", "bias"):
        scale = max(float(np.abs(heads[0][k]).max()), 1.0)
        print(f"  head.npz {k}: max |diff| {np.abs(heads[1][k] - heads[0][k]).max():.3g} (max |value| {scale:.3g})")
        np.testing.assert_allclose(heads[1][k], heads[0][k], rtol=0, atol=1e-3 * scale)


def test_frozen_loop_leaves_backbone_and_batchnorm_statistics_untouched(parity_runs):
    _, frozen = parity_runs("resnet18-2c-sgd")
    ckpt = torch.load(frozen.run_dir / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == EPOCHS and ckpt["freeze_backbone"] is True
    assert sorted(ckpt["state_dict"]) == ["bias", "weight"] and ckpt["head_only"]  # last.pt: the head only
    best = torch.load(frozen.run_dir / "best.pt", map_location="cpu", weights_only=True)  # the whole network
    saved = {k.removeprefix("backbone."): v for k, v in best["state_dict"].items() if k.startswith("backbone.")}
    fresh = build_backbone("resnet18", weights="none", image_size=SIZE).net.state_dict()
    assert saved.keys() == fresh.keys()
    stats = [k for k in fresh if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(stats) == 3 * 20  # resnet18's 20 BatchNorm layers
    changed = [k for k in fresh if not torch.equal(saved[k], fresh[k])]
    assert changed == []
    # ... while the head did train away from the plan's init
    plan = make_plan(n_train=2 * N_PER_CLASS[0], feature_dim=512, num_outputs=1,
                     config=TrainConfig(epochs=EPOCHS, **PARITY["resnet18-2c-sgd"][2]))
    assert not np.allclose(ckpt["state_dict"]["weight"].numpy(), plan.weight)


# ---------------------------------------------------------------- parity with --class-weight balanced

# an imbalanced dataset: the demo with class 1 keeping only 4 of its 12 train images (and one class of 3)
WEIGHTED = {
    "resnet18-2c-sgd-balanced": ("resnet18", 2, dict(optimizer="sgd", lr=0.5, batch_size=8)),
    "resnet18-3c-adam-balanced": ("resnet18", 3, dict(optimizer="adam", lr=0.05, batch_size=8)),
}
KEPT_OF_CLASS_1 = 4


@pytest.fixture(scope="module")
def imbalanced(work, datasets) -> dict[int, Path]:
    """The demo datasets with class 1's train images cut to KEPT_OF_CLASS_1 (a copy, not a demo folder)."""
    import shutil

    out = {}
    for c, root in datasets.items():
        dest = work / f"imbalanced{c}"
        shutil.copytree(root, dest, ignore=shutil.ignore_patterns(".featcache-demo.json"))
        class_1 = sorted(p for p in (dest / "train").iterdir() if p.is_dir())[1]
        for image in sorted(class_1.iterdir())[KEPT_OF_CLASS_1:]:
            image.unlink()
        out[c] = dest
    return out


@pytest.mark.parametrize("case", list(WEIGHTED))
def test_parity_holds_with_class_weight_balanced(case, work, imbalanced, weights):
    model, classes, options = WEIGHTED[case]
    common = dict(model=model, data=str(imbalanced[classes]), weights=weights[model], image_size=SIZE, num_workers=0)
    cache = featcache.extract(**common, cache_dir=str(work / "cache"))
    runs_dir = str(work / "weighted" / case)
    head = featcache.train_head(cache=cache, epochs=EPOCHS, runs_dir=runs_dir, class_weight="balanced", **options)
    frozen = featcache.finetune(**common, freeze_backbone=True, epochs=EPOCHS, runs_dir=runs_dir,
                                cache_dir=str(work / "cache"), class_weight="balanced", **options)
    plain = featcache.train_head(cache=cache, epochs=EPOCHS, runs_dir=runs_dir, **options)
    assert not head.diverged and not frozen.diverged
    h, f = ([r.to_dict() for r in run.history] for run in (head, frozen))
    _assert_same_history(h, f)
    hs, fs = head.summary, frozen.summary
    assert (hs.selected_epoch, hs.best_val_acc, hs.test_acc) == (fs.selected_epoch, fs.best_val_acc, fs.test_acc)
    assert hs.test_loss == pytest.approx(fs.test_loss, abs=LOSS_TOL)
    print(f"{case}: max |loss diff| over epochs {_max_loss_diff(h, f):.3g}")
    # the weights are the train split's balanced ones, recorded alike in both runs, and they change the training
    n = N_PER_CLASS[0] * (classes - 1) + KEPT_OF_CLASS_1
    counts = [N_PER_CLASS[0], KEPT_OF_CLASS_1] + [N_PER_CLASS[0]] * (classes - 2)
    expected = [n / (classes * k) for k in counts]
    for run in (head, frozen):
        assert run.config.class_weight == "balanced"
        assert run.extra["clinical"]["class_weight"]["weights"] == pytest.approx(expected, rel=1e-12)
    assert abs(plain.history[0].train_loss - head.history[0].train_loss) > 1e-3
    # val loss is the plain unweighted mean in both (metrics.evaluate)
    assert f[-1]["val_loss"] == pytest.approx(h[-1]["val_loss"], abs=LOSS_TOL)
    # both runs stored their test rows by image path: the two modes compare paired, with the same test metrics
    paired = featcache.compare(head.run_dir, frozen.run_dir, bootstrap=50)
    assert paired.rows == N_PER_CLASS[2] * classes
    assert paired.differences["accuracy"].point == 0.0
    assert paired.values_a["auroc"] == pytest.approx(paired.values_b["auroc"], abs=1e-9)


# ---------------------------------------------------------------- resume after SIGKILL (and the full fine-tune run)

DRIVER = """\
import sys, time
import featcache.finetuning as ft

kill_after = int(sys.argv[1])
_save = ft._Checkpoints.save


def save(self, name, payload):
    _save(self, name, payload)
    if name == "last.pt" and payload["epoch"] == kill_after:
        time.sleep(600)  # the test kills this process here, between two epochs


ft._Checkpoints.save = save
from featcache.cli import main

sys.argv = ["featcache", *sys.argv[2:]]
main()
"""

FEATCACHE = [sys.executable, "-m", "featcache"]
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _kill_after_epoch(proc: subprocess.Popen, runs_dir: Path, epoch: int, timeout: float = 300) -> Path:
    """Wait until the driver's run holds last.pt of `epoch`, then SIGKILL it; its run directory.

    last.pt is replaced by a rename, so a new checkpoint is a new inode: each one is loaded once.
    """
    deadline, seen = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the driver ended by itself:\n{proc.communicate()[1]}"
        for ckpt in runs_dir.glob("*/last.pt"):
            try:
                st = ckpt.stat()
                if (st.st_ino, st.st_mtime_ns) != seen:
                    seen = st.st_ino, st.st_mtime_ns
                    if torch.load(ckpt, map_location="cpu", weights_only=True)["epoch"] == epoch:
                        proc.send_signal(signal.SIGKILL)
                        proc.wait()
                        return ckpt.parent
            except (OSError, RuntimeError, EOFError):  # replaced or not complete yet: look again
                seen = None
        time.sleep(0.1)
    pytest.fail(f"no last.pt of epoch {epoch} within {timeout} s")


# mode: (epochs, kill after epoch, extra options, where the clean and the resumed run go)
RESUME_CASES = {
    # augments on a DataLoader worker, BatchNorm in train mode: all its randomness must come from the
    # per-epoch seed, whatever epoch a process starts at. Workers fork, so every run is a subprocess.
    "finetune": (3, 1, ["--augment", "--num-workers", "1"], "subprocess"),
    "frozen": (4, 2, ["--freeze-backbone", "--num-workers", "0"], "in-process"),
}


@pytest.mark.parametrize("mode", [pytest.param("finetune", marks=pytest.mark.slow), "frozen"])
def test_run_killed_between_epochs_resumes_to_the_history_of_a_clean_run(mode, datasets, tmp_path):
    epochs, kill_after, extra, where = RESUME_CASES[mode]
    args = [str(a) for a in ["finetune", "--model", "resnet18", "--data", datasets[2], "--weights", "none",
                             "--image-size", SIZE, "--epochs", epochs, "--batch-size", 8, "--optimizer", "sgd",
                             "--lr", 0.02, "--quiet", *extra]]
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    popen = dict(env=ONE_THREAD, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = subprocess.Popen([sys.executable, str(driver), str(kill_after), *args,
                               "--runs-dir", str(tmp_path / "killed")], **popen)
    clean_args = [*args, "--runs-dir", str(tmp_path / "clean")]
    resume_args = [*args, "--runs-dir", str(tmp_path / "other"), "--resume"]
    procs = [killed]
    try:
        if where == "subprocess":  # runs while the driver runs
            procs.append(clean := subprocess.Popen([*FEATCACHE, *clean_args], **popen))
        else:
            result = _invoke(clean_args)
            assert result.exit_code == 0, result.output
        run_dir = _kill_after_epoch(killed, tmp_path / "killed", epoch=kill_after)
        assert killed.returncode == -signal.SIGKILL
        assert not (run_dir / runs.METRICS_FILE).exists()

        if where == "subprocess":
            resumed = subprocess.run([*FEATCACHE, *resume_args, str(run_dir)], env=ONE_THREAD, capture_output=True,
                                     text=True, timeout=300)
            assert resumed.returncode == 0, resumed.stderr
            out = resumed.stdout
            _, err = clean.communicate(timeout=300)
            assert clean.returncode == 0, err
        else:
            result = _invoke([*resume_args, run_dir])
            assert result.exit_code == 0, result.output
            out = result.stdout
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    assert f"resuming {run_dir}" in out and f"continuing after epoch {kill_after} of {epochs}" in out
    assert not (tmp_path / "other").exists()  # the resumed run finishes in its own directory
    clean_dir = _only_run_dir(tmp_path / "clean")

    a, b = [json.loads((d / runs.METRICS_FILE).read_text()) for d in (clean_dir, run_dir)]
    assert a["mode"] == b["mode"] == mode
    assert a["config"] == {**b["config"], "runs_dir": str(tmp_path / "clean")}
    assert len(a["history"]) == len(b["history"]) == epochs
    for x, y in zip(a["history"], b["history"]):
        assert (x["lr"], x["train_acc"], x["val_acc"]) == (y["lr"], y["train_acc"], y["val_acc"])
    diff = _max_loss_diff(a["history"], b["history"])
    print(f"{mode}: resumed vs clean, max |loss diff| {diff:.3g}")
    assert diff <= 1e-6
    assert len({r["train_loss"] for r in a["history"]}) == epochs  # the run moves
    for k in ("selected_epoch", "test_acc", "test_loss", "confusion_matrix", "best_val_loss", "train_loss"):
        assert a["summary"][k] == b["summary"][k], k
    # on CPU the parameters end bit-identical, not just close
    sa, sb = [torch.load(d / "last.pt", map_location="cpu", weights_only=True)["state_dict"]
              for d in (clean_dir, run_dir)]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)

    if mode == "finetune":
        _check_full_finetune_run(clean_dir, a, sa)


def _check_full_finetune_run(run_dir: Path, doc: dict, last_state: dict) -> None:
    """What a full fine-tune writes, and that it trained the backbone."""
    for name in ("best.pt", "last.pt", "metrics.json", "history.csv", "curves.png", "head.npz"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert doc["extra"]["finetune"]["augment"] is True and doc["extra"]["finetune"]["freeze_backbone"] is False
    with open(run_dir / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [r["epoch"] for r in doc["history"]]
    assert [float(r["val_loss"]) for r in rows] == [r["val_loss"] for r in doc["history"]]

    fresh = build_backbone("resnet18", weights="none", image_size=SIZE).net.state_dict()
    for k in ("conv1.weight", "layer4.1.conv2.weight", "bn1.running_mean", "layer4.1.bn2.running_var"):
        assert not torch.equal(last_state[f"backbone.{k}"], fresh[k]), k
    best = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True)
    assert best["epoch"] == doc["summary"]["selected_epoch"]
    head = runs.load_head(run_dir / "head.npz")
    np.testing.assert_array_equal(head["weight"], best["state_dict"]["head.weight"].numpy())
    np.testing.assert_array_equal(head["bias"], best["state_dict"]["head.bias"].numpy())


def test_augment_is_documented():
    # an --augment run is part of the resume test above
    result = _invoke(["finetune", "--help"])
    assert result.exit_code == 0
    assert "--augment" in result.output and "RandomResizedCrop" in result.output and "flip" in result.output


# ---------------------------------------------------------------- divergence guard


def test_divergence_guard_stops_the_run_and_keeps_the_last_good_checkpoint(datasets, tmp_path):
    # One step per epoch (batch 32 > 24 images): epoch 1 trains from the init (loss ~0.69), its one
    # step with lr 1e8 throws the head far off, and epoch 2's train loss is ~1e8: a jump.
    args = ["finetune", "--model", "resnet18", "--data", datasets[2], "--weights", "none", "--image-size", SIZE,
            "--freeze-backbone", "--epochs", 3, "--lr", "1e8", "--num-workers", 0, "--quiet",
            "--runs-dir", tmp_path / "cli"]
    result = _invoke(args)
    assert result.exit_code == 5, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "diverged" in errors[0] and "--lr" in errors[0]
    assert isinstance(result.exception, SystemExit)  # a message, not a traceback

    run_dir = _only_run_dir(tmp_path / "cli")
    doc = json.loads((run_dir / runs.METRICS_FILE).read_text())
    assert doc["diverged"] is True and doc["summary"]["diverged"] is True
    assert [r["epoch"] for r in doc["history"]] == [1, 2]  # stopped after epoch 2 of 3
    assert "epoch 2" in doc["extra"]["diverged_reason"]
    assert doc["history"][1]["train_loss"] > 1e6 * doc["history"][0]["train_loss"]
    assert doc["summary"]["selected_epoch"] == 1

    last = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 1 and len(last["history"]) == 1
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())

    result = featcache.finetune(model="resnet18", data=str(datasets[2]), weights="none", image_size=SIZE,
                                freeze_backbone=True, epochs=3, lr=1e8, num_workers=0, runs_dir=str(tmp_path / "api"))
    assert result.diverged and result.summary.diverged
    assert [r.epoch for r in result.history] == [1, 2]
    assert runs.load_run(result.run_dir).diverged


def test_a_loss_that_becomes_nan_in_the_first_epoch_stops_the_run_without_a_checkpoint(datasets, tmp_path):
    # full fine-tune, lr 1e8: the second step already sends the activations to inf/NaN
    result = _invoke(["finetune", "--model", "resnet18", "--data", datasets[2], "--weights", "none",
                      "--image-size", SIZE, "--epochs", 2, "--batch-size", 8, "--lr", "1e8", "--num-workers", 0,
                      "--quiet", "--runs-dir", tmp_path])
    assert result.exit_code == 5, result.output
    assert "stopped: loss became NaN/inf in epoch 1; no epoch finished before it, so there is no checkpoint" \
        in result.stdout
    run_dir = _only_run_dir(tmp_path)
    doc = json.loads((run_dir / runs.METRICS_FILE).read_text())
    assert doc["diverged"] is True and len(doc["history"]) == 1 and doc["history"][0]["train_loss"] is None
    assert not (run_dir / "last.pt").exists() and not (run_dir / "best.pt").exists()


# ---------------------------------------------------------------- errors a user can cause


def _error_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)  # a message, not a traceback
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ")
    return lines[0]


def test_resume_of_a_finished_or_foreign_directory_and_amp_on_cpu_exit_2(datasets, tmp_path, parity_runs):
    base = ["finetune", "--model", "resnet18", "--data", datasets[2], "--weights", "none", "--image-size", SIZE,
            "--quiet", "--runs-dir", tmp_path]
    _, finished = parity_runs("resnet18-2c-sgd")
    assert "already finished" in _error_line(_invoke([*base, "--resume", finished.run_dir]))
    (tmp_path / "foreign").mkdir()
    assert "not a featcache finetune run" in _error_line(_invoke([*base, "--resume", tmp_path / "foreign"]))
    assert "--amp" in _error_line(_invoke([*base, "--amp", "--device", "cpu"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign"]  # no run directory was started
