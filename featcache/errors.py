"""Errors a user can cause: one sentence, a documented exit code, no traceback."""

# Exit codes (README "Exit codes" lists the same table).
EXIT_BAD_INPUT = 2
EXIT_BAD_CACHE = 3
EXIT_LOCKED = 4
EXIT_DIVERGED = 5


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
