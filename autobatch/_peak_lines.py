"""The predicted peak as lines ``a + s·b`` in the batch ``b``: their named parts, the safety margin, the largest batch.

The predicted peak of the training process at batch ``b`` on the host is::

    fixed            the training process's RSS now, measured in it (TensorFlow's
                     runtime, the model, what it holds); where that process is not
                     known (the CLI), the probe child's runtime + model stands for it
  + step(b)          what a real training step added above the child's baseline
                     (first-step tracing, optimizer state, one batch, activations),
                     fitted as a + s·b and shifted above every measured point
  + data held        the whole raw dataset (unless the process holds it already)
                     or the shards being read
  + queue(b)         batches waiting in the feed's queue, at worst-case size
  + preprocess(b)    the transient peak of preprocessing the next batch

and on a GPU the fitted device peak of a real step.

One margin rule: ``safety`` × what training adds on top of what is held now (the
step's growth, the queue, preprocessing and the shards being read). The fixed part
is measured and the dataset, export copy and accumulators are counted exactly, so
they get none, and a tight budget is not spent on a margin for memory that cannot move.

Pure arithmetic over plain numbers, shared by :func:`autobatch.plan.make_plan` and
:func:`autobatch.bucket_plan.make_bucket_plan`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Literal

from autobatch._memory import Budget
from autobatch._result import ProbeResult, StepCurve
from autobatch.errors import ConfigError

Strategy = Literal["in_memory", "stream"]

PROCESS_PART = "this process"
"""The measured RSS of the process that will train (less the dataset, a part of its own)."""
CHILD_BASELINE_PART = "runtime + model (probe child)"
"""The probe child's runtime + model, standing for a training process that autobatch does not run (the CLI)."""
DEVICE_PART = "model + runtime on the device"
"""The intercept of a GPU's fitted step line: what the device holds at any batch, measured by every trial."""
EXACT_PARTS = frozenset(
    {PROCESS_PART, CHILD_BASELINE_PART, DEVICE_PART, "dataset", "gradient accumulators", "tf.data copy"}
)
"""Parts measured or counted exactly, which get no safety margin."""

DEFAULT_SAFETY = 0.1
"""The default ``safety``: 10% of what training adds. It covers what a long run adds beyond the trials' sweep of
padded lengths (peaks up to 1.2% above the prediction, ~4% of the growth, over 30-epoch runs) and the trials'
scatter (BENCHMARKS.md, 4)."""

Part = tuple[str, float, float]
"""One named part of a peak line: (name, bytes, bytes per sample)."""


@dataclasses.dataclass(frozen=True)
class BudgetUse:
    """How one budget is used at the planned batch size."""

    budget: Budget
    usable_bytes: int
    """The budget less the safety margin at the planned batch size."""
    margin_bytes: int
    """The safety margin at the planned batch size: ``safety`` × the predicted (not measured) part of the peak."""
    predicted_peak_bytes: int
    """Predicted peak at the planned batch size."""
    components: tuple[tuple[str, int], ...]
    """The predicted peak split into its parts (name, bytes)."""
    max_batch_size: int | None
    """The largest batch this budget alone allows (``None``: unbounded by it)."""


@dataclasses.dataclass(frozen=True)
class Margin:
    """The safety margin: ``safety`` × every part of a peak line not measured or counted exactly."""

    safety: float

    @classmethod
    def of(cls, safety: float | None) -> Margin:
        """The margin ``safety`` × the growth, validated; ``safety=None`` takes :data:`DEFAULT_SAFETY`.

        Raises:
            ConfigError: ``safety`` is outside ``[0, 1)``.
        """
        safety = DEFAULT_SAFETY if safety is None else safety
        if not 0 <= safety < 1:
            raise ConfigError(f"`safety` must be in [0, 1). Received: safety={safety}")
        return cls(float(safety))

    def line(self, parts: Sequence[Part]) -> tuple[float, float]:
        """(intercept, slope) of the margin over ``parts``: ``safety`` × every part not measured or counted exactly."""
        grows = [(pa, ps) for name, pa, ps in parts if name not in EXACT_PARTS]
        return self.safety * sum(pa for pa, _ in grows), self.safety * sum(ps for _, ps in grows)


@dataclasses.dataclass(frozen=True)
class Piece:
    """The peak line ``a + s·b`` made of ``parts``, from batch ``start`` up to the next piece's start."""

    start: int
    a: float
    s: float
    parts: list[Part]
    between: tuple[int, int] | None = None
    """The real trials the step's growth is interpolated between here, if any."""


def max_batch(intercept: float, slope: float, usable: float) -> int | None:
    """The largest ``b`` with ``intercept + slope·b <= usable`` (``None``: unbounded)."""
    if slope <= 0:
        return None if intercept <= usable else 0
    return max(int(math.floor((usable - intercept) / slope)), 0)


def allowed(limit: float, a: float, s: float, parts: Sequence[Part], margin: Margin) -> int | None:
    """The largest batch whose predicted peak plus its safety margin fits ``limit`` (``None``: unbounded)."""
    ma, ms = margin.line(parts)
    return max_batch(a + ma, s + ms, limit)


