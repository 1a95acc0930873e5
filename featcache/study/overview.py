"""The live overview of a running study: done / running / waiting, and the time left (rich, on a terminal).

On a terminal it is a rich Live table redrawn twice a second; elsewhere (a log file, a job runner) one line
per finished step. The time left is the estimate of what is left, scaled by how the finished steps compared
with their own estimates.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Mapping, Sequence

SHOWN_WAITING = 6  # waiting runs listed under the running one


def duration(seconds: float) -> str:
    """12 s, 3.5 min, 2.1 h."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


class Overview:
    """States of a study's steps (runs and extractions) and their times; a context manager around the work."""

    def __init__(self, steps: Sequence[str], *, done: set[str], costs: Mapping[str, float], live: bool,
                 log: Callable[[str], None]):
        """steps: every step's key in run order (extractions "extract model@weights", then run keys)."""
        self.order = list(steps)
        self.status = {k: ("done" if k in done else "waiting") for k in self.order}
        self.costs, self.log = dict(costs), log
        self.live = live and sys.stderr.isatty()
        self.started: dict[str, float] = {}
        self.took: dict[str, float] = {}
        self._live = None

    def __enter__(self):
        if self.live:
            from rich.console import Console
            from rich.live import Live

            self._live = Live(get_renderable=self.render, console=Console(stderr=True), refresh_per_second=2,
                              transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc):
        if self._live is not None:
            self._live.__exit__(*exc)

    def start(self, key: str) -> None:
        self.status[key] = "running"
        self.started[key] = time.perf_counter()

    def finish(self, key: str, *, status: str = "done") -> None:
        self.took[key] = time.perf_counter() - self.started.pop(key)
        self.status[key] = status
        if not self.live:
            self.log(f"  {status:<8} {key} ({duration(self.took[key])}); {self.counts()}")

    def counts(self) -> str:
        """'done 4, running 1, waiting 7 (about 3 min left)'."""
        runs = [self.status[k] for k in self.order]
        done = sum(s in ("done", "diverged") for s in runs)
        diverged = runs.count("diverged")
        text = f"done {done}/{len(runs)}" + (f" ({diverged} diverged)" if diverged else "")
        text += f", running {runs.count('running')}, waiting {runs.count('waiting')}"
        return text + f" (about {duration(self.time_left())} left)"

    def time_left(self) -> float:
        """Seconds: estimates of the waiting and running steps, scaled by actual / estimated of the finished ones."""
        finished = [k for k in self.took if k in self.costs]
        scale = (sum(self.took[k] for k in finished) / max(sum(self.costs[k] for k in finished), 1e-9)
                 if finished else 1.0)
        now = time.perf_counter()
        left = sum(self.costs.get(k, 0.0) for k, s in self.status.items() if s == "waiting")
        left += sum(max(self.costs.get(k, 0.0) - (now - t0) / scale, 0.0) for k, t0 in self.started.items())
        return left * scale

    def render(self):
        """The rich table: running steps, the next waiting ones, and the counts."""
        from rich.table import Table

        table = Table(title=f"featcache study: {self.counts()}", title_justify="left")
        for column in ("step", "status", "time"):
            table.add_column(column)
        now = time.perf_counter()
        for key, t0 in self.started.items():
            table.add_row(key, "[bold yellow]running", duration(now - t0))
        waiting = [k for k in self.order if self.status[k] == "waiting"]
        for key in waiting[:SHOWN_WAITING]:
            table.add_row(key, "waiting", f"~{duration(self.costs.get(key, 0.0))}")
        if len(waiting) > SHOWN_WAITING:
            table.add_row(f"... {len(waiting) - SHOWN_WAITING} more", "waiting", "")
        for key in [k for k in self.took if k in self.status][-3:]:
            style = "red" if self.status[key] == "diverged" else "green"
            table.add_row(key, f"[{style}]{self.status[key]}", duration(self.took[key]))
        return table
