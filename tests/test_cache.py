"""The cache file on its own: layout, atomic finish, resume, lock, verify (numpy + h5py only)."""

from __future__ import annotations

import multiprocessing as mp
import os

import h5py
import numpy as np
import pytest

from featcache import cache
from featcache.errors import CacheError, LockedError

D = 6


def _meta(key="k" * 64):
    return {
        "key": key, "model": "resnet18", "weights": "none", "weights_sha256": "",
        "transform": {"crop": 32}, "class_names": ["a", "b"], "dataset_root": "/data",
        "dataset_name": "d", "dataset_fingerprint": "f", "split_rule": {"val": "folder"},
        "versions": {"numpy": np.__version__}, "created": "",
    }


def _splits(n_train=10, n_val=4):
    return {
        "train": cache.SplitRows(labels=np.arange(n_train) % 2, paths=[f"train/x{i}.png" for i in range(n_train)]),
        "val": cache.SplitRows(labels=np.arange(n_val) % 2, paths=[f"val/x{i}.png" for i in range(n_val)]),
    }


def _features(split, start, stop):
    rows = np.arange(start, stop, dtype=np.float32)[:, None]
    return rows * 10 + np.arange(D, dtype=np.float32) + (100 if split == "val" else 0)


def _write_all(writer, batch_size=3, stop_after=None):
    written = 0
    for split in ("train", "val"):
        for a, b in writer.pending(split, batch_size):
            if stop_after is not None and written >= stop_after:
                return
            writer.write(split, a, _features(split, a, b))
            written += 1


def test_roundtrip_and_plain_h5py_layout(tmp_path):
    final = tmp_path / "d" / "m.h5"
    w = cache.CacheWriter(final, meta=_meta(), feature_dim=D, dtype="float32", splits=_splits())
    assert not final.exists() and w.partial.exists()
    _write_all(w)
    assert w.finish() == final and final.exists() and not w.partial.exists()

    x, y, meta = cache.load_features(final, "train")
    np.testing.assert_array_equal(x, _features("train", 0, 10))
    np.testing.assert_array_equal(y, np.arange(10) % 2)
    assert meta["class_names"] == ["a", "b"] and meta["splits"] == {"train": 10, "val": 4}
    assert cache.load_paths(final, "val") == [f"val/x{i}.png" for i in range(4)]
    assert cache.verify_cache(final) == []
    # Anyone can read it with plain h5py, as README documents.
    with h5py.File(final, "r") as f:
        assert f.attrs["complete"] and f.attrs["feature_dim"] == D
        assert f["val/features"].shape == (4, D) and f["val/features"].dtype == np.float32
        assert f["train/paths"][0].decode() == "train/x0.png"


def _count_opens(monkeypatch) -> list:
    """Every h5py.File opened from now on (its path), in a list."""
    opened = []

    class Counted(h5py.File):
        def __init__(self, name, *args, **kwargs):
            opened.append(name)
            super().__init__(name, *args, **kwargs)
    monkeypatch.setattr(h5py, "File", Counted)
    return opened


def _message(call) -> str:
    with pytest.raises(CacheError) as caught:
        call()
    return str(caught.value)


def test_load_splits_opens_the_file_once_and_checks_as_load_features_does(tmp_path, monkeypatch):
    final = tmp_path / "d" / "m.h5"
    w = cache.CacheWriter(final, meta=_meta(), feature_dim=D, dtype="float32", splits=_splits())
    _write_all(w)
    w.finish()
    opened = _count_opens(monkeypatch)
    meta, splits = cache.load_splits(final, ("train", "val"))
    assert len(opened) == 1
    assert list(splits) == ["train", "val"] and meta == cache.read_meta(final)
    for split, (x, y) in splits.items():
        want_x, want_y, _ = cache.load_features(final, split)
        np.testing.assert_array_equal(x, want_x)
        np.testing.assert_array_equal(y, want_y)
        assert x.shape == (len(y), D) and y.dtype == np.int64
    opened.clear()
    cache.load_features(final, "val")
    with cache.FeatureReader(final):
        pass
    assert len(opened) == 2  # one open each

    # the same errors, word for word: a split the file lacks (the default asks for test too), rows never
    # written, NaN features
    want = _message(lambda: cache.load_features(final, "test"))
    assert _message(lambda: cache.load_splits(final)) == want and "has no split 'test'" in want
    with h5py.File(final, "r+") as f:
        f["val/done"][1] = False
    want = _message(lambda: cache.load_features(final, "val"))
    assert _message(lambda: cache.load_splits(final, ("train", "val"))) == want and "missing rows of val" in want
    with h5py.File(final, "r+") as f:
        f["val/done"][1] = True
        f["train/features"][2, 0] = np.nan
    want = _message(lambda: cache.load_features(final, "train"))
    assert _message(lambda: cache.load_splits(final, ("val", "train"))) == want and "1 of 10 rows" in want


def test_the_extraction_attribute_is_stored_as_given(tmp_path):
    run = {"images": 13, "seconds": 0.5, "images_per_s": 26.0, "device": "cpu", "batch_size": 3, "num_workers": 0}
    final = tmp_path / "d" / "m.h5"
    w = cache.CacheWriter(final, meta=_meta(), feature_dim=D, dtype="float32", splits=_splits())
    _write_all(w)
    w.finish(extraction=run)
    assert cache.read_meta(final)["extraction"] == run and cache.verify_cache(final) == []
    # through the copy that leaves out an unreadable row, too
    compact = tmp_path / "d" / "c.h5"
    w = cache.CacheWriter(compact, meta=_meta(), feature_dim=D, dtype="float32", splits=_splits())
    w.write("train", 0, _features("train", 0, 2), failed=[2])
    _write_all(w)
    w.finish(skipped=[("train", "train/x2.png", "truncated")], extraction=run)
    meta = cache.read_meta(compact)
    assert meta["extraction"] == run and meta["splits"] == {"train": 9, "val": 4}


