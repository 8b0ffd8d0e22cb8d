"""What the probe measured: the preprocessed arrays' signature, each real training trial, and the fits through them.

:class:`ProbeResult` is frozen and round-trips through JSON (the probe cache stores it); the planner reads
the step's memory against the batch size from :attr:`ProbeResult.host_curve`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

from autobatch import _cache
from autobatch._render import as_text, compact_table
from autobatch._units import format_bytes

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape (``None`` where batches differ) of one preprocessed array."""

    name: str
    dtype: str
    shape: tuple[int | None, ...]


@dataclasses.dataclass(frozen=True)
class StepTrial:
    """One real training measurement in the child process."""

    batch_size: int
    peak_rss_bytes: int | None
    """Child's peak RSS (``VmHWM``) over the steps, ``None`` if it never finished."""
    gpu_peak_bytes: int | None = None
    """Peak device memory (``tf.config.experimental.get_memory_info``), on GPU only."""
    seconds_per_step: float | None = None
    fits: bool = True
    """``False`` when the trial ran out of memory or exceeded its limit."""
    note: str = ""


@dataclasses.dataclass(frozen=True)
class LinearFit:
    """``peak(batch) = intercept_bytes + slope_bytes * batch``, lying on or above every measured point."""

    intercept_bytes: float
    slope_bytes: float

    def __call__(self, batch_size: int) -> float:
        return self.intercept_bytes + self.slope_bytes * batch_size


@dataclasses.dataclass(frozen=True)
class StepPiece:
    """One linear piece of a :class:`StepCurve`, from batch ``start`` up to the next piece's start."""

    start: int
    intercept_bytes: float
    slope_bytes: float
    between: tuple[int, int] | None = None
    """The two real trials this piece interpolates between; ``None`` on the fitted line or below the first trial."""

    def __call__(self, batch_size: int) -> float:
        return self.intercept_bytes + self.slope_bytes * batch_size


