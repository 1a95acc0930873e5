"""Group-aware splits (--group-by, a manifest's group column): whole groups per carved split, leakage reported.

The data: sklearn's digits as "patients", each seen in several augmented copies (shifts, a flip), the
file name carrying the patient id -- the situation of several slices or views per patient.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from featcache.cli import cli
from featcache.config import DataConfig, ExtractConfig
from featcache.datasets import group_of_paths, scan_dataset, spanning_groups
from featcache.errors import UserError
from featcache.extraction import dataset_changed, plan_extraction

REGEX = r"(patient\d+)"
COPIES = 4


def _copies(image: np.ndarray) -> list[np.ndarray]:
    """COPIES near-duplicates of an (8, 8) digit: itself, shifted right, shifted down, mirrored."""
    return [image, np.roll(image, 1, axis=1), np.roll(image, 1, axis=0), image[:, ::-1]][:COPIES]


def patients_dataset(root: Path, *, digits=(3, 8), per_class: int = 20, given_test: int = 0) -> Path:
    """ROOT/train/<digit>/patientNNN_k.png: `per_class` patients (digits) per class, COPIES images each (32 px).

    given_test: that many patients per class also get one copy under ROOT/test (a leak across given splits).
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    for digit in digits:
        images = data.images[data.target == digit][:per_class]  # (per_class, 8, 8) 0..16
        for p, image in enumerate(images):
            pid = f"patient{digit}{p:03d}"
            for k, copy in enumerate(_copies(image)):
                pixels = np.kron(copy * (255 / 16), np.ones((4, 4))).astype(np.uint8)  # (32, 32)
                target = root / "train" / str(digit) / f"{pid}_{k}.png"
                if p < given_test and k == 0:
                    target = root / "test" / str(digit) / f"{pid}_{k}.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(target)
    return root


@pytest.fixture(scope="module")
def patients(tmp_path_factory) -> Path:
    return patients_dataset(tmp_path_factory.mktemp("groups") / "patients")


def _group_of(index) -> dict[str, str]:
    return group_of_paths(REGEX, [s.path for _, s in index.files()])


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_carved_splits_take_whole_groups_and_file_carving_leaks(patients, seed):
    grouped = scan_dataset(patients, val_fraction=0.15, test_fraction=0.3, seed=seed, group_by=REGEX)
    assert spanning_groups(grouped.splits, _group_of(grouped)) == ()
    assert grouped.leaked_groups == ()
    by_file = scan_dataset(patients, val_fraction=0.15, test_fraction=0.3, seed=seed)
    leaked = spanning_groups(by_file.splits, _group_of(by_file))
    assert len(leaked) > 10  # of 40 patients with 4 copies, most have a copy in val or test
    assert sum(len(v) for v in grouped.splits.values()) == sum(len(v) for v in by_file.splits.values()) == 160


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_group_carving_is_stratified_and_deterministic(patients, seed):
    index = scan_dataset(patients, val_fraction=0.15, test_fraction=0.3, seed=seed, group_by=REGEX)
    for split, fraction in (("test", 0.3), ("val", 0.15)):
        per_class = Counter(s.label for s in index.splits[split])
        for label in (0, 1):  # target round(80 * fraction) images per class, met within one group of 4
            assert abs(per_class[label] - round(80 * fraction)) <= COPIES, (split, per_class)
    again = scan_dataset(patients, val_fraction=0.15, test_fraction=0.3, seed=seed, group_by=REGEX)
    assert again.splits == index.splits
    other = scan_dataset(patients, val_fraction=0.15, test_fraction=0.3, seed=seed + 100, group_by=REGEX)
    assert other.splits["test"] != index.splits["test"]


def test_the_split_rule_and_the_cache_key_record_the_group_rule(patients, tmp_path):
    def plan(group_by):
        return plan_extraction(ExtractConfig(model="resnet18", weights="none", cache_dir=str(tmp_path),
                                             data=DataConfig(root=str(patients), group_by=group_by)))

    plain, grouped = plan(None), plan(REGEX)
    assert "group_by" not in plain.meta["split_rule"] and "groups" not in plain.meta["split_rule"]
    assert grouped.meta["split_rule"]["group_by"] == REGEX and grouped.meta["split_rule"]["groups"] == "regex"
    assert plain.key != grouped.key != plan(r"(patient\d+)_").key  # same groups, another rule
    assert dataset_changed(grouped.meta) is False  # the rescan uses the stored regex


def test_a_path_the_regex_does_not_match_and_a_bad_regex(patients):
    with pytest.raises(UserError, match=r"does not match the image path train/3/patient3000_0.png"):
        scan_dataset(patients, group_by=r"(subject\d+)")
    with pytest.raises(UserError, match="not a valid regular expression"):
        scan_dataset(patients, group_by=r"(patient")


