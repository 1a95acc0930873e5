"""What a new user meets first (issue 16, items 2, 3, 4, 6, 7): reports that tell runs apart, a report over a
runs folder, errors that do not mislead, the rough edges of the commands, and a head that says when it underfits."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featcache import environment
from synthetic import gaussian_problem, write_cache
from cli_helpers import invoke, one_error_line

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("fc")
    splits = dict(zip(("train", "val", "test"), gaussian_problem(3, n=(90, 30, 30), dim=6, seed=2)))
    return write_cache(tmp / "cache" / "synthetic" / "resnet18-none-000000000000.h5", splits, ["a", "b", "c"])


def _head(cache, runs_dir, *args):
    result = invoke("head-train", "--cache", cache, "--runs-dir", runs_dir, "--bootstrap", "0", *args)
    assert result.exit_code == 0, result.output
    return result


# --------------------------------------------------------------------------- 2, 3: report


def test_report_tells_runs_apart_and_takes_a_runs_folder_ignoring_files(cache, tmp_path):
    runs_dir = tmp_path / "runs"
    good = _head(cache, runs_dir, "--epochs", "20", "--lr", "0.1", "--run-name", "sgd good")
    assert "underfits" not in good.stderr  # a head that learns what the features allow is not warned about
    assert "warning" not in json.loads((runs_dir / "sgd good" / "metrics.json").read_text())["extra"]["reference"]
    _head(cache, runs_dir, "--epochs", "2", "--optimizer", "adam", "--lr", "1e-4", "--weight-decay", "1e-5",
          "--standardize", "--run-name", "adam", "--quiet")
    _head(cache, runs_dir, "--solver", "ridge", "--run-name", "ridge", "--quiet")
    (runs_dir / "demo-comparison.png").write_bytes(b"png")
    (runs_dir / "demo-model.pt").write_bytes(b"pt")
    for given in ([runs_dir], sorted(runs_dir.iterdir())):  # `report runs` and `report runs/*`
        result = invoke("report", *given, "--format", "csv", "--figure", "")
        assert result.exit_code == 0, result.output
        assert result.stderr.splitlines() == [
            "Ignored 2 files that are not a run directory (demo-comparison.png, demo-model.pt)."]
        rows = {r["run"]: r for r in csv.DictReader(io.StringIO(result.stdout))}
        assert sorted(rows) == ["adam", "ridge", "sgd good"]
    assert [rows["sgd good"][k] for k in ("dataset", "optimizer", "lr", "weight_decay", "standardize", "image_size")] \
        == ["synthetic", "sgd", "0.1", "0.0", "False", "32"]
    assert [rows["adam"][k] for k in ("optimizer", "lr", "weight_decay", "standardize")] == ["adam", "0.0001", "1e-05",
                                                                                             "True"]
    assert rows["ridge"]["mode"] == "head/ridge" and rows["ridge"]["optimizer"] == ""  # no optimizer to show
    table = invoke("report", runs_dir / "adam", runs_dir / "ridge", "--figure", "").stdout
    assert "1e-05" in table and "adam" in table and "synthetic" in table  # %g, never 0.0000
    doc = json.loads(invoke("report", runs_dir / "adam", "--format", "json", "--figure", "").stdout)
    assert doc[0]["config"]["optimizer"] == "adam" and doc[0]["config"]["weight_decay"] == 1e-5


# --------------------------------------------------------------------------- 4: errors that mislead


def test_a_file_that_is_no_cache_is_bad_input_not_a_corrupt_cache(cache, tmp_path):
    png = tmp_path / "cmp.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    metrics_json = tmp_path / "metrics.json"
    metrics_json.write_text("{}")
    for args, path in ((("cache", "verify", png), png),
                       (("head-train", "--cache", metrics_json, "--runs-dir", tmp_path / "r"), metrics_json)):
        line = one_error_line(invoke(*args), 2)
        assert line.startswith(f"Error: {path} is not a featcache cache file") and "delete" not in line
    missing = tmp_path / "cache" / "x" / "nothing.h5"
    for args in (("cache", "verify", missing), ("head-train", "--cache", missing)):
        line = one_error_line(invoke(*args), 2)
        assert f"{missing} does not exist" in line
    damaged = tmp_path / "damaged.h5"  # a cache file whose bytes were lost stays a bad cache (exit 3)
    damaged.write_bytes(cache.read_bytes()[:1000])
    verify = invoke("cache", "verify", damaged)
    assert verify.exit_code == 3 and "(corrupt or truncated); delete it" in verify.stderr


def test_ctrl_c_during_extract_says_what_is_kept_and_exits_130(monkeypatch, tmp_path):
    import featcache.extraction

    def interrupted(*_, **__):
        raise KeyboardInterrupt

    monkeypatch.setattr(featcache.extraction, "extract", interrupted)
    result = invoke("extract", "--model", "resnet18", "--data", tmp_path, "--weights", "none")
    assert result.exit_code == 130 and "Aborted" not in result.output
    assert result.stderr.splitlines() == [
        "Interrupted: the features extracted so far are kept (a .partial file beside the cache); run the same "
        "command again to resume where it stopped."]


def _folder(root: Path, classes, per_split: int = 2, size: int = 16) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_split):
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


def test_a_dataset_of_one_class_is_refused_up_front(tmp_path):
    data = _folder(tmp_path / "one", ["cats"])
    manifest = tmp_path / "one.csv"
    manifest.write_text("path,label\n" + "".join(f"one/train/cats/{i}.png,cats\n" for i in range(2)))
    for args in (("extract", "--model", "resnet18", "--data", data, "--weights", "none"),
                 ("finetune", "--model", "resnet18", "--data", data, "--weights", "none", "--epochs", "1"),
                 ("extract", "--model", "resnet18", "--data", manifest, "--weights", "none")):
        line = one_error_line(invoke(*args, "--cache-dir", tmp_path / "cache"), 2)
        assert "has only the class 'cats'; a classifier needs two or more classes" in line
    assert not (tmp_path / "cache").exists()  # refused before anything was written


# --------------------------------------------------------------------------- 6: rough edges


def test_finetune_help_keeps_its_line_continuation_and_cache_ls_shows_the_image_size(cache):
    lines = invoke("finetune", "--help").output.splitlines()
    i = next(i for i, line in enumerate(lines) if line.rstrip().endswith("\\"))
    assert "--epochs 5 \\" in lines[i] and lines[i + 1].strip().startswith("--resume runs/")
    listed = invoke("cache", "ls", "--cache-dir", cache.parent.parent, env={"COLUMNS": "80"})
    assert listed.exit_code == 0, listed.output
    assert cache.name in listed.output and "32 px" in listed.output  # the whole file name, at 80 columns


def test_cache_folder_is_not_tracked_but_ignored():
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files", "cache"], cwd=ROOT, capture_output=True, text=True).stdout
    ignored = subprocess.run(["git", "check-ignore", "-q", "cache/x.h5"], cwd=ROOT).returncode
    assert tracked == "" and ignored == 0


@pytest.mark.slow
def test_workers_start_from_a_fork_server_once_jax_is_loaded(tmp_path):
    assert environment.worker_context(0) is None
    assert environment.worker_context(2) == ("forkserver" if "jax" in sys.modules else None)
    data = _folder(tmp_path / "tiny", ["a", "b"], per_split=2)
    script = tmp_path / "session.py"
    script.write_text(
        "import featcache, jax.numpy\n"  # JAX loaded first, as after featcache.train_head
        "if __name__ == '__main__':\n"
        f"    featcache.extract(model='resnet18', data={str(data)!r}, weights='none', image_size=16, num_workers=1,\n"
        f"                      batch_size=4, cache_dir={str(tmp_path / 'new cache')!r})\n")
    env = {**os.environ, "PYTHONWARNINGS": "default"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "os.fork()" not in done.stderr
    assert list((tmp_path / "new cache").glob("*/*.h5"))  # the code makes the cache folder it needs


# --------------------------------------------------------------------------- 7: a head that underfits says so


def test_an_underfit_head_points_to_lr_and_a_sweep_on_the_edge_says_so(cache, tmp_path):
    runs_dir = tmp_path / "my runs"  # a space: printed paths are quoted so that they paste into a shell
    slow = _head(cache, runs_dir, "--epochs", "2", "--lr", "1e-5", "--run-name", "slow one")
    doc = json.loads((runs_dir / "slow one" / "metrics.json").read_text())
    reference = doc["extra"]["reference"]
    assert reference["train_acc"] - doc["summary"]["train_acc"] > 0.05  # ridge on the same cache does better
    assert "Warning: the head's train acc" in slow.stderr and "--lr" in slow.stderr
    assert "Loaded" in slow.stderr and f"Run written to '{runs_dir / 'slow one'}'" in slow.stderr
    quiet = _head(cache, runs_dir, "--epochs", "2", "--lr", "1e-5", "--run-name", "slow quiet", "--quiet")
    assert quiet.stderr == ""  # --quiet: no progress lines ...
    assert "Warning: the head's train acc" in quiet.stdout  # ... but the warning still shows
    assert f"run: '{runs_dir / 'slow quiet'}'" in quiet.stdout
    grid = _head(cache, runs_dir, "--epochs", "2", "--lr", "1e-6,1e-5", "--weight-decay", "0", "--run-name", "grid")
    assert "Note: The selected lr 1e-0" in grid.stderr and "of the grid (1e-06 ... 1e-05); widen --lr past it." \
        in grid.stderr  # a grid of two values always picks an edge
    knn = _head(cache, runs_dir, "--solver", "knn", "--k", "1,2", "--run-name", "knn")
    note = json.loads((runs_dir / "knn" / "metrics.json").read_text())["extra"]["knn"].get("note")
    assert note is not None and note in knn.stderr and "widen --k" in note
