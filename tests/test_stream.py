"""featcache.stream and cache.FeatureReader: head-train streamed from the HDF5 file gives the in-memory
results, reads any rows in any order (os.pread and the h5py fallback alike), never holds the features
whole, and fails cleanly."""

from __future__ import annotations

import json
import threading
import tracemalloc

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

import featcache.cache as cache_module
import featcache.cache.reader as reader_module  # FeatureReader's module: its tuning constants
import featcache.environment as environment
import featcache.stream as stream
from featcache.cache import FeatureReader, load_features
from featcache.cli import cli
from featcache.config import TrainConfig
from featcache.errors import CacheError
from featcache.head import fit_head
from featcache.head_runs import train_head
from synthetic import gaussian_problem, write_cache

SPLITS = ("train", "val", "test")


def _cache(tmp_path, num_classes=3, n=(203, 57, 61), dim=24, seed=0, dtype="float32", name="c.h5"):
    problem = gaussian_problem(num_classes, n=n, dim=dim, seed=seed)
    path = write_cache(tmp_path / name, dict(zip(SPLITS, problem)), [f"c{i}" for i in range(num_classes)],
                       dtype=dtype)
    return path, problem


def _compressed_copy(src, dst):
    """The same cache with gzip-compressed features, as another tool might rewrite it (h5py fallback)."""
    with h5py.File(src, "r") as f, h5py.File(dst, "w") as g:
        for k, v in f.attrs.items():
            g.attrs[k] = v
        for split in f:
            for name, ds in f[split].items():
                kw = dict(compression="gzip", chunks=(16, ds.shape[1])) if name == "features" else {}
                g.create_dataset(f"{split}/{name}", data=ds[...], **kw)
    return dst


# ---------------------------------------------------------------- FeatureReader


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_reader_takes_any_rows_in_the_order_asked(tmp_path, dtype):
    path, _ = _cache(tmp_path, n=(700, 40, 30), dim=20, dtype=dtype)  # 700 rows: three 256-row chunks
    x = load_features(path, "train")[0]
    rng = np.random.default_rng(1)
    with FeatureReader(path) as reader:
        assert reader.raw("train") and reader.raw("val")
        assert np.array_equal(reader.labels("train"), load_features(path, "train")[1])
        for rows in (rng.permutation(700), rng.permutation(700)[:37], np.array([699, 0, 255, 256, 5, 5]),
                     np.zeros(0, np.int64)):
            got = reader.take("train", rows)
            assert got.dtype == np.dtype(dtype) and np.array_equal(got, x[rows])
        assert np.array_equal(reader.read("train", 250, 600), x[250:600])
        with pytest.raises(IndexError):
            reader.take("train", np.array([700]))


def test_reader_reads_a_large_take_in_several_threads(tmp_path):
    path, _ = _cache(tmp_path, num_classes=2, n=(9000, 10, 10), dim=8)
    x = load_features(path, "train")[0]
    rows = np.random.default_rng(4).permutation(9000)
    with FeatureReader(path) as reader:
        assert np.array_equal(reader.take("train", rows), x[rows])
        readers = [t for t in threading.enumerate() if t.name.startswith("featcache-read")]
        assert len(readers) >= 2  # 9000 rows: 8 threads of 1125
    assert not [t for t in threading.enumerate() if t.name.startswith("featcache-read")]  # closed with the reader


def test_reader_reads_neighbours_in_one_call_in_file_order(tmp_path, monkeypatch):
    path, _ = _cache(tmp_path, n=(700, 40, 30), dim=20)  # a row is 80 bytes
    x = load_features(path, "train")[0]
    rows = np.random.default_rng(2).permutation(700)[:300]
    calls = []
    real_preadv = reader_module.os.preadv
    monkeypatch.setattr(reader_module.os, "preadv",
                        lambda fd, buffers, at: (calls.append((at, len(buffers))), real_preadv(fd, buffers, at))[1])
    runs = len(np.flatnonzero(np.diff(np.sort(rows)) != 1)) + 1  # runs of consecutive rows
    with FeatureReader(path) as reader:
        for most in (1024, 4):
            monkeypatch.setattr(reader_module, "_MAX_BUFFERS", most)
            calls.clear()
            assert np.array_equal(reader.take("train", rows), x[rows]), most
            assert [at for at, _ in calls] == sorted(at for at, _ in calls)  # one pass forward through the file
            assert max(n for _, n in calls) <= most and sum(n for _, n in calls) == 300
            if most == 1024:  # the file's chunks lie back to back: one call per run
                assert len(calls) == runs
            else:
                assert len(calls) >= 300 // 4 and len(calls) > runs


