"""Faults injected on purpose (issue 7): unreadable images, kills at every step of a cache write, damaged and
stale caches, a cache being written or moved, a full disk, NaN features, divergence, SIGTERM, resume with
other settings, bad option values. Each test checks the message and exit code AND that nothing was lost or
corrupted.

Cases already covered elsewhere are not repeated here: image conversion (test_datasets), dataset layout
errors (test_datasets, test_extract), SIGKILL mid-extraction and the lock (test_extract, test_cache), damaged
files at the API level (test_cache), SIGKILL during finetune and its divergence guard (test_finetune).

Tiny data: the demo dataset at 32 px, resnet18 with weights "none", CPU; --num-workers 0 in this process
(JAX may be loaded here and DataLoader workers fork), runs with workers go to subprocesses.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import featcache
import featcache.finetuning
from featcache import cache
from featcache.config import SPLITS, DataConfig, ExtractConfig
from featcache.demo import make_demo_dataset
from featcache.extraction import plan_extraction

from synthetic import gaussian_problem, write_cache

FEATCACHE = Path(sys.executable).with_name("featcache")  # the console script of this venv
BOMB_REASON = "too many pixels, refused as a possible decompression bomb"
NOT_AN_IMAGE = "not a recognised image format"
MODEL = ["--model", "resnet18", "--weights", "none", "--image-size", "32"]


from cli_helpers import invoke as _invoke, one_error_line as _one_error_line  # noqa: E402


def _extract(data: Path, cache_dir: Path, **options) -> Path:
    options = {"weights": "none", "image_size": 32, "num_workers": 0, "batch_size": 4, **options}
    return featcache.extract(model="resnet18", data=str(data), cache_dir=str(cache_dir), **options)


def _read(path: Path) -> dict:
    """{split: (features, labels, paths)} with plain h5py."""
    with h5py.File(path, "r") as f:
        return {s: (f[s]["features"][...], f[s]["labels"][...], [p.decode() for p in f[s]["paths"][...]]) for s in f}


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _csv_rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def _png_header(path: Path, width: int, height: int) -> None:
    """A PNG that declares width x height 1-bit pixels and holds no pixel data (a decompression-bomb shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b""))
                     + chunk(b"IEND", b""))


# (relative path, expected reason, or a part of it)
BROKEN = [
    ("train/abnormal/0_empty.png", NOT_AN_IMAGE),  # zero bytes
    ("train/abnormal/0_text.png", NOT_AN_IMAGE),  # a text file named .png
    ("train/abnormal/0_truncated.jpg", "truncated"),  # half a JPEG
    ("train/normal/0_random.bmp", NOT_AN_IMAGE),  # bytes PIL cannot identify
    ("val/abnormal/0_bomb.png", BOMB_REASON),  # 30000 x 30000: over twice MAX_IMAGE_PIXELS (PIL's error)
    ("test/normal/0_bomb.png", BOMB_REASON),  # 10000 x 10000: between 1x and 2x (PIL only warns, and decodes)
]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("reliability")


