"""Image folders: scan `ROOT/{train,val,test}/<class>/...`, carve missing splits, load images safely.

Layout: ``ROOT/{train,val,test}/<class>/<image>``; images may sit deeper inside a
class folder (walked recursively, in sorted order). Class names are the sorted names
of train's class folders; val and test must have the same class folders. Hidden
files and folders (leading ".") and files whose extension is not in
``IMAGE_EXTENSIONS`` are ignored, as are files lying directly in a split folder.

Missing val/test splits are carved from train, stratified and seeded: within each
class, train files are ordered by ``sha256(f"{seed}:{relpath}")`` (relpath relative to
ROOT, e.g. ``train/normal/a.png``); the first ``round(n * test_fraction)`` become test
(if test/ is missing), the next ``round(n * val_fraction)`` become val (if val/ is
missing); Python's ``round`` (half to even). Adding a file moves only that file and at
most a boundary file per carved split.

Manifests: ``--data manifest.csv`` lists the images instead of folders: a header with the
columns ``path,label`` and optionally ``split`` (train, val, test or empty) and ``group``;
paths are relative to the CSV's folder (the dataset root), one row per image. Class names
are the sorted distinct labels. Rows whose split is empty or ``train`` form the train pool;
val/test with no row are carved from it exactly as a folder's missing splits. The CSV's own
bytes are part of the fingerprint.

Group-aware carving (``group_by``, a regex searched in each relative path whose first
capture group -- or whole match -- names the image's group, e.g. a patient; or a manifest's
``group`` column, an empty cell being its own group): carved val/test take whole groups.
The train pool's groups are ordered by ``sha256(f"{seed}:{group}")``; each split's target
per class is ``round(n_class * fraction)``; in that order each group goes to the carved
split (test before val on ties) whose per-class deficit it reduces most, measured as the
drop in ``sum_c |deficit_c|``, or stays in train when it reduces none. A carved split
that got no group though its target was not zero then takes the train group that leaves
its ``sum_c |deficit_c|`` smallest. A group with images in more than one given split
(ROOT/train and ROOT/test, or manifest split values) is leakage: a warning line, or with
``strict`` a UserError.

Conversion rule of ``load_image`` (every image becomes 8-bit RGB):

1. The EXIF orientation is applied (``ImageOps.exif_transpose``); multi-frame files
   (TIFF stacks, animated GIF) give their first frame.
2. 16-bit grayscale (modes ``I;16``, ``I;16L``, ``I;16B``, ``I;16N``) is scaled
   linearly from 0..65535 to 0..255: ``round(value / 257)``. Mode ``I`` (32-bit
   integer) is treated the same when its values lie in 0..65535, else min-max scaled.
   Nothing is clipped: a 16-bit image is never turned all white.
3. Floating-point images (mode ``F``) are min-max scaled to 0..255 per image (a
   constant image becomes black; NaN counts as 0).
4. Images with an alpha channel or a transparency key (``RGBA``, ``LA``, ``PA``,
   ``P`` or ``L``/``RGB`` with transparency) are composited over a **black**
   background, the background of fluorescence microscopy and radiographs: a fully
   transparent pixel becomes black.
5. Everything else (``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ...) is
   converted by PIL's ``Image.convert("RGB")``; grayscale is replicated into the three
   channels.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from featcache import demo
from featcache.config import SPLITS, DataConfig
from featcache.errors import UserError
from featcache.files import atomic_write_bytes

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp"}

_MODES_16BIT = {"I;16", "I;16L", "I;16B", "I;16N"}
_MODES_ALPHA = {"RGBA", "LA", "PA", "RGBa", "La"}


class ImageLoadError(UserError):
    """An image file could not be read; carries the path and the reason."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"Cannot read image {path} ({reason}); replace or delete the file.")
        self.path = str(path)
        self.reason = reason

    def __reduce__(self):
        return (type(self), (self.path, self.reason))


@dataclass(frozen=True)
class Sample:
    """One image: its path relative to the dataset root (posix separators) and its label."""

    path: str
    label: int


