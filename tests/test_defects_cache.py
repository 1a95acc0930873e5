"""Issue 15, the cache's part: damaged bytes found by checksums, planted symlinks, damaged attributes, a read-only
cache folder, non-UTF-8 file names, --strict on resume, dangling image symlinks, leftover partial files."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import h5py
import numpy as np
import pytest

from featcache import cache
from featcache.config import SPLITS
from featcache.errors import CacheError

from synthetic import gaussian_problem, write_cache


from cli_helpers import invoke as _invoke, one_error_line as _one_error_line  # noqa: E402


def _cache(path: Path) -> Path:
    splits = dict(zip(SPLITS, gaussian_problem(2, n=(600, 40, 40), dim=8)))  # train: 3 chunks of 256 rows
    return write_cache(path, splits, ["a", "b"])


def _value_offset(path: Path, split: str, row: int, col: int) -> int:
    """The file position of one float32 feature value (from h5py's chunk index)."""
    with h5py.File(path, "r") as f:
        ds = f[split]["features"]
        chunk_rows, dim = ds.chunks
        info = ds.id.get_chunk_info_by_coord((row - row % chunk_rows, 0))
        return info.byte_offset + ((row % chunk_rows) * dim + col) * 4


def _label_offset(path: Path, split: str, row: int) -> int:
    with h5py.File(path, "r") as f:
        return f[split]["labels"].id.get_offset() + row * 8


def _flip(path: Path, offset: int, bit: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([byte ^ (1 << bit)]))


DAMAGE = {  # what is done to train row 300 (the second chunk), and what the message names
    "mantissa": (lambda p: _flip(p, _value_offset(p, "train", 300, 2), 0), "train/features rows 300-300"),
    "exponent": (lambda p: _flip(p, _value_offset(p, "train", 300, 2) + 2, 7), "train/features rows 300-300"),
    "1e38": (lambda p: _write(p, _value_offset(p, "train", 300, 2), struct.pack("<f", 1e38)),
             "train/features rows 300-300"),
    "label": (lambda p: _flip(p, _label_offset(p, "train", 300), 0), "train/labels"),
}


def _write(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(data)


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_value_or_label_is_found_by_verify_every_reader_and_head_train(damage, tmp_path):
    path = _cache(tmp_path / "c" / "d" / "m.h5")
    before = cache.load_features(path, "train")
    inject, where = DAMAGE[damage]
    inject(path)
    with h5py.File(path, "r") as f:  # the bytes really changed, and stay finite (no NaN check catches them)
        x, y = f["train"]["features"][...], f["train"]["labels"][...]
        assert not (np.array_equal(x, before[0]) and np.array_equal(y, before[1])) and np.isfinite(x).all()
    want = f"{path} is damaged (checksum mismatch in {where}); delete it and run featcache extract again."

    verify = _invoke("cache", "verify", path)
    assert verify.exit_code == 3 and verify.stderr.splitlines() == [f"{path}: {want}"]
    for read in (lambda: cache.load_features(path, "train"), lambda: cache.load_splits(path)):
        with pytest.raises(CacheError) as exc:
            read()
        assert str(exc.value) == want
    if damage == "label":
        with pytest.raises(CacheError) as exc:
            cache.FeatureReader(path)
        assert str(exc.value) == want
    else:
        with cache.FeatureReader(path) as reader:
            assert reader.raw("train")  # the os.preadv path
            np.testing.assert_array_equal(reader.take("train", np.arange(0, 256)), before[0][:256])  # chunk 1 sound
            for read in (lambda: reader.take("train", np.array([599, 300, 3])), lambda: reader.read("train", 290, 310)):
                with pytest.raises(CacheError) as exc:
                    read()
                assert str(exc.value) == want
    error = _one_error_line(_invoke("head-train", "--cache", path, "--runs-dir", tmp_path / "runs"), 3)
    assert error == f"Error: {want}"
    assert not (tmp_path / "runs").exists()


def test_a_sound_cache_verifies_and_a_format_1_cache_is_read_but_said_to_carry_no_checksums(tmp_path):
    path = _cache(tmp_path / "m.h5")
    assert _invoke("cache", "verify", path).stdout.strip() == f"{path}: ok"
    x, y, _ = cache.load_features(path, "val")
    with h5py.File(path, "r+") as f:  # what a format 1 file is: no checksums
        f.attrs["format_version"] = 1
        for split in SPLITS:
            del f[split]["checksums"]
            del f[split]["labels"].attrs["crc32"]
    x1, y1, _ = cache.load_features(path, "val")
    np.testing.assert_array_equal(x1, x) and np.testing.assert_array_equal(y1, y)
    with cache.FeatureReader(path) as reader:
        np.testing.assert_array_equal(reader.take("val", np.arange(len(x))), x)
    verify = _invoke("cache", "verify", path)
    assert verify.exit_code == 3
    assert verify.stderr.splitlines()[0] == (
        f"{path}: train: carries no checksums (format 1, written before featcache stored them), so damaged values "
        "cannot be detected; run featcache extract again to get a checked cache")


def test_check_rows_names_the_first_and_last_damaged_row(tmp_path):
    path = _cache(tmp_path / "m.h5")
    with h5py.File(path, "r") as f:
        sums = f["train"]["checksums"][...]
    rows = cache.load_features(path, "train")[0]
    rows[5, 0] += 1.0
    rows[9, 3] -= 1.0
    with pytest.raises(CacheError, match=r"checksum mismatch in train/features rows 5-9"):
        cache.layout.check_rows(path, "train", rows, np.arange(len(rows)), sums)


# --------------------------------------------------------------------------- damaged attributes and layout


@pytest.mark.parametrize("damage", ["class_names", "features_1d", "no_labels"])
def test_damaged_attributes_or_datasets_are_one_sentence_from_every_reader(damage, tmp_path):
    path = _cache(tmp_path / "c" / "d" / "m.h5")
    with h5py.File(path, "r+") as f:
        if damage == "class_names":
            f.attrs["class_names"] = "[not json"
        elif damage == "features_1d":
            del f["val"]["features"]
            f["val"].create_dataset("features", data=np.zeros(40, dtype=np.float32))
        else:
            del f["test"]["labels"]
    want = {"class_names": f"{path} has damaged attributes (JSONDecodeError); delete it and run featcache "
                           "extract again.",
            "features_1d": f"{path} has a damaged split val (features (40,), labels (40,), done (40,), D=8); "
                           "delete it and run featcache extract again.",
            "no_labels": f"{path} has a damaged split test (features (40, 8), labels None, done (40,), D=8); "
                         "delete it and run featcache extract again."}[damage]
    for read in (lambda: cache.read_meta(path), lambda: cache.load_features(path, "train"),
                 lambda: cache.load_splits(path), lambda: cache.FeatureReader(path)):
        with pytest.raises(CacheError) as exc:
            read()
        assert str(exc.value) == want
    assert cache.verify_cache(path) == [want]
    assert _one_error_line(_invoke("head-train", "--cache", path, "--runs-dir", tmp_path / "runs"), 3) == \
        f"Error: {want}"


# --------------------------------------------------------------------------- extract: symlinks, folders, names

MODEL = ["--model", "resnet18", "--weights", "none", "--image-size", "32", "--num-workers", "0", "--batch-size", "4",
         "--quiet"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    from featcache.demo import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("defects") / "demo", n_per_class=(4, 2, 2), image_size=32)


def _final(data: Path, cache_dir: Path, **data_options) -> Path:
    from featcache.config import DataConfig, ExtractConfig
    from featcache.extraction import plan_extraction

    return plan_extraction(ExtractConfig(model="resnet18", data=DataConfig(root=str(data), **data_options),
                                         weights="none", image_size=32, cache_dir=str(cache_dir))).path


@pytest.mark.parametrize("planted", ["lock", "partial"])
def test_a_symlink_planted_at_the_lock_or_partial_file_is_refused_and_its_target_untouched(planted, demo, tmp_path):
    final = _final(demo, tmp_path / "cache")
    final.parent.mkdir(parents=True)
    victim = tmp_path / "victim.txt"
    if planted == "lock":
        victim.write_text("precious\n")
        link = cache.lock_path(final)
    else:  # dangling: h5py would create the cache at the target
        link = cache.partial_path(final)
    link.symlink_to(victim)
    error = _one_error_line(_invoke("extract", *MODEL, "--data", demo, "--cache-dir", tmp_path / "cache"), 3)
    assert error == f"Error: {link} is a symbolic link; remove it and run the same command again."
    if planted == "lock":
        assert victim.read_text() == "precious\n"
    else:
        assert not victim.exists() and not os.path.lexists(final)
    assert link.is_symlink()


def test_a_read_only_cache_folder_is_one_sentence_exit_2(demo, tmp_path, monkeypatch):
    import errno

    import featcache.cache.lock as lock

    real_open = os.open

    def read_only(path, flags, *args):  # what a read-only file system answers, even to root
        if str(path).endswith(".lock") and flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(lock.os, "open", read_only)
    error = _one_error_line(_invoke("extract", *MODEL, "--data", demo, "--cache-dir", tmp_path / "cache"), 2)
    folder = _final(demo, tmp_path / "cache").parent
    assert error == (f"Error: cannot write in {folder} (Read-only file system); choose a writable --cache-dir or fix "
                     "its permissions.")


def test_a_non_utf8_file_name_is_extracted_and_its_bytes_kept(demo, tmp_path):
    import shutil

    data = Path(shutil.copytree(demo, tmp_path / "data"))
    src = next((data / "train" / "normal").iterdir())
    odd = os.fsdecode(os.fsencode(data / "train" / "normal") + b"/bad\xff.png")
    shutil.copyfile(src, odd)
    result = _invoke("extract", *MODEL, "--data", data, "--cache-dir", tmp_path / "cache")
    assert result.exit_code == 0, result.output
    final = _final(data, tmp_path / "cache")
    paths = cache.load_paths(final, "train")
    assert "train/normal/bad\udcff.png" in paths and len(paths) == 9
    assert os.path.isfile(data / paths[paths.index("train/normal/bad\udcff.png")])  # back to the file on disk
    x, _, _ = cache.load_features(final, "train")
    np.testing.assert_array_equal(x[paths.index("train/normal/bad\udcff.png")], x[paths.index(
        src.relative_to(data).as_posix())])  # the same image bytes, the same features
    assert cache.verify_cache(final) == []


# --------------------------------------------------------------------------- extract: --strict, dangling, leftovers


class _Killed(Exception):
    pass


def test_strict_resume_refuses_rows_an_interrupted_run_skipped(demo, tmp_path, monkeypatch):
    import shutil

    data = Path(shutil.copytree(demo, tmp_path / "data"))
    (data / "train" / "abnormal" / "0_empty.png").write_bytes(b"")  # sorts first: in the first batch
    real_write = cache.CacheWriter.write

    def write_then_die(self, split, start, features, *, failed=()):
        real_write(self, split, start, features, failed=failed)
        raise _Killed
    monkeypatch.setattr(cache.CacheWriter, "write", write_then_die)
    with pytest.raises(_Killed):
        _invoke("extract", *MODEL, "--data", data, "--cache-dir", tmp_path / "cache", catch_exceptions=False)
    monkeypatch.undo()
    final = _final(data, tmp_path / "cache")
    with h5py.File(cache.partial_path(final), "r") as f:
        assert f["train"]["failed"][...].sum() == 1 and f["train"]["done"][...].sum() == 4
    error = _one_error_line(_invoke("extract", *MODEL, "--data", data, "--cache-dir", tmp_path / "cache",
                                    "--strict"), 2)
    assert f"Cannot read image {data / 'train/abnormal/0_empty.png'} (" in error and "--strict" in error
    assert not final.exists()
    done = _invoke("extract", *MODEL, "--data", data, "--cache-dir", tmp_path / "cache")  # without: resumes
    assert done.exit_code == 0 and final.exists(), done.output


def test_a_dangling_image_symlink_is_skipped_and_listed(demo, tmp_path):
    import shutil

    data = Path(shutil.copytree(demo, tmp_path / "data"))
    (data / "train" / "normal" / "0_gone.png").symlink_to(tmp_path / "nowhere.png")
    result = _invoke("extract", *MODEL, "--data", data, "--cache-dir", tmp_path / "cache")
    assert result.exit_code == 0, result.output
    final = _final(data, tmp_path / "cache")
    rows = cache.failures_path(final).read_text().splitlines()
    assert rows[0] == "split,path,reason" and rows[1].startswith("train,train/normal/0_gone.png,") and len(rows) == 2
    assert "train/normal/0_gone.png" not in cache.load_paths(final, "train")


def test_leftover_partials_of_a_complete_cache_are_removed_at_the_next_hit(demo, tmp_path):
    args = ["extract", *MODEL, "--data", demo, "--cache-dir", tmp_path / "cache"]
    assert _invoke(*args).exit_code == 0
    final = _final(demo, tmp_path / "cache")
    before = final.read_bytes()
    for leftover in (cache.partial_path(final), cache.compact_path(final)):  # a kill just after the final rename
        leftover.write_bytes(before)
    hit = _invoke(*args)
    assert hit.exit_code == 0, hit.output
    assert sorted(p.name for p in final.parent.iterdir()) == [final.name, final.name + ".lock"]
    assert final.read_bytes() == before


def test_verify_content_sees_a_same_size_same_mtime_swap_and_cache_ls_shows_the_key_mode(demo, tmp_path):
    import shutil

    data = Path(shutil.copytree(demo, tmp_path / "data"))
    args = ["extract", *MODEL, "--data", data, "--cache-dir", tmp_path / "cache"]
    assert _invoke(*args, "--verify-content").exit_code == 0
    by_stat, by_content = _final(data, tmp_path / "cache"), _final(data, tmp_path / "cache", verify_content=True)
    assert by_content.exists() and by_stat != by_content
    found = _invoke("head-train", "--model", "resnet18", "--weights", "none", "--image-size", "32", "--data", data,
                    "--cache-dir", tmp_path / "cache", "--verify-content", "--epochs", "1", "--runs-dir",
                    tmp_path / "runs")  # head-train finds the cache by the same content key
    assert found.exit_code == 0, found.output
    image = next((data / "val" / "normal").iterdir())
    st = image.stat()
    swapped = bytearray(image.read_bytes())
    swapped[-20] ^= 0xFF  # same size
    image.write_bytes(bytes(swapped))
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime
    assert _final(data, tmp_path / "cache") == by_stat  # stat mode: the swap is invisible (a stale hit)
    assert _final(data, tmp_path / "cache", verify_content=True) != by_content  # content mode: a new key
    listed = _invoke("cache", "ls", "--cache-dir", tmp_path / "cache", env={"COLUMNS": "250"})
    assert listed.exit_code == 0
    rows = [line for line in listed.output.splitlines() if "│ content" in line]
    assert len(rows) == 1 and "│ stale" in rows[0], listed.output  # the content key sees the swap: ls says stale