@pytest.fixture(scope="module")
def broken(work) -> Path:
    """The 32-image demo dataset plus the six unreadable files of BROKEN."""
    root = make_demo_dataset(work / "broken", n_per_class=(8, 4, 4), image_size=32)
    buf = io.BytesIO()
    Image.open(next((root / "train" / "normal").iterdir())).convert("RGB").save(buf, "JPEG", quality=95)
    jpeg = buf.getvalue()
    (root / BROKEN[0][0]).write_bytes(b"")
    (root / BROKEN[1][0]).write_text("this is not an image\n")
    (root / BROKEN[2][0]).write_bytes(jpeg[: len(jpeg) // 2])
    (root / BROKEN[3][0]).write_bytes(np.random.default_rng(0).bytes(300))
    _png_header(root / BROKEN[4][0], 30_000, 30_000)
    _png_header(root / BROKEN[5][0], 10_000, 10_000)
    return root


@pytest.fixture(scope="module")
def clean(work, broken) -> Path:
    """The same dataset without the unreadable files."""
    return Path(shutil.copytree(broken, work / "clean", ignore=shutil.ignore_patterns("0_*")))


@pytest.fixture(scope="module")
def broken_cache(work, broken) -> Path:
    return _extract(broken, work / "cache")


@pytest.fixture(scope="module")
def clean_cache(work, clean) -> Path:
    """A clean extraction of `clean` (the reference the tests compare with; read only, copied to be moved)."""
    return _extract(clean, work / "clean-cache")


def _assert_failures_listed(csv_path: Path) -> None:
    rows = _csv_rows(csv_path)
    assert rows[0] == ["split", "path", "reason"]
    assert [(s, p) for s, p, _ in rows[1:]] == [(p.split("/")[0], p) for p, _ in BROKEN]
    for (_, _, reason), (_, expected) in zip(rows[1:], BROKEN):
        assert expected.lower() in reason.lower(), (reason, expected)


# --------------------------------------------------------------------------- 1, 2: unreadable images


class _Killed(Exception):
    pass


def test_unreadable_images_are_skipped_listed_never_padded_and_survive_a_resume(broken, clean_cache, broken_cache,
                                                                                  tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    args = ["extract", *MODEL, "--data", broken, "--cache-dir", cache_dir, "--batch-size", 4, "--num-workers", 0,
            "--quiet"]
    # An interrupted first run that has committed two batches, the first holding three unreadable images
    # (train/abnormal/0_* sort first): the re-run must still list them, with their reasons.
    real_write, calls = cache.CacheWriter.write, []

    def write_then_die(self, split, start, features, *, failed=()):
        real_write(self, split, start, features, failed=failed)
        calls.append(len(failed))
        if len(calls) == 2:
            raise _Killed
    monkeypatch.setattr(cache.CacheWriter, "write", write_then_die)
    with pytest.raises(_Killed):
        _extract(broken, cache_dir)
    monkeypatch.undo()
    assert calls == [3, 0]

    result = _invoke(*args)
    final = plan_extraction(ExtractConfig(model="resnet18", data=DataConfig(root=str(broken)), weights="none",
                                          image_size=32, cache_dir=str(cache_dir))).path
    csv_path = final.with_name(final.stem + ".failures.csv")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == f"resuming {final.name}.partial: 8 rows already written"
    assert result.output.splitlines()[-1] == f"6 unreadable images skipped (not in the cache), listed in {csv_path}"
    _assert_failures_listed(csv_path)
    assert sorted(p.name for p in final.parent.iterdir()) == sorted([final.name, final.name + ".lock", csv_path.name])

    # Only readable images have rows: the cache equals a clean extraction of the dataset without the broken
    # files (and the resumed file equals the uninterrupted one bit for bit).
    got, want, uninterrupted = _read(final), _read(clean_cache), _read(broken_cache)
    for split in SPLITS:
        assert got[split][2] == want[split][2] and len(got[split][2]) == {"train": 16, "val": 8, "test": 8}[split]
        np.testing.assert_array_equal(got[split][1], want[split][1])
        np.testing.assert_allclose(got[split][0], want[split][0], rtol=1e-4, atol=1e-5)  # other batches: rounding
        assert all(np.array_equal(a, b) for a, b in zip(got[split], uninterrupted[split]))
    assert cache.verify_cache(final) == []
    with h5py.File(final, "r") as f:  # the documented layout, nothing else
        assert all(set(f[s]) == {"features", "labels", "paths", "done", "checksums"} for s in SPLITS)
        assert [tuple(r) for r in json.loads(f.attrs["skipped"])] == [tuple(r) for r in _csv_rows(csv_path)[1:]]
    # the resumed run measured its own work: the 32 - 5 readable images the interrupted run had not committed
    assert cache.read_meta(final)["extraction"]["images"] == 27

    # A cache hit says so again; --strict refuses a cache that left images out, naming the first.
    hit = _invoke(*args)
    assert hit.exit_code == 0 and hit.output == (f"cache hit: {final}\n6 unreadable images skipped (not in the "
                                                 f"cache), listed in {csv_path}\n"), hit.output
    error = _one_error_line(_invoke(*args, "--strict"), 2)
    assert f"Cannot read image {broken / BROKEN[0][0]} ({NOT_AN_IMAGE})" in error and "--strict" in error

    # --strict on a fresh extraction: stops at the first unreadable image; nothing under a final name.
    strict = ["extract", *MODEL, "--data", broken, "--cache-dir", tmp_path / "strict", "--num-workers", 0, "--strict"]
    error = _one_error_line(_invoke(*strict), 2)
    assert f"Cannot read image {broken / BROKEN[0][0]} ({NOT_AN_IMAGE})" in error
    assert not list((tmp_path / "strict").glob("*/*.h5"))


def test_decode_workers_report_unreadable_images_instead_of_crashing(broken, broken_cache, tmp_path):
    # torch cannot rebuild ImageLoadError(path, reason) from a worker; the worker returns the reason instead.
    done = subprocess.run([str(FEATCACHE), "extract", *MODEL, "--data", str(broken), "--cache-dir", str(tmp_path),
                           "--batch-size", "4", "--num-workers", "1", "--quiet"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    path = tmp_path / broken_cache.parent.name / broken_cache.name
    assert done.stdout.splitlines()[-1] == (f"6 unreadable images skipped (not in the cache), listed in "
                                            f"{path.with_name(path.stem + '.failures.csv')}")
    got, want = _read(path), _read(broken_cache)
    assert all(np.array_equal(a, b) for s in SPLITS for a, b in zip(got[s], want[s]))


def test_finetune_skips_the_same_images_and_matches_head_train_on_the_cache(broken, broken_cache, tmp_path):
    options = ["--epochs", 2, "--batch-size", 8, "--lr", 0.05, "--optimizer", "sgd"]
    args = ["finetune", *MODEL, "--data", broken, "--freeze-backbone", "--num-workers", 0, "--quiet", *options]
    result = _invoke(*args, "--runs-dir", tmp_path / "ft")
    assert result.exit_code == 0, result.output
    (run_dir,) = (tmp_path / "ft").iterdir()
    assert f"6 unreadable images skipped, listed in {run_dir / 'failures.csv'}" in result.stdout
    _assert_failures_listed(run_dir / "failures.csv")
    head = _invoke("head-train", "--cache", broken_cache, *options, "--runs-dir", tmp_path / "head")
    assert head.exit_code == 0, head.output
    (head_dir,) = (tmp_path / "head").iterdir()
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (run_dir, head_dir))
    for x, y in zip(a["history"], b["history"]):  # 16 train images in both, the same plan
        assert (x["train_acc"], x["val_acc"]) == (y["train_acc"], y["val_acc"])
        assert x["train_loss"] == pytest.approx(y["train_loss"], abs=1e-4)
    assert a["summary"]["test_acc"] == b["summary"]["test_acc"]

    error = _one_error_line(_invoke(*args, "--strict", "--runs-dir", tmp_path / "strict"), 2)
    assert str(broken / BROKEN[0][0]) in error
    assert not (tmp_path / "strict").exists() or not list((tmp_path / "strict").iterdir())  # no run started


# --------------------------------------------------------------------------- 6: SIGKILL at each step of a cache write

KILL_DRIVER = """\
import os, signal, sys
import featcache.cache as cache
import featcache.cache.writer as writer

point = sys.argv[1]
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
if point == "before_first_commit":  # the partial file is allocated, no row committed
    cache.CacheWriter.write = lambda self, *a, **k: die()
else:  # the rename of the finished file (plain, or the copy without unreadable rows)
    real_replace = os.replace

    def replace(src, dst):
        if str(src).endswith(".partial"):
            if point == "before_rename":
                die()
            real_replace(src, dst)
            die()
        return real_replace(src, dst)
    writer.os.replace = replace
from featcache.cli import cli
cli(sys.argv[2:], prog_name="featcache")
"""


@pytest.mark.slow
@pytest.mark.parametrize("point, dataset", [("before_first_commit", "clean"), ("before_rename", "clean"),
                                            ("after_rename", "clean"), ("before_rename", "broken"),
                                            ("after_rename", "broken")])  # leaves the full-size .h5.partial
def test_sigkill_at_each_step_never_leaves_a_partial_under_the_final_name(point, dataset, request, tmp_path):
    data = request.getfixturevalue(dataset)
    # the uninterrupted extraction; for "broken", of the copy without the unreadable rows
    reference = _read(request.getfixturevalue(f"{dataset}_cache"))
    driver = tmp_path / "driver.py"
    driver.write_text(KILL_DRIVER)
    cache_dir = tmp_path / "cache"
    args = ["extract", *MODEL, "--data", str(data), "--cache-dir", str(cache_dir), "--batch-size", "4",
            "--num-workers", "0", "--quiet"]
    killed = subprocess.run([sys.executable, str(driver), point, *args], capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (final,) = [p for p in (cache_dir / data.name).iterdir() if p.name.endswith(".lock")]
    final = final.with_name(final.name.removesuffix(".lock"))
    if final.exists():  # only once the rename happened: then it is the complete file
        assert point == "after_rename" and cache.verify_cache(final) == []
    else:
        assert cache.partial_path(final).exists()
        with pytest.raises(cache.CacheError, match="extraction was interrupted"):
            featcache.load_features(final, "train")

    rerun = _invoke(*args)
    assert rerun.exit_code == 0, rerun.output
    expected_first_line = {"before_first_commit": "resnet18: ", "before_rename": f"resuming {final.name}.partial: ",
                           "after_rename": f"cache hit: {final}"}[point]
    assert rerun.output.startswith(expected_first_line), rerun.output
    assert cache.verify_cache(final) == [] and not cache.partial_path(final).exists()
    assert not final.with_name(final.name + ".compact.partial").exists()
    got = _read(final)
    assert all(np.array_equal(a, b) for s in SPLITS for a, b in zip(got[s], reference[s]))


# --------------------------------------------------------------------------- 7, 8, 10, 12, 13, 14: the cache


def _synthetic_cache(path: Path, *, scale: float = 1.0, nan_rows: dict | None = None) -> Path:
    splits = dict(zip(SPLITS, gaussian_problem(2, n=(40, 20, 20), dim=8)))
    for split, rows in (nan_rows or {}).items():
        splits[split][0][rows, 1] = np.nan if split != "test" else np.inf
    return write_cache(path, {s: (x * scale, y) for s, (x, y) in splits.items()}, ["a", "b"])


@pytest.mark.parametrize("damage", ["zero", "truncated", "random"])
def test_head_train_refuses_a_corrupt_cache_with_exit_3(damage, tmp_path):
    path = _synthetic_cache(tmp_path / "c" / "d" / "m.h5")
    data = path.read_bytes()
    path.write_bytes({"zero": b"", "truncated": data[: len(data) // 2],
                      "random": np.random.default_rng(0).bytes(len(data))}[damage])
    error = _one_error_line(_invoke("head-train", "--cache", path, "--runs-dir", tmp_path / "runs"), 3)
    assert f"{path} is not a readable cache (corrupt or truncated)" in error and "extract again" in error
    assert not (tmp_path / "runs").exists()
    listed = _invoke("cache", "ls", "--cache-dir", tmp_path / "c", env={"COLUMNS": "200"})
    assert re.search(r"│ corrupt\s+│ m\.h5", listed.output), listed.output


def test_nan_rows_are_refused_naming_split_and_row_count(tmp_path):
    path = _synthetic_cache(tmp_path / "m.h5", nan_rows={"val": [2, 5, 7], "test": [0]})
    error = _one_error_line(_invoke("head-train", "--cache", path, "--runs-dir", tmp_path / "runs"), 3)
    assert f"{path}: 3 of 20 rows of val hold NaN or inf features" in error
    assert not (tmp_path / "runs").exists()
    verify = _invoke("cache", "verify", path)
    assert verify.exit_code == 3
    assert verify.stderr.splitlines() == [f"{path}: val: 3 of 20 rows hold NaN or inf features",
                                          f"{path}: test: 1 of 20 rows hold NaN or inf features"]


def test_head_train_divergence_exits_5_and_keeps_the_run(tmp_path):
    path = _synthetic_cache(tmp_path / "m.h5", scale=1e18)
    with np.errstate(all="ignore"):
        result = _invoke("head-train", "--cache", path, "--lr", "1e15", "--epochs", 2, "--runs-dir", tmp_path / "runs")
    error = _one_error_line(result, 5)
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert "Training diverged (" in error and "lower --lr" in error and str(run_dir) in error
    doc = json.loads((run_dir / "metrics.json").read_text())
    assert doc["diverged"] is True and len(doc["history"]) == 2 and (run_dir / "head.npz").is_file()


def test_cache_ls_shows_a_cache_of_a_changed_dataset_as_stale(tmp_path):
    data = make_demo_dataset(tmp_path / "d", n_per_class=(3, 2, 2), image_size=32)
    config = ExtractConfig(model="resnet18", data=DataConfig(root=str(data)), weights="none", image_size=32,
                           cache_dir=str(tmp_path / "cache"))
    plan = plan_extraction(config)  # the real key and metadata, features filled in without torch
    rows = {s: cache.SplitRows(labels=np.array([x.label for x in v]), paths=[x.path for x in v])
            for s, v in plan.index.splits.items()}
    writer = cache.CacheWriter(plan.path, meta=plan.meta, feature_dim=4, dtype="float32", splits=rows)
    for split, r in rows.items():
        writer.write(split, 0, np.ones((len(r.labels), 4), np.float32))
    writer.finish()

    def status() -> str:
        (row,) = re.findall(r"│ (complete|stale|corrupt|partial)\s+│",
                            _invoke("cache", "ls", "--cache-dir", tmp_path / "cache", env={"COLUMNS": "250"}).output)
        return row

    assert status() == "complete"
    added = data / "train" / "normal" / "zz_added.png"
    shutil.copy(next((data / "val" / "normal").iterdir()), added)
    assert status() == "stale"
    added.unlink()
    assert status() == "complete"
    edited = next((data / "test" / "abnormal").iterdir())
    stat = edited.stat()
    os.utime(edited, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # same size, rewritten later
    assert status() == "stale"
    assert featcache.extraction.find_cache(config) is None  # a stale cache is never used
    shutil.move(data, tmp_path / "elsewhere")
    assert status() == "complete"  # its dataset is gone: nothing to compare against


def test_head_train_while_the_cache_is_written_never_reads_the_partial(clean, tmp_path):
    cache_dir = tmp_path / "cache"
    config = ExtractConfig(model="resnet18", data=DataConfig(root=str(clean)), weights="none", image_size=32,
                           cache_dir=str(cache_dir))
    plan = plan_extraction(config)
    rows = {s: cache.SplitRows(labels=np.array([x.label for x in v]), paths=[x.path for x in v])
            for s, v in plan.index.splits.items()}
    by_key = ["head-train", *MODEL, "--data", clean, "--cache-dir", cache_dir, "--runs-dir", tmp_path / "runs"]
    by_file = ["head-train", "--cache", plan.path, "--runs-dir", tmp_path / "runs"]
    with cache.write_lock(plan.path):  # an extraction in progress: lock held, partial file half written
        writer = cache.CacheWriter(plan.path, meta=plan.meta, feature_dim=4, dtype="float32", splits=rows)
        writer.write("train", 0, np.ones((4, 4), np.float32))
        for args in (by_key, by_file):
            error = _one_error_line(_invoke(*args), 4)
            assert f"{plan.path} is still being extracted by pid {os.getpid()} " in error and "--wait" in error
        writer.close()
    # the writer was killed: the partial stays for a resume, still never read
    error = _one_error_line(_invoke(*by_file), 3)
    assert "extraction was interrupted" in error and "run the same featcache extract again to resume" in error
    error = _one_error_line(_invoke("head-train", "--cache", cache.partial_path(plan.path)), 3)
    assert "unfinished cache" in error
    assert "No cache of resnet18" in _one_error_line(_invoke(*by_key), 2)  # ... and says how to create it
    assert not (tmp_path / "runs").exists()


def test_a_moved_cache_directory_is_still_found_and_read(clean, clean_cache, tmp_path):
    cache_dir = Path(shutil.copytree(clean_cache.parents[1], tmp_path / "cache"))  # a cache directory of our own
    path = cache_dir / clean_cache.parent.name / clean_cache.name
    options = ["--epochs", 2, "--lr", 0.05]
    before = _invoke("head-train", "--cache", path, *options, "--runs-dir", tmp_path / "r0")
    assert before.exit_code == 0, before.output
    moved = tmp_path / "elsewhere" / "features"
    shutil.move(cache_dir, moved)
    assert not cache_dir.exists()
    new_path = moved / path.parent.name / path.name
    assert cache.verify_cache(new_path) == []
    for i, args in enumerate([["--cache", new_path],
                              [*MODEL, "--data", clean, "--cache-dir", moved]]):  # found by key in its new place
        after = _invoke("head-train", *args, *options, "--runs-dir", tmp_path / f"r{i + 1}")
        assert after.exit_code == 0, after.output
    docs = [json.loads(next((tmp_path / f"r{i}").iterdir()).joinpath("metrics.json").read_text()) for i in range(3)]
    for doc in docs[1:]:  # the same numbers (times aside)
        assert [{k: v for k, v in r.items() if k != "seconds"} for r in doc["history"]] == \
            [{k: v for k, v in r.items() if k != "seconds"} for r in docs[0]["history"]]
        assert doc["summary"]["test_acc"] == docs[0]["summary"]["test_acc"]
        assert doc["summary"]["test_loss"] == docs[0]["summary"]["test_loss"]
    assert docs[2]["cache"]["path"] == str(new_path)
    listed = _invoke("cache", "ls", "--cache-dir", moved, env={"COLUMNS": "250"})
    assert re.search(r"│ complete\s+│ " + re.escape(path.name), listed.output), listed.output


# --------------------------------------------------------------------------- 11: disk full


@pytest.fixture(params=["tmpfs", "file-size-limit"])
def small_disk(request, tmp_path):
    """(folder, exhaust) where exhaust(leave) makes every write beyond `leave` more bytes fail.

    tmpfs: a real file system (needs root; memory only as used); exhaust fills it up, writes fail with ENOSPC.
    file-size-limit: RLIMIT_FSIZE (any user); exhaust caps the size of every file, writes fail with EFBIG.
    """
    folder = tmp_path / "disk"
    folder.mkdir()
    if request.param == "tmpfs":
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(folder)],
                                 capture_output=True, text=True)
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); the file-size-limit case runs")

        def exhaust(leave: int) -> None:
            st = os.statvfs(folder)
            with open(folder / "filler", "wb") as f:
                f.truncate(0)
                f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))

        def free() -> None:
            (folder / "filler").unlink(missing_ok=True)

        try:
            yield folder, exhaust, free
        finally:
            subprocess.run(["umount", "-l", str(folder)], check=True)
        return

    limits, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.getsignal(signal.SIGXFSZ)

    def exhaust(leave: int) -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (leave, limits[1]))

    def free() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)

    try:
        yield folder, exhaust, free
    finally:
        free()


