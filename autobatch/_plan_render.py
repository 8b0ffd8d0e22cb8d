"""Plans as a person reads them in an 80-column terminal: a short header, then one row per part or bucket.

Every cell is one short value that never wraps; only the explanation below the
table wraps, as a paragraph.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from autobatch._peak_lines import BudgetUse
from autobatch._render import compact_table
from autobatch._units import format_bytes


def _share(part: int, whole: int) -> str:
    return f"{part / whole:.0%}" if whole else "-"


def budget_line(use: BudgetUse) -> Any:
    """``host peak 1.9 GiB of 2.0 GiB, max batch 1,218 (ram_limit=2GiB)``: one budget at the planned batch.

    The numbers come first; a long source (a GPU's NVML reading) wraps at the end of the line.
    """
    from rich.text import Text

    most = "unbounded" if use.max_batch_size is None else f"{use.max_batch_size:,}"
    return Text.assemble(
        (f"{use.budget.kind} peak ", "bold"),
        f"{format_bytes(use.predicted_peak_bytes)} of {format_bytes(use.budget.limit_bytes)}, max batch {most} ",
        (f"({use.budget.source})", "dim"),
    )


def peak_table(uses: Sequence[BudgetUse]) -> Any:
    """The predicted peak of every budget, then its parts, one row each: name, bytes, share of that peak."""
    table = compact_table()
    table.add_column("predicted peak", no_wrap=True)
    table.add_column("bytes", justify="right", no_wrap=True)
    table.add_column("share", justify="right", no_wrap=True)
    for use in uses:
        peak = use.predicted_peak_bytes
        table.add_row(use.budget.kind, format_bytes(peak), _share(peak, peak), style="bold")
        for name, value in use.components:
            table.add_row(f"  {name}", format_bytes(value), _share(value, peak))
    return table


def plan_view(header: Sequence[Any], table: Any, explanation: str, note: str) -> Any:
    """The header lines, the table, the explanation and the note on the confirming trial, one below the other."""
    from rich.console import Group
    from rich.text import Text

    return Group(*header, Text(""), table, Text(""), Text(explanation), Text(note, style="dim"))