@dataclasses.dataclass(frozen=True)
class StepCurve:
    """A step's memory vs batch size: through every trial that finished, the fitted line past the largest.

    Between two measured batches the growth is their chord (memory grows with the batch, so the chord of two
    measurements is closer than any line through all of them); past the largest it is the conservative
    :class:`LinearFit`; below the smallest, that line but never above the smallest measurement.
    """

    line: LinearFit
    points: tuple[tuple[int, float], ...] = ()
    """(batch, bytes) measured, ascending in both (a smaller batch never needs more)."""

    def pieces(self) -> tuple[StepPiece, ...]:
        """The curve's linear pieces, ascending in ``start`` (the first starts at 0)."""
        a, s = self.line.intercept_bytes, self.line.slope_bytes
        if not self.points:
            return (StepPiece(0, a, s),)
        first, low = self.points[0]
        pieces = [StepPiece(0, a, s)]
        # The first batch whose line value passes the smallest measurement: from there, that measurement caps it.
        above = math.floor((low - a) / s) + 1 if s > 0 else (0 if a > low else first + 1)
        if above <= 0:
            pieces = [StepPiece(0, low, 0.0)]
        elif above <= first:
            pieces.append(StepPiece(above, low, 0.0))
        for (b0, g0), (b1, g1) in zip(self.points, self.points[1:]):
            slope = (g1 - g0) / (b1 - b0)
            pieces.append(StepPiece(b0 + 1, g0 - slope * b0, slope, (b0, b1)))
        pieces.append(StepPiece(self.points[-1][0] + 1, a, s))
        return tuple(pieces)

    def piece_at(self, batch_size: int) -> StepPiece:
        """The piece covering ``batch_size``."""
        return [p for p in self.pieces() if p.start <= max(batch_size, 0)][-1]

    def __call__(self, batch_size: int) -> float:
        return self.piece_at(batch_size)(batch_size)


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    """What one training batch costs in memory, measured."""

    n_samples: int
    source: Literal["in_memory", "shards"]
    raw_bytes: int
    """In-memory size of the whole dataset before preprocessing."""
    raw_bytes_per_sample: float
    raw_scope: str
    """Which rows ``raw_bytes`` was measured on."""
    largest_shard_raw_bytes: int
    sample_batch_size: int
    preprocessed_bytes_per_sample: float
    """Bytes per sample after ``preprocess``, on a random batch."""
    worst_preprocessed_bytes_per_sample: float
    """Bytes per sample after ``preprocess``, on the batch of the largest rows."""
    worst_scope: str
    preprocess_peak_bytes_per_sample: float
    """Transient peak of ``preprocess`` on the worst batch (tracemalloc), per sample."""
    output_signature: tuple[TensorSpec, ...]
    device: str
    """``"CPU"`` or the GPU the trials ran on; ``"none"`` without a model."""
    model_name: str | None = None
    model_params: int | None = None
    baseline_rss_bytes: int | None = None
    """Child RSS after loading TensorFlow and the model, before any step or shard: the trials' growth is above it."""
    trials: tuple[StepTrial, ...] = ()
    trial_prefetch_batches: int = 0
    """Batches the trials' ``tf.data`` pipeline prefetched: that much queue is inside the measured peaks."""
    trial_holds_shard: bool = False
    """Whether the trials' child held one shard read as streaming reads it (inside the measured peaks)."""
    shard_read_peak_bytes: int | None = None
    """Transient peak of reading the largest shard (Arrow buffers + pandas objects), measured in the child."""
    trial_reads_shard: bool = False
    """Whether the trials read the next shard on a thread during the steps (the read-ahead is inside the peaks)."""
    wall_seconds: float = 0.0
    cache_key: str = ""
    from_cache: bool = False

    @property
    def has_model(self) -> bool:
        return bool(self.trials)

    def _fit(self, attr: str, above: float = 0.0) -> LinearFit | None:
        points = [(t.batch_size, getattr(t, attr)) for t in self.trials if getattr(t, attr) is not None]
        if not points:
            return None
        b = np.array([p[0] for p in points], dtype=float)
        peak = np.array([p[1] for p in points], dtype=float) - above
        # One batch is at least resident during its step, so the slope is never below it.
        floor = self.worst_preprocessed_bytes_per_sample
        slope = floor
        if len(set(b.tolist())) >= 2:
            slope = max(float(np.polyfit(b, peak, 1)[0]), floor)
        # Shift the line up until no measured point lies above it: conservative, never optimistic.
        intercept = float(np.max(peak - slope * b))
        return LinearFit(intercept, slope)

    @property
    def host_fit(self) -> LinearFit | None:
        """Fitted growth (bytes) of the child's RSS above its baseline in one training step vs batch size, host RAM.

        The baseline (TensorFlow's runtime and the model) is the process's own: the training process measures
        its own, so only what each step adds above it comes from the trials.
        """
        return self._fit("peak_rss_bytes", float(self.baseline_rss_bytes or 0))

    @property
    def host_curve(self) -> StepCurve | None:
        """:attr:`host_fit` through the trials that finished: the growth the planner predicts at each batch."""
        fit = self.host_fit
        if fit is None:
            return None
        above = float(self.baseline_rss_bytes or 0)
        measured: dict[int, float] = {}
        for t in self.trials:
            if t.fits and t.peak_rss_bytes is not None:
                measured[t.batch_size] = max(measured.get(t.batch_size, -math.inf), t.peak_rss_bytes - above)
        points, most = [], -math.inf
        for batch, growth in sorted(measured.items()):
            most = max(most, growth)  # scatter: a larger batch is planned for at least what a smaller one took
            points.append((batch, most))
        return StepCurve(fit, tuple(points))

    @property
    def gpu_fit(self) -> LinearFit | None:
        """Fitted device peak vs batch size, on GPU."""
        return self._fit("gpu_peak_bytes")

    def failed_batch_size(self) -> int | None:
        """The smallest batch size whose trial ran out of memory, if any."""
        failed = [t.batch_size for t in self.trials if not t.fits]
        return min(failed) if failed else None

    def with_trial(self, trial: StepTrial) -> ProbeResult:
        """A copy with one more trial (e.g. the planner's confirmation run)."""
        return dataclasses.replace(self, trials=(*self.trials, trial))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def load_cached(cls, key: str, directory: str | os.PathLike[str] | None = None) -> ProbeResult | None:
        """The cached result for ``key``, or ``None`` when absent or not a valid result (then it is measured again)."""
        cached = _cache.load(key, directory)
        if cached is None:
            return None
        try:
            result = cls.from_dict(cached)
            if not isinstance(result.n_samples, int) or result.n_samples < 1 or not result.output_signature:
                raise ValueError(f"it holds n_samples={result.n_samples!r} and no output signature")
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            logger.warning("ignoring an invalid probe cache entry %s (%s); it will be rebuilt", key, exc)
            return None
        return dataclasses.replace(result, from_cache=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProbeResult:
        fields = dict(data)
        fields["output_signature"] = tuple(
            TensorSpec(s["name"], s["dtype"], tuple(s["shape"])) for s in fields["output_signature"]
        )
        fields["trials"] = tuple(StepTrial(**t) for t in fields["trials"])
        return cls(**fields)

    def __rich__(self) -> Any:
        from rich.text import Text

        # Names and numbers never wrap: how each was measured goes on a dim line of its own under the name.
        table = compact_table("autobatch probe")
        table.add_column("measurement (how)", overflow="fold")
        table.add_column("value", justify="right", no_wrap=True)

        def row(name: str, value: str, how: str = "") -> None:
            table.add_row(Text.assemble(name, (f"\n  {how}" if how else "", "dim")), value)

        row("samples", f"{self.n_samples:,}", self.source)
        row("raw bytes / sample", format_bytes(self.raw_bytes_per_sample), self.raw_scope)
        row("raw dataset", format_bytes(self.raw_bytes))
        row(
            "after preprocess / sample (random)",
            format_bytes(self.preprocessed_bytes_per_sample),
            f"batch of {self.sample_batch_size} random rows",
        )
        row(
            "after preprocess / sample (worst)",
            format_bytes(self.worst_preprocessed_bytes_per_sample),
            f"largest rows of {self.worst_scope}",
        )
        row("preprocess transient peak / sample", format_bytes(self.preprocess_peak_bytes_per_sample), "tracemalloc")
        base = self.baseline_rss_bytes or 0
        if self.baseline_rss_bytes is not None:
            row("runtime + model (child RSS)", format_bytes(self.baseline_rss_bytes), self.device)
        for trial in self.trials:
            grew = f"+{format_bytes(trial.peak_rss_bytes - base)}" if trial.peak_rss_bytes is not None else ""
            value = grew if trial.fits else "does not fit"
            how = f"VmHWM − baseline, {trial.seconds_per_step * 1000:.0f} ms/step" if trial.seconds_per_step else trial.note
            if trial.gpu_peak_bytes is not None:
                value += f" / GPU {format_bytes(trial.gpu_peak_bytes)}"
            row(f"train step, batch {trial.batch_size}", value, how)
        fit = self.host_fit
        if fit is not None:
            how = "fixed + per sample × batch, least squares above every trial"
            row("fit: step growth, fixed", format_bytes(fit.intercept_bytes), how)
            row("fit: step growth, per sample", format_bytes(fit.slope_bytes))
        cached = " (from cache)" if self.from_cache else ""
        table.caption = f"probe took {self.wall_seconds:.1f} s{cached}"
        return table

    def __str__(self) -> str:
        return as_text(self)