@pytest.mark.slow
def test_a_full_disk_is_a_clear_error_and_loses_nothing(small_disk, clean):
    folder, exhaust, free = small_disk
    cache_dir = folder / "cache"
    earlier = _extract(clean, cache_dir, dtype="float16")  # an earlier cache on the same disk
    digest = _sha256(earlier)
    args = ["extract", *MODEL, "--data", clean, "--cache-dir", cache_dir, "--num-workers", 0, "--quiet"]
    exhaust(24_000)  # the float32 cache needs ~70 kB
    try:
        error = _one_error_line(_invoke(*args), 6)
    finally:
        free()
    assert re.search(r"Out of disk space writing .*\.h5\.partial \((No space left on device|File too large)\); "
                     r"free space in .* and run the same command again", error), error
    assert _sha256(earlier) == digest
    assert [p.name for p in earlier.parent.glob("*.h5*") if not p.name.endswith(".lock")] == [earlier.name]
    done = _invoke(*args)  # space back: the same command works
    assert done.exit_code == 0, done.output

    # a checkpoint: epoch 1 is saved, then the disk fills up
    runs_dir = folder / "runs"
    ft = ["finetune", *MODEL, "--data", clean, "--freeze-backbone", "--epochs", 2, "--batch-size", 8, "--lr", 0.05,
          "--num-workers", 0, "--quiet", "--runs-dir", runs_dir]
    real_save = featcache.finetuning._Checkpoints.save

    def save_then_fill(self, name, payload):
        real_save(self, name, payload)
        if name == "last.pt" and payload["epoch"] == 1:
            exhaust(1_000_000)  # a resnet18 checkpoint is ~45 MB
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(featcache.finetuning._Checkpoints, "save", save_then_fill)
        try:
            error = _one_error_line(_invoke(*ft), 6)
        finally:
            free()
    (run_dir,) = runs_dir.iterdir()
    assert re.search(rf"Out of disk space writing {re.escape(str(run_dir))}/(best|last)\.pt \(.+\); "
                     rf"{re.escape(str(run_dir / 'last.pt'))} \(epoch 1\) is intact; free space in .* and continue "
                     rf"with the same command plus --resume {re.escape(str(run_dir))}\.", error), error
    assert torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)["epoch"] == 1
    assert sorted(p.name for p in run_dir.iterdir()) == ["best.pt", "finetune.json", "last.pt"]  # no temporary file
    resumed = _invoke(*ft, "--resume", run_dir)
    assert resumed.exit_code == 0 and "continuing after epoch 1 of 2" in resumed.output, resumed.output
    assert len(json.loads((run_dir / "metrics.json").read_text())["history"]) == 2


