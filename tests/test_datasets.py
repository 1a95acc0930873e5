"""Scanning image folders, carved splits, fingerprints, image conversion, the torch Dataset."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from featcache import datasets, demo
from featcache.datasets import (ImageDataset, ImageLoadError, Sample, load_image,
                                resolve_data_root, scan_dataset)
from featcache.errors import UserError


def _png(path: Path, value: int = 128, size: tuple[int, int] = (8, 6)) -> Path:
    """Write a small gray RGB PNG (creating folders)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value // 2, 255 - value)).save(path)
    return path


def _layout(root: Path, counts: dict[str, dict[str, int]]) -> Path:
    """root/<split>/<class>/img_<i>.png for {split: {class: count}}."""
    for split, classes in counts.items():
        for class_name, count in classes.items():
            (root / split / class_name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                _png(root / split / class_name / f"img_{i:03d}.png", value=(7 * i) % 256)
    return root


def _placement(index: datasets.DatasetIndex) -> dict[str, str]:
    """{relative path: split} of every file of the index."""
    return {sample.path: split for split, sample in index.files()}


# --- scanning ------------------------------------------------------------------------------

def test_scan_layout_ignores_hidden_and_non_images(tmp_path):
    root = tmp_path / "xrays"
    _layout(root, {"train": {"normal": 2, "pneumonia": 1}, "val": {"normal": 1, "pneumonia": 1},
                   "test": {"normal": 1, "pneumonia": 2}})
    _png(root / "train" / "pneumonia" / "left" / "deep" / "b.PNG")  # nested, upper-case extension
    _png(root / "train" / "normal" / ".hidden.png")
    _png(root / "train" / "normal" / ".ipynb_checkpoints" / "img_000-checkpoint.png")
    _png(root / "train" / ".ipynb_checkpoints" / "x.png")  # a hidden "class" folder
    (root / "train" / "normal" / ".DS_Store").write_bytes(b"\0\1")
    (root / "train" / "normal" / "notes.txt").write_text("not an image")
    _png(root / "train" / "stray.png")  # not inside a class folder

    index = scan_dataset(root)
    assert index.root == root.resolve() and index.root.is_absolute()
    assert index.name == "xrays"
    assert index.class_names == ("normal", "pneumonia")
    assert index.splits["train"] == (
        Sample("train/normal/img_000.png", 0), Sample("train/normal/img_001.png", 0),
        Sample("train/pneumonia/img_000.png", 1), Sample("train/pneumonia/left/deep/b.PNG", 1))
    assert index.splits["val"] == (Sample("val/normal/img_000.png", 0),
                                   Sample("val/pneumonia/img_000.png", 1))
    assert [s.label for s in index.splits["test"]] == [0, 1, 1]
    assert index.split_rule == {"val": "folder", "test": "folder", "val_fraction": None,
                                "test_fraction": None, "seed": None}
    assert [split for split, _ in index.files()] == ["train"] * 4 + ["val"] * 2 + ["test"] * 3


def test_class_map_is_train_s_sorted_folders_in_every_split(tmp_path):
    root = _layout(tmp_path / "d", {s: {"b": 1, "a": 1, "c": 1} for s in datasets.SPLITS})
    index = scan_dataset(root)
    assert index.class_names == ("a", "b", "c")
    for split in datasets.SPLITS:
        assert {s.path.split("/")[1]: s.label for s in index.splits[split]} == {"a": 0, "b": 1, "c": 2}


def test_missing_train_folder(tmp_path):
    _layout(tmp_path / "d", {"val": {"a": 1}})
    with pytest.raises(UserError, match=r"d has no train/ folder; expected .*d/train/<class>/<image>"):
        scan_dataset(tmp_path / "d")


def test_no_class_folders(tmp_path):
    _png(tmp_path / "d" / "train" / "flat.png")
    with pytest.raises(UserError, match=r"d/train has no class folders"):
        scan_dataset(tmp_path / "d")


def test_empty_class_folder(tmp_path):
    root = _layout(tmp_path / "d", {"train": {"a": 2}})
    (root / "train" / "b").mkdir()
    (root / "train" / "b" / ".DS_Store").write_bytes(b"")
    (root / "train" / "b" / "readme.md").write_text("")
    with pytest.raises(UserError, match=r"Class folder .*d/train/b has no images"):
        scan_dataset(root)


def test_empty_class_folder_in_val(tmp_path):
    root = _layout(tmp_path / "d", {"train": {"a": 2, "b": 2}, "val": {"a": 1}})
    (root / "val" / "b").mkdir()
    with pytest.raises(UserError, match=r"d/val/b has no images"):
        scan_dataset(root)


def test_val_and_test_class_mismatch_names_split_and_classes(tmp_path):
    root = _layout(tmp_path / "d", {"train": {"a": 2, "b": 2}, "val": {"a": 1, "c": 1},
                                    "test": {"a": 1, "b": 1}})
    with pytest.raises(UserError) as info:
        scan_dataset(root)
    message = str(info.value)
    assert "d/val" in message and "missing ['b']" in message and "extra ['c']" in message
    assert info.value.exit_code == 2

    root = _layout(tmp_path / "e", {"train": {"a": 2, "b": 2}, "test": {"a": 1}})
    with pytest.raises(UserError, match=r"e/test has classes .*missing \['b'\], extra none"):
        scan_dataset(root)


@pytest.mark.parametrize("val,test", [(-0.1, 0.1), (1.0, 0.0), (0.0, 1.2), (0.5, 0.5), (0.7, 0.4)])
def test_bad_fractions(tmp_path, val, test):
    root = _layout(tmp_path / "d", {"train": {"a": 10}})
    with pytest.raises(UserError, match="fraction"):
        scan_dataset(root, val_fraction=val, test_fraction=test)


# --- carved splits -------------------------------------------------------------------------

def test_carved_split_is_stratified_disjoint_complete_and_deterministic(tmp_path):
    root = _layout(tmp_path / "d", {"train": {"a": 20, "b": 13}})
    index = scan_dataset(root, val_fraction=0.2, test_fraction=0.1, seed=7)
    assert index.split_rule == {"val": "carved", "test": "carved", "val_fraction": 0.2,
                                "test_fraction": 0.1, "seed": 7}
    counts = {split: [sum(s.label == k for s in index.splits[split]) for k in (0, 1)]
              for split in datasets.SPLITS}
    # a: test round(2.0)=2, val round(4.0)=4; b: test round(1.3)=1, val round(2.6)=3
    assert counts == {"test": [2, 1], "val": [4, 3], "train": [14, 9]}
    paths = [s.path for _, s in index.files()]
    assert len(paths) == len(set(paths)) == 33
    assert set(paths) == {f"train/{c}/img_{i:03d}.png" for c, n in (("a", 20), ("b", 13))
                          for i in range(n)}
    for samples in index.splits.values():
        assert list(samples) == sorted(samples, key=lambda s: s.path)
        assert all(s.label == index.class_names.index(s.path.split("/")[1]) for s in samples)
    assert scan_dataset(root, val_fraction=0.2, test_fraction=0.1, seed=7) == index
    other = scan_dataset(root, val_fraction=0.2, test_fraction=0.1, seed=8)
    assert _placement(other) != _placement(index)
    assert [len(other.splits[s]) for s in datasets.SPLITS] == [23, 7, 3]


def test_only_missing_splits_are_carved(tmp_path):
    root = _layout(tmp_path / "d", {"train": {"a": 10, "b": 10}, "test": {"a": 2, "b": 2}})
    index = scan_dataset(root, val_fraction=0.3, test_fraction=0.1, seed=0)
    assert index.split_rule == {"val": "carved", "test": "folder", "val_fraction": 0.3,
                                "test_fraction": None, "seed": 0}
    assert all(s.path.startswith("test/") for s in index.splits["test"])
    assert len(index.splits["test"]) == 4
    assert [len(index.splits[s]) for s in ("train", "val")] == [14, 6]
    assert all(s.path.startswith("train/") for s in index.splits["val"])


def test_carved_split_is_stable_when_a_file_is_added(tmp_path):
    root = _layout(tmp_path / "d", {"train": {"a": 40, "b": 40}})
    before = _placement(scan_dataset(root, seed=1))
    # 41 * 0.15 rounds like 40 * 0.15 (to 6): the split sizes of class a stay the same.
    moved_counts = []
    for i in range(12):
        new = _png(root / "train" / "a" / f"new_{i}.png").relative_to(root).as_posix()
        after = _placement(scan_dataset(root, seed=1))
        assert set(after) == set(before) | {new}
        moved = [p for p in before if before[p] != after[p]]
        # Inserting into the ordered list pushes at most one boundary file per carved split.
        assert len(moved) <= 2
        assert all(p.startswith("train/a/") for p in moved)
        moved_counts.append(len(moved))
        if after[new] == "train":
            assert moved == []
        os.remove(root / new)
        assert _placement(scan_dataset(root, seed=1)) == before
    assert 0 in moved_counts  # most new files land in train and move nothing


def test_carving_needs_one_train_image_per_class(tmp_path):
    root = _layout(tmp_path / "d", {"train": {"a": 10, "b": 2}})
    with pytest.raises(UserError, match=r"d/train/b has only 2 images"):
        scan_dataset(root, val_fraction=0.3, test_fraction=0.4)


# --- fingerprint ---------------------------------------------------------------------------

def test_fingerprint_tracks_added_removed_and_edited_files(tmp_path):
    root = _layout(tmp_path / "d", {"train": {"a": 3, "b": 3}, "val": {"a": 1, "b": 2},
                                    "test": {"a": 1, "b": 1}})
    first = scan_dataset(root).fingerprint()
    assert len(first) == 64 and int(first, 16) >= 0
    assert scan_dataset(root).fingerprint() == first  # re-scan: same
    # Fractions and seed are unused when val/ and test/ exist: the fingerprint ignores them.
    assert scan_dataset(root, val_fraction=0.3, seed=9).fingerprint() == first

    added = _png(root / "train" / "a" / "extra.png")
    with_added = scan_dataset(root).fingerprint()
    assert with_added != first
    added.unlink()
    assert scan_dataset(root).fingerprint() == first

    removed = root / "val" / "b" / "img_001.png"
    removed.unlink()
    assert scan_dataset(root).fingerprint() != first
    _png(removed)

    image = root / "train" / "b" / "img_001.png"
    stat = image.stat()
    baseline = scan_dataset(root).fingerprint()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    touched = scan_dataset(root).fingerprint()
    assert touched != baseline
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert scan_dataset(root).fingerprint() == baseline
    with open(image, "ab") as f:  # a size change with the mtime restored
        f.write(b"\0")
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert scan_dataset(root).fingerprint() != baseline


def test_fingerprint_covers_split_rule(tmp_path):
    root = _layout(tmp_path / "d", {"train": {"a": 20, "b": 20}})
    assert scan_dataset(root, seed=0).fingerprint() != scan_dataset(root, seed=1).fingerprint()
    assert (scan_dataset(root, val_fraction=0.1).fingerprint()
            != scan_dataset(root, val_fraction=0.2).fingerprint())


def test_fingerprint_of_a_vanished_file_is_a_user_error(tmp_path):
    root = _layout(tmp_path / "d", {"train": {"a": 4, "b": 4}})
    index = scan_dataset(root)
    (root / "train" / "a" / "img_002.png").unlink()
    with pytest.raises(UserError, match="img_002.png disappeared"):
        index.fingerprint()


# --- load_image ----------------------------------------------------------------------------

def test_16_bit_grayscale_is_scaled_not_saturated(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 32).round().astype(np.uint16).reshape(32, 64)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    with Image.open(tmp_path / "ramp.png") as raw:
        assert raw.mode == "I;16"
    image = load_image(tmp_path / "ramp.png")
    pixels = np.asarray(image)
    assert image.mode == "RGB" and image.size == (64, 32)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 0] == pixels[..., 2]).all()
    assert 120 < pixels.mean() < 135
    assert pixels.min() == 0 and pixels.max() == 255
    assert (pixels == 255).mean() < 0.01
    np.testing.assert_array_equal(pixels[..., 0], np.rint(ramp / 257).astype(np.uint8))