@dataclass(frozen=True)
class DatasetIndex:
    """The scanned dataset: class names and the samples of each split, sorted by path."""

    root: Path  # resolved absolute
    name: str  # root folder name
    class_names: tuple[str, ...]  # sorted folder names of train
    splits: dict[str, tuple[Sample, ...]]  # "train", "val", "test"
    # {"val": "folder"|"carved", "test": "folder"|"carved", "val_fraction": float|None,
    #  "test_fraction": float|None, "seed": int|None}; a fraction is None when its split
    # is a folder and the seed None when nothing is carved, so unused settings do not
    # change the fingerprint.
    split_rule: dict
    leaked_groups: tuple[str, ...] = ()  # groups with images in more than one given split (sorted)
    manifest: str | None = None  # the manifest's file name inside root, when scanned from a CSV

    def files(self) -> list[tuple[str, Sample]]:
        """Every (split, sample), splits in SPLITS order."""
        return [(split, sample) for split in SPLITS for sample in self.splits[split]]

    def fingerprint(self, *, content: bool = False) -> str:
        """sha256 hex over class names, split rule and every file's split, path, label, size, mtime_ns.

        content=True (--verify-content) hashes every file's bytes in place of its mtime: a file swapped for
        another of the same size and time changes it (it reads the whole dataset once).
        """
        digest = hashlib.sha256()
        header = {"class_names": list(self.class_names), "split_rule": self.split_rule}
        if content:
            header["key_mode"] = "content"
        digest.update(json.dumps(header, sort_keys=True).encode())
        if self.manifest is not None:
            digest.update(f"\nmanifest\t{hashlib.sha256((self.root / self.manifest).read_bytes()).hexdigest()}".encode())
        for split, sample in self.files():
            try:
                stat = os.stat(self.root / sample.path)
            except FileNotFoundError:  # a dangling symlink: the link itself; extraction lists it as unreadable
                stat = _lstat_or_none(self.root / sample.path)
                if stat is None:
                    raise UserError(f"Image {self.root / sample.path} disappeared after the dataset "
                                    "was scanned; run the command again.") from None
            except OSError as exc:
                raise UserError(f"Image {self.root / sample.path} cannot be read ({exc.strerror}); fix its "
                                "permissions or remove it.") from exc
            stamp = _file_sha256(self.root / sample.path) if content else stat.st_mtime_ns
            digest.update(f"\n{split}\t{sample.path}\t{sample.label}\t{stat.st_size}\t"
                          f"{stamp}".encode("utf-8", "surrogateescape"))
        return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    """sha256 hex of a file's bytes ("" for one that cannot be opened: extraction lists it as unreadable)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return ""
    return digest.hexdigest()


def _lstat_or_none(path: Path) -> os.stat_result | None:
    """The lstat of a symbolic link whose target is gone, else None."""
    try:
        return os.lstat(path) if os.path.islink(path) else None
    except OSError:
        return None


def resolve_data_root(data: str, *, cache_dir: str | Path = "cache") -> Path:
    """`--data` value -> dataset folder: "demo" / "demo3" render the 2-/3-class demo into `cache_dir`."""
    if data == "demo":
        return demo.ensure_demo_dataset(cache_dir, num_classes=2)
    if data == "demo3":
        return demo.ensure_demo_dataset(cache_dir, num_classes=3)
    root = Path(data).expanduser()
    if root.is_file() and root.suffix.lower() == ".csv":
        return root  # a manifest
    if not root.exists():
        raise UserError(f"Dataset folder {root} does not exist; pass --data DIR with "
                        "train/<class>/ images, or --data demo.")
    if not root.is_dir():
        raise UserError(f"Dataset path {root} is a file, not a folder; pass --data DIR with "
                        "train/<class>/ images, or --data demo.")
    return root


def scan_dataset(root: str | Path, *, val_fraction: float = 0.15, test_fraction: float = 0.15,
                 seed: int = 0, group_by: str | None = None, strict: bool = False,
                 log: Callable[[str], None] | None = None) -> DatasetIndex:
    """Scan ROOT/{train,val,test}/<class>/... (or a manifest CSV) into a DatasetIndex, carving missing val/test.

    Args:
      root: the dataset folder, or a manifest .csv (module docstring).
      val_fraction: share of each train class carved as val when val/ is missing.
      test_fraction: share of each train class carved as test when test/ is missing.
      seed: orders files for carving (see the module docstring).
      group_by: regex naming each path's group: carve whole groups, report groups spanning given splits.
      strict: a group spanning given splits is a UserError instead of a warning.
      log: where the leakage warning goes (default: stderr).

    Returns:
      The index; raises UserError for a bad layout or bad fractions.
    """
    root = Path(root).expanduser().resolve()
    if root.is_file():
        return scan_manifest(root, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
                             group_by=group_by, strict=strict, log=log)
    if not root.is_dir():
        raise UserError(f"Dataset folder {root} does not exist or is not a folder; pass --data "
                        "DIR with train/<class>/ images, or --data demo.")
    _check_fractions(val_fraction=val_fraction, test_fraction=test_fraction)
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise UserError(f"{root} has no train/ folder; expected {root}/train/<class>/<image>.")
    class_names = tuple(_class_folders(train_dir))
    if not class_names:
        raise UserError(f"{train_dir} has no class folders; expected {train_dir}/<class>/<image>.")
    check_two_classes(class_names, where=str(train_dir))

    found = _split_folders(root, class_names)
    carve = {split: split not in found for split in ("val", "test")}
    splits = {split: found.get(split, []) for split in SPLITS}
    groups = group_of_paths(group_by, [s.path for samples in splits.values() for s in samples]) if group_by else None
    leaked = _check_leakage(splits, groups, strict=strict, log=log)
    if any(carve.values()):
        splits = _carve(root, class_names, splits, carve=carve, val_fraction=val_fraction,
                        test_fraction=test_fraction, seed=seed, groups=groups)
    split_rule = {
        "val": "carved" if carve["val"] else "folder",
        "test": "carved" if carve["test"] else "folder",
        "val_fraction": float(val_fraction) if carve["val"] else None,
        "test_fraction": float(test_fraction) if carve["test"] else None,
        "seed": int(seed) if any(carve.values()) else None,
        **({"groups": "regex", "group_by": group_by} if group_by else {}),
    }
    return DatasetIndex(
        root=root,
        name=root.name,
        class_names=class_names,
        splits={split: tuple(sorted(samples, key=lambda s: s.path))
                for split, samples in splits.items()},
        split_rule=split_rule,
        leaked_groups=leaked,
    )


def check_two_classes(class_names: Sequence[str], *, where: str) -> None:
    """UserError (exit 2) unless there are two or more classes: a classifier of one class learns nothing, so
    extract and finetune refuse it before any image is read."""
    if len(class_names) < 2:
        found = f"only the class {class_names[0]!r}" if class_names else "no class"
        raise UserError(f"{where} has {found}; a classifier needs two or more classes: add a folder (or label) "
                        "per class.")


def _check_fractions(*, val_fraction: float, test_fraction: float) -> None:
    """UserError unless both fractions lie in [0, 1) and leave train at least some share."""
    for label, fraction in (("val", val_fraction), ("test", test_fraction)):
        if not 0.0 <= fraction < 1.0:
            raise UserError(f"The {label} fraction {fraction} is outside [0, 1); "
                            f"pass a value like --{label}-fraction 0.15.")
    if val_fraction + test_fraction >= 1.0:
        raise UserError(f"The val and test fractions ({val_fraction} + {test_fraction}) must sum "
                        "to less than 1; lower --val-fraction or --test-fraction.")


def _split_folders(root: Path, class_names: tuple[str, ...]) -> dict[str, list[Sample]]:
    """The samples of each split folder present under `root`; UserError if its classes differ from train's."""
    found: dict[str, list[Sample]] = {}
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        if split != "train":
            present = set(_class_folders(split_dir))
            missing, extra = sorted(set(class_names) - present), sorted(present - set(class_names))
            if missing or extra:
                raise UserError(f"{split_dir} has classes that differ from train/ (missing "
                                f"{missing or 'none'}, extra {extra or 'none'}); give every "
                                "split the same class folders.")
        found[split] = [Sample(path, label) for label, class_name in enumerate(class_names)
                        for path in _class_images(root, split_dir / class_name)]
    return found