# --------------------------------------------------------------------------- 15, 16: SIGTERM, resume with other settings


def test_sigterm_stops_at_a_batch_boundary_and_resume_refuses_other_settings(clean, tmp_path, monkeypatch):
    args = ["finetune", *MODEL, "--data", clean, "--freeze-backbone", "--epochs", 3, "--batch-size", 8, "--lr", 0.05,
            "--num-workers", 0, "--quiet"]
    clean_run = _invoke(*args, "--runs-dir", tmp_path / "clean")
    assert clean_run.exit_code == 0, clean_run.output
    before = signal.getsignal(signal.SIGTERM)
    real_step, sent = featcache.finetuning._Loop._train_step, []

    def step_then_sigterm(self, images, labels, **kwargs):  # in the first batch of epoch 2
        if self.sampler.epoch == 1 and not sent:
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, before)  # else SIGTERM ends pytest
            os.kill(os.getpid(), signal.SIGTERM)
            sent.append(True)
        return real_step(self, images, labels, **kwargs)
    monkeypatch.setattr(featcache.finetuning._Loop, "_train_step", step_then_sigterm)
    error = _one_error_line(_invoke(*args, "--runs-dir", tmp_path / "runs"), 143)
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is the caller's again
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert error == (f"Error: Stopped by SIGTERM in epoch 2 of 3; {run_dir / 'last.pt'} (epoch 1) is intact; continue "
                     f"with the same command plus --resume {run_dir}.")
    last = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 1 and len(last["history"]) == 1 and not (run_dir / "metrics.json").exists()
    files = {p.name: _sha256(p) for p in run_dir.iterdir()}

    # other settings: refused, naming each difference; the run is untouched
    error = _one_error_line(_invoke(*args, "--model", "squeezenet1_0", "--resume", run_dir), 2)
    assert "model 'resnet18' (run) vs 'squeezenet1_0' (given)" in error
    error = _one_error_line(_invoke(*[a if a != 0.05 else 0.5 for a in args], "--epochs", 4, "--augment",
                                    "--resume", run_dir), 2)
    assert re.search(r"Cannot resume .* with other settings: augment False \(run\) vs True \(given\); epochs 3 "
                     r"\(run\) vs 4 \(given\); lr 0\.05 \(run\) vs 0\.5 \(given\)\.", error), error
    other = make_demo_dataset(tmp_path / "other", n_per_class=(12, 4, 4), image_size=32)
    assert "root" in _one_error_line(_invoke(*[other if a == clean else a for a in args], "--resume", run_dir), 2)
    assert {p.name: _sha256(p) for p in run_dir.iterdir()} == files

    # the same command (workers, device and runs folder may differ) continues to the clean run's numbers
    resumed = _invoke(*args, "--runs-dir", tmp_path / "elsewhere", "--num-workers", 0, "--resume", run_dir)
    assert resumed.exit_code == 0 and "continuing after epoch 1 of 3" in resumed.output, resumed.output
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (next((tmp_path / "clean").iterdir()), run_dir))
    assert [(r["train_acc"], r["val_acc"]) for r in a["history"]] == [(r["train_acc"], r["val_acc"]) for r in b["history"]]
    assert max(abs(x[k] - y[k]) for x, y in zip(a["history"], b["history"]) for k in ("train_loss", "val_loss")) <= 1e-6