def test_16_bit_tiff_low_range_is_not_stretched(tmp_path):
    # A 12-bit detector stored in 16 bits: values 0..4095 -> 0..16 (documented rule, no stretch).
    values = (np.arange(64).reshape(8, 8) * 64).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "twelve.tif")
    pixels = np.asarray(load_image(tmp_path / "twelve.tif"))
    assert pixels.max() == round(4032 / 257) == 16


def test_mode_i_and_f(tmp_path):
    small = np.array([[0, 65535], [257, 514]], dtype=np.int32)
    Image.fromarray(small, mode="I").save(tmp_path / "i.tif")
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "i.tif"))[..., 1], [[0, 255], [1, 2]])
    wide = np.array([[-100, 0], [100, 200000]], dtype=np.int32)  # outside 16 bits: min-max
    Image.fromarray(wide, mode="I").save(tmp_path / "wide.tif")
    assert np.asarray(load_image(tmp_path / "wide.tif"))[..., 0].tolist() == [[0, 0], [0, 255]]
    floats = np.array([[-1.0, 0.0], [1.0, 3.0]], dtype=np.float32)
    Image.fromarray(floats, mode="F").save(tmp_path / "f.tif")
    assert np.asarray(load_image(tmp_path / "f.tif"))[..., 2].tolist() == [[0, 64], [128, 255]]
    Image.fromarray(np.full((3, 3), 5.0, np.float32), mode="F").save(tmp_path / "flat.tif")
    assert np.asarray(load_image(tmp_path / "flat.tif")).max() == 0


