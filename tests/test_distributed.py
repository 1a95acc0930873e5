"""Several processes under torchrun (gloo on the CPU, 2 processes): they give the results of one.

* extraction with 2 ranks writes the one-process cache (same key, path, row order, equal features);
* a rank killed mid-extraction: the re-run redoes only its unfinished shard, and the cache is the same;
* DDP fine-tuning with the frozen backbone reports the one-process metrics, also after torchrun
  restarted the group from last.pt (--max-restarts): one group run checks both;
* the pieces without processes: the shard grid, the merge (with an unreadable image), the loss
  scale that makes DDP's gradient average the global batch's gradient, --nproc's checks and forwarding.

Tiny data: the demo dataset (12, 6, 6) per class at 32 px, one train and one val image removed so
that the last batch and the val split split unevenly over 2 ranks; resnet18, weights "none".
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import featcache
from featcache import cache, distributed, runs
from featcache.cli import cli
from featcache.demo import make_demo_dataset

FEATCACHE = [sys.executable, "-m", "featcache"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",  # one thread: bit-identical features
       "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}  # what `--nproc` sets for torchrun; see distributed.launch
EXTRACT_ARGS = ["--model", "resnet18", "--weights", "none", "--image-size", "32", "--batch-size", "4",
                "--num-workers", "0", "--quiet"]
FINETUNE = dict(model="resnet18", weights="none", image_size=32, freeze_backbone=True, epochs=3, batch_size=8,
                optimizer="sgd", lr=0.05, num_workers=0)
FINETUNE_ARGS = ["--model", "resnet18", "--weights", "none", "--image-size", "32", "--freeze-backbone",
                 "--epochs", "3", "--batch-size", "8", "--optimizer", "sgd", "--lr", "0.05", "--num-workers", "0",
                 "--quiet"]
LOSS_TOL = 1e-4  # the bound; in practice ~1e-7 (sums in another order)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("distributed")


@pytest.fixture(scope="module")
def data(work) -> Path:
    """23 train, 11 val, 12 test images, the first test image unreadable: with batch 4 the shards get
    short batches and one skipped row; with batch 8 the last training batch (7 rows) splits 4 + 3,
    val 6 + 5 and the 11 readable test images 6 + 5."""
    root = make_demo_dataset(work / "d", n_per_class=(12, 6, 6), image_size=32)
    for split in ("train", "val"):
        sorted((root / split).rglob("*.png"))[0].unlink()
    sorted((root / "test").rglob("*.png"))[0].write_bytes(b"not a PNG")
    return root


@pytest.fixture(scope="module")
def one_process_cache(data, work) -> Path:
    return featcache.extract(model="resnet18", data=str(data), weights="none", image_size=32, batch_size=4,
                             num_workers=0, cache_dir=str(work / "one-cache"))


@pytest.fixture(scope="module")
def one_process_run(data, work) -> dict:
    result = featcache.finetune(data=str(data), runs_dir=str(work / "one-run"), **FINETUNE)
    return json.loads((result.run_dir / runs.METRICS_FILE).read_text())


def _read(path: Path) -> dict:
    """{split: (features, labels, paths, done)} and the attributes, with plain h5py."""
    with h5py.File(path, "r") as f:
        splits = {s: tuple(f[s][k][...] for k in ("features", "labels", "paths", "done")) for s in f}
        attrs = {k: v for k, v in f.attrs.items() if k not in ("created", "extraction")}  # the run, not the cache
    return {"splits": splits, "attrs": attrs}


def _assert_same_cache(got: Path, want: Path, *, verify: bool = True) -> None:
    a, b = _read(got), _read(want)
    assert list(a["splits"]) == list(b["splits"]) == ["train", "val", "test"]
    for split in a["splits"]:
        for x, y in zip(a["splits"][split], b["splits"][split]):
            assert np.array_equal(x, y), split  # bit-identical features; same labels, paths, order
    assert a["attrs"].keys() == b["attrs"].keys()
    for k in a["attrs"]:
        assert np.array_equal(a["attrs"][k], b["attrs"][k]), k
    if verify:
        assert cache.verify_cache(got) == []
        assert cache.failures_path(got).read_text() == cache.failures_path(want).read_text()  # the skipped images


def _run(args: list, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], env=ENV, capture_output=True, text=True, timeout=300, **kwargs)


# --------------------------------------------------------------------------- extraction


def test_two_processes_extract_the_one_process_cache(data, one_process_cache, tmp_path):
    cache_dir = tmp_path / "cache"
    done = _run([*FEATCACHE, "extract", *EXTRACT_ARGS, "--data", data, "--cache-dir", cache_dir, "--nproc", 2])
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    path = cache_dir / data.name / one_process_cache.name  # same key, so the same file name
    # 12 batches of 4 (the last of train and of val short), round-robin: 23 rows each; the unreadable
    # test image (test row 0, batch 9) is rank 1's
    assert "[rank 0/2] resnet18: 23 images in " in done.stdout, done.stdout
    assert "[rank 1/2] resnet18: 22 images in " in done.stdout, done.stdout
    assert f"[rank 0/2] merged 2 shards into {path.name} in " in done.stdout
    failures = cache.failures_path(path)
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, path.name + ".lock", failures.name])
    _assert_same_cache(path, one_process_cache)
    run = cache.read_meta(path)["extraction"]  # the group's run: every rank's images, from the first start to merged
    assert (run["images"], run["processes"], run["batch_size"], run["num_workers"]) == (23 + 22, 2, 4, 0)
    assert run["seconds"] > 0 and run["images_per_s"] == pytest.approx(45 / run["seconds"])

    again = _run([*FEATCACHE, "extract", *EXTRACT_ARGS, "--data", data, "--cache-dir", cache_dir, "--nproc", 2])
    assert again.returncode == 0 and again.stdout.startswith(f"cache hit: {path}\n")  # found before torchrun


KILL_DRIVER = """\
import os, pathlib, sys, time
from featcache import cache

