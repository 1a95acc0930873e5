"""The fixed cost of a head-train process: compiled programs kept between processes, figures drawn in a child
started first (and written before metrics.json), no Flax or matplotlib in the fitting process, and the compile
and train seconds named apart in the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from featcache import runs
from featcache.errors import UserError
from featcache.figure_worker import FigureWorker
from featcache.head_runs import compilation_cache_dir
from featcache.plots import plot_curves
from featcache.metrics import EpochRecord
from tests.synthetic import gaussian_problem, write_cache

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def cache_file(tmp_path_factory) -> Path:
    splits = dict(zip(("train", "val", "test"), gaussian_problem(2, n=(60, 20, 20), dim=16)))
    return write_cache(tmp_path_factory.mktemp("fixed") / "cache" / "toy" / "resnet18-none-0123456789ab.h5", splits,
                       ["a", "b"])


def _head_train(cache: Path, runs_dir: Path, name: str) -> tuple[dict, set]:
    """One `featcache head-train` process; (its metrics.json, the modules loaded in it at the end)."""
    code = ("import sys; from featcache.cli import main; sys.argv = ['featcache', 'head-train', '--cache', "
            f"{str(cache)!r}, '--epochs', '3', '--runs-dir', {str(runs_dir)!r}, '--run-name', {name!r}]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print('MODULES', ' '.join(sorted(m for m in sys.modules if '.' not in m)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr
    modules = set(next(ln for ln in out.stdout.splitlines() if ln.startswith("MODULES")).split()[1:])
    return json.loads((runs_dir / name / runs.METRICS_FILE).read_text()), modules


def test_second_process_loads_its_program_and_the_figures_come_from_a_child(cache_file, tmp_path):
    programs = compilation_cache_dir(cache_file)
    first, modules = _head_train(cache_file, tmp_path, "one")
    kept = sorted(p.name for p in programs.iterdir())
    assert kept, "no compiled program was kept"
    second, _ = _head_train(cache_file, tmp_path, "two")
    assert sorted(p.name for p in programs.iterdir()) == kept  # same shapes: found, nothing compiled anew
    drop = lambda history: [{k: v for k, v in r.items() if k != "seconds"} for r in history]  # noqa: E731
    assert drop(first["history"]) == drop(second["history"])  # a loaded program computes what a compiled one does
    assert "jax" in modules and not {"flax", "matplotlib", "torch"} & modules  # figures: drawn by the child
    for name in ("curves.png", "roc.png", "calibration.png"):  # written before metrics.json
        assert (tmp_path / "one" / name).read_bytes()[:8] == PNG_MAGIC, name


def test_compile_and_train_seconds_are_named_in_the_summary(cache_file, tmp_path):
    doc, _ = _head_train(cache_file, tmp_path, "run")
    s, t = doc["summary"], doc["timings"]
    assert (s["compile_seconds"], s["train_seconds"]) == (t["compile_s"], t["train_s"])
    assert s["training_time"] == pytest.approx(s["compile_seconds"] + s["train_seconds"])  # old readers: the sum
    assert t["first_batch_at"] <= t["last_batch_at"]
    assert runs.load_run(tmp_path / "run").summary.training_time == s["training_time"]
    s["train_seconds"] = "fast"
    (tmp_path / "run" / runs.METRICS_FILE).write_text(json.dumps(doc))
    with pytest.raises(UserError, match="train_seconds is not a number"):
        runs.load_run(tmp_path / "run")


def _history(n: int = 3) -> list[EpochRecord]:
    return [EpochRecord(epoch=e, lr=1e-3, train_loss=1.0 / e, train_acc=0.5, val_loss=1.0 / e, val_acc=0.5, seconds=0.1)
            for e in range(1, n + 1)]


def test_worker_draws_in_the_child_what_pickles_and_here_what_does_not(tmp_path):
    with FigureWorker.start() as worker:
        worker.call(plot_curves, _history(), tmp_path / "child.png", "t")
        worker.call(lambda path: plot_curves(_history(), path, "t"), tmp_path / "here.png")  # a lambda: here
        assert worker.drawn_here == 1
        worker.wait()
    assert (tmp_path / "child.png").read_bytes()[:8] == (tmp_path / "here.png").read_bytes()[:8] == PNG_MAGIC


def test_a_figure_that_fails_in_the_child_fails_the_run_at_wait_with_the_childs_exception(tmp_path):
    with FigureWorker.start() as worker:
        worker.call(plot_curves, _history(), tmp_path / "missing-folder" / "x.png", "t")
        with pytest.raises(FileNotFoundError, match="missing-folder"):  # raised as if drawn here (exit codes hold)
            worker.wait()
    assert not (tmp_path / "missing-folder").exists()


def test_a_child_that_dies_without_an_exception_is_a_runtime_error(tmp_path):
    with FigureWorker.start() as worker:
        worker.call(os._exit, 3)
        with pytest.raises(RuntimeError, match="drawing the run's figures failed: 3"):
            worker.wait()


def test_worker_without_a_child_draws_everything_here(tmp_path):
    worker = FigureWorker.here()
    worker.call(plot_curves, _history(), tmp_path / "a.png", "t")
    worker.wait()
    assert worker.drawn_here == 1 and (tmp_path / "a.png").is_file()
