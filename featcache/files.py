"""Files that a reader sees whole or not at all: atomic writes and directory fsync (stdlib only).

Files written here get the permissions every other tool gives a new file, 0o666 less the umask (0644 under
the usual umask 022), not mkstemp's private 0600.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

from featcache.errors import NoSpaceError, UserError, out_of_space

NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}  # errnos of a folder that cannot be written


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc/self/status), else set and
    restored at once."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The mode a plain new file gets: 0o666 less the umask (what open(path, "w") gives)."""
    return 0o666 & ~current_umask()


def not_writable(path: str | Path, exc: OSError) -> UserError:
    """The one-sentence UserError (exit 2) for a file that cannot be written: permission denied or a
    read-only file system."""
    return UserError(f"Cannot write {path} ({exc.strerror or exc}); make its folder writable or choose another "
                     "folder.")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that a reader sees the old file or the whole new one, never a part."""
    atomic_write(path, lambda f: f.write(data))


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Call `write(file)` on a temporary file beside `path`, then rename it into place (atomic_write_bytes).

    The file gets `new_file_mode()` (the umask's permissions). A full disk is a NoSpaceError naming `path`,
    a read-only or forbidden folder a UserError (`not_writable`); the temporary file is removed and the old
    `path`, if any, is left as it was.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        if exc.errno in NOT_WRITABLE:
            raise not_writable(path, exc) from None
        raise
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fchmod(f.fileno(), new_file_mode())
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


def shell_quoted(path: str | Path) -> str:
    """A path as the user can paste it into a shell (shlex.quote: quotes only when it holds spaces and the like)."""
    import shlex

    return shlex.quote(str(path))


def model_file_part(model: str) -> str:
    """`--model` as part of a file name (cache files, run directories): a backbone file by its file name,
    `timm/<name>` as `timm-<name>`, every other character outside [A-Za-z0-9_.-] as `-`."""
    if not model.startswith("timm/") and (os.sep in model or "/" in model):
        model = os.path.basename(model.rstrip("/" + os.sep)) or model
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in model) or "model"
