"""The writer lock of a cache file: one writer at a time, released by the kernel even on SIGKILL (flock)."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from featcache.cache.layout import folder_error, lock_path, partial_path, symlink_error, timestamp
from featcache.errors import CacheError, LockedError, UserError

LOCK_GRACE_S = 1.0  # a held lock is retried this long before it counts as held (a killed run's workers let go)


@contextmanager
def write_lock(final: Path, *, wait: bool = False) -> Iterator[None]:
    """Hold the writer lock of `final` (flock: released by the kernel even on SIGKILL)."""
    path = lock_path(final)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)  # a planted symlink is never truncated
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise symlink_error(path) from None
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise folder_error(path.parent, exc) from None
        raise
    try:
        if not _flock_within(fd, LOCK_GRACE_S):
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
            if not wait:
                raise LockedError(
                    f"{final.name} is being written by {holder}; wait for it to finish "
                    "or run again with --wait."
                ) from None
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {timestamp()}".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing drops the flock; the file stays (unlinking would race a waiter)


def _flock_within(fd: int, seconds: float) -> bool:
    """Take the exclusive flock, retrying for `seconds` (a probe by lock_holder holds it for a moment)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)


def lock_holder(final: Path) -> str | None:
    """Who writes `final` now ("pid N on HOST since T"), or None when no process holds its lock.

    Retries for LOCK_GRACE_S, as a writer does: the decode workers of a writer killed a moment ago
    still hold its lock until they die with it.
    """
    try:
        fd = os.open(lock_path(Path(final)), os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:  # none, or a symlink no writer would take (write_lock refuses it)
        return None
    deadline = time.monotonic() + LOCK_GRACE_S
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # released at once (close); writers retry meanwhile
                return None
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
                time.sleep(0.05)
    finally:
        os.close(fd)


def missing_cache_error(final: Path) -> UserError:
    """Why the cache `final` is not there: being extracted now (LockedError), interrupted, or never extracted."""
    final = Path(final)
    holder = lock_holder(final)
    if holder is not None:
        return LockedError(f"{final} is still being extracted by {holder}; wait for featcache extract to "
                           "finish (or run it with --wait) and try again.")
    if partial_path(final).exists():
        return CacheError(f"Cache file {final} does not exist yet: its extraction was interrupted "
                          f"({partial_path(final).name} is kept); run the same featcache extract again to resume it.")
    return UserError(f"Cache file {final} does not exist; check the path (featcache cache ls lists the caches) or run "
                     "featcache extract to create it.")  # bad input (exit 2), not a bad cache