PID_FILE = pathlib.Path(sys.argv[1])
write = cache.ShardWriter.write
writes = 0


def stalling_write(self, *args, **kwargs):  # rank 1 stops after two batches; the test SIGKILLs it
    global writes
    write(self, *args, **kwargs)
    writes += 1
    if os.environ["RANK"] == "1" and writes == 2:
        PID_FILE.write_text(str(os.getpid()))
        time.sleep(600)


cache.ShardWriter.write = stalling_write
sys.argv = ["featcache", *sys.argv[2:]]
from featcache.cli import main
main()
"""


def _done_rows(path: Path) -> int:
    with h5py.File(path, "r", locking=False) as f:
        return sum(int(f[s]["done"][...].sum()) for s in f)


@pytest.mark.slow
def test_a_rank_killed_mid_extraction_leaves_only_its_shard_to_redo(data, one_process_cache, tmp_path):
    cache_dir = tmp_path / "cache"
    final = cache_dir / data.name / one_process_cache.name
    shard0, shard1 = (cache.shard_path(final, rank=r, world_size=2, batch_size=4) for r in (0, 1))
    driver, pid_file = tmp_path / "driver.py", tmp_path / "rank1.pid"
    driver.write_text(KILL_DRIVER)
    proc = subprocess.Popen([str(a) for a in [*TORCHRUN, driver, pid_file, "extract", *EXTRACT_ARGS, "--data", data,
                                              "--cache-dir", cache_dir]],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (pid_file.is_file() and pid_file.read_text() and shard0.is_file()):  # rank 0 done, rank 1 stalled
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "the ranks never got there"
            time.sleep(0.05)
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
        out = proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode != 0, out[-3000:]  # torchrun stopped the group
    assert not final.exists()
    assert _done_rows(shard0) == 23 and _done_rows(cache.partial_path(shard1)) == 8

    rerun = _run([*FEATCACHE, "extract", *EXTRACT_ARGS, "--data", data, "--cache-dir", cache_dir, "--nproc", 2])
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr[-3000:]
    assert f"[rank 0/2] resuming {shard0.name}: 23 rows already written" in rerun.stdout
    assert "[rank 0/2] resnet18: 0 images in " in rerun.stdout  # its shard was complete: nothing redone
    assert f"[rank 1/2] resuming {cache.partial_path(shard1).name}: 8 rows already written" in rerun.stdout
    assert "[rank 1/2] resnet18: 14 images in " in rerun.stdout  # only the rows it had not committed (15, 1 unreadable)
    assert not cache.shard_files(final)
    _assert_same_cache(final, one_process_cache)


# --------------------------------------------------------------------------- fine-tuning (DDP)


def _only_run_dir(runs_dir: Path) -> Path:
    (run_dir,) = [p for p in runs_dir.iterdir() if p.is_dir()]
    return run_dir


def _assert_same_report(got: dict, want: dict) -> None:
    """The one-process report: same accuracies, selected epoch and confusion matrix; losses within LOSS_TOL."""
    assert len(got["history"]) == len(want["history"]) == FINETUNE["epochs"]
    for g, w in zip(got["history"], want["history"]):
        assert (g["lr"], g["train_acc"], g["val_acc"]) == (w["lr"], w["train_acc"], w["val_acc"])
    diff = max(abs(g[k] - w[k]) for g, w in zip(got["history"], want["history"]) for k in ("train_loss", "val_loss"))
    print(f"DDP vs one process: max |loss diff| {diff:.3g}")
    assert diff <= LOSS_TOL
    for k in ("selected_epoch", "train_acc", "best_val_acc", "test_acc", "confusion_matrix"):
        assert got["summary"][k] == want["summary"][k], k
    for k in ("train_loss", "best_val_loss", "test_loss"):
        assert abs(got["summary"][k] - want["summary"][k]) <= LOSS_TOL, k
    assert len({h["val_acc"] for h in want["history"]}) > 1  # the head moves: not agreement of a constant model


# Loaded by every process of the run through PYTHONPATH (the workers start as `python -m featcache`, so no
# driver script can wrap them): on the first attempt, rank 1 dies in the last epoch once last.pt is written.
RESTART_SITE = """\
import os