def test_reader_falls_back_to_h5py_for_compressed_features(tmp_path):
    path, _ = _cache(tmp_path, n=(300, 40, 30), dim=20)
    copy = _compressed_copy(path, tmp_path / "gz.h5")
    rows = np.random.default_rng(3).permutation(300)[:120]
    with FeatureReader(path) as raw, FeatureReader(copy) as fallback:
        assert raw.raw("train") and not fallback.raw("train")
        assert np.array_equal(fallback.take("train", rows), raw.take("train", rows))
        assert np.array_equal(fallback.take("train", np.r_[rows[:3], rows[:3]]), raw.take("train", np.r_[rows[:3], rows[:3]]))
        assert np.array_equal(fallback.read("train", 17, 290), raw.read("train", 17, 290))  # a slice through h5py


def test_reader_refuses_partial_and_truncated_files(tmp_path):
    path, _ = _cache(tmp_path, n=(300, 40, 30), dim=20)
    partial = tmp_path / "p.h5.partial"
    partial.write_bytes(path.read_bytes())
    with pytest.raises(CacheError, match="unfinished cache"):
        FeatureReader(partial)
    with FeatureReader(path) as reader:
        size = path.stat().st_size
        with open(path, "r+b") as f:  # cut the file after the file was opened: the train rows are gone
            f.truncate(size // 2)
        with pytest.raises(CacheError, match="truncated"):
            reader.take("test", np.arange(30))


# ---------------------------------------------------------------- streamed training == in-memory training

CASES = [
    dict(num_classes=2, dtype="float32", config=dict(epochs=6, batch_size=16, lr=0.05, nesterov=True,
                                                     weight_decay=0.01)),
    dict(num_classes=3, dtype="float32", config=dict(epochs=5, batch_size=32, optimizer="adam", lr=0.01,
                                                     standardize=True)),
    dict(num_classes=4, dtype="float16", config=dict(epochs=4, batch_size=24, optimizer="adamw", lr=0.02,
                                                     weight_decay=0.1, scheduler="none")),
]


@pytest.fixture(scope="module")
def in_memory_fits(tmp_path_factory):
    """case index -> (its cache, the in-memory fit on it): fitted once per case, shared by the three block sizes
    (each fit_head compiles its own program)."""
    done = {}

    def get(i: int):
        if i not in done:
            case = CASES[i]
            path, _ = _cache(tmp_path_factory.mktemp(f"case{i}"), num_classes=case["num_classes"], dtype=case["dtype"])
            splits = [load_features(path, s)[:2] for s in SPLITS]  # what head-train trains on, float16 included
            done[i] = path, fit_head(*splits, num_classes=case["num_classes"], config=TrainConfig(**case["config"]))
        return done[i]

    return get


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['num_classes']}cls-{c['config'].get('optimizer', 'sgd')}")
@pytest.mark.parametrize("blocks", ["one-batch", "three-batches", "whole"])
def test_streamed_fit_equals_in_memory_fit(case, blocks, in_memory_fits):
    config = TrainConfig(**case["config"])
    path, in_memory = in_memory_fits(CASES.index(case))
    block_rows = {"one-batch": 1, "three-batches": 3, "whole": 100}[blocks] * config.batch_size
    with FeatureReader(path) as reader:
        streamed, info = stream.fit_streamed(reader, config=config, block_rows=block_rows)

    assert info["blocks_per_epoch"] == -(-203 // block_rows) and info["rows_read"] == 203 * config.epochs
    assert len(streamed.history) == config.epochs
    for a, b in zip(in_memory.history, streamed.history):
        assert (a.epoch, a.lr, a.train_acc, a.val_acc) == (b.epoch, b.lr, b.train_acc, b.val_acc)
        assert abs(a.train_loss - b.train_loss) < 1e-6 and abs(a.val_loss - b.val_loss) < 1e-6
    assert streamed.selected == in_memory.selected
    # bit-identical on this machine; the bound leaves room for another XLA's kernel choices
    np.testing.assert_allclose(streamed.epoch_weights, in_memory.epoch_weights, rtol=0, atol=1e-6)
    np.testing.assert_allclose(streamed.test_logits, in_memory.test_logits, rtol=0, atol=1e-5)
    assert streamed.summary.test_acc == in_memory.summary.test_acc
    assert streamed.summary.confusion_matrix == in_memory.summary.confusion_matrix
    if config.standardize:
        np.testing.assert_allclose(streamed.mean, in_memory.mean, rtol=1e-6)
        np.testing.assert_allclose(streamed.std, in_memory.std, rtol=1e-6)
    else:
        assert streamed.mean is None and in_memory.mean is None
    assert set(streamed.timings) == {"load_s", "compile_s", "train_s", "read_s", "wait_s"}


def test_streaming_never_holds_the_features_whole(tmp_path):
    """What Python allocates (numpy's arrays included: tracemalloc sees them) stays near a few blocks and
    JAX's tracing, far below the features; loading the split, the control, is seen as what it is."""
    path, _ = _cache(tmp_path, num_classes=2, n=(16384, 64, 64), dim=256)
    config = TrainConfig(epochs=2, batch_size=64)
    features = 16384 * 256 * 4  # 16 MiB of train features
    with FeatureReader(path) as reader:
        stream.fit_streamed(reader, config=TrainConfig(epochs=1, batch_size=64), block_rows=256)  # JAX's imports
        tracemalloc.start()
        try:
            stream.fit_streamed(reader, config=config, block_rows=256)  # blocks of 256 KiB
            _, streamed_peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    tracemalloc.start()
    try:
        load_features(path, "train")
        _, loaded_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert loaded_peak >= features
    assert streamed_peak < features / 4, streamed_peak


def test_a_failing_read_stops_the_training_and_its_thread(tmp_path, monkeypatch):
    path, _ = _cache(tmp_path)
    calls = []
    real_take = FeatureReader.take

    def take(self, split, rows):
        calls.append(split)
        if len(calls) == 4:
            raise CacheError("the disk went away")
        return real_take(self, split, rows)

    monkeypatch.setattr(FeatureReader, "take", take)
    with FeatureReader(path) as reader, pytest.raises(CacheError, match="disk went away"):
        stream.fit_streamed(reader, config=TrainConfig(epochs=3), block_rows=32)
    assert not [t for t in threading.enumerate() if t.name == "featcache-stream-reader"]


@pytest.mark.parametrize("split, standardize", [("val", False), ("train", True)])
def test_nan_features_are_refused_before_training(tmp_path, split, standardize):
    path, _ = _cache(tmp_path)
    with h5py.File(path, "r+") as f:
        f[split]["features"][7, 3] = np.nan
    with pytest.raises(CacheError) as in_memory:
        load_features(path, split)
    with FeatureReader(path) as reader, pytest.raises(CacheError) as streamed:
        stream.fit_streamed(reader, config=TrainConfig(epochs=1, standardize=standardize), block_rows=32)
    rows = {"train": 203, "val": 57}[split]
    assert str(streamed.value) == str(in_memory.value) and f"1 of {rows} rows of {split}" in str(streamed.value)


def _fake_system(tmp_path, cgroup_line: str, files: dict[str, str]) -> dict:
    (tmp_path / "proc" / "self").mkdir(parents=True)
    (tmp_path / "proc" / "meminfo").write_text("MemTotal:       24000000 kB\nMemAvailable:   20000000 kB\n")
    (tmp_path / "proc" / "self" / "cgroup").write_text(cgroup_line + "\n")
    for name, text in files.items():
        (tmp_path / "cg" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "cg" / name).write_text(text)
    return {"proc": str(tmp_path / "proc"), "cgroup_root": str(tmp_path / "cg")}


def test_memory_available_is_the_tighter_of_the_system_and_the_cgroup_limit(tmp_path):
    mib = 2**20
    v1 = _fake_system(tmp_path / "v1", "4:memory:/slurm/job7\n1:cpu:/", {
        "memory/slurm/job7/memory.limit_in_bytes": str(1024 * mib),
        "memory/slurm/job7/memory.usage_in_bytes": str(600 * mib),
        "memory/slurm/job7/memory.stat": f"cache {100 * mib}\ntotal_cache {200 * mib}\n",
        "memory/slurm/memory.limit_in_bytes": "9223372036854771712",  # a parent without a limit
        "memory/memory.limit_in_bytes": "9223372036854771712"})
    assert environment.memory_available(**v1) == (1024 - 400) * mib  # page cache counted as free
    v2 = _fake_system(tmp_path / "v2", "0::/user.slice/job", {
        "user.slice/job/memory.max": "max",
        "user.slice/job/memory.current": str(50 * mib),
        "user.slice/memory.max": str(512 * mib),  # the limit sits on the parent
        "user.slice/memory.current": str(300 * mib),
        "user.slice/memory.stat": f"anon {250 * mib}\nfile {50 * mib}\n"})
    assert environment.memory_available(**v2) == (512 - 250) * mib
    free = _fake_system(tmp_path / "none", "0::/", {"memory.max": "max"})
    assert environment.memory_available(**free) == 20000000 * 1024  # no limit: MemAvailable
    assert environment.memory_available(proc=str(tmp_path / "nowhere"), cgroup_root=str(tmp_path / "nowhere")) is None


def test_block_rows_fit_the_memory_and_the_batch():
    assert stream.block_rows_for(feature_dim=512, batch_size=32, memory_mib=1024) == 131072  # 4 x 256 MiB
    assert stream.block_rows_for(feature_dim=2048, batch_size=24, memory_mib=100) == 3192  # a multiple of 24
    assert stream.block_rows_for(feature_dim=10**7, batch_size=32, memory_mib=16) == 32  # at least one batch
    assert stream.block_memory_mib(available=64 * 2**30) == 1024
    assert stream.block_memory_mib(available=600 * 2**20) == 150  # a quarter of what is left
    assert stream.block_memory_mib(available=2**20) == 16


# ---------------------------------------------------------------- train_head and the command line


def test_train_head_streams_on_its_own_when_memory_is_short(tmp_path, monkeypatch, capsys):
    path, _ = _cache(tmp_path)
    config = TrainConfig(epochs=3, runs_dir=str(tmp_path / "runs"))
    monkeypatch.setattr(environment, "memory_available", lambda: 10**9)
    loaded = train_head(cache=path, config=config, run_name="loaded")
    assert "stream" not in loaded.extra
    need = stream.in_memory_bytes(cache_module.read_meta(path))
    monkeypatch.setattr(environment, "memory_available", lambda: need - 1)
    streamed = train_head(cache=path, config=config, run_name="streamed")
    assert "streaming them from the file" in capsys.readouterr().err
    assert streamed.extra["stream"]["blocks_per_epoch"] == 1 and streamed.extra["stream"]["pread"] is True
    assert streamed.summary.test_acc == loaded.summary.test_acc
    assert [r.val_acc for r in streamed.history] == [r.val_acc for r in loaded.history]


def test_cli_stream_and_no_stream_report_the_same_run(tmp_path):
    path, _ = _cache(tmp_path, num_classes=2)
    runner = CliRunner()
    common = ["head-train", "--cache", str(path), "--epochs", "4", "--batch-size", "16", "--lr", "0.05",
              "--standardize", "--runs-dir", str(tmp_path / "runs")]
    streamed = runner.invoke(cli, common + ["--stream", "--stream-memory", "16", "--run-name", "s"])
    assert streamed.exit_code == 0, streamed.output
    assert "Streaming 203 train rows per epoch" in streamed.output
    loaded = runner.invoke(cli, common + ["--no-stream", "--run-name", "l"])
    assert loaded.exit_code == 0, loaded.output
    s, l = [json.loads((tmp_path / "runs" / name / "metrics.json").read_text()) for name in ("s", "l")]
    assert s["extra"]["stream"]["block_rows"] == 16 * 2**20 // (4 * 4 * 24) // 16 * 16
    assert "stream" not in l["extra"]
    assert s["summary"]["test_acc"] == l["summary"]["test_acc"]
    assert s["summary"]["selected_epoch"] == l["summary"]["selected_epoch"]
    for a, b in zip(s["history"], l["history"]):
        assert a["val_acc"] == b["val_acc"] and abs(a["train_loss"] - b["train_loss"]) < 1e-6


def test_cli_stream_with_a_grid_is_a_one_line_error(tmp_path):
    path, _ = _cache(tmp_path, num_classes=2)
    result = CliRunner().invoke(cli, ["head-train", "--cache", str(path), "--stream", "--seeds", "3"])
    assert result.exit_code == 2
    assert result.output.startswith("Error: ") and "--stream trains one head" in result.output
    assert len(result.output.strip().splitlines()) == 1
