"""The synthetic demo dataset: reproducible, complete, atomic, shape-based classes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featcache import demo
from featcache.errors import UserError

SMALL = (4, 2, 2)


def _tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under root (marker included), keyed by relative path."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _auc(high: np.ndarray, low: np.ndarray) -> float:
    """P(a value from `high` > a value from `low`), ties counted half."""
    high, low = np.asarray(high)[:, None], np.asarray(low)[None, :]
    return float((high > low).mean() + 0.5 * (high == low).mean())


def _component_elongation(path: Path) -> float:
    """Mean sqrt(eigenvalue ratio) of the second moments of the dark blobs (cells) of an image."""
    gray = np.asarray(Image.open(path).convert("L"), dtype=np.float64)
    background, darkest = np.median(gray), np.percentile(gray, 1)
    mask = gray < background - 0.4 * (background - darkest)
    # Connected components (4-neighbour) by min-label propagation.
    none = mask.size
    labels = np.where(mask, np.arange(mask.size).reshape(mask.shape), none)
    while True:
        p = np.pad(labels, 1, constant_values=none)
        new = np.minimum.reduce([labels, p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]])
        new = np.where(mask, new, none)
        if (new == labels).all():
            break
        labels = new
    ratios = []
    for label in np.unique(labels[mask]):
        ys, xs = np.nonzero(labels == label)
        if len(ys) >= 10:
            low, high = np.linalg.eigvalsh(np.cov(np.stack([ys, xs])))
            ratios.append(np.sqrt(high / max(low, 1e-6)))
    return float(np.mean(ratios)) if ratios else 1.0


def test_same_seed_gives_byte_identical_files(tmp_path):
    a = demo.make_demo_dataset(tmp_path / "a", seed=3, n_per_class=SMALL)
    b = demo.make_demo_dataset(tmp_path / "b", seed=3, n_per_class=SMALL)
    hashes = _tree_hashes(a)
    assert hashes == _tree_hashes(b)
    assert len(hashes) == 2 * sum(SMALL) + 1  # images + marker


def test_another_seed_gives_other_images(tmp_path):
    a = _tree_hashes(demo.make_demo_dataset(tmp_path / "a", seed=0, n_per_class=SMALL))
    b = _tree_hashes(demo.make_demo_dataset(tmp_path / "b", seed=1, n_per_class=SMALL))
    assert a.keys() == b.keys()
    differing = [k for k in a if k.endswith(".png") and a[k] != b[k]]
    assert len(differing) == 2 * sum(SMALL)


def test_images_are_independent_of_counts(tmp_path):
    # Each image has its own generator: asking for more images leaves the first ones unchanged.
    a = _tree_hashes(demo.make_demo_dataset(tmp_path / "a", n_per_class=(2, 1, 1)))
    b = _tree_hashes(demo.make_demo_dataset(tmp_path / "b", n_per_class=(4, 2, 2)))
    pngs = [k for k in a if k.endswith(".png")]
    assert pngs and all(a[k] == b[k] for k in pngs)


@pytest.mark.parametrize("num_classes,names", [(2, ["abnormal", "normal"]),
                                               (3, ["clustered", "elongated", "normal"])])
def test_layout_counts_and_marker(tmp_path, num_classes, names):
    root = demo.make_demo_dataset(tmp_path / "d", seed=5, num_classes=num_classes,
                                  n_per_class=(5, 3, 2), image_size=48)
    assert sorted(p.name for p in root.iterdir()) == [".featcache-demo.json", "test", "train", "val"]
    for split, count in zip(("train", "val", "test"), (5, 3, 2)):
        assert sorted(p.name for p in (root / split).iterdir()) == names
        for name in names:
            files = sorted(p.name for p in (root / split / name).iterdir())
            assert files == [f"{name}_{split}_{i:04d}.png" for i in range(count)]
    with Image.open(root / "train" / names[0] / f"{names[0]}_train_0000.png") as image:
        assert image.mode == "RGB" and image.size == (48, 48)
    marker = json.loads((root / ".featcache-demo.json").read_text())
    assert marker == {"version": demo.DEMO_VERSION, "seed": 5, "num_classes": num_classes,
                      "class_names": names, "counts": {"train": 5, "val": 3, "test": 2},
                      "image_size": 48}
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # no partial folder left behind


def test_failed_render_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def failing(rng, *, kind, size):
        calls.append(kind)
        if len(calls) == 5:
            raise KeyboardInterrupt  # as if the run were killed mid-way
        return np.zeros((size, size, 3), np.uint8)

    monkeypatch.setattr(demo, "render_cell_image", failing)
    with pytest.raises(KeyboardInterrupt):
        demo.make_demo_dataset(tmp_path / "d", n_per_class=SMALL)
    assert list(tmp_path.iterdir()) == []


def test_classes_differ_in_shape_not_brightness(tmp_path):
    root = demo.make_demo_dataset(tmp_path / "d", seed=0, n_per_class=(40, 1, 1))
    normal = sorted((root / "train" / "normal").glob("*.png"))
    abnormal = sorted((root / "train" / "abnormal").glob("*.png"))
    brightness = {name: np.array([np.asarray(Image.open(p), dtype=float).mean() for p in paths])
                  for name, paths in (("normal", normal), ("abnormal", abnormal))}
    assert 0.3 < _auc(brightness["abnormal"], brightness["normal"]) < 0.7
    elong_normal = np.array([_component_elongation(p) for p in normal])
    elong_abnormal = np.array([_component_elongation(p) for p in abnormal])
    assert elong_abnormal.mean() > elong_normal.mean() + 0.2
    assert _auc(elong_abnormal, elong_normal) > 0.7


def test_ensure_reuses_existing_dataset(tmp_path, monkeypatch):
    root = demo.ensure_demo_dataset(tmp_path, seed=2, n_per_class=SMALL)
    assert root == tmp_path / "demo-data" / "demo-c2-s2-64px-n4-2-2"
    assert root.name.startswith("demo")
    image = root / "train" / "normal" / "normal_train_0000.png"
    before = (root.stat().st_ino, image.stat().st_mtime_ns,
              (root / ".featcache-demo.json").stat().st_mtime_ns)

    def no_render(*args, **kwargs):
        raise AssertionError("the demo dataset was rendered again")

    monkeypatch.setattr(demo, "make_demo_dataset", no_render)
    assert demo.ensure_demo_dataset(tmp_path, seed=2, n_per_class=SMALL) == root
    after = (root.stat().st_ino, image.stat().st_mtime_ns,
             (root / ".featcache-demo.json").stat().st_mtime_ns)
    assert after == before


def test_ensure_rerenders_a_stale_dataset(tmp_path):
    root = demo.ensure_demo_dataset(tmp_path, n_per_class=SMALL)
    hashes = _tree_hashes(root)
    marker = root / ".featcache-demo.json"
    marker.write_text(marker.read_text().replace('"version"', '"old_version"'))
    (root / "train" / "normal" / "normal_train_0000.png").unlink()
    assert demo.ensure_demo_dataset(tmp_path, n_per_class=SMALL) == root
    assert _tree_hashes(root) == hashes
    assert sorted(p.name for p in root.parent.iterdir()) == [root.name]


def test_default_name(tmp_path):
    assert demo.demo_dataset_dir(tmp_path, num_classes=3, seed=1).name == "demo-c3-s1-64px"


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="mine"):
        demo.make_demo_dataset(tmp_path / "mine", n_per_class=SMALL)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# ---------------------------------------------------------------- `featcache demo`, end to end

# the branch's DEMO_MODELS need the timm backbones; the test passes a torchvision model with random weights
DEMO_ARGS = ["--models", "resnet18@none", "--epochs", "2", "--finetune-epochs", "1", "--image-size", "32"]
DEMO_STEPS = [  # the lines that open each step, in order, as the command prints them
    "== demo dataset: {cache}/demo-data/demo-c2-s0-64px",
    "== 1. the study: resnet18@none x cached head, frozen loop, fine-tune (2 epochs, fine-tune 1, 1 seed, 32 px)",
    "== 2. export the best cached head (resnet18) and predict the demo test images",
]


def test_the_demo_models_are_one_constant_the_command_shows():
    from featcache import demo_run
    from featcache.cli import cli

    (option,) = [p for p in cli.commands["demo"].params if p.name == "models"]
    assert option.default == demo_run.DEMO_MODELS and option.show_default == ",".join(demo_run.DEMO_MODELS)
    assert len(demo_run.DEMO_MODELS) == 2 and {m.partition("@")[0] for m in demo_run.DEMO_MODELS} == {
        "timm/tf_efficientnet_lite0"}  # pretrained (offline) and random weights: one backbone, two rows


@pytest.mark.slow  # a study (extract, a JAX head, two PyTorch loops, the report), export and predict (32 px)
def test_demo_command_runs_a_study_and_agrees_with_its_runs(tmp_path):
    import re
    import subprocess
    import sys

    from featcache import runs

    cache, runs_dir = tmp_path / "cache", tmp_path / "runs"
    out = subprocess.run([sys.executable, "-m", "featcache", "demo", *DEMO_ARGS, "--cache-dir", str(cache),
                          "--runs-dir", str(runs_dir)], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    steps = [line for line in lines if line.startswith("== ")]
    assert steps == [s.format(cache=cache) for s in DEMO_STEPS]
    study = runs_dir / "demo-study"
    report = json.loads((study / "report.json").read_text())
    assert [r["name"] for r in report["rows"]] == ["resnet18@none head sgd", "resnet18@none frozen",
                                                   "resnet18@none finetune"]
    done = {runs.load_run(p).mode: runs.load_run(p) for p in study.glob("runs/*/*") if runs.is_finished(p)}
    assert sorted(done) == ["finetune", "frozen", "head"]
    assert [len(done[m].history) for m in ("head", "frozen", "finetune")] == [2, 2, 1]
    head, frozen = done["head"], done["frozen"]
    assert head.summary.test_acc == pytest.approx(frozen.summary.test_acc, abs=1e-9)  # the parity the demo shows
    assert any(line.startswith("Best row: ") for line in lines) and (study / "report.html").is_file()
    (predicted,) = [line for line in lines if line.startswith("predicted ")]
    assert re.fullmatch(rf"predicted 60 test images with {runs_dir}/demo-model\.pt2: accuracy (\S+); the run's "
                        rf"test accuracy {head.summary.test_acc:.4f} \(agree\)", predicted), predicted
    assert len([line for line in lines if re.fullmatch(r"  \S+\.png: (normal|abnormal) \(p=0\.\d{3}\)", line)]) == 3
