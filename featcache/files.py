"""Files that a reader sees whole or not at all: atomic writes and directory fsync (stdlib only)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

from featcache.errors import NoSpaceError, out_of_space


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that a reader sees the old file or the whole new one, never a part."""
    atomic_write(path, lambda f: f.write(data))


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Call `write(file)` on a temporary file beside `path`, then rename it into place (atomic_write_bytes).

    A full disk is a NoSpaceError naming `path`; the temporary file is removed and the old `path`,
    if any, is left as it was.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        reason = out_of_space(exc)
        if reason:
            raise NoSpaceError(path, reason, f"free space in {path.parent} and run the command again "
                               f"(any earlier {path.name} is unchanged).") from None
        raise


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside `path` durable (fsync the directory itself)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
