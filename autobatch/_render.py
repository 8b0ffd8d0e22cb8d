"""What every result shares to be read in a terminal: its plain text at a width, and one compact table style."""

from __future__ import annotations

import io
from typing import Any

WIDTH = 80
"""Columns a result's ``str()`` renders at."""


def as_text(renderable: Any, *, width: int = WIDTH) -> str:
    """What ``renderable`` prints as plain text, ``width`` columns wide."""
    from rich.console import Console

    console = Console(width=width, record=True, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def compact_table(title: str | None = None) -> Any:
    """A ``rich`` table with a rule under its header and no borders: rows fit 80 columns where boxes would wrap."""
    from rich import box
    from rich.table import Table

    return Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold")
