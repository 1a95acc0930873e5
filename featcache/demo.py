"""The built-in synthetic demo dataset: deterministic microscopy-like PNGs (numpy + PIL).

Brightfield-style images of stained cells on a noisy, blurred background. Classes
differ in cell *shape and arrangement*; count, size, stain colour, contrast,
background and noise vary the same way in every class, so mean brightness does not
separate them.

* ``normal``    round cells, evenly stained, scattered.
* ``abnormal``  (2 classes) mostly elongated or lobed cells, often clustered,
  unevenly stained; about a quarter of its cells still look normal.
* ``elongated`` / ``clustered`` (3 classes, replacing ``abnormal``): elongated
  scattered cells / lobed cells packed in clusters.

Every image comes from its own ``numpy.random.Generator(PCG64)`` seeded by
``(seed, split, class, i)``, so files do not depend on each other and the same seed
gives byte-identical files. A dataset is rendered into a hidden sibling folder and
renamed into place with ``os.replace`` when complete, marker file included.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageFilter

from featcache.config import SPLITS as DEMO_SPLITS
from featcache.errors import UserError

DEMO_VERSION = 1  # bump when the rendering changes: old markers then no longer match
MARKER_NAME = ".featcache-demo.json"
DEFAULT_N_PER_CLASS = (100, 30, 30)
CLASS_NAMES = {2: ("abnormal", "normal"), 3: ("clustered", "elongated", "normal")}

_REF_SIZE = 64.0  # geometry below is in pixels of a 64 px image, scaled to image_size
_HEMATOXYLIN_OD = np.array([0.65, 0.70, 0.29])  # optical density per RGB channel


def demo_class_names(num_classes: int) -> tuple[str, ...]:
    """Sorted class folder names of the demo dataset with `num_classes` classes."""
    if num_classes not in CLASS_NAMES:
        raise ValueError(f"num_classes must be one of {sorted(CLASS_NAMES)}, got {num_classes}")
    return CLASS_NAMES[num_classes]


def demo_dataset_dir(cache_dir: str | Path, *, seed: int = 0, num_classes: int = 2,
                     n_per_class: tuple[int, int, int] = DEFAULT_N_PER_CLASS,
                     image_size: int = 64) -> Path:
    """Folder of the demo dataset with these settings inside `cache_dir` (name starts with "demo")."""
    name = f"demo-c{num_classes}-s{seed}-{image_size}px"
    if tuple(n_per_class) != DEFAULT_N_PER_CLASS:
        name += "-n" + "-".join(str(n) for n in n_per_class)
    return Path(cache_dir) / "demo-data" / name


def ensure_demo_dataset(cache_dir: str | Path, *, seed: int = 0, num_classes: int = 2,
                        n_per_class: tuple[int, int, int] = DEFAULT_N_PER_CLASS,
                        image_size: int = 64) -> Path:
    """Return the demo dataset folder in `cache_dir`, rendering it only if missing or stale.

    This is what ``--data demo`` resolves to in every command.
    """
    root = demo_dataset_dir(cache_dir, seed=seed, num_classes=num_classes,
                            n_per_class=n_per_class, image_size=image_size)
    expected = _marker(seed=seed, num_classes=num_classes, n_per_class=n_per_class,
                       image_size=image_size)
    if _read_marker(root) == expected:
        return root
    return make_demo_dataset(root, seed=seed, num_classes=num_classes,
                             n_per_class=n_per_class, image_size=image_size)


def make_demo_dataset(root: str | Path, *, seed: int = 0, num_classes: int = 2,
                      n_per_class: tuple[int, int, int] = DEFAULT_N_PER_CLASS,
                      image_size: int = 64) -> Path:
    """Render the demo dataset into `root`/{train,val,test}/<class>/<class>_<split>_<i:04d>.png.

    Args:
      root: destination folder; replaced atomically if it holds an older demo dataset.
      seed: the same seed gives byte-identical files.
      num_classes: 2 (abnormal, normal) or 3 (clustered, elongated, normal).
      n_per_class: images per class in (train, val, test).
      image_size: side of the square RGB images, in pixels.

    Returns:
      `root`, complete, with its `.featcache-demo.json` marker.
    """
    root = Path(root)
    class_names = demo_class_names(num_classes)
    if len(n_per_class) != 3 or min(n_per_class) < 0 or image_size < 8:
        raise ValueError(f"bad demo settings n_per_class={n_per_class} image_size={image_size}")
    if root.exists() and any(root.iterdir()) and _read_marker(root) is None:
        raise UserError(f"Folder {root} exists and is not a featcache demo dataset; "
                        "remove it or render the demo somewhere else.")
    marker = _marker(seed=seed, num_classes=num_classes, n_per_class=n_per_class,
                     image_size=image_size)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes 0o700
        for split_index, (split, count) in enumerate(zip(DEMO_SPLITS, n_per_class)):
            for class_index, class_name in enumerate(class_names):
                folder = tmp / split / class_name
                folder.mkdir(parents=True)
                for i in range(count):
                    rng = np.random.Generator(np.random.PCG64(
                        [DEMO_VERSION, seed, num_classes, split_index, class_index, i]))
                    pixels = render_cell_image(rng, kind=class_name, size=image_size)
                    Image.fromarray(pixels, mode="RGB").save(
                        folder / f"{class_name}_{split}_{i:04d}.png", format="PNG", compress_level=6)
        (tmp / MARKER_NAME).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
        _move_into_place(tmp, root, marker)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def render_cell_image(rng: np.random.Generator, *, kind: str, size: int = 64) -> np.ndarray:
    """One synthetic brightfield image of cells of class `kind`; returns (size, size, 3) uint8."""
    scale = size / _REF_SIZE
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5  # (H, W) pixel centres
    look = _draw_nuisances(rng, size=size, scale=scale)
    shapes, clustered, uneven_p = _class_traits(rng, kind, look.n_cells)
    centres = _cell_centres(rng, look.n_cells, size=size, radius=look.mean_radius, clustered=clustered)
    density = np.zeros((size, size))  # (H, W) optical density of stain
    for centre, shape in zip(centres, shapes):
        density += _cell_density(rng, yy, xx, centre=centre, shape=shape, look=look, uneven_p=uneven_p)
    _add_debris(rng, density, yy, xx, size=size, scale=scale, contrast=look.contrast)
    return _photograph(rng, density, look=look, scale=scale)


class _Nuisances(NamedTuple):
    """What varies the same way in every class: cell count and size, stain, contrast, background."""

    n_cells: int
    mean_radius: float
    stain: np.ndarray  # (3,) optical density per RGB channel
    contrast: float
    background: np.ndarray  # (3,) RGB in [0, 1]
    background_field: np.ndarray  # (H, W) slow illumination variation around 1
    texture: np.ndarray  # (H, W) in about [-1, 1]


def _draw_nuisances(rng: np.random.Generator, *, size: int, scale: float) -> _Nuisances:
    """The nuisances of one image, drawn identically for every class."""
    n_cells = int(rng.integers(4, 12))
    mean_radius = rng.uniform(3.5, 6.5) * scale
    stain = _HEMATOXYLIN_OD * rng.uniform(0.8, 1.2, size=3)
    stain = stain + np.array([0.25, 0.0, -0.1]) * rng.uniform(-1.0, 1.0)  # purple..blue shift
    contrast = rng.uniform(0.45, 1.3)
    background = rng.uniform(0.72, 0.95) * (1.0 - rng.uniform(0.0, 0.08, size=3))
    background_field = 1.0 + rng.uniform(0.02, 0.1) * _smooth_noise(rng, size, grid=5)
    texture = _smooth_noise(rng, size, grid=12)  # (H, W) in about [-1, 1]
    return _Nuisances(n_cells, mean_radius, stain, contrast, background, background_field, texture)


def _class_traits(rng: np.random.Generator, kind: str, n_cells: int) -> tuple[list[str], bool, float]:
    """What the class decides: (shape of each cell, clustered or not, chance of uneven staining per cell)."""
    if kind == "normal":
        shapes = ["round"] * n_cells
        clustered = rng.random() < 0.15
        uneven_p = 0.15
    elif kind == "abnormal":
        shapes = [str(rng.choice(["elongated", "lobed"])) if rng.random() < 0.75 else "round"
                  for _ in range(n_cells)]
        clustered = rng.random() < 0.5
        uneven_p = 0.8
    elif kind == "elongated":
        shapes = ["elongated" if rng.random() < 0.8 else "round" for _ in range(n_cells)]
        clustered = rng.random() < 0.15
        uneven_p = 0.6
    elif kind == "clustered":
        shapes = ["lobed" if rng.random() < 0.8 else "round" for _ in range(n_cells)]
        clustered = True
        uneven_p = 0.6
    else:
        raise ValueError(f"unknown demo class {kind!r}")
    return shapes, clustered, uneven_p


def _cell_density(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, *, centre: np.ndarray, shape: str,
                  look: _Nuisances, uneven_p: float) -> np.ndarray:
    """(H, W) stain optical density of one cell (cytoplasm and nucleus) of `shape` at `centre` (y, x)."""
    cy, cx = centre
    radius = look.mean_radius * rng.uniform(0.8, 1.2)  # radius of the equal-area disc
    if shape == "elongated":
        aspect = rng.uniform(1.8, 3.0)
    elif shape == "lobed":
        aspect = rng.uniform(1.0, 1.5)
    else:
        aspect = rng.uniform(1.0, 1.2)
    a, b = radius * np.sqrt(aspect), radius / np.sqrt(aspect)  # semi-axes, area = pi r^2
    angle = rng.uniform(0.0, np.pi)
    dx, dy = xx - cx, yy - cy
    u = (dx * np.cos(angle) + dy * np.sin(angle)) / a
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) / b
    r = np.hypot(u, v)
    theta = np.arctan2(v, u)
    boundary = np.ones_like(r)
    harmonics = (0.03, 0.03) if shape != "lobed" else (0.12, 0.25)
    for k in (2, 3, 4, 5):
        boundary += rng.uniform(*harmonics) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    cell = np.clip((boundary - r) * radius / 1.2 + 0.5, 0.0, 1.0)  # ~1 px soft edge
    nucleus = np.clip((0.45 * boundary - r) * radius / 1.0 + 0.5, 0.0, 1.0)
    stain_level = look.contrast * rng.uniform(0.8, 1.2)
    if rng.random() < uneven_p:
        gradient = rng.uniform(0.4, 0.8) * u * rng.choice([-1.0, 1.0])
        local = 1.0 + np.clip(gradient + 0.5 * look.texture, -0.8, 1.5)
    else:
        local = 1.0
    return stain_level * (0.35 * cell * local + 0.5 * nucleus)


def _add_debris(rng: np.random.Generator, density: np.ndarray, yy: np.ndarray, xx: np.ndarray, *, size: int,
                scale: float, contrast: float) -> None:
    """Add a few tiny specks to `density` (H, W), in place: debris, in every class."""
    for _ in range(int(rng.integers(0, 6))):
        cy, cx = rng.uniform(0, size, size=2)
        speck = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (0.7 * scale) ** 2))
        density += rng.uniform(0.2, 0.8) * contrast * speck


def _photograph(rng: np.random.Generator, density: np.ndarray, *, look: _Nuisances, scale: float) -> np.ndarray:
    """The brightfield picture of stain `density` (H, W): light through the stain, blur, sensor noise; uint8 RGB."""
    rgb = look.background * look.background_field[..., None] * np.exp(-density[..., None] * look.stain)
    image = Image.fromarray(_to_uint8(rgb), mode="RGB")
    image = image.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.3, 1.0) * scale))
    noisy = np.asarray(image, dtype=np.float64) / 255.0
    noisy = noisy + rng.normal(0.0, rng.uniform(0.01, 0.035), size=noisy.shape)
    return _to_uint8(noisy)


def _cell_centres(rng: np.random.Generator, n: int, *, size: int, radius: float,
                  clustered: bool) -> np.ndarray:
    """(n, 2) cell centres (y, x): uniform over the image, or around 1-2 cluster centres."""
    margin = min(radius, size / 4)
    if not clustered:
        return rng.uniform(margin, size - margin, size=(n, 2))
    hubs = rng.uniform(size * 0.3, size * 0.7, size=(int(rng.integers(1, 3)), 2))
    which = rng.integers(0, len(hubs), size=n)
    centres = hubs[which] + rng.normal(0.0, 1.3 * radius, size=(n, 2))
    return np.clip(centres, margin, size - margin)


def _smooth_noise(rng: np.random.Generator, size: int, *, grid: int) -> np.ndarray:
    """(size, size) smooth random field in about [-1, 1]: a grid x grid field upsampled bicubically."""
    coarse = rng.uniform(-1.0, 1.0, size=(grid, grid)).astype(np.float32)
    field = Image.fromarray(coarse, mode="F").resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(field, dtype=np.float64)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    """Float image in [0, 1] -> uint8, rounded and clipped."""
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def _marker(*, seed: int, num_classes: int, n_per_class: tuple[int, int, int],
            image_size: int) -> dict:
    """The content of `.featcache-demo.json` for these settings (no timestamps: reproducible)."""
    return {
        "version": DEMO_VERSION,
        "seed": int(seed),
        "num_classes": int(num_classes),
        "class_names": list(demo_class_names(num_classes)),
        "counts": {split: int(n) for split, n in zip(DEMO_SPLITS, n_per_class)},
        "image_size": int(image_size),
    }


def _read_marker(root: Path) -> dict | None:
    """The marker of a demo dataset at `root`, or None if absent or unreadable."""
    try:
        return json.loads((root / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None


def _move_into_place(tmp: Path, root: Path, marker: dict) -> None:
    """Rename the finished `tmp` to `root`, replacing an older demo dataset there."""
    try:
        os.replace(tmp, root)  # succeeds if root is missing or an empty folder
        return
    except OSError:
        if not root.is_dir():
            raise
    if _read_marker(root) == marker:
        return  # a concurrent run finished the same dataset first; ours is discarded
    old = root.with_name(f".{root.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(root, old)
    try:
        os.replace(tmp, root)
    finally:
        shutil.rmtree(old, ignore_errors=True)
