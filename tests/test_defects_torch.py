"""Issue 15, the torch side: a crafted run directory never runs code on --resume (checkpoints load as data,
finetune.json is validated), SIGTERM to the whole process group (Slurm) ends finetune with exit 143 and one
line, --resume honours the given --device/--num-workers, bad --seed/--image-size are usage errors, and the
predictions CSV cannot carry spreadsheet formulas.

Tiny data: the demo dataset at 32 px, resnet18 with weights "none", CPU, the frozen loop. Runs with decode
workers go to subprocesses (JAX may be loaded in this process and DataLoader workers fork).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from featcache.cli import cli
from featcache.demo import make_demo_dataset
from featcache.prediction import Prediction, Predictions

FEATCACHE = Path(sys.executable).with_name("featcache")  # the console script of this venv
MODEL = ["--model", "resnet18", "--weights", "none", "--image-size", "32"]


from cli_helpers import invoke as _invoke, one_error_line as _one_error_line  # noqa: E402


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("defects-torch")


@pytest.fixture(scope="module")
def data(work) -> Path:
    return make_demo_dataset(work / "data", n_per_class=(16, 4, 4), image_size=32)


def _args(data: Path, runs_dir: Path, *, epochs: int = 1, workers: int = 0) -> list:
    return ["finetune", *MODEL, "--data", data, "--freeze-backbone", "--epochs", epochs, "--batch-size", 4,
            "--lr", 0.05, "--num-workers", workers, "--quiet", "--runs-dir", runs_dir]


@pytest.fixture(scope="module")
def finished(work, data) -> Path:
    """A finished one-epoch run directory."""
    result = _invoke(*_args(data, work / "runs"))
    assert result.exit_code == 0, result.output
    (run_dir,) = (work / "runs").iterdir()
    return run_dir


def _stopped_copy(finished: Path, where: Path) -> Path:
    """A copy of the finished run as if it had been killed before its end (no metrics.json)."""
    run_dir = Path(shutil.copytree(finished, where))
    (run_dir / "metrics.json").unlink()
    return run_dir


class _Payload:
    """Unpickling it runs a shell command that creates `marker` (what a crafted run directory would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# --------------------------------------------------------------------------- 1: code execution on resume


def test_checkpoints_hold_only_data_and_load_with_weights_only(finished):
    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(finished / name, map_location="cpu", weights_only=True)
        assert ckpt["epoch"] == 1 and len(ckpt["history"]) == 1 and ckpt["model"] == "resnet18"
        assert ckpt["optimizer"]["state"] and all(isinstance(v, torch.Tensor) for v in ckpt["state_dict"].values())


def test_resume_of_a_crafted_checkpoint_runs_no_code(finished, data, tmp_path):
    run_dir = _stopped_copy(finished, tmp_path / "crafted")
    marker = tmp_path / "pwned"
    honest = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
    torch.save({**honest, "history": [_Payload(marker)]}, run_dir / "last.pt")
    error = _one_error_line(_invoke(*_args(data, tmp_path / "runs"), "--resume", run_dir), 2)
    assert not marker.exists()
    assert error.startswith(f"Error: {run_dir / 'last.pt'} is not a featcache checkpoint that loads as plain data (")
    assert error.endswith("); start a new run without --resume.")
    assert not (run_dir / "metrics.json").exists()
    # the payload is real: the old weights_only=False load would have run it
    torch.load(run_dir / "last.pt", map_location="cpu", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("damage", ["not a zip", "a list", "no history"])
def test_resume_of_a_damaged_checkpoint_is_one_line_naming_it(damage, finished, data, tmp_path):
    run_dir = _stopped_copy(finished, tmp_path / "damaged")
    honest = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
    if damage == "not a zip":
        (run_dir / "last.pt").write_bytes(b"garbage")
    elif damage == "a list":
        torch.save([1, 2], run_dir / "last.pt")
    else:
        torch.save({k: v for k, v in honest.items() if k != "history"}, run_dir / "last.pt")
    error = _one_error_line(_invoke(*_args(data, tmp_path / "runs"), "--resume", run_dir), 2)
    assert error.startswith(f"Error: {run_dir / 'last.pt'} is not a featcache checkpoint"), error


@pytest.mark.parametrize("damage, words", [
    (lambda doc: doc.pop("dataset_fingerprint"), "no 'dataset_fingerprint'"),
    (lambda doc: doc.update(dataset_fingerprint=None), "dataset_fingerprint is not a string"),
    (lambda doc: doc["train"].update(epochs="1"), "epochs is '1', not int"),
    (lambda doc: doc["finetune"]["data"].update(root=["x"]), "root is ['x'], not str"),
    (lambda doc: doc["finetune"].update(evil=1), "the fields of FinetuneConfig are not"),
    (lambda doc: doc.update(finetune=[]), "the fields of FinetuneConfig are not"),
    (lambda doc: doc["finetune"].pop("model"), "the fields of FinetuneConfig are not"),
])
def test_a_damaged_finetune_json_is_refused_and_never_skips_the_dataset_check(damage, words, finished, data,
                                                                              tmp_path):
    run_dir = _stopped_copy(finished, tmp_path / "run")
    doc = json.loads((run_dir / "finetune.json").read_text())
    damage(doc)
    (run_dir / "finetune.json").write_text(json.dumps(doc))
    error = _one_error_line(_invoke(*_args(data, tmp_path / "runs"), "--resume", run_dir), 2)
    assert error.startswith(f"Error: {run_dir / 'finetune.json'} is damaged or not written by featcache ("), error
    assert words in error and error.endswith("start a new run without --resume."), error


def test_a_finetune_json_of_an_older_featcache_without_a_defaulted_field_resumes(finished, data, tmp_path):
    run_dir = _stopped_copy(finished, tmp_path / "run")
    doc = json.loads((run_dir / "finetune.json").read_text())
    del doc["finetune"]["amp"]  # a field with a default, as if the run predated it
    (run_dir / "finetune.json").write_text(json.dumps(doc))
    result = _invoke(*_args(data, tmp_path / "runs"), "--resume", run_dir)
    assert result.exit_code == 0 and "continuing after epoch 1 of 1" in result.output, result.output
    assert json.loads((run_dir / "metrics.json").read_text())["extra"]["finetune"]["amp"] is False


def test_a_finetune_json_that_is_not_json_is_refused(finished, data, tmp_path):
    run_dir = _stopped_copy(finished, tmp_path / "run")
    (run_dir / "finetune.json").write_text("{not json")
    error = _one_error_line(_invoke(*_args(data, tmp_path / "runs"), "--resume", run_dir), 2)
    assert f"{run_dir / 'finetune.json'} is damaged or not written by featcache" in error


# --------------------------------------------------------------------------- 6, 7: SIGTERM to the group; resume


def _last_epoch(run_dir: Path) -> int:
    try:
        return torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)["epoch"]
    except Exception:  # not there yet, or being renamed into place
        return 0


@pytest.mark.slow
def test_sigterm_to_the_process_group_exits_143_with_one_line_then_resume_uses_the_given_workers(data, tmp_path):
    clean = _invoke(*_args(data, tmp_path / "clean", epochs=3))
    assert clean.exit_code == 0, clean.output
    runs_dir = tmp_path / "runs"
    args = [str(a) for a in _args(data, runs_dir, epochs=3, workers=1)]
    proc = subprocess.Popen([str(FEATCACHE), *args], start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (runs_dir.is_dir() and any(runs_dir.iterdir()) and _last_epoch(next(runs_dir.iterdir())) >= 1):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        time.sleep(0.3)  # into epoch 2, where the decode worker is busy
        os.killpg(proc.pid, signal.SIGTERM)  # what Slurm does: the main process and its DataLoader workers
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    (run_dir,) = runs_dir.iterdir()
    lines = err.strip().splitlines()
    assert proc.returncode == 143, (out, err)
    assert "Traceback" not in err and [line for line in lines if line.startswith("Error: ")] == lines[-1:], err
    assert lines[-1].startswith("Error: Stopped by SIGTERM in epoch "), err
    assert lines[-1].endswith(f"; continue with the same command plus --resume {run_dir}."), err
    assert not (run_dir / "metrics.json").exists()

    # the resuming command's --num-workers (0 here, in this process) is the one the run uses and records
    resumed = _invoke(*_args(data, runs_dir, epochs=3, workers=0), "--resume", run_dir)
    assert resumed.exit_code == 0 and "continuing after epoch" in resumed.output, resumed.output
    doc = json.loads((run_dir / "metrics.json").read_text())
    assert doc["extra"]["finetune"]["num_workers"] == 0
    assert json.loads((run_dir / "finetune.json").read_text())["finetune"]["num_workers"] == 1
    a = json.loads((next((tmp_path / "clean").iterdir()) / "metrics.json").read_text())
    assert [(r["train_acc"], r["val_acc"]) for r in a["history"]] == [(r["train_acc"], r["val_acc"])
                                                                      for r in doc["history"]]
    assert max(abs(x[k] - y[k]) for x, y in zip(a["history"], doc["history"]) for k in ("train_loss", "val_loss")) \
        <= 1e-6


def test_resume_uses_the_given_device_and_num_workers(finished, data, tmp_path, monkeypatch):
    import featcache.finetuning as ft

    run_dir = _stopped_copy(finished, tmp_path / "run")
    (run_dir / "last.pt").unlink()  # resume from the start: nothing to replay, the settings are what counts
    (run_dir / "best.pt").unlink()
    seen = []
    real = ft._make_loaders

    def spy(index, backbone, config, **kwargs):
        seen.append((config.device, config.num_workers))
        return real(index, backbone, dataclasses.replace(config, num_workers=0), **kwargs)  # JAX may be loaded
    monkeypatch.setattr(ft, "_make_loaders", spy)
    result = _invoke(*_args(data, tmp_path / "runs", workers=3), "--resume", run_dir)
    assert result.exit_code == 0, result.output
    assert seen == [("cpu", 3)]


# --------------------------------------------------------------------------- 6: bad --seed and --image-size


@pytest.mark.parametrize("command, base", [
    ("finetune", ["--model", "resnet18", "--data", "demo"]),
    ("extract", ["--model", "resnet18", "--data", "demo"]),
    ("head-train", ["--cache", "x.h5"]),
    ("demo", []),
    ("demo-data", ["out"]),
    ("shift", ["--cache", "x.h5"]),
    ("bench", ["--quick"]),
])
@pytest.mark.parametrize("option, value, words", [
    ("--seed", "-1", "-1 is not in the range 0<=x<=2147483647"),
    ("--split-seed", "-1", "-1 is not in the range 0<=x<=2147483647"),
    ("--image-size", "30000", "30000 is not in the range 1<=x<=4096"),
])
def test_bad_seed_and_image_size_are_usage_errors(command, base, option, value, words, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = {p.name for p in cli.commands[command].params}
    name = option.lstrip("-").replace("-", "_")
    if name not in params:
        pytest.skip(f"{command} has no {option}")
    result = _invoke(command, *base, option, value)
    assert result.exit_code == 2, result.output
    assert "Usage: " in result.output and "Traceback" not in result.output and words in result.output, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing rendered, trained or written


def test_every_seed_and_image_size_option_is_bounded():
    """No command takes a --seed, --split-seed or --image-size without a range (the test above covers them all)."""
    import click

    for name, command in cli.commands.items():
        for param in command.params:
            if param.name in ("seed", "split_seed", "image_size"):
                assert isinstance(param.type, click.IntRange), (name, param.name)
                assert param.type.min is not None and param.type.max is not None, (name, param.name)
    assert "At most 4096" in _invoke("finetune", "--help").output


# --------------------------------------------------------------------------- 7: formulas in the predictions CSV


def test_predictions_csv_escapes_cells_a_spreadsheet_would_run():
    names = ["=cmd|' /C calc'!A0", "+1", "-2", "@SUM(A1)", "\tx", "\rx", "normal"]
    rows = [Prediction(path=f"{n}.png", predicted=n, probabilities=tuple([1 / len(names)] * len(names)))
            for n in names]
    table = Predictions(class_names=names, rows=rows, failed=[("=bad.png", "=reason")],
                        logits=np.zeros((len(rows), len(names)), np.float32))
    parsed = list(csv.reader(io.StringIO(table.to_csv())))
    assert parsed[0][:2] == ["path", "predicted"] and parsed[0][2] == "prob_=cmd|' /C calc'!A0"
    assert [(r[0], r[1]) for r in parsed[1:-1]] == [(f"'{n}.png", f"'{n}") for n in names[:-1]] + [
        ("normal.png", "normal")]
    assert parsed[-1][0] == "'=bad.png" and parsed[-1][-1] == "'=reason"
    assert parsed[1][2] == f"{1 / len(names):.6f}"  # numbers stay numbers