if os.environ.get("RANK") == "1" and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
    import time
    import torch
    from featcache import finetuning as ft

    train_epoch = ft._Loop._train_epoch

    def dying_train_epoch(self, epoch, bar):
        if epoch == self.plan.epochs - 1:
            while True:
                try:
                    if torch.load(self.run_dir / ft.LAST_CKPT, weights_only=False)["epoch"] == epoch:
                        os._exit(17)
                except (OSError, RuntimeError, EOFError):
                    pass
                time.sleep(0.05)
        return train_epoch(self, epoch, bar)

    ft._Loop._train_epoch = dying_train_epoch
"""


def test_ddp_frozen_finetune_reports_the_one_process_metrics_also_after_a_torchrun_restart(data, one_process_run,
                                                                                            tmp_path):
    # One group run checks both: `finetune --nproc 2` (DDP) reports what one process reports, and when a rank
    # dies, torchrun (--max-restarts) restarts the group, which resumes from last.pt to the same numbers.
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(RESTART_SITE)
    env = {**ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), ENV.get("PYTHONPATH")]))}
    done = subprocess.run([str(a) for a in [*FEATCACHE, "finetune", *FINETUNE_ARGS, "--data", data,
                                            "--runs-dir", tmp_path / "runs", "--nproc", 2, "--max-restarts", 1]],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert done.stdout.count("epoch   1/3") == 1  # rank 0 reports, once (the restart does not redo epoch 1)
    run_dir = _only_run_dir(tmp_path / "runs")  # only rank 0 wrote a run directory; the restarted group went on in it
    assert f"resuming {run_dir} (torchrun restarted the processes)" in done.stdout
    assert "continuing after epoch 2 of 3" in done.stdout
    for name in ("metrics.json", "history.csv", "head.npz", "best.pt", "last.pt", "finetune.json"):
        assert (run_dir / name).is_file(), name
    _assert_same_report(json.loads((run_dir / runs.METRICS_FILE).read_text()), one_process_run)


# --------------------------------------------------------------------------- the pieces, in one process


def test_shards_cover_the_one_process_grid_round_robin():
    sizes = {"train": 23, "val": 11, "test": 12}
    grid = [(s, a, min(a + 4, n)) for s, n in sizes.items() for a in range(0, n, 4)]
    shards = [cache.shard_batches(sizes, 4, rank=r, world_size=3) for r in range(3)]
    for r, shard in enumerate(shards):
        assert [(s, a, b) for s in sizes for a, b in shard[s]] == grid[r::3]
    assert sorted((s, a, b) for shard in shards for s in sizes for a, b in shard[s]) == sorted(grid)


def test_merged_shards_equal_the_one_process_file_with_an_unreadable_image(tmp_path):
    d = 3
    splits = {s: cache.SplitRows(labels=np.arange(n) % 2, paths=[f"{s}/{i}.png" for i in range(n)])
              for s, n in {"train": 10, "val": 5, "test": 3}.items()}
    meta = {"key": "k" * 64, "model": "m", "class_names": ["a", "b"]}
    failed = {("train", 6), ("val", 4)}  # unreadable: no features, listed as skipped

    def fill(writer, split, start, stop):
        bad = [r for r in range(start, stop) if (split, r) in failed]
        good = [r for r in range(start, stop) if (split, r) not in failed]
        writer.write(split, start, np.array([[r, r + 0.5, -r] for r in good], np.float32).reshape(-1, d), failed=bad)

    skipped = [(s, f"{s}/{r}.png", "truncated") for s, r in sorted(failed, key=lambda x: ("train", "val").index(x[0]))]
    one = cache.CacheWriter(tmp_path / "one.h5", meta=meta, feature_dim=d, dtype="float32", splits=splits)
    for s, rows in splits.items():
        for a, b in one.pending(s, 4):
            fill(one, s, a, b)
    one.finish(skipped=skipped)

    final = tmp_path / "two.h5"
    shards = []
    for r in range(2):
        w = cache.ShardWriter(final, rank=r, world_size=2, batch_size=4, meta=meta, feature_dim=d,
                              dtype="float32", splits=splits)
        for s in splits:
            for a, b in w.pending(s, 4):
                fill(w, s, a, b)
        own = [(s, p, why) for s, p, why in skipped if int(Path(p).stem) in w.failed_rows(s)]
        shards.append(w.finish(skipped=own))
    assert cache.shards_skipped(shards, splits) == skipped
    cache.merge_shards(final, shards=shards, meta=meta, feature_dim=d, dtype="float32", splits=splits,
                       skipped=skipped)
    _assert_same_cache(final, tmp_path / "one.h5", verify=False)  # (the attributes of a real cache are missing)
    assert cache.read_meta(final)["skipped"] == [list(x) for x in skipped]
    assert not cache.shard_files(final)


@pytest.mark.parametrize("num_outputs", [1, 3])  # BCE on one logit; softmax cross-entropy
@pytest.mark.parametrize("world_size", [2, 3])
def test_loss_scale_makes_the_ddp_average_the_global_batch_gradient(num_outputs, world_size):
    torch.manual_seed(0)
    x, w = torch.randn(7, 5, dtype=torch.float64), torch.randn(num_outputs, 5, dtype=torch.float64)
    y = torch.randint(0, max(num_outputs, 2), (7,))

    def loss_of(rows):
        logits = x[rows] @ w.T
        if num_outputs == 1:
            return torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], y[rows].double())
        return torch.nn.functional.cross_entropy(logits, y[rows])

    w.requires_grad_(True)
    (want,) = torch.autograd.grad(loss_of(np.arange(7)), w)
    grads = []
    for r in range(world_size):  # 7 rows over 2 or 3 ranks: 4+3, 3+2+2
        rows = np.arange(7)[distributed._part(7, r, world_size)]
        scale = distributed.loss_scale(rows=len(rows), global_rows=7, world_size=world_size)
        grads.append(torch.autograd.grad(loss_of(rows) * scale, w)[0])
    assert torch.allclose(sum(grads) / world_size, want, rtol=0, atol=1e-12)  # what DDP's average gives


def test_parts_are_numpy_array_split():
    for n in range(0, 12):
        for world_size in (1, 2, 3, 5):
            parts = np.array_split(np.arange(n), world_size)
            assert all(np.array_equal(np.arange(n)[distributed._part(n, r, world_size)], parts[r])
                       for r in range(world_size))


def _no_launch(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torchrun was started")
    monkeypatch.setattr(distributed, "launch", refuse)


@pytest.mark.parametrize("batch_size, message", [
    (7, "--batch-size 7 does not split evenly over 2 processes; use a multiple of 2"),
    (22, "The last batch of each epoch has 1 of the 23 training images, fewer than the 2 processes"),
])
def test_a_batch_that_does_not_split_is_one_line_before_torchrun(batch_size, message, data, monkeypatch):
    _no_launch(monkeypatch)
    result = CliRunner().invoke(cli, ["finetune", *FINETUNE_ARGS, "--data", str(data), "--nproc", "2",
                                      "--batch-size", str(batch_size)])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"Error: {message}") and len(result.output.strip().splitlines()) == 1


def test_nproc_gives_torchrun_the_same_command_without_nproc(data, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(distributed, "launch", lambda command, args, **kw: calls.append((command, args, kw)) or 0)
    args = ["--model", "resnet18", "--model", "googlenet", "--data", str(data), "--val-fraction", "0.2", "--strict",
            "--weights", "none", "--image-size", "32", "--cache-dir", str(tmp_path), "--quiet"]  # in --help's order
    result = CliRunner().invoke(cli, ["extract", *args, "--nproc", "2"])
    assert result.exit_code == 0, result.output
    ft_args = ["--model", "resnet18", "--data", str(data), "--weights", "none", "--lr", "0.05",
               "--runs-dir", str(tmp_path), "--freeze-backbone"]
    result = CliRunner().invoke(cli, ["finetune", *ft_args, "--nproc", "2", "--max-restarts", "3"])
    assert result.exit_code == 0, result.output
    assert calls == [("extract", args, {"nproc": 2, "max_restarts": 0}),
                     ("finetune", ft_args, {"nproc": 2, "max_restarts": 3})]
    assert distributed.torchrun_command("extract", ["--quiet"], nproc=2)[1:] == [
        "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=0",
        "-m", "featcache", "extract", "--quiet"]


def test_nproc_under_torchrun_is_refused(data, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = CliRunner().invoke(cli, ["finetune", *FINETUNE_ARGS, "--data", str(data), "--nproc", "2"])
    assert result.exit_code == 2 and "already runs under torchrun; drop --nproc" in result.output


def test_help_shows_nproc_with_examples_and_no_torch_is_imported():
    for command in ("extract", "finetune"):
        result = CliRunner().invoke(cli, [command, "--help"])
        assert result.exit_code == 0 and "--nproc" in result.output and "--max-restarts" in result.output
        assert "Example:" in result.output and "--nproc 4" in result.output
    code = "import sys, featcache.distributed; bad = {'torch', 'jax'} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
