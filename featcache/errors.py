"""Errors a user can cause: one sentence, a documented exit code, no traceback."""

from __future__ import annotations

import errno
import os
import re

# Exit codes (README "When things go wrong" lists the same table).
EXIT_BAD_INPUT = 2
EXIT_BAD_CACHE = 3
EXIT_LOCKED = 4
EXIT_DIVERGED = 5
EXIT_NO_SPACE = 6
EXIT_TERMINATED = 143  # 128 + SIGTERM: what a shell reports for a process SIGTERM ended

# errno values that mean "the bytes do not fit": disk full, quota exceeded, file-size limit.
_NO_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_H5_ERRNO = re.compile(r"errno = (\d+)")  # h5py folds the OS error into its message


class UserError(Exception):
    """Something the user can fix; the CLI prints the message and exits with `exit_code`."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str, *, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class CacheError(UserError):
    """A cache is corrupt, stale or partial."""

    exit_code = EXIT_BAD_CACHE


class LockedError(UserError):
    """Another process holds the lock of the cache being written."""

    exit_code = EXIT_LOCKED


class DivergedError(UserError):
    """Training diverged (loss NaN/inf or far above its running level)."""

    exit_code = EXIT_DIVERGED


class NoSpaceError(UserError):
    """The disk (or quota, or file-size limit) ran out while writing `path`."""

    exit_code = EXIT_NO_SPACE

    def __init__(self, path, reason: str, advice: str):
        super().__init__(f"Out of disk space writing {path} ({reason}); {advice}")
        self.path, self.reason, self.advice = str(path), reason, advice

    def __reduce__(self):  # pickled whole: the figure worker sends it from its child process
        return type(self), (self.path, self.reason, self.advice)


class TerminatedError(UserError):
    """The run was stopped by SIGTERM and can be resumed."""

    exit_code = EXIT_TERMINATED


def out_of_space(exc: BaseException) -> str | None:
    """The OS's reason ("No space left on device", ...) if `exc` or an exception it chains is out of space, else None.

    torch.save reports a failed write as a RuntimeError whose context is the OSError; h5py as a
    ValueError/OSError whose message carries "errno = 28".
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE_ERRNOS:
            return exc.strerror or os.strerror(exc.errno)
        match = _H5_ERRNO.search(str(exc))
        if match and int(match.group(1)) in _NO_SPACE_ERRNOS:
            return os.strerror(int(match.group(1)))
        exc = exc.__cause__ or exc.__context__
    return None