def pieces_allowed(limit: float, pieces: Sequence[Piece], margin: Margin) -> int | None:
    """The largest batch whose predicted peak plus margin fits ``limit`` on a rising piecewise line (``None``: unbounded)."""
    for piece, after in zip(pieces, [*pieces[1:], None]):
        most = allowed(limit, piece.a, piece.s, piece.parts, margin)
        if after is not None and (most is None or most >= after.start - 1):
            continue  # this whole piece fits: the answer lies further up
        return most if most is None else max(most, piece.start - 1, 0)
    return None


def piece_at(pieces: Sequence[Piece], batch: int) -> Piece:
    """The piece of a piecewise line that holds ``batch``."""
    return [p for p in pieces if p.start <= max(batch, 1)][-1]


def budget_use(budget: Budget, a: float, s: float, parts: Sequence[Part], margin: Margin, batch: int) -> BudgetUse:
    """How ``budget`` is used at ``batch`` by the peak line ``a + s·b`` made of ``parts``."""
    b = max(batch, 1)
    ma, ms = margin.line(parts)
    kept = int(round(ma + ms * b))
    return BudgetUse(
        budget=budget,
        usable_bytes=budget.limit_bytes - kept,
        margin_bytes=kept,
        predicted_peak_bytes=int(round(a + s * b)),
        components=tuple((name, int(round(pa + ps * b))) for name, pa, ps in parts),
        max_batch_size=allowed(budget.limit_bytes, a, s, parts, margin),
    )


def fixed_part(result: ProbeResult, process_rss_bytes: int | None) -> Part | None:
    """What the training process holds before it trains: measured in it, else the probe child's runtime + model."""
    if process_rss_bytes is not None:
        # The dataset is a part of its own; in memory, this process holds it already.
        held = result.raw_bytes if result.source == "in_memory" else 0
        return PROCESS_PART, float(max(process_rss_bytes - held, 0)), 0.0
    if result.baseline_rss_bytes is not None:
        return CHILD_BASELINE_PART, float(result.baseline_rss_bytes), 0.0
    return None


def host_terms(
    result: ProbeResult,
    strategy: Strategy,
    queue_batches: int,
    read_ahead_shards: int,
    process_rss_bytes: int | None,
    export_bytes: Mapping[str, int] | None = None,
) -> tuple[float, float, list[Part]]:
    """Intercept, slope and named (intercept, slope) parts of the host peak line."""
    parts: list[Part] = []
    fixed = fixed_part(result, process_rss_bytes)
    if fixed is not None:
        parts.append(fixed)
    fit = result.host_fit
    if fit is not None:
        parts.append(("train step", fit.intercept_bytes, fit.slope_bytes))
    else:
        parts.append(("one batch", 0.0, result.worst_preprocessed_bytes_per_sample))
    if strategy == "in_memory":
        parts.append(("dataset", float(result.raw_bytes), 0.0))
    else:
        shard = float(result.largest_shard_raw_bytes)
        if result.trial_reads_shard and read_ahead_shards >= 1:
            # The trials held one shard and read the next during their steps: one read-ahead is measured.
            reading = shard * (read_ahead_shards - 1)
        elif result.trial_holds_shard and result.shard_read_peak_bytes is not None and read_ahead_shards >= 1:
            # The child held the current shard; the next one is read during steps: its measured read peak
            # (Arrow buffers + pandas objects, ~3x the rows) and then its rows stay until their turn.
            reading = max(float(result.shard_read_peak_bytes), shard) + shard * (read_ahead_shards - 1)
        else:
            reading = shard * (1 + read_ahead_shards - (1 if result.trial_holds_shard else 0))
        parts.append(("shards read", reading, 0.0))
    copy = (export_bytes or {}).get(strategy, 0)
    if copy:
        parts.append(("tf.data copy", float(copy), 0.0))
    waiting = max(queue_batches - result.trial_prefetch_batches, 0)  # the trials' prefetch is measured
    parts.append(("queue", 0.0, waiting * result.worst_preprocessed_bytes_per_sample))
    parts.append(("preprocess", 0.0, result.preprocess_peak_bytes_per_sample))
    return sum(p[1] for p in parts), sum(p[2] for p in parts), parts


def host_pieces(a: float, s: float, parts: list[Part], curve: StepCurve | None) -> list[Piece]:
    """The host peak line with the step's growth following the measured ``curve``, piece by piece."""
    if curve is None:
        return [Piece(0, a, s, parts)]
    line = curve.line
    pieces = []
    for step in curve.pieces():
        # Every other part is the same on each piece: only the train step's line changes.
        da, ds = step.intercept_bytes - line.intercept_bytes, step.slope_bytes - line.slope_bytes
        named = [(n, pa + da, ps + ds) if n == "train step" else (n, pa, ps) for n, pa, ps in parts]
        pieces.append(Piece(step.start, a + da, s + ds, named, step.between))
    return pieces
