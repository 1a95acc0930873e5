"""Issue 15, the cache's part: damaged bytes found by checksums, planted symlinks, damaged attributes, a read-only
cache folder, non-UTF-8 file names, --strict on resume, dangling image symlinks, leftover partial files."""

from __future__ import annotations

import struct
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from featcache import cache
from featcache.cli import cli
from featcache.config import SPLITS
from featcache.errors import CacheError

from synthetic import gaussian_problem, write_cache


def _invoke(*args, **kwargs):
    return CliRunner().invoke(cli, [str(a) for a in args], **kwargs)


def _one_error_line(result, code: int) -> str:
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output, result.output
    lines = result.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("Error: ")] == lines[-1:], result.stderr
    return lines[-1]


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