def load_image(path: str | Path) -> Image.Image:
    """Open an image as 8-bit RGB by the conversion rule of this module's docstring.

    Raises ImageLoadError for a missing, corrupt, truncated or unidentifiable file, and for one
    over PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``; refused, not decoded).
    """
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that, and then decodes: refuse instead.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                opened.load()
                image = ImageOps.exif_transpose(opened)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL's decoders raise almost anything on a malformed file
        raise ImageLoadError(path, _reason(exc)) from exc
    try:
        return _to_rgb(image)
    except (ValueError, OSError) as exc:  # a mode PIL cannot convert
        raise ImageLoadError(path, f"cannot convert mode {image.mode} to RGB ({_reason(exc)})") from exc


class ImageDataset:
    """Samples of one split as (transform(load_image(root/path)), label, index).

    A map-style dataset for torch's DataLoader (it needs only __len__ and __getitem__); it does
    not subclass torch's Dataset so that scanning a folder never imports torch (a cache hit
    must not pay torch's start-up).
    """

    def __init__(self, root: Path, samples: Sequence[Sample], transform: Callable):
        self.root = Path(root)
        self.samples = tuple(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple:
        sample = self.samples[i]
        return self.transform(load_image(self.root / sample.path)), sample.label, i


class SkipUnreadable:
    """Wraps a map-style dataset: item i -> (item, i, "") or (None, i, reason) when its image is unreadable.

    The one skip rule of extract, finetune and predict: an image is skipped exactly when `load_image`
    raises ImageLoadError. Collate batches with `collate_readable`. A DataLoader worker cannot pass
    ImageLoadError itself to the main process (torch rebuilds a worker's exception from its message
    alone), so the worker returns the reason and the main process decides: skip or, --strict, stop.
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple:
        try:
            return self.dataset[i], i, ""
        except ImageLoadError as exc:
            return None, i, exc.reason


def collate_readable(items: Sequence[tuple]) -> tuple:
    """Batch SkipUnreadable items: (default-collated readable items or None if none, their indices, [(index, reason)])."""
    from torch.utils.data import default_collate

    good = [(item, i) for item, i, _ in items if item is not None]
    batch = default_collate([item for item, _ in good]) if good else None
    return batch, [i for _, i in good], [(i, reason) for item, i, reason in items if item is None]


def failures_csv(failures: Sequence[tuple[str, str, str]]) -> str:
    """The text of failures.csv: a header and one (split, path, reason) row per skipped image."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["split", "path", "reason"])
    writer.writerows(failures)
    return buf.getvalue()


def write_failures_csv(path: str | Path, failures: Sequence[tuple[str, str, str]]) -> None:
    """Write failures.csv (failures_csv) to `path` atomically: a reader sees all of it or none."""
    atomic_write_bytes(path, failures_csv(failures).encode("utf-8", "surrogateescape"))  # names as on disk


def skipped_images_line(count: int, csv_path: str | Path, *, note: str = "") -> str:
    """The one line that says how many unreadable images were skipped and where they are listed.

    Args:
        count: images skipped.
        csv_path: the failures.csv that lists them.
        note: what skipping means here, in parentheses after "skipped" (extract: "not in the cache").
    """
    noted = f" ({note})" if note else ""
    return f"{count} unreadable image{'s' if count != 1 else ''} skipped{noted}, listed in {csv_path}"


def strict_error(path: str | Path, reason: str) -> UserError:
    """The error of --strict at an unreadable image: `path` (as the user knows it) and why it failed."""
    return UserError(f"Cannot read image {path} ({reason}); replace or delete it, or drop --strict to skip "
                     "unreadable images and list them in failures.csv.")


def _class_folders(split_dir: Path) -> list[str]:
    """Sorted names of the non-hidden sub-folders of a split folder."""
    return sorted(entry.name for entry in split_dir.iterdir()
                  if entry.is_dir() and not entry.name.startswith("."))


def _class_images(root: Path, class_dir: Path) -> list[str]:
    """Posix paths relative to `root` of the images under `class_dir`, walked recursively and sorted."""
    paths: list[str] = []
    seen: set[str] = set()  # real paths of visited folders: symlink loops end here
    for folder, dirs, files in os.walk(class_dir, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                paths.append(Path(folder, name).relative_to(root).as_posix())
    if not paths:
        raise UserError(f"Class folder {class_dir} has no images "
                        f"({', '.join(sorted(IMAGE_EXTENSIONS))}); add images or remove the folder.")
    return sorted(paths)


def _carve(root: Path, class_names: tuple[str, ...], splits: dict[str, list[Sample]], *,
           carve: dict[str, bool], val_fraction: float, test_fraction: float, seed: int,
           groups: dict[str, str] | None = None, where: str | None = None) -> dict[str, list[Sample]]:
    """Move a stratified, seeded share of each train class (whole groups when `groups`) into the missing val/test."""
    if groups is not None:
        return _carve_groups(class_names, splits, groups, carve=carve, val_fraction=val_fraction,
                             test_fraction=test_fraction, seed=seed, where=where or str(root / "train"))
    out = {split: list(samples) for split, samples in splits.items()}
    out["train"] = []
    for label, class_name in enumerate(class_names):
        members = sorted((s for s in splits["train"] if s.label == label),
                         key=lambda s: (hashlib.sha256(f"{seed}:{s.path}".encode("utf-8", "surrogateescape")).hexdigest(), s.path))
        n = len(members)
        n_test = round(n * test_fraction) if carve["test"] else 0
        n_val = round(n * val_fraction) if carve["val"] else 0
        if n - n_test - n_val < 1:
            where_class = f"Class folder {root / 'train' / class_name}" if where is None else \
                f"Class {class_name!r} of {where}"
            raise UserError(f"{where_class} has only {n} images, too "
                            "few to carve val/test from; add images or provide val/ and test/ folders.")
        out["test"] += members[:n_test]
        out["val"] += members[n_test:n_test + n_val]
        out["train"] += members[n_test + n_val:]
    return out


def scan_data(root: str | Path, data: DataConfig, *, log: Callable[[str], None] | None = None) -> DatasetIndex:
    """scan_dataset with the fractions, seed, group rule and strictness of a DataConfig (root from resolve_data_root)."""
    return scan_dataset(root, val_fraction=data.val_fraction, test_fraction=data.test_fraction,
                        seed=data.split_seed, group_by=data.group_by, strict=data.strict, log=log)


def rescan(root: str | Path, split_rule: dict) -> DatasetIndex:
    """Scan a dataset again with a split rule stored in a cache (its manifest, fractions, seed, group regex).

    A fraction is None when its split was given (folder or manifest rows): it was not used, so 0 stands in.
    Leakage is neither warned about nor an error here: the rescan only compares fingerprints.
    """
    root = Path(root)
    target = root / split_rule["manifest"] if split_rule.get("manifest") else root
    return scan_dataset(target, val_fraction=split_rule.get("val_fraction") or 0.0,
                        test_fraction=split_rule.get("test_fraction") or 0.0, seed=split_rule.get("seed") or 0,
                        group_by=split_rule.get("group_by"), log=lambda line: None)


def group_of_paths(regex: str, paths: Sequence[str]) -> dict[str, str]:
    """{path: group} by `regex` searched in each relative path: its first capture group, or the whole match.

    Raises UserError for an invalid regex and for the first path it does not match.
    """
    try:
        pattern = re.compile(regex)
    except re.error as exc:
        raise UserError(f"--group-by {regex!r} is not a valid regular expression ({exc}); pass one with a "
                        r"capture group, e.g. '(patient\d+)'.") from exc
    groups: dict[str, str] = {}
    for path in paths:
        match = pattern.search(path)
        if match is None:
            raise UserError(f"--group-by {regex!r} does not match the image path {path}; use a pattern that "
                            "matches every image path (relative to the dataset root).")
        groups[path] = (match.group(1) if pattern.groups else None) or match.group(0)
    return groups


def spanning_groups(splits: dict[str, Sequence[Sample]], groups: dict[str, str]) -> tuple[str, ...]:
    """The sorted groups whose images lie in more than one split (`groups`: {path: group})."""
    seen: dict[str, set[str]] = {}
    for split, samples in splits.items():
        for sample in samples:
            seen.setdefault(groups[sample.path], set()).add(split)
    return tuple(sorted(group for group, where in seen.items() if len(where) > 1))


def leakage_line(leaked: Sequence[str]) -> str:
    """The one warning line for groups with images in more than one given split."""
    shown = ", ".join(leaked[:3]) + (", ..." if len(leaked) > 3 else "")
    return (f"Warning: {len(leaked)} group{'s' if len(leaked) != 1 else ''} ({shown}) have images in more than one "
            "given split, so test images have near-duplicates in training; put each group in one split "
            "(--strict makes this an error).")


def _check_leakage(splits: dict[str, list[Sample]], groups: dict[str, str] | None, *, strict: bool,
                   log: Callable[[str], None] | None) -> tuple[str, ...]:
    """Groups spanning the given splits: warned about (log, default stderr), or with `strict` a UserError."""
    if groups is None:
        return ()
    leaked = spanning_groups({split: samples for split, samples in splits.items() if samples}, groups)
    if leaked and strict:
        raise UserError(f"{len(leaked)} group{'s' if len(leaked) != 1 else ''} ({', '.join(leaked[:3])}"
                        f"{', ...' if len(leaked) > 3 else ''}) have images in more than one given split; move each "
                        "group's images into one split, or drop --strict to only warn.")
    if leaked:
        (log or (lambda line: print(line, file=sys.stderr)))(leakage_line(leaked))
    return leaked


def _carve_groups(class_names: tuple[str, ...], splits: dict[str, list[Sample]], groups: dict[str, str], *,
                  carve: dict[str, bool], val_fraction: float, test_fraction: float, seed: int,
                  where: str) -> dict[str, list[Sample]]:
    """Move whole train groups into the missing val/test splits by the greedy rule of the module docstring."""
    members: dict[str, list[Sample]] = {}
    for sample in splits["train"]:
        members.setdefault(groups[sample.path], []).append(sample)
    counts = {group: np.bincount([s.label for s in samples], minlength=len(class_names))  # (K,) int
              for group, samples in members.items()}
    total = sum(counts.values())
    deficit = {split: np.array([round(int(n) * fraction) for n in total])  # (K,) int
               for split, fraction in (("test", test_fraction), ("val", val_fraction)) if carve[split]}
    targets = {split: int(d.sum()) for split, d in deficit.items()}
    order = sorted(members, key=lambda g: (hashlib.sha256(f"{seed}:{g}".encode()).hexdigest(), g))
    home = dict.fromkeys(order, "train")
    for group in order:
        gains = {split: int(np.abs(d).sum() - np.abs(d - counts[group]).sum()) for split, d in deficit.items()}
        best = max(gains, key=lambda split: gains[split], default=None)  # dict order: test first on ties
        if best is not None and gains[best] > 0:
            home[group] = best
            deficit[best] = deficit[best] - counts[group]
    for split, d in deficit.items():
        spare = [g for g in order if home[g] == "train"]
        if targets[split] > 0 and split not in home.values() and spare:
            pick = min(spare, key=lambda g: int(np.abs(d - counts[g]).sum()))
            home[pick] = split
    out = {split: list(samples) for split, samples in splits.items()}
    out["train"] = []
    for group in order:
        out[home[group]] += members[group]
    left = np.bincount([s.label for s in out["train"]], minlength=len(class_names))
    for label, class_name in enumerate(class_names):
        if left[label] < 1:
            raise UserError(f"Class {class_name!r} of {where} lies in too few groups to carve val/test by group; "
                            "add images of more groups, lower the fractions, or provide val and test splits.")
    return out


MANIFEST_COLUMNS = ("path", "label", "split", "group")


def scan_manifest(csv_path: str | Path, *, val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0,
                  group_by: str | None = None, strict: bool = False,
                  log: Callable[[str], None] | None = None) -> DatasetIndex:
    """Scan a manifest CSV (module docstring) into a DatasetIndex rooted at the CSV's folder.

    Groups come from `group_by` (a regex on the path) when given, else from the `group` column if
    present. Raises UserError for a bad header, an empty path or label, an unknown split value, a
    repeated path and a row naming a missing file (each names the line).
    """
    csv_path = Path(csv_path).expanduser().resolve()
    _check_fractions(val_fraction=val_fraction, test_fraction=test_fraction)
    rows, has_group = _read_manifest(csv_path)
    class_names = tuple(sorted({label for _, label, _, _ in rows}))
    check_two_classes(class_names, where=f"{csv_path}'s label column")
    splits: dict[str, list[Sample]] = {split: [] for split in SPLITS}
    for path, label, split, _ in rows:
        splits[split or "train"].append(Sample(path, class_names.index(label)))
    if group_by:
        groups = group_of_paths(group_by, [row[0] for row in rows])
    else:
        groups = {path: group or path for path, _, _, group in rows} if has_group else None
    carve = {split: not splits[split] for split in ("val", "test")}
    leaked = _check_leakage(splits, groups, strict=strict, log=log)
    if any(carve.values()):
        splits = _carve(csv_path.parent, class_names, splits, carve=carve, val_fraction=val_fraction,
                        test_fraction=test_fraction, seed=seed, groups=groups, where=str(csv_path))
    split_rule = {
        "val": "carved" if carve["val"] else "manifest", "test": "carved" if carve["test"] else "manifest",
        "val_fraction": float(val_fraction) if carve["val"] else None,
        "test_fraction": float(test_fraction) if carve["test"] else None,
        "seed": int(seed) if any(carve.values()) else None, "manifest": csv_path.name,
        **({"groups": "regex", "group_by": group_by} if group_by else {"groups": "column"} if has_group else {}),
    }
    return DatasetIndex(root=csv_path.parent, name=csv_path.stem, class_names=class_names,
                        splits={split: tuple(sorted(samples, key=lambda s: s.path))
                                for split, samples in splits.items()},
                        split_rule=split_rule, leaked_groups=leaked, manifest=csv_path.name)


def _read_manifest(csv_path: Path) -> tuple[list[tuple[str, str, str, str]], bool]:
    """([(path, label, split, group)] of every non-blank row, whether a group column exists); UserError per bad row."""
    try:
        text = csv_path.read_bytes().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"Cannot read the manifest {csv_path} ({exc}); pass a UTF-8 CSV with columns path,label.") \
            from exc
    reader = csv.reader(io.StringIO(text))
    header = [name.strip().lower() for name in next(reader, [])]
    if ("path" not in header or "label" not in header or len(set(header)) != len(header)
            or not set(header) <= set(MANIFEST_COLUMNS)):
        raise UserError(f"The manifest {csv_path} has the header {','.join(header) or '(none)'}; its first line "
                        "must name the columns path,label and optionally split,group.")
    rows, seen = [], set()
    for line, values in enumerate(reader, start=2):
        if not any(value.strip() for value in values):
            continue
        if len(values) != len(header):
            raise UserError(f"Line {line} of {csv_path} has {len(values)} fields, not {len(header)}; give every "
                            f"row the columns {','.join(header)}.")
        cell = dict(zip(header, (value.strip() for value in values)))
        row = (cell["path"], cell["label"], cell.get("split", "").lower(), cell.get("group", ""))
        _check_manifest_row(csv_path, line, row, seen)
        seen.add(row[0])
        rows.append(row)
    if not rows:
        raise UserError(f"The manifest {csv_path} lists no images; add rows path,label.")
    return rows, "group" in header


def _check_manifest_row(csv_path: Path, line: int, row: tuple[str, str, str, str], seen: set[str]) -> None:
    """UserError naming line `line` of the manifest for an empty path/label, unknown split, repeat or missing file."""
    path, label, split, _ = row
    if not path or not label:
        raise UserError(f"Line {line} of {csv_path} has an empty {'path' if not path else 'label'}; "
                        "give every row a path and a label.")
    if split not in ("", *SPLITS):
        raise UserError(f"Line {line} of {csv_path} has the split {split!r}; use train, val, test or leave it empty.")
    if path in seen:
        raise UserError(f"Line {line} of {csv_path} repeats the path {path}; list every image once.")
    if not (csv_path.parent / path).is_file():
        raise UserError(f"Line {line} of {csv_path} names {path}, which does not exist; fix the path (relative to "
                        "the manifest's folder) or remove the row.")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Apply steps 2-5 of the conversion rule (module docstring) to a loaded image."""
    mode = image.mode
    if mode in _MODES_16BIT:
        values = np.asarray(image).astype(np.uint32)  # (H, W) 0..65535
        return _gray_to_rgb(((values + 128) // 257).astype(np.uint8))
    if mode == "I":
        values = np.asarray(image)  # (H, W) int32
        if values.size and values.min() >= 0 and values.max() <= 65535:
            return _gray_to_rgb(((values.astype(np.uint32) + 128) // 257).astype(np.uint8))
        return _gray_to_rgb(_min_max_uint8(values.astype(np.float64)))
    if mode == "F":
        return _gray_to_rgb(_min_max_uint8(np.nan_to_num(np.asarray(image, dtype=np.float64))))
    if mode in _MODES_ALPHA or "transparency" in image.info:
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    if mode == "RGB":
        return image
    return image.convert("RGB")


def _min_max_uint8(values: np.ndarray) -> np.ndarray:
    """Min-max scale a (H, W) array to uint8 0..255; a constant array becomes 0."""
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.rint((values - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> Image.Image:
    """(H, W) uint8 -> RGB image with the gray value in all three channels."""
    return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2))


def _reason(exc: BaseException) -> str:
    """A short reason for an image that failed to load."""
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return "too many pixels, refused as a possible decompression bomb"
    if isinstance(exc, Image.UnidentifiedImageError):
        return "not a recognised image format"
    text = str(exc).strip()
    return text.rstrip(".") if text else type(exc).__name__