def test_alpha_is_composited_over_black(tmp_path):
    rgba = Image.new("RGBA", (4, 3), (200, 100, 50, 255))
    rgba.putpixel((0, 0), (200, 100, 50, 0))
    rgba.putpixel((1, 0), (200, 100, 50, 128))
    rgba.save(tmp_path / "rgba.png")
    image = load_image(tmp_path / "rgba.png")
    assert image.mode == "RGB" and image.size == (4, 3)
    assert image.getpixel((0, 0)) == (0, 0, 0)
    assert image.getpixel((2, 2)) == (200, 100, 50)
    assert all(abs(a - b / 2) <= 1 for a, b in zip(image.getpixel((1, 0)), (200, 100, 50)))
    Image.new("LA", (5, 5), (90, 0)).save(tmp_path / "la.png")
    assert load_image(tmp_path / "la.png").getpixel((2, 2)) == (0, 0, 0)


def test_palette_with_and_without_transparency(tmp_path):
    palette = Image.new("P", (6, 4), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    palette.putpixel((0, 0), 2)
    palette.save(tmp_path / "p.png")
    image = load_image(tmp_path / "p.png")
    assert image.mode == "RGB" and image.size == (6, 4)
    assert image.getpixel((0, 0)) == (0, 255, 0) and image.getpixel((1, 1)) == (255, 0, 0)
    palette.save(tmp_path / "pt.png", transparency=1)  # red entry transparent -> black
    image = load_image(tmp_path / "pt.png")
    assert image.getpixel((0, 0)) == (0, 255, 0) and image.getpixel((1, 1)) == (0, 0, 0)
    palette.save(tmp_path / "p.gif")
    assert load_image(tmp_path / "p.gif").mode == "RGB"


def test_bilevel_gray_cmyk_and_exif_orientation(tmp_path):
    bits = Image.new("1", (7, 5), 0)
    bits.putpixel((3, 2), 1)
    bits.save(tmp_path / "bits.png")
    image = load_image(tmp_path / "bits.png")
    assert image.mode == "RGB" and image.size == (7, 5)
    assert image.getpixel((3, 2)) == (255, 255, 255) and image.getpixel((0, 0)) == (0, 0, 0)

    Image.new("L", (5, 4), 77).save(tmp_path / "gray.bmp")
    assert load_image(tmp_path / "gray.bmp").getpixel((1, 1)) == (77, 77, 77)

    Image.new("CMYK", (9, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    with Image.open(tmp_path / "cmyk.jpg") as raw:
        assert raw.mode == "CMYK"
    image = load_image(tmp_path / "cmyk.jpg")
    assert image.mode == "RGB" and image.size == (9, 8)
    red, green, blue = image.getpixel((4, 4))
    assert red > 200 and green < 60 and blue < 60  # cyan/magenta/yellow 0,1,1 -> red

    rotated = Image.new("RGB", (12, 4), (10, 20, 30))
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    rotated.save(tmp_path / "rotated.jpg", exif=exif)
    assert load_image(tmp_path / "rotated.jpg").size == (4, 12)


def test_unreadable_images_raise_image_load_error(tmp_path):
    (tmp_path / "fake.png").write_text("not really a png")
    with pytest.raises(ImageLoadError, match=r"fake.png \(not a recognised image format\)") as info:
        load_image(tmp_path / "fake.png")
    assert isinstance(info.value, UserError) and info.value.exit_code == 2
    assert info.value.path == str(tmp_path / "fake.png")

    _png(tmp_path / "whole.png", size=(64, 64))
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="cut.png"):
        load_image(tmp_path / "cut.png")

    with pytest.raises(ImageLoadError, match=r"missing.png \(file not found\)"):
        load_image(tmp_path / "missing.png")

    error = ImageLoadError("a/b.png", "broken")
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), str(copy), copy.path, copy.reason) == (ImageLoadError, str(error), "a/b.png",
                                                               "broken")


