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
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from featcache import demo
from featcache.config import SPLITS
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
    if not root.exists():
        raise UserError(f"Dataset folder {root} does not exist; pass --data DIR with "
                        "train/<class>/ images, or --data demo.")
    if not root.is_dir():
        raise UserError(f"Dataset path {root} is a file, not a folder; pass --data DIR with "
                        "train/<class>/ images, or --data demo.")
    return root


def scan_dataset(root: str | Path, *, val_fraction: float = 0.15, test_fraction: float = 0.15,
                 seed: int = 0) -> DatasetIndex:
    """Scan ROOT/{train,val,test}/<class>/... into a DatasetIndex, carving missing val/test from train.

    Args:
      root: the dataset folder.
      val_fraction: share of each train class carved as val when val/ is missing.
      test_fraction: share of each train class carved as test when test/ is missing.
      seed: orders files for carving (see the module docstring).

    Returns:
      The index; raises UserError for a bad layout or bad fractions.
    """
    root = Path(root).expanduser().resolve()
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

    found = _split_folders(root, class_names)
    carve = {split: split not in found for split in ("val", "test")}
    splits = {split: found.get(split, []) for split in SPLITS}
    if any(carve.values()):
        splits = _carve(root, class_names, splits, carve=carve, val_fraction=val_fraction,
                        test_fraction=test_fraction, seed=seed)
    split_rule = {
        "val": "carved" if carve["val"] else "folder",
        "test": "carved" if carve["test"] else "folder",
        "val_fraction": float(val_fraction) if carve["val"] else None,
        "test_fraction": float(test_fraction) if carve["test"] else None,
        "seed": int(seed) if any(carve.values()) else None,
    }
    return DatasetIndex(
        root=root,
        name=root.name,
        class_names=class_names,
        splits={split: tuple(sorted(samples, key=lambda s: s.path))
                for split, samples in splits.items()},
        split_rule=split_rule,
    )


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
           carve: dict[str, bool], val_fraction: float, test_fraction: float,
           seed: int) -> dict[str, list[Sample]]:
    """Move a stratified, seeded share of each train class into the missing val/test splits."""
    out = {split: list(samples) for split, samples in splits.items()}
    out["train"] = []
    for label, class_name in enumerate(class_names):
        members = sorted((s for s in splits["train"] if s.label == label),
                         key=lambda s: (hashlib.sha256(f"{seed}:{s.path}".encode("utf-8", "surrogateescape")).hexdigest(), s.path))
        n = len(members)
        n_test = round(n * test_fraction) if carve["test"] else 0
        n_val = round(n * val_fraction) if carve["val"] else 0
        if n - n_test - n_val < 1:
            raise UserError(f"Class folder {root / 'train' / class_name} has only {n} images, too "
                            "few to carve val/test from; add images or provide val/ and test/ folders.")
        out["test"] += members[:n_test]
        out["val"] += members[n_test:n_test + n_val]
        out["train"] += members[n_test + n_val:]
    return out


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
