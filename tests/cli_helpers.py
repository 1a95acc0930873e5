"""Driving the CLI as a user does, for the tests: invoke a command, read its one error line."""

from __future__ import annotations

from click.testing import CliRunner

from featcache.cli import cli


def invoke(*args, **kwargs):
    """Run `featcache ARGS...` in-process (arguments str()-ed); the click Result."""
    return CliRunner().invoke(cli, [str(a) for a in args], **kwargs)


def one_error_line(result, code: int) -> str:
    """The single 'Error: ...' line of a failed command, its last line on stderr; no traceback."""
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output, result.output
    lines = result.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("Error: ")] == lines[-1:], result.stderr
    return lines[-1]