def test_a_group_spanning_given_splits_is_a_warning_or_with_strict_an_error(tmp_path):
    root = patients_dataset(tmp_path / "leaky", per_class=6, given_test=2)
    lines = []
    index = scan_dataset(root, group_by=REGEX, log=lines.append)
    assert index.leaked_groups == ("patient3000", "patient3001", "patient8000", "patient8001")
    assert len(lines) == 1 and lines[0].startswith("Warning: 4 groups (patient3000, patient3001, patient8000, ...)")
    assert spanning_groups(index.splits, _group_of(index)) == index.leaked_groups  # carving adds none
    with pytest.raises(UserError, match=r"4 groups .* have images in more than one given split"):
        scan_dataset(root, group_by=REGEX, strict=True)
    result = CliRunner().invoke(cli, ["extract", "--model", "resnet18", "--data", str(root), "--weights", "none",
                                      "--group-by", REGEX, "--strict", "--cache-dir", str(tmp_path / "c")])
    assert result.exit_code == 2 and "have images in more than one given split" in result.output


def test_the_manifest_group_column_and_split_values(tmp_path):
    root = patients_dataset(tmp_path / "m", per_class=10)
    paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    rows = ["path,label,group"] + [f"{p},{p.split('/')[1]},{p.split('/')[2].split('_')[0]}" for p in paths]
    (root / "all.csv").write_text("\n".join(rows) + "\n")
    index = scan_dataset(root / "all.csv", test_fraction=0.3, seed=2)
    assert index.split_rule["groups"] == "column" and index.leaked_groups == ()
    assert spanning_groups(index.splits, _group_of(index)) == ()
    assert len(index.splits["test"]) >= 8
    # the same groups given as split values, one patient in train and test: leakage from the manifest
    rows = ["path,label,split,group"] + [f"{p},{p.split('/')[1]},{'test' if p.endswith('patient3000_1.png') else ''},"
                                         f"{p.split('/')[2].split('_')[0]}" for p in paths]
    (root / "leak.csv").write_text("\n".join(rows) + "\n")
    lines = []
    assert scan_dataset(root / "leak.csv", log=lines.append).leaked_groups == ("patient3000",)
    assert lines and lines[0].startswith("Warning: 1 group (patient3000)")
    with pytest.raises(UserError, match="1 group"):
        scan_dataset(root / "leak.csv", strict=True)


def test_report_shows_file_level_leakage_against_group_carving(tmp_path, monkeypatch):
    """extract + head-train with and without --group-by on the same patients; report lays both runs side by side."""
    import json

    from featcache.cache import read_meta

    monkeypatch.chdir(tmp_path)  # report's default figure
    root = patients_dataset(tmp_path / "patients", per_class=30)
    common = ["--model", "resnet18", "--data", str(root), "--weights", "none", "--image-size", "32",
              "--test-fraction", "0.3", "--cache-dir", str(tmp_path / "c")]
    leaked = {}
    for name, extra in (("file", []), ("group", ["--group-by", REGEX])):
        result = CliRunner().invoke(cli, ["extract", *common, *extra, "--quiet", "--num-workers", "0"])
        assert result.exit_code == 0, result.output
        result = CliRunner().invoke(cli, ["head-train", *common, *extra, "--runs-dir", str(tmp_path / "runs"),
                                          "--run-name", name, "--solver", "ridge", "--standardize"])
        assert result.exit_code == 0, result.output
        index = scan_dataset(root, test_fraction=0.3, group_by=extra[1] if extra else None)
        leaked[name] = spanning_groups(index.splits, _group_of(index))
        metrics = json.loads((tmp_path / "runs" / name / "metrics.json").read_text())
        assert read_meta(metrics["cache"]["path"])["split_rule"].get("group_by") == (REGEX if extra else None)
    assert len(leaked["file"]) > 10 and leaked["group"] == ()
    result = CliRunner().invoke(cli, ["report", str(tmp_path / "runs" / "file"), str(tmp_path / "runs" / "group"),
                                      "--format", "json"])
    assert result.exit_code == 0, result.output
    rows = {Path(row["run_dir"]).name: row for row in json.loads(result.output[:result.output.rindex("]") + 1])}
    assert set(rows) == {"file", "group"}
    for row in rows.values():
        assert 0.5 < row["test_acc"] <= 1.0
    print(f"test acc: file-level carving {rows['file']['test_acc']:.4f} "
          f"({len(leaked['file'])} patients leak), group carving {rows['group']['test_acc']:.4f}")