def test_resume_refuses_a_dataset_changed_since_the_run_started(clean, tmp_path):
    data = Path(shutil.copytree(clean, tmp_path / "d"))
    args = ["finetune", *MODEL, "--data", data, "--freeze-backbone", "--epochs", 1, "--num-workers", 0, "--quiet",
            "--runs-dir", tmp_path / "runs"]
    assert _invoke(*args).exit_code == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    (run_dir / "metrics.json").unlink()  # as if it had been killed before its end
    shutil.copy(next((data / "val" / "normal").iterdir()), data / "train" / "normal" / "zz_added.png")
    error = _one_error_line(_invoke(*args, "--resume", run_dir), 2)
    assert f"The dataset {data} changed since {run_dir} started" in error


# --------------------------------------------------------------------------- 17: bad option values


@pytest.mark.parametrize("command, bad, words", [
    ("finetune", ["--epochs", "-1"], ["--epochs", "-1 is not in the range x>=1"]),
    ("finetune", ["--epochs", "0"], ["--epochs", "x>=1"]),
    ("finetune", ["--batch-size", "0"], ["--batch-size", "0 is not in the range x>=1"]),
    ("finetune", ["--model", "resnet19"], ["--model", "Unknown model 'resnet19'; did you mean resnet18"]),
    ("finetune", ["--optimizer", "rmsprop"], ["--optimizer", "'rmsprop' is not one of 'sgd', 'adam', 'adamw'"]),
    ("finetune", ["--lr", "0"], ["--lr", "0.0 is not in the range x>0"]),
    ("finetune", ["--lr", "-1e-3"], ["--lr", "x>0"]),
    ("finetune", ["--momentum", "-0.9"], ["--momentum", "x>=0"]),
    ("finetune", ["--val-fraction", "1.5"], ["--val-fraction", "1.5 is not in the range 0<=x<1"]),
    ("finetune", ["--test-fraction", "-0.1"], ["--test-fraction", "0<=x<1"]),
    ("finetune", ["--num-workers", "-2"], ["--num-workers", "x>=-1"]),
    ("finetune", ["--image-size", "0"], ["--image-size", "0 is not in the range 1<=x<=4096"]),
    ("extract", ["--batch-size", "0"], ["--batch-size", "x>=1"]),
    ("extract", ["--val-fraction", "1.0"], ["--val-fraction", "0<=x<1"]),
    ("head-train", ["--lr", "1e-3,0"], ["--lr", "0 is not > 0"]),
    ("head-train", ["--weight-decay", "-1"], ["--weight-decay", "-1 is not >= 0"]),
    ("head-train", ["--epochs", "0"], ["--epochs", "x>=1"]),
    ("predict", ["--batch-size", "0"], ["--batch-size", "x>=1"]),
])
def test_bad_option_values_are_usage_errors_exit_2(command, bad, words, tmp_path):
    base = {"finetune": ["--model", "resnet18", "--data", "demo", "--runs-dir", tmp_path / "runs",
                         "--cache-dir", tmp_path / "cache"],
            "extract": ["--model", "resnet18", "--data", "demo", "--cache-dir", tmp_path / "cache"],
            "head-train": ["--cache", tmp_path / "x.h5", "--runs-dir", tmp_path / "runs"],
            "predict": ["--model-file", tmp_path / "m.pt", tmp_path]}[command]
    result = _invoke(command, *base, *bad)
    assert result.exit_code == 2, result.output
    assert "Usage: " in result.output and "Traceback" not in result.output
    for word in words:
        assert word in result.output, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no dataset rendered, no run, no cache


# --------------------------------------------------------------------------- issue 15: disk full while drawing


def test_a_full_disk_while_writing_curves_png_exits_6_with_one_line(small_disk, tmp_path):
    folder, exhaust, free = small_disk
    path = _synthetic_cache(tmp_path / "m.h5")
    runs_dir = folder / "runs"
    args = ["head-train", "--cache", path, "--epochs", 3, "--runs-dir", runs_dir, "--run-name", "r"]
    exhaust(20_000)  # head.npz, history.csv and test_logits.npz fit; curves.png (~60 kB) does not
    try:
        error = _one_error_line(_invoke(*args), 6)
    finally:
        free()
    run_dir = runs_dir / "r"
    assert re.fullmatch(rf"Error: Out of disk space writing {re.escape(str(run_dir / 'curves.png'))} "
                        r"\((No space left on device|File too large)\); free space in "
                        rf"{re.escape(str(run_dir))} and run the command again \(any earlier curves\.png is "
                        r"unchanged\)\.", error), error
    # no temporary file, unfinished (no metrics.json)
    assert sorted(p.name for p in run_dir.iterdir()) == ["head.npz", "history.csv", "test_logits.npz"]