def test_decompression_bomb_is_an_image_load_error(tmp_path, monkeypatch):
    _png(tmp_path / "big.png", size=(64, 64))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 4096 px > 2 * 100: refused
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        load_image(tmp_path / "big.png")


# --- ImageDataset and resolve_data_root ----------------------------------------------------

def test_image_dataset_items(tmp_path):
    root = _layout(tmp_path / "d", {"train": {"a": 2, "b": 3}})
    index = scan_dataset(root, val_fraction=0.0, test_fraction=0.0)
    dataset = ImageDataset(index.root, index.splits["train"],
                           lambda im: torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255)
    assert len(dataset) == 5
    image, label, i = dataset[3]
    assert image.shape == (3, 6, 8) and image.dtype == torch.float32
    assert (label, i) == (1, 3)
    images, labels, indices = next(iter(torch.utils.data.DataLoader(dataset, batch_size=5)))
    assert images.shape == (5, 3, 6, 8)
    assert labels.tolist() == [0, 0, 1, 1, 1] and indices.tolist() == [0, 1, 2, 3, 4]


def test_resolve_data_root(tmp_path, monkeypatch):
    with pytest.raises(UserError, match=r"Dataset folder .*nowhere does not exist; pass --data DIR"):
        resolve_data_root(str(tmp_path / "nowhere"))
    (tmp_path / "file.txt").write_text("")
    with pytest.raises(UserError, match=r"file.txt is a file, not a folder"):
        resolve_data_root(str(tmp_path / "file.txt"))
    assert resolve_data_root(str(tmp_path)) == tmp_path

    calls = []
    monkeypatch.setattr(demo, "ensure_demo_dataset",
                        lambda cache_dir, **kw: calls.append((cache_dir, kw)) or Path("x"))
    resolve_data_root("demo", cache_dir=tmp_path)
    resolve_data_root("demo3", cache_dir=tmp_path)
    assert calls == [(tmp_path, {"num_classes": 2}), (tmp_path, {"num_classes": 3})]


def test_demo_dataset_scans_with_its_marker_hidden(tmp_path):
    root = demo.ensure_demo_dataset(tmp_path, n_per_class=(3, 2, 1), image_size=32)
    index = scan_dataset(root)
    assert index.name.startswith("demo")
    assert index.class_names == ("abnormal", "normal")
    assert [len(index.splits[s]) for s in datasets.SPLITS] == [6, 4, 2]
    assert load_image(index.root / index.splits["test"][0].path).size == (32, 32)
