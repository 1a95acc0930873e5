"""Tables: the summary of one run, runs side by side, plain listings (rich)."""

from __future__ import annotations

from typing import Mapping, Sequence


def print_table(rows: Sequence[Mapping], *, title: str | None = None) -> None:
    """Print dict rows as a table (columns: the keys of the first row)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    columns = list(rows[0]) if rows else []
    for c in columns:
        table.add_column(str(c), justify="right" if _is_number(rows[0][c]) else "left")
    for r in rows:
        table.add_row(*(_fmt(r.get(c)) for c in columns))
    Console(width=max(120, Console().width)).print(table)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)
