"""head-train's probes end to end on a real dataset: scikit-learn's bundled handwritten digits (no network)
written as a PNG image folder, extracted with a random-init resnet18, then sgd, lbfgs, knn and few-shot runs
from the CLI and the API, side by side in `featcache report`, export where a linear head results."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import featcache
from featcache import runs
from featcache.cache import load_features, load_paths
from featcache.cli import cli

SIZE = 32
CLASSES = (0, 1, 7)  # three digits
N_PER_CLASS = {"train": 24, "val": 8, "test": 8}  # 40 images of each digit


def _invoke(args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _assert_one_line_error(result, *needles: str) -> None:
    """Exit 2 and one error line, the last (progress lines on stderr may come before it), no traceback."""
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("Error: ") and "Traceback" not in result.output, result.output
    assert sum(line.startswith("Error") for line in lines) == 1, result.output
    for needle in needles:
        assert needle in lines[-1], (needle, result.output)


def _run_dirs(runs_dir: Path) -> set[Path]:
    return {p for p in runs_dir.iterdir() if (p / runs.METRICS_FILE).is_file()}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("probes")


@pytest.fixture(scope="module")
def digits(work) -> Path:
    """The digits 0, 1 and 7 as 32 px RGB PNGs (the 8x8 images upscaled) under ROOT/{train,val,test}/<digit>/."""
    from PIL import Image
    from sklearn.datasets import load_digits

    data = load_digits()
    root = work / "digits"
    for digit in CLASSES:
        images = data.images[data.target == digit]
        start = 0
        for split, n in N_PER_CLASS.items():
            folder = root / split / f"digit{digit}"
            folder.mkdir(parents=True)
            for i, image in enumerate(images[start:start + n]):
                gray = Image.fromarray(np.round(image * 255 / 16).astype(np.uint8), mode="L")
                gray.resize((SIZE, SIZE), Image.NEAREST).convert("RGB").save(folder / f"{start + i:03d}.png")
            start += n
    return root


@pytest.fixture(scope="module")
def cache(work, digits) -> Path:
    result = _invoke(["extract", "--model", "resnet18", "--weights", "none", "--image-size", SIZE, "--data", digits,
                      "--cache-dir", work / "cache", "--num-workers", 0])
    assert result.exit_code == 0, result.output
    (path,) = (work / "cache").rglob("*.h5")
    return path


@pytest.fixture(scope="module")
def cli_runs(work, cache) -> dict:
    """{name: run directory} of the CLI runs: sgd, lbfgs (default grid), knn, 3-shot lbfgs."""
    runs_dir = work / "runs"
    out = {}
    for name, args in [("sgd", ["--epochs", 5, "--optimizer", "adam", "--lr", 0.01, "--standardize"]),
                       ("lbfgs", ["--solver", "lbfgs", "--standardize"]),
                       ("knn", ["--solver", "knn", "--k", "1,5,20"]),
                       ("shot", ["--solver", "lbfgs", "--C", "0.1,1,10", "--shots", 3, "--draws", 4])]:
        result = _invoke(["head-train", "--cache", cache, "--runs-dir", runs_dir, "--run-name", name, *args])
        assert result.exit_code == 0, (name, result.output)
        out[name] = runs_dir / name
    return out


def test_every_probe_runs_from_the_cli_and_report_shows_them_side_by_side(work, cache, cli_runs):
    api_runs = featcache.train_head(cache=cache, solver="knn", ks=[1, 3], shots=[2, 5], draws=3, seed=1,
                                    runs_dir=str(work / "runs"), run_name="api-shot")
    assert [r.extra["solver"] for r in api_runs] == ["2-shot-knn", "5-shot-knn"]
    result = _invoke(["report", *cli_runs.values(), *(r.run_dir for r in api_runs), "--format", "json",
                      "--figure", work / "comparison.png"])
    assert result.exit_code == 0, result.output
    assert (work / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows, _ = json.JSONDecoder().raw_decode(result.output)
    knn_k = runs.load_run(cli_runs["knn"]).extra["knn"]["selected_k"]
    assert [r["mode"] for r in rows] == ["head", "head/lbfgs", f"head/knn-k{knn_k}", "head/3-shot-lbfgs",
                                         "head/2-shot-knn", "head/5-shot-knn"]
    for row in rows:  # a real dataset: every probe well above chance (1/3)
        assert row["test_acc"] > 0.6, row
    markdown = _invoke(["report", *cli_runs.values(), *(r.run_dir for r in api_runs), "--format", "markdown",
                        "--figure", ""])  # the same figure was drawn above
    assert markdown.exit_code == 0, markdown.output
    shot = runs.load_run(cli_runs["shot"]).extra["fewshot"]
    interval = f"{shot['test_acc']['mean']:.4f} ± {shot['test_acc']['half_width']:.4f}"
    assert "| resnet18 | head/3-shot-lbfgs | 3 shots | 4 | " in markdown.output and interval in markdown.output


def test_lbfgs_run_is_the_selected_c_head_and_exports(work, cache, cli_runs):
    run = runs.load_run(cli_runs["lbfgs"])
    grid = run.extra["lbfgs"]
    assert len(grid["cs"]) == 32 and grid["cs"][0] == pytest.approx(1e-6) and grid["cs"][-1] == pytest.approx(1e6)
    i = grid["selected"]
    assert grid["selected_c"] == grid["cs"][i] and run.summary.best_val_acc == pytest.approx(grid["val_acc"][i])
    assert max(grid["val_acc"]) == grid["val_acc"][i]
    assert (grid.get("note") is not None) == (i in (0, 31))
    assert (run.run_dir / runs.CURVES_FILE).is_file()
    head = runs.load_head(run.run_dir / runs.HEAD_FILE)
    x, y, _ = load_features(cache, "test")
    logits = ((x - head["mean"]) / head["std"]) @ head["weight"].T + head["bias"]  # (N, 3)
    assert run.summary.test_acc == pytest.approx(np.mean(logits.argmax(axis=1) == y))
    exported = _invoke(["export", run.run_dir, "--out", work / "lbfgs.pt"])
    assert exported.exit_code == 0, exported.output
    assert (work / "lbfgs.pt").is_file()


def test_knn_run_has_no_head_and_export_refuses_it(work, cli_runs):
    run = runs.load_run(cli_runs["knn"])
    record = run.extra["knn"]
    assert record["ks"] == [1, 5, 20] and record["temperature"] == pytest.approx(0.07)
    assert run.summary.test_acc == pytest.approx(record["test_acc"][record["ks"].index(record["selected_k"])])
    assert not (run.run_dir / runs.HEAD_FILE).exists() and record["streamed"] is False
    _assert_one_line_error(_invoke(["export", run.run_dir, "--out", work / "knn.pt"]), "no linear head to export")
    assert not (work / "knn.pt").exists()


def test_fewshot_draws_come_from_train_and_are_recorded_by_path(cache, cli_runs):
    run = runs.load_run(cli_runs["shot"])
    record = run.extra["fewshot"]
    train = load_paths(cache, "train")
    assert record["shots"] == 3 and record["draws"] == 4 and len(record["train_paths"]) == 4
    for draw in record["train_paths"]:
        assert len(set(draw)) == 9 and set(draw) <= set(train)
        assert sorted(Path(p).parent.name for p in draw) == ["digit0"] * 3 + ["digit1"] * 3 + ["digit7"] * 3
    assert not (run.run_dir / runs.HEAD_FILE).exists()
    per_draw = record["test_acc_per_draw"]
    assert record["test_acc"]["mean"] == pytest.approx(np.mean(per_draw))
    assert run.summary.test_acc == pytest.approx(np.mean(per_draw))  # pooled draws = mean over draws
    assert np.asarray(run.summary.confusion_matrix).sum() == 4 * 3 * N_PER_CLASS["test"]


def test_knn_streams_its_train_rows_from_the_file(work, cache, cli_runs, monkeypatch):
    from featcache import head_runs
    from featcache.cache import FeatureReader

    reads = []
    original = FeatureReader.read

    def counting_read(self, split, start, stop):
        reads.append((split, start, stop))
        return original(self, split, start, stop)

    monkeypatch.setattr(FeatureReader, "read", counting_read)
    monkeypatch.setattr(head_runs, "_knn_block_rows", lambda memory_mib, dim: 20)
    monkeypatch.setattr("featcache.environment.memory_available", lambda: 1024)  # auto: the cache does not fit
    streamed = featcache.train_head(cache=cache, solver="knn", ks=[1, 5, 20], runs_dir=str(work / "runs"),
                                    run_name="knn-streamed")
    assert reads == [("train", s, min(s + 20, 72)) for s in range(0, 72, 20)]
    loaded = runs.load_run(cli_runs["knn"])
    assert streamed.extra["knn"]["streamed"] is True and streamed.extra["solver"] == loaded.extra["solver"]
    assert streamed.extra["knn"]["val_acc"] == loaded.extra["knn"]["val_acc"]
    assert streamed.extra["knn"]["test_acc"] == loaded.extra["knn"]["test_acc"]
    assert streamed.summary.confusion_matrix == loaded.summary.confusion_matrix


@pytest.mark.parametrize("args, needles", [
    (["--solver", "lbfgs", "--shots", 25], ["25 shots per class", "'digit0'", "24 rows"]),
    (["--solver", "knn", "--k", "5,100"], ["k = 100", "72 train rows"]),
    (["--solver", "lbfgs", "--C", "1,0"], ["positive finite", "got 0"]),
    (["--C", "1"], ["--C sets the C grid of --solver lbfgs"]),
    (["--solver", "ridge", "--shots", 5], ["--shots draws few-shot train sets for --solver lbfgs or knn"]),
    (["--solver", "lbfgs", "--stream"], ["--stream trains one head with --solver sgd"]),
    (["--solver", "knn", "--temperature", 0], ["temperature must be a positive number"]),
    (["--solver", "lbfgs", "--seeds", 3], ["--solver lbfgs is deterministic and searches --C"]),
    (["--draws", 3], ["--draws sets how many few-shot draws"]),
])
def test_bad_probe_options_are_one_sentence_errors(work, cache, args, needles):
    before = _run_dirs(work / "runs") if (work / "runs").exists() else set()
    result = _invoke(["head-train", "--cache", cache, "--runs-dir", work / "runs", *args])
    _assert_one_line_error(result, *needles)
    assert (_run_dirs(work / "runs") if (work / "runs").exists() else set()) == before
