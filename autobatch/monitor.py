"""MemoryMonitor: a Keras callback that shows memory live during ``fit`` and summarises it after.

The display pulls state: a daemon thread samples memory a few times a second
(``tick``), and ``rich.live.Live`` renders the latest state; batches only bump
counters. In a non-interactive terminal (CI logs, ``nohup``) it prints one
concise line every ``line_interval_s`` instead of redrawing. The memory reader,
the clock and the console are injectable so tests drive it with fakes.

Besides the budget, it watches the headroom: the memory the system (or the
cgroup) can still give, less what the plan still expects this process to grow
by. When another process takes memory and the headroom falls below the plan's
safety margin, it warns; with ``adaptive=True`` it also asks the feed to cut
the following batches into smaller pieces (:meth:`autobatch.feeds.BaseFeed.shrink`),
so training continues in less memory instead of being killed by the OS.

The readings, the summary and the log's readers live in :mod:`autobatch._readings`
(no Keras there), re-exported here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import keras
from rich.console import Console
from rich.table import Table

from autobatch._readings import MemoryReading, MonitorSummary, read_memory
from autobatch._units import format_bytes
from autobatch.errors import ConfigError
from autobatch.plan import Plan

__all__ = ["MemoryMonitor", "MemoryReading", "MonitorSummary", "read_memory"]

logger = logging.getLogger(__name__)


class MemoryMonitor(keras.callbacks.Callback):
    """Show process RSS, headroom, GPU memory and samples/s live during ``model.fit``.

    Use ``verbose=0`` in ``fit`` so Keras's own progress bar does not fight the live display.

    Args:
        plan: the :class:`Plan` training follows: its budgets, predicted peak and batch size.
        warn_at: warn when memory crosses this fraction of a budget, or the plan's predicted
            peak on that budget when it is higher: a plan that leaves 3% free expects more than 90%.
        host_budget_bytes: the host budget when there is no plan.
        batch_size: samples per step when there is no plan.
        interval_s: how often memory is sampled (and the live display refreshed).
        line_interval_s: in a non-interactive terminal, print one line this often.
        log_path: write one JSON record per sample to this file (for ``autobatch report``).
        feed: the feed, if it reports time spent producing batches (``feed.stats.seconds``).
        disable: do nothing at all.
        console: where to draw (default: rich's global console).
        reader: returns a :class:`MemoryReading` (default :func:`read_memory`).
        clock: monotonic seconds (default ``time.monotonic``).
        background: sample from a daemon thread; ``False`` leaves sampling to ``tick()`` calls.
        min_headroom_bytes: warn when the headroom (available memory less the plan's
            predicted growth of this process) falls below this; default: the plan's
            ``safety`` × the host limit (or the plan's margin, if larger) — memory other
            processes may still take is a fraction of the machine, not of the
            batch's growth. ``None`` without a plan: no headroom check.
        adaptive: on low headroom also call ``feed.shrink()``, so the following batches
            are served in smaller pieces (the feed must come from
            ``to_tf_dataset(adaptive=True)``, as :func:`autobatch.fit` builds it).
            It shrinks once when the headroom first falls, and again only if
            available memory keeps falling by half a margin after at least
            ``adapt_after_steps`` more steps.
        adapt_after_steps: training steps between two shrinks.

    Raises:
        ConfigError: ``warn_at`` is out of range, or ``adaptive`` without a feed that can shrink.

    Example:
        >>> model.fit(feed, epochs=3, verbose=0, callbacks=[autobatch.MemoryMonitor(plan)])
    """

    def __init__(
        self,
        plan: Plan | None = None,
        *,
        warn_at: float = 0.9,
        host_budget_bytes: int | None = None,
        batch_size: int | None = None,
        interval_s: float = 0.25,
        line_interval_s: float = 10.0,
        log_path: str | os.PathLike[str] | None = None,
        feed: Any = None,
        disable: bool = False,
        console: Console | None = None,
        reader: Callable[[], MemoryReading] = read_memory,
        clock: Callable[[], float] = time.monotonic,
        background: bool = True,
        min_headroom_bytes: int | None = None,
        adaptive: bool = False,
        adapt_after_steps: int = 4,
    ) -> None:
        super().__init__()
        if not 0 < warn_at <= 1:
            raise ConfigError(f"`warn_at` must be in (0, 1]. Received: warn_at={warn_at}")
        if adaptive and not callable(getattr(feed, "shrink", None)):
            raise ConfigError(
                "adaptive=True shrinks the feed's batches on low headroom, so pass the feed (feed=...) "
                f"that training reads from. Received: feed={feed!r}"
            )
        self.plan = plan
        host = plan.budget("host") if plan is not None else None
        gpu = plan.budget("gpu") if plan is not None else None
        self.host_budget_bytes = host.budget.limit_bytes if host is not None else host_budget_bytes
        self.gpu_budget_bytes = gpu.budget.limit_bytes if gpu is not None else None
        self._host_source = host.budget.source if host is not None else "host_budget_bytes"
        self.batch_size = plan.batch_size if plan is not None else batch_size
        self._predicted = {use.budget.kind: use.predicted_peak_bytes for use in (host, gpu) if use is not None}
        if min_headroom_bytes is None and host is not None:
            min_headroom_bytes = max(host.margin_bytes, int(plan.safety * host.budget.limit_bytes))
        self.min_headroom_bytes = min_headroom_bytes
        self.adaptive = adaptive
        self.adapt_after_steps = adapt_after_steps
        self.warn_at = warn_at
        self.interval_s = interval_s
        self.line_interval_s = line_interval_s
        self.log_path = Path(log_path) if log_path is not None else None
        self.feed = feed
        self.disable = disable
        self.console = console or Console()
        self._reader = reader
        self._clock = clock
        self._background = background
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._live: Any = None
        self._log: TextIO | None = None
        self.summary: MonitorSummary | None = None
        self._reset()

    # ------------------------------------------------------------------ state

    def _reset(self) -> None:
        self._start = self._last_line = 0.0
        self._reading: MemoryReading | None = None
        self._peak_rss = 0
        self._peak_gpu: int | None = None
        self._epoch = 0
        self._step = 0
        self._steps_done = 0
        self._samples = 0
        self._step_seconds = self._between_seconds = 0.0
        self._batch_started: float | None = None
        self._batch_ended: float | None = None
        self._over: set[str] = set()
        self._warnings: list[str] = []
        self._pressure: tuple[int, int] | None = None  # (available bytes, steps done) at the last shrink or warning
        self._shrinks = 0

    def _budget_checks(self, reading: MemoryReading) -> list[tuple[str, int, int, str]]:
        checks = []
        if self.host_budget_bytes:
            checks.append(("host", reading.rss_bytes, self.host_budget_bytes, self._host_source))
        if self.gpu_budget_bytes and reading.gpu_bytes is not None:
            checks.append(("gpu", reading.gpu_bytes, self.gpu_budget_bytes, "gpu budget"))
        return checks

    def tick(self) -> MemoryReading:
        """Take one memory reading: update peaks, warn on threshold crossings, log and print lines."""
        reading = self._reader()
        now = self._clock()
        with self._lock:
            self._reading = reading
            self._peak_rss = max(self._peak_rss, reading.peak_rss_bytes, reading.rss_bytes)
            if reading.gpu_peak_bytes is not None:
                self._peak_gpu = max(self._peak_gpu or 0, reading.gpu_peak_bytes)
        for kind, used, budget, source in self._budget_checks(reading):
            expected = min(self._predicted.get(kind, 0), budget)
            threshold = max(self.warn_at * budget, expected)
            if used >= threshold and kind not in self._over:
                self._over.add(kind)
                beyond = f", above the plan's predicted peak of {format_bytes(expected)}" if used > expected > 0 else ""
                message = (
                    f"{kind} memory at {format_bytes(used)} is {used / budget:.0%} of the {kind} budget "
                    f"{format_bytes(budget)} ({source}){beyond}; training may be killed if it keeps growing"
                )
                self._warnings.append(message)
                logger.warning(message)
                warnings.warn(message, ResourceWarning, stacklevel=2)
                if self._live is None:
                    self.console.print(f"[bold yellow]autobatch warning:[/] {message}", highlight=False)
            elif used < threshold - 0.05 * budget:
                # Re-arm only after a clear drop, so hovering at the threshold warns once, not every reading.
                self._over.discard(kind)
        self._check_headroom(reading)
        if self._log is not None:
            record = {"t": round(now - self._start, 3), "epoch": self._epoch, "step": self._step, **dataclasses.asdict(reading)}
            record["samples_per_s"] = round(self._samples_per_second(now), 2)
            self._log.write(json.dumps(record) + "\n")
            self._log.flush()
        if self._live is None and now - self._last_line >= self.line_interval_s:
            self._last_line = now
            self.console.print(self._line(reading, now), highlight=False, soft_wrap=True)
        return reading

    def _steps_total(self) -> int | None:
        # An adaptive feed's epochs have as many steps as pieces; Keras is told an upper bound, not worth showing.
        if self.adaptive or not self.params:
            return None
        return self.params.get("steps")

    def headroom_bytes(self, reading: MemoryReading) -> int:
        """Available memory less what the plan still expects this process to grow by (its predicted peak less the peak so far)."""
        growth = 0
        if self.plan is not None:
            growth = max(self.plan.predicted_peak_bytes - max(self._peak_rss, reading.peak_rss_bytes), 0)
        return reading.available_bytes - growth

    def _check_headroom(self, reading: MemoryReading) -> None:
        margin = self.min_headroom_bytes
        if not margin:
            return
        headroom = self.headroom_bytes(reading)
        if headroom >= margin:
            if headroom >= 1.25 * margin:
                self._pressure = None  # recovered clearly: a later fall warns (and shrinks) again
            return
        available = reading.available_bytes
        if self._pressure is not None:
            last_available, last_steps = self._pressure
            falling = available < last_available - margin / 2
            if not (self.adaptive and falling and self._steps_done - last_steps >= self.adapt_after_steps):
                return
        self._pressure = (available, self._steps_done)
        message = (
            f"memory headroom is {format_bytes(headroom)}, below the safety margin of {format_bytes(margin)}: "
            f"the system (or cgroup) has {format_bytes(available)} available"
            + (f" and the plan expects this process to grow by {format_bytes(available - headroom)}" if available != headroom else "")
            + ". Another process may be taking memory; the OS may kill training"
        )
        if self.adaptive:
            before = self.feed.current_batch_size
            self.feed.shrink()
            after = self.feed.current_batch_size
            if after < before:
                self._shrinks += 1
                message += f". adaptive: the following batches are cut from {before:,} to at most {after:,} samples"
            else:
                message += f". adaptive: batches are already at their smallest ({after:,})"
        else:
            message += ". Pass adaptive=True to autobatch.fit to shrink batches instead"
        self._warnings.append(message)
        logger.warning(message)
        warnings.warn(message, ResourceWarning, stacklevel=3)
        if self._live is None:
            self.console.print(f"[bold yellow]autobatch warning:[/] {message}", highlight=False)

    def _samples_per_second(self, now: float) -> float:
        elapsed = now - self._start
        return self._samples / elapsed if elapsed > 0 else 0.0

    def _line(self, reading: MemoryReading, now: float) -> str:
        epochs = self.params.get("epochs", "?") if self.params else "?"
        steps = self._steps_total()
        parts = [f"epoch {self._epoch + 1}/{epochs} step {self._step}" + (f"/{steps}" if steps else "")]
        rss = f"RSS {format_bytes(reading.rss_bytes)} (peak {format_bytes(self._peak_rss)})"
        if self.host_budget_bytes:
            rss += f" of {format_bytes(self.host_budget_bytes)} budget ({reading.rss_bytes / self.host_budget_bytes:.0%})"
        parts.append(rss)
        parts.append(f"available {format_bytes(reading.available_bytes)}")
        if reading.gpu_bytes is not None:
            parts.append(f"GPU {format_bytes(reading.gpu_bytes)} (peak {format_bytes(self._peak_gpu)})")
        parts.append(f"{self._samples_per_second(now):,.0f} samples/s")
        return "autobatch | " + " | ".join(parts)

    def _render(self) -> Table:
        with self._lock:
            reading = self._reading
        now = self._clock()
        table = Table(title="autobatch memory", show_header=False, box=None, padding=(0, 2))
        table.add_column(style="bold")
        table.add_column(justify="right")
        table.add_column(style="dim")
        epochs = self.params.get("epochs", "?") if self.params else "?"
        steps = self._steps_total()
        table.add_row("epoch / step", f"{self._epoch + 1}/{epochs}  {self._step}" + (f"/{steps}" if steps else ""), "")
        if reading is not None:
            budget = format_bytes(self.host_budget_bytes) if self.host_budget_bytes else "-"
            table.add_row("process RSS", format_bytes(reading.rss_bytes), f"budget {budget}")
            predicted = format_bytes(self.plan.predicted_peak_bytes) if self.plan is not None else "-"
            table.add_row("peak RSS", format_bytes(self._peak_rss), f"predicted {predicted}")
            headroom = ""
            if self.host_budget_bytes:
                headroom = f"headroom to budget {format_bytes(self.host_budget_bytes - reading.rss_bytes)}"
            table.add_row("system available", format_bytes(reading.available_bytes), headroom)
            if reading.gpu_bytes is not None:
                table.add_row("GPU", format_bytes(reading.gpu_bytes), f"peak {format_bytes(self._peak_gpu)}")
        table.add_row("samples/s", f"{self._samples_per_second(now):,.1f}", "")
        return table

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.tick()
            except Exception:  # a failed reading must never break training
                logger.exception("memory reading failed")

    # ------------------------------------------------------------------ keras hooks

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        if self.disable:
            return
        self._reset()
        self.summary = None
        self._start = self._clock()
        self._last_line = self._start - self.line_interval_s
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "w")
            header = {
                "type": "header",
                "host_budget_bytes": self.host_budget_bytes,
                "gpu_budget_bytes": self.gpu_budget_bytes,
                "predicted_peak_bytes": self.plan.predicted_peak_bytes if self.plan is not None else None,
                "batch_size": self.batch_size,
            }
            self._log.write(json.dumps(header) + "\n")
        if self.console.is_terminal and self._background:
            from rich.live import Live

            self._live = Live(get_renderable=self._render, console=self.console, refresh_per_second=4, transient=False)
            self._live.start()
        self.tick()
        if self._background:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="autobatch-monitor", daemon=True)
            self._thread.start()

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._epoch = epoch
        self._step = 0

    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        now = self._clock()
        if self._batch_ended is not None:
            self._between_seconds += now - self._batch_ended
        self._batch_started = now

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        now = self._clock()
        if self._batch_started is not None:
            self._step_seconds += now - self._batch_started
        self._batch_ended = now
        self._step = batch + 1
        self._steps_done += 1
        self._samples += self._step_samples(batch)

    def _step_samples(self, batch: int) -> int:
        # The feed knows each batch's real size (the last one of an epoch may be smaller, pieces are smaller).
        step_rows = getattr(self.feed, "step_rows", None)
        rows = step_rows(batch) if step_rows is not None else None
        if rows is not None:
            return rows
        bounds = getattr(self.feed, "batch_bounds", None)
        if bounds is not None:
            try:
                lo, hi = bounds(batch)
                return hi - lo
            except IndexError:
                pass
        return self.batch_size or 0

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._batch_ended = None  # validation and epoch-end work is not "between steps"

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        if self.disable:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        reading = self.tick()
        if self._live is not None:
            self._live.stop()
            self._live = None
        feed_stats = getattr(self.feed, "stats", None)
        self.summary = MonitorSummary(
            peak_rss_bytes=max(self._peak_rss, reading.peak_rss_bytes),
            predicted_peak_bytes=self.plan.predicted_peak_bytes if self.plan is not None else None,
            host_budget_bytes=self.host_budget_bytes,
            peak_gpu_bytes=self._peak_gpu,
            gpu_budget_bytes=self.gpu_budget_bytes,
            samples=self._samples,
            seconds=self._clock() - self._start,
            step_seconds=self._step_seconds,
            between_steps_seconds=self._between_seconds,
            feed_seconds=getattr(feed_stats, "seconds", None),
            warnings=tuple(self._warnings),
            truncated_sequences=getattr(feed_stats, "truncated_sequences", None),
            shrinks=self._shrinks,
            smallest_batch_size=self.feed.current_batch_size if self._shrinks else None,
        )
        if self._log is not None:
            self._log.write(json.dumps({"type": "summary", **dataclasses.asdict(self.summary)}) + "\n")
            self._log.close()
            self._log = None
        self.console.print(self.summary)
