"""Progress bars with images/s (rich), shared by extract, finetune and predict."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator


def _rate_column():
    """A rich column showing the task's speed as images/s ('-' before the first update)."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task):
            return Text("   - img/s" if task.speed is None else f"{task.speed:6.1f} img/s")

    return Rate()


@contextmanager
def progress_bar(enabled: bool = True) -> Iterator["object | None"]:
    """A rich Progress on an interactive stderr, else None (callers check `if bar:`)."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _rate_column(),
                  TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                  console=Console(stderr=True)) as bar:
        yield bar
