"""Fuzzing `load_image`: random bytes, random modes, sizes and formats, truncated and bit-flipped files.

Every input must either load as an 8-bit RGB image of its own size or raise ImageLoadError (which
extraction skips and lists); any other exception would crash a whole extraction. numpy's seeded
generator stands in for hypothesis (not a dependency): every case is reproducible from its number.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
from PIL import Image

from featcache.datasets import ImageLoadError, load_image

CASES = 200  # per generator (truncated/flipped case 177 is a TIFF whose decoder raised TypeError)
# (mode, formats PIL can write it in)
MODES = {
    "1": ["PNG", "BMP", "TIFF"], "L": ["PNG", "JPEG", "BMP", "TIFF", "GIF", "WEBP"], "P": ["PNG", "BMP", "GIF", "TIFF"],
    "RGB": ["PNG", "JPEG", "BMP", "TIFF", "GIF", "WEBP"], "RGBA": ["PNG", "TIFF", "WEBP"], "LA": ["PNG", "TIFF"],
    "I;16": ["PNG", "TIFF"], "I": ["TIFF"], "F": ["TIFF"], "CMYK": ["JPEG", "TIFF"], "YCbCr": ["TIFF"],
    "LAB": ["TIFF"],
}
MAGIC = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*", b"RIFF\x00\x00\x00\x00WEBP", b""]


def _random_image(rng: np.random.Generator) -> tuple[bytes, str, tuple[int, int]]:
    """A valid file of a random mode, size and format: (bytes, format, (width, height))."""
    mode = str(rng.choice(list(MODES)))
    fmt = str(rng.choice(MODES[mode]))
    size = (int(rng.integers(1, 40)), int(rng.integers(1, 40)))
    if mode in ("I;16", "I"):
        top = int(rng.choice([255, 4095, 65535]))
        pixels = rng.integers(0, top + 1, size[::-1]).astype(np.uint16 if mode == "I;16" else np.int32)
        image = Image.fromarray(pixels)  # uint16 -> "I;16", int32 -> "I"
    elif mode == "F":
        image = Image.fromarray(rng.normal(0, float(rng.choice([1e-3, 1.0, 1e6])), size[::-1]).astype(np.float32))
    else:
        rgb = Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8))
        image = rgb.convert(mode) if mode != "P" else rgb.quantize(int(rng.integers(2, 256)))
        if mode in ("RGBA", "LA"):
            alpha = Image.fromarray(rng.integers(0, 256, size[::-1], dtype=np.uint8))
            image.putalpha(alpha)
    buf = io.BytesIO()
    extra = {"transparency": 0} if mode == "P" and fmt == "PNG" and rng.random() < 0.5 else {}
    image.save(buf, format=fmt, **extra)
    return buf.getvalue(), fmt, size


def _check(path, case: str, size: tuple[int, int] | None = None) -> str:
    """Load `path`: "ok" (RGB uint8 of the right size) or "reported"; any other exception fails the test."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns about some odd files; only exceptions matter here
            image = load_image(path)
            pixels = np.asarray(image)
    except ImageLoadError as exc:
        assert exc.path == str(path) and exc.reason, case
        return "reported"
    except Exception as exc:  # noqa: BLE001 - the point of the test
        pytest.fail(f"{case}: load_image raised {type(exc).__name__}: {exc}")
    assert image.mode == "RGB" and pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3, case
    if size is not None:
        assert image.size == size, case
    return "ok"


def test_random_bytes_are_reported_never_crash(tmp_path):
    rng = np.random.default_rng(20261130)
    outcomes = []
    for case in range(CASES):
        head = MAGIC[int(rng.integers(len(MAGIC)))]
        data = head + rng.bytes(int(rng.integers(0, 600)))
        path = tmp_path / f"bytes{case:03d}.{rng.choice(['png', 'jpg', 'gif', 'bmp', 'tif', 'webp'])}"
        path.write_bytes(data)
        outcomes.append(_check(path, f"random bytes case {case} ({len(data)} bytes, magic {head!r})"))
    assert outcomes.count("reported") >= CASES * 0.9  # random bytes are (almost) never an image


def test_valid_images_of_every_mode_load_as_rgb(tmp_path):
    rng = np.random.default_rng(1)
    formats = set()
    for case in range(CASES):
        data, fmt, size = _random_image(rng)
        formats.add(fmt)
        path = tmp_path / f"valid{case:03d}.{fmt.lower()}"
        path.write_bytes(data)
        assert _check(path, f"valid case {case} ({fmt}, {size})", size) == "ok"
    assert formats == {"PNG", "JPEG", "BMP", "TIFF", "GIF", "WEBP"}


def test_truncated_and_bit_flipped_images_load_or_are_reported(tmp_path):
    rng = np.random.default_rng(2)
    outcomes = []
    for case in range(CASES):
        data, fmt, size = _random_image(rng)
        cut = data[: int(rng.integers(0, len(data)))]
        flipped = bytearray(data)
        for _ in range(int(rng.integers(1, 8))):
            flipped[int(rng.integers(len(flipped)))] ^= 1 << int(rng.integers(8))
        for kind, damaged in (("truncated", cut), ("flipped", bytes(flipped))):
            path = tmp_path / f"{kind}{case:03d}.{fmt.lower()}"
            path.write_bytes(damaged)
            outcomes.append(_check(path, f"{kind} case {case} ({fmt}, {size}, {len(damaged)} of {len(data)} bytes)"))
    # Both outcomes occur: damage is often caught, and some flips only change pixel values.
    assert outcomes.count("reported") > CASES * 0.3 and outcomes.count("ok") > CASES * 0.1
