"""Manifests: --data manifest.csv (path,label[,split,group]) scanned like a folder, with its own errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from featcache.cli import cli
from featcache.config import DataConfig, ExtractConfig
from featcache.datasets import resolve_data_root, scan_dataset
from featcache.errors import UserError
from featcache.extraction import dataset_changed, plan_extraction


def _png(path: Path, value: int = 100) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (value, value, value)).save(path)


def _manifest(root: Path, lines: list[str], name: str = "manifest.csv") -> Path:
    """Write the CSV and a PNG for every data row's path (first field)."""
    root.mkdir(parents=True, exist_ok=True)
    for line in lines[1:]:
        _png(root / line.split(",")[0], value=len(line) * 7 % 256)
    (root / name).write_text("\n".join(lines) + "\n")
    return root / name


def _rows(n: int, *, split: bool) -> list[str]:
    head = "path,label,split" if split else "path,label"
    rows = [head]
    for i in range(n):
        label = "cat" if i % 2 else "dog"
        where = ("train", "train", "val", "test")[i % 4] if split else ""
        rows.append(f"imgs/{label}/{i:03d}.png,{label}" + (f",{where}" if split else ""))
    return rows


def test_manifest_without_split_column_is_carved_like_a_folder(tmp_path):
    csv_path = _manifest(tmp_path / "study", _rows(40, split=False))
    assert resolve_data_root(str(csv_path)) == csv_path
    index = scan_dataset(csv_path, val_fraction=0.25, test_fraction=0.25, seed=3)
    assert index.root == (tmp_path / "study").resolve() and index.name == "manifest"
    assert index.class_names == ("cat", "dog")
    assert {s: len(v) for s, v in index.splits.items()} == {"train": 20, "val": 10, "test": 10}
    for split in ("val", "test"):  # stratified: 5 of each class
        assert sorted(s.label for s in index.splits[split]) == [0] * 5 + [1] * 5
    assert index.split_rule == {"val": "carved", "test": "carved", "val_fraction": 0.25, "test_fraction": 0.25,
                                "seed": 3, "manifest": "manifest.csv"}
    assert all((index.root / s.path).is_file() for _, s in index.files())
    assert index.splits["train"][0].path.startswith("imgs/")


def test_manifest_with_split_column_keeps_the_given_splits(tmp_path):
    csv_path = _manifest(tmp_path / "m", _rows(16, split=True))
    index = scan_dataset(csv_path)
    assert {s: len(v) for s, v in index.splits.items()} == {"train": 8, "val": 4, "test": 4}
    assert [s.path for s in index.splits["val"]] == [f"imgs/{'dog' if i % 2 == 0 else 'cat'}/{i:03d}.png"
                                                     for i in (2, 6, 10, 14)]
    assert index.split_rule["val"] == "manifest" and index.split_rule["seed"] is None


def test_rows_without_split_are_carved_when_that_split_has_no_rows(tmp_path):
    lines = ["path,label,split"] + [f"a/{i}.png,{'x' if i % 2 else 'y'},{'test' if i < 4 else ''}" for i in range(24)]
    index = scan_dataset(_manifest(tmp_path / "m", lines), val_fraction=0.25)
    assert {s.path for s in index.splits["test"]} == {f"a/{i}.png" for i in range(4)}
    assert len(index.splits["val"]) == 4 and len(index.splits["train"]) == 16  # round(10 * 0.25) = 2 per class
    assert index.split_rule["test"] == "manifest" and index.split_rule["val"] == "carved"


@pytest.mark.parametrize("lines, message", [
    (["file,label", "a.png,x"], "header file,label"),
    (["path,label,fold", "a.png,x,1"], "header path,label,fold"),
    (["path,label,split", "a.png,x,holdout"], "Line 2 of .* has the split 'holdout'"),
    (["path,label", "a.png,x", "b.png, "], "Line 3 of .* has an empty label"),
    (["path,label", "a.png,x", "a.png,y"], "Line 3 of .* repeats the path a.png"),
    (["path,label"], "lists no images"),
])
def test_bad_manifests_say_which_line(tmp_path, lines, message):
    root = tmp_path / "m"
    root.mkdir()
    _png(root / "a.png")
    _png(root / "b.png")
    (root / "m.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=message):
        scan_dataset(root / "m.csv")


def test_a_row_naming_a_missing_file_is_an_error_naming_the_row(tmp_path):
    csv_path = _manifest(tmp_path / "m", _rows(8, split=False))
    (tmp_path / "m" / "imgs" / "cat" / "005.png").unlink()
    with pytest.raises(UserError, match=r"Line 7 of .*manifest.csv names imgs/cat/005.png, which does not exist"):
        scan_dataset(csv_path)
    result = CliRunner().invoke(cli, ["extract", "--model", "resnet18", "--data", str(csv_path), "--weights", "none",
                                      "--cache-dir", str(tmp_path / "c")])
    assert result.exit_code == 2, result.output
    assert "Line 7" in result.output and "Traceback" not in result.output


def test_fingerprint_covers_the_csv_bytes_and_the_files(tmp_path):
    lines = _rows(12, split=False)
    csv_path = _manifest(tmp_path / "m", lines)
    config = ExtractConfig(model="resnet18", data=DataConfig(root=str(csv_path)), weights="none",
                           cache_dir=str(tmp_path / "c"))
    plan = plan_extraction(config)
    assert plan.meta["dataset_root"] == str((tmp_path / "m").resolve())
    assert dataset_changed(plan.meta) is False
    csv_path.write_text("\n".join(lines) + "\n\n")  # same rows, other bytes
    assert scan_dataset(csv_path).fingerprint() != plan.meta["dataset_fingerprint"]
    assert dataset_changed(plan.meta) is True
    assert plan_extraction(config).key != plan.key
    csv_path.write_text("\n".join(lines) + "\n")
    assert plan_extraction(config).key == plan.key
    _png(tmp_path / "m" / "imgs" / "cat" / "001.png", value=3)  # a listed file edited
    assert plan_extraction(config).key != plan.key


def test_a_csv_that_is_not_utf8_and_a_file_that_is_not_csv(tmp_path):
    (tmp_path / "bad.csv").write_bytes(b"path,label\n\xff\xfe.png,x\n")
    with pytest.raises(UserError, match="Cannot read the manifest"):
        scan_dataset(tmp_path / "bad.csv")
    (tmp_path / "list.txt").write_text("path,label\n")
    with pytest.raises(UserError, match="is a file, not a folder"):
        resolve_data_root(str(tmp_path / "list.txt"))