def test_partial_file_is_never_read_as_a_cache(tmp_path):
    final = tmp_path / "d" / "m.h5"
    w = cache.CacheWriter(final, meta=_meta(), feature_dim=D, dtype="float16", splits=_splits())
    _write_all(w, stop_after=2)
    w.close()
    with pytest.raises(CacheError, match="unfinished"):
        cache.load_features(w.partial, "train")
    with pytest.raises(CacheError, match="does not exist"):
        cache.read_meta(final)
    rows = cache.list_caches(tmp_path)
    assert [r["status"] for r in rows] == ["partial"]
    assert rows[0]["splits"]["train"] == {"n": 10, "done": 6}


def test_resume_writes_only_missing_rows_and_equals_clean_run(tmp_path):
    final = tmp_path / "d" / "m.h5"
    w = cache.CacheWriter(final, meta=_meta(), feature_dim=D, dtype="float32", splits=_splits())
    _write_all(w, stop_after=2)
    w.close()
    w = cache.CacheWriter(final, meta=_meta(), feature_dim=D, dtype="float32", splits=_splits())
    assert w.resumed_rows == 6
    assert w.pending("train", 3) == [(6, 9), (9, 10)]
    _write_all(w)
    w.finish()
    x, _, _ = cache.load_features(final, "train")
    np.testing.assert_array_equal(x, _features("train", 0, 10))


def test_partial_with_another_key_is_discarded(tmp_path):
    final = tmp_path / "d" / "m.h5"
    w = cache.CacheWriter(final, meta=_meta("a" * 64), feature_dim=D, dtype="float32", splits=_splits())
    _write_all(w, stop_after=2)
    w.close()
    w = cache.CacheWriter(final, meta=_meta("b" * 64), feature_dim=D, dtype="float32", splits=_splits())
    assert w.resumed_rows == 0 and len(w.pending("train", 3)) == 4
    w.close()


def test_finish_refuses_missing_rows(tmp_path):
    w = cache.CacheWriter(tmp_path / "m.h5", meta=_meta(), feature_dim=D, dtype="float32", splits=_splits())
    _write_all(w, stop_after=1)
    with pytest.raises(RuntimeError):
        w.finish()
    w.close()


@pytest.mark.parametrize("damage", ["truncate", "zero", "random"])
def test_damaged_file_is_corrupt_never_zeros(tmp_path, damage):
    final = tmp_path / "d" / "m.h5"
    w = cache.CacheWriter(final, meta=_meta(), feature_dim=D, dtype="float32", splits=_splits())
    _write_all(w)
    w.finish()
    size = final.stat().st_size
    if damage == "truncate":
        os.truncate(final, size // 2)
    elif damage == "zero":
        os.truncate(final, 0)
    else:
        final.write_bytes(np.random.default_rng(0).bytes(size))
    with pytest.raises(CacheError, match="extract again"):
        cache.load_features(final, "train")
    assert cache.verify_cache(final)
    assert [r["status"] for r in cache.list_caches(tmp_path)] == ["corrupt"]


def test_verify_reports_missing_attribute(tmp_path):
    final = tmp_path / "m.h5"
    w = cache.CacheWriter(final, meta=_meta(), feature_dim=D, dtype="float32", splits=_splits())
    _write_all(w)
    w.finish()
    with h5py.File(final, "r+") as f:
        del f.attrs["weights_sha256"]
    assert cache.verify_cache(final) == ["attribute 'weights_sha256' missing"]


def test_key_changes_with_every_input():
    base = dict(dataset_fingerprint="f", class_names=["a", "b"], split_rule={"val": "folder"}, model="m",
                weights="none", weights_id="w", transform={"crop": 32}, dtype="float32")
    keys = {cache.cache_key(**base)}
    for field, value in [("dataset_fingerprint", "g"), ("class_names", ["a", "c"]), ("model", "n"),
                         ("weights", "imagenet"), ("weights_id", "v"), ("transform", {"crop": 64}),
                         ("dtype", "float16"), ("split_rule", {"val": "carved"})]:
        keys.add(cache.cache_key(**{**base, field: value}))
    assert len(keys) == 9
    assert cache.cache_key(**base) == cache.cache_key(**dict(base))


def _hold_lock(path, started, release):
    with cache.write_lock(path):
        started.set()
        release.wait(10)


def test_lock_names_the_holder_and_wait_waits(tmp_path):
    final = tmp_path / "m.h5"
    ctx = mp.get_context("fork")
    started, release = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold_lock, args=(final, started, release))
    p.start()
    try:
        assert started.wait(10)
        with pytest.raises(LockedError, match=f"pid {p.pid}") as exc:
            with cache.write_lock(final):
                pass
        assert exc.value.exit_code == 4 and "--wait" in str(exc.value)
        release.set()
        with cache.write_lock(final, wait=True):  # blocks until the holder exits
            assert not p.is_alive() or p.join(5) is None
    finally:
        release.set()
        p.join(10)
