"""What the memory monitor reads and records: one reading of the process's memory, a run's summary, its log.

:class:`~autobatch.monitor.MemoryMonitor` takes :class:`MemoryReading` s during
``fit`` and ends with a :class:`MonitorSummary`; :func:`summary_from_log` and
:func:`plot_log` read its JSON-lines log back (``autobatch report``). Nothing
here imports Keras or TensorFlow.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import psutil
from rich.table import Table

from autobatch._memory import peak_rss_bytes, read_cgroup_memory, rss_bytes
from autobatch._units import format_bytes


@dataclasses.dataclass(frozen=True)
class MemoryReading:
    """One reading of the training process's memory."""

    rss_bytes: int
    """Resident memory of this process now."""
    peak_rss_bytes: int
    """Peak resident memory of this process so far (``VmHWM``)."""
    available_bytes: int
    """Memory the system (or the cgroup, if tighter) can still give."""
    gpu_bytes: int | None = None
    """Device memory in use now, on GPU."""
    gpu_peak_bytes: int | None = None
    """Peak device memory, on GPU."""


def read_memory() -> MemoryReading:
    """Read this process's memory (psutil, ``/proc``, cgroup, and TensorFlow's GPU info when loaded)."""
    rss = rss_bytes()
    available = psutil.virtual_memory().available
    group = read_cgroup_memory()
    if group is not None and group.usage_bytes is not None:
        available = min(available, group.headroom_bytes)  # page cache in the group's usage is reclaimable
    gpu = gpu_peak = None
    tf = sys.modules.get("tensorflow")
    if tf is not None and tf.config.list_physical_devices("GPU"):
        info = tf.config.experimental.get_memory_info("GPU:0")
        gpu, gpu_peak = int(info["current"]), int(info["peak"])
    return MemoryReading(rss, peak_rss_bytes() or rss, available, gpu, gpu_peak)


@dataclasses.dataclass(frozen=True)
class MonitorSummary:
    """What a training run did with memory and time."""

    peak_rss_bytes: int
    predicted_peak_bytes: int | None
    host_budget_bytes: int | None
    peak_gpu_bytes: int | None
    gpu_budget_bytes: int | None
    samples: int
    seconds: float
    step_seconds: float
    """Wall time inside training steps (on the TF backend this includes fetching data in-graph)."""
    between_steps_seconds: float
    """Wall time between one step's end and the next one's start (callbacks, Python feed overhead)."""
    feed_seconds: float | None
    """Time the feed spent producing batches, when the feed reports it (may overlap steps)."""
    warnings: tuple[str, ...]
    truncated_sequences: int | None = None
    """Sequences ``preprocess`` cut to a fixed ``maxlen`` (autobatch's padding helpers), when the feed counts them."""
    shrinks: int = 0
    """Times low headroom made the feed cut batches into smaller pieces (``adaptive=True``)."""
    smallest_batch_size: int | None = None
    """The largest batch served after the last shrink (``None``: never shrunk)."""

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    def __rich__(self) -> Table:
        table = Table(title="autobatch memory summary", header_style="bold")
        table.add_column("")
        table.add_column("measured", justify="right")
        table.add_column("predicted", justify="right")
        table.add_column("budget", justify="right")
        pct = f" ({self.peak_rss_bytes / self.host_budget_bytes:.0%})" if self.host_budget_bytes else ""
        table.add_row(
            "peak RSS (VmHWM)",
            format_bytes(self.peak_rss_bytes) + pct,
            format_bytes(self.predicted_peak_bytes),
            format_bytes(self.host_budget_bytes),
        )
        if self.peak_gpu_bytes is not None:
            table.add_row("peak GPU", format_bytes(self.peak_gpu_bytes), "-", format_bytes(self.gpu_budget_bytes))
        table.add_row("samples/s (mean)", f"{self.samples_per_second:,.1f}", "", "")
        table.add_row("time in training steps", f"{self.step_seconds:.2f} s", "", "")
        table.add_row("time between steps", f"{self.between_steps_seconds:.2f} s", "", "")
        if self.feed_seconds is not None:
            table.add_row("feed producing batches", f"{self.feed_seconds:.2f} s", "", "")
        if self.truncated_sequences:
            table.add_row("sequences cut to maxlen", f"{self.truncated_sequences:,}", "", "")
        if self.shrinks:
            table.add_row("batches shrunk (low headroom)", f"{self.shrinks}× to {self.smallest_batch_size:,}", "", "")
        if self.warnings:
            table.caption = f"{len(self.warnings)} memory warning(s): {self.warnings[-1]}"
        return table


def summary_from_log(path: str | os.PathLike[str]) -> tuple[MonitorSummary, list[dict[str, Any]], dict[str, Any]]:
    """Read a ``log_path`` file: its summary, its interval records and its header.

    Raises:
        ValueError: the file is not an autobatch monitor log.
    """
    header: dict[str, Any] = {}
    records: list[dict[str, Any]] = []
    summary: MonitorSummary | None = None
    with open(path) as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{path}: line {number} is not JSON ({exc})") from exc
            kind = record.pop("type", None)
            if kind == "header":
                header = record
            elif kind == "summary":
                record["warnings"] = tuple(record.get("warnings", ()))
                summary = MonitorSummary(**record)
            else:
                records.append(record)
    if summary is None:
        if not records:
            raise ValueError(f"{path} holds no autobatch monitor records")
        # A run that was killed never wrote its summary: rebuild what the records show.
        summary = MonitorSummary(
            peak_rss_bytes=max(r["peak_rss_bytes"] for r in records),
            predicted_peak_bytes=header.get("predicted_peak_bytes"),
            host_budget_bytes=header.get("host_budget_bytes"),
            peak_gpu_bytes=max((r["gpu_peak_bytes"] for r in records if r.get("gpu_peak_bytes")), default=None),
            gpu_budget_bytes=header.get("gpu_budget_bytes"),
            samples=int(records[-1].get("samples_per_s", 0) * records[-1]["t"]),
            seconds=records[-1]["t"],
            step_seconds=0.0,
            between_steps_seconds=0.0,
            feed_seconds=None,
            warnings=(),
        )
    return summary, records, header


def plot_log(records: list[dict[str, Any]], header: dict[str, Any], out: str | os.PathLike[str]) -> Path:
    """Save a PNG of RSS (and peak) over time against the budget; needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["t"] for r in records]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(t, [r["rss_bytes"] / 2**20 for r in records], label="RSS")
    ax.plot(t, [r["peak_rss_bytes"] / 2**20 for r in records], label="peak RSS", linestyle="--")
    if header.get("host_budget_bytes"):
        ax.axhline(header["host_budget_bytes"] / 2**20, color="red", label="host budget")
    if header.get("predicted_peak_bytes"):
        ax.axhline(header["predicted_peak_bytes"] / 2**20, color="gray", linestyle=":", label="predicted peak")
    ax.set_xlabel("seconds")
    ax.set_ylabel("MiB")
    ax.legend(loc="lower right")
    ax.set_title("autobatch: memory during fit")
    fig.tight_layout()
    path = Path(out)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
