"""Size-aware plans: one batch size per length bucket, every bucket's predicted peak within the budget.

Pure, as :mod:`autobatch.plan`: the size-aware probe's fitted memory model
(``a + p·batch·length (+ c·batch·length²)``) and the budgets in, the buckets and
their batch sizes out. The feed is built from the plan by
``autobatch.feeds.make_feed(x, y, plan=plan)``, and a ``tf.data`` pipeline is
bucketed with it by ``autobatch.feeds.size_aware.bucket_by_sequence_length(dataset, fn, plan=plan)``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from autobatch._memory import Budget
from autobatch._peak_lines import DEVICE_PART, BudgetUse, Margin, Strategy, allowed, budget_use, host_terms
from autobatch._plan_render import budget_line, plan_view
from autobatch._render import as_text, compact_table
from autobatch._result import ProbeResult
from autobatch._units import format_bytes
from autobatch.errors import BudgetError, ConfigError

_SHORT_LIMITS = {"a real trial that ran out of memory": "out-of-memory trial"}
"""What a bucket's row says for a limit whose full name would not fit an 80-column row."""


@dataclasses.dataclass(frozen=True)
class Bucket:
    """One length bucket of a :class:`BucketPlan`: samples of length ``lo``–``hi``, padded to ``hi``."""

    lo: int
    """Shortest length in the bucket (one more than the previous boundary)."""
    hi: int
    """The boundary: every batch of this bucket is padded to this length."""
    batch_size: int
    n_samples: int
    """Samples of the planned data in this bucket."""
    predicted_peak_bytes: int
    """Predicted host peak of a step of this bucket (with data, queue and preprocessing)."""
    limited_by: str
    """What stopped its batch from growing: ``host memory``, ``gpu memory``, ``the bucket's samples``, ..."""

    @property
    def steps(self) -> int:
        """Batches of this bucket per epoch (its last one may be smaller)."""
        return math.ceil(self.n_samples / self.batch_size) if self.n_samples else 0


def _padded_tokens_cost(values: Any, counts: Any, candidates: list[int], n_buckets: int) -> list[int]:
    """Boundaries among ``candidates`` (ascending, the last ≥ every length) minimising the padded tokens, by DP."""
    import numpy as np

    values = np.asarray(values)
    cum = np.concatenate([[0], np.cumsum(counts)])
    # count[j]: samples of length <= candidates[j]
    upto = [int(cum[np.searchsorted(values, c, side="right")]) for c in candidates]
    m = len(candidates)
    k_max = min(n_buckets, m)
    inf = float("inf")
    best = [[inf] * m for _ in range(k_max + 1)]
    back = [[-1] * m for _ in range(k_max + 1)]
    for j in range(m):
        best[1][j] = candidates[j] * upto[j]
    for k in range(2, k_max + 1):
        for j in range(m):
            for i in range(j):
                cost = best[k - 1][i] + candidates[j] * (upto[j] - upto[i])
                if cost < best[k][j]:
                    best[k][j], back[k][j] = cost, i
    k = min(range(1, k_max + 1), key=lambda q: (best[q][m - 1], q))
    chosen, j = [], m - 1
    while k >= 1 and j >= 0:
        chosen.append(candidates[j])
        j, k = back[k][j], k - 1
    return sorted(chosen)


def bucket_boundaries(lengths: Any, buckets: int | Sequence[int] = 8, *, multiple: int = 8) -> tuple[int, ...]:
    """Length bucket boundaries: given, or chosen from the length distribution.

    With an int, the boundaries are picked among the distribution's percentiles
    and a geometric ladder of lengths (×1.2, for the long tail), each rounded up
    to a multiple of ``multiple`` and the last one the longest length, so that
    padding every sample to its bucket's boundary adds the fewest padded
    positions (an exact dynamic programme). Given boundaries are sorted; a
    last bucket up to the longest length is added when they stop short of it.

    Args:
        lengths: every sample's length.
        buckets: how many buckets to choose, or the boundaries themselves.
        multiple: round chosen boundaries up to a multiple of this (fewer, friendlier shapes).

    Returns:
        Ascending boundaries; the last one is at least the longest length.

    Raises:
        ConfigError: ``buckets`` is not a positive int or a list of positive ints.
    """
    import numpy as np

    values, counts = np.unique(np.asarray(lengths, dtype=np.int64), return_counts=True)
    if not len(values):
        raise ConfigError("bucket_boundaries needs at least one sample length; received none.")
    longest = int(values[-1])
    if isinstance(buckets, bool) or not isinstance(buckets, (int, Sequence)) or isinstance(buckets, str):
        raise ConfigError(f"`buckets` must be a number of buckets or a list of boundaries. Received: {buckets!r}")
    if isinstance(buckets, int):
        if buckets < 1:
            raise ConfigError(f"`buckets` must be >= 1. Received: buckets={buckets}")
        # Percentiles resolve the bulk; a geometric ladder (×1.2) resolves the long tail, where few samples lie.
        qs = np.percentile(np.repeat(values, counts), np.linspace(0, 100, 101))
        ladder = [float(values[0]) * 1.2**k for k in range(int(math.log(max(longest, 1) / max(values[0], 1), 1.2)) + 2)]
        candidates = sorted(
            {min(max(-(-int(math.ceil(q)) // multiple) * multiple, 1), longest) for q in (*qs, *ladder)} | {longest}
        )
        return tuple(_padded_tokens_cost(values, counts, candidates, buckets))
    given = sorted({int(b) for b in buckets})
    if not given or given[0] < 1:
        raise ConfigError(f"bucket boundaries must be positive ints. Received: buckets={list(buckets)!r}")
    if given[-1] < longest:
        given.append(longest)
    return tuple(given)


def expected_batch_max(values: Any, counts: Any, batch_size: int) -> float:
    """Expected longest length in a batch of ``batch_size`` samples drawn at random: what per-batch padding pads to."""
    import numpy as np

    values = np.asarray(values, dtype=float)
    cdf = np.cumsum(counts) / float(np.sum(counts))
    below = np.concatenate([[0.0], cdf[:-1]])
    return float(np.sum(values * (cdf**batch_size - below**batch_size)))


@dataclasses.dataclass(frozen=True)
class BucketPlan:
    """Size-aware batching: one batch size per length bucket, every bucket's predicted peak within the budget."""

    buckets: tuple[Bucket, ...]
    strategy: Strategy
    n_samples: int
    budgets: tuple[BudgetUse, ...]
    """Each budget at the bucket with the highest predicted peak."""
    fixed_batch_size: int
    """The largest safe single batch size: the one whose batch of the longest sequences fits."""
    fixed_mean_padded_length: float
    """Mean padded length with that fixed batch and per-batch padding (expected longest of a random batch)."""
    mean_padded_length: float
    """Mean padded length of size-aware batching (each sample padded to its bucket's boundary)."""
    expected_speedup: float
    """Predicted samples/s of size-aware batching ÷ of the fixed batch, from the trials' step times."""
    explanation: str
    safety: float
    queue_batches: int
    confirmed: bool
    """Whether a real trial at the most demanding bucket's batch and length fitted the budget."""
    measured_peak_bytes: int | None
    sized: Any
    """The :class:`~autobatch.size_probe.SizeAwareProbe` the plan rests on."""
    gradient_accumulation_steps: int = 1
    target_batch_size: int | None = None

    @property
    def probe(self) -> ProbeResult:
        return self.sized.probe

    @property
    def distribution(self) -> None:
        """Size-aware plans are for one worker (see :class:`~autobatch.plan.Plan` for tf.distribute)."""
        return None

    @property
    def boundaries(self) -> tuple[int, ...]:
        return tuple(b.hi for b in self.buckets)

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        return tuple(b.batch_size for b in self.buckets)

    @property
    def batch_size(self) -> int:
        """The largest bucket batch (what a monitor or an adaptive feed treats as "the" batch)."""
        return max(b.batch_size for b in self.buckets)

    @property
    def effective_batch_size(self) -> int:
        return self.batch_size

    @property
    def steps_per_epoch(self) -> int:
        return sum(b.steps for b in self.buckets)

    @property
    def mean_batch_size(self) -> float:
        return self.n_samples / max(self.steps_per_epoch, 1)

    @property
    def predicted_peak_bytes(self) -> int:
        return max(b.predicted_peak_bytes for b in self.buckets)

    @property
    def limited_by(self) -> str:
        return max(self.buckets, key=lambda b: b.predicted_peak_bytes).limited_by

    def budget(self, kind: str) -> BudgetUse | None:
        return next((use for use in self.budgets if use.budget.kind == kind), None)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["sized"] = self.sized.to_dict()
        if not math.isfinite(self.expected_speedup):
            data["expected_speedup"] = None  # JSON has no infinity
        return data

    def __rich__(self) -> Any:
        from rich.text import Text

        table = compact_table()
        for name in ("lengths", "batch", "samples", "steps", "peak", "limited by"):
            table.add_column(name, justify="left" if name in ("lengths", "limited by") else "right", no_wrap=True)
        for b in self.buckets:
            table.add_row(
                f"{b.lo:,}–{b.hi:,}",
                f"{b.batch_size:,}",
                f"{b.n_samples:,}",
                f"{b.steps:,}",
                format_bytes(b.predicted_peak_bytes),
                _SHORT_LIMITS.get(b.limited_by, b.limited_by),
            )
        batches = self.batch_sizes
        header = [
            Text.assemble(
                ("autobatch size-aware plan", "bold"),
                "  ",
                (f"{len(self.buckets)} buckets", "bold green"),
                f", batch {min(batches):,}–{max(batches):,} (mean {self.mean_batch_size:,.1f})",
            ),
            Text(f"strategy {self.strategy}, {self.steps_per_epoch:,} steps/epoch over {self.n_samples:,} samples"),
            Text(
                f"padded to each bucket's longest: {self.mean_padded_length:,.0f} on average, "
                f"{self.fixed_mean_padded_length:,.0f} at fixed batch {self.fixed_batch_size:,}"
            ),
            *(budget_line(use) for use in self.budgets),
            Text.assemble(("limited by ", "bold"), self.limited_by),
        ]
        note = (
            f"confirmed by a real training trial at the most demanding bucket: measured step peak plus data and "
            f"queue = {format_bytes(self.measured_peak_bytes)}"
            if self.confirmed
            else "not confirmed by a trial at a planned bucket"
        )
        return plan_view(header, table, self.explanation, note)

    def __str__(self) -> str:
        return as_text(self)


def make_bucket_plan(
    sized: Any,
    budgets: Sequence[Budget],
    *,
    buckets: int | Sequence[int] = 8,
    safety: float | None = None,
    max_batch_size: int | None = None,
    queue_batches: int = 2,
    read_ahead_shards: int = 1,
    process_rss_bytes: int | None = None,
) -> BucketPlan:
    """Choose, per length bucket, the largest batch whose predicted peak fits every budget.

    The host peak of a step of a bucket padded to length ``L`` at batch ``b`` is
    the fitted ``a + p·b·L (+ c·b·L²)`` of the size-aware probe, plus the data held
    (dataset or shards, as :func:`~autobatch.plan.make_plan` counts it), batches waiting in the
    queue beyond what the trials prefetched, and preprocessing's transient peak,
    both measured per padded token. The fixed batch it is compared with is the
    largest whose batch of the longest sequences fits the same budget.

    Args:
        sized: the :class:`~autobatch.size_probe.SizeAwareProbe`.
        budgets: the host budget and, on a GPU, the device budget.
        buckets: how many length buckets to choose from the distribution, or their boundaries.
        safety: safety margin on what training adds (default
            :data:`~autobatch.plan.DEFAULT_SAFETY`), as in :func:`~autobatch.plan.make_plan`.
        max_batch_size: never plan a larger batch in any bucket.
        queue_batches: batches the feed may hold waiting.
        read_ahead_shards: shard files read ahead when streaming.
        process_rss_bytes: the training process's measured RSS (the fixed part), as in
            :func:`~autobatch.plan.make_plan`.

    Returns:
        The :class:`BucketPlan`.

    Raises:
        ConfigError: an option is out of range.
        BudgetError: one sample of the longest bucket does not fit a budget.
    """
    margin = Margin.of(safety)
    safety = margin.safety
    if max_batch_size is not None and max_batch_size < 1:
        raise ConfigError(f"`max_batch_size` must be >= 1. Received: max_batch_size={max_batch_size}")
    if queue_batches < 0:
        raise ConfigError(f"`queue_batches` must be >= 0. Received: queue_batches={queue_batches}")
    if not budgets:
        raise ConfigError("make_bucket_plan needs at least one budget (the host's).")
    if sized.host_model is None:
        raise ConfigError("the size-aware probe has no fitted memory model (no trial completed).")
    import numpy as np

    result: ProbeResult = sized.probe
    values = np.asarray(sized.length_values, dtype=np.int64)
    counts = np.asarray(sized.length_counts, dtype=np.int64)
    boundaries = bucket_boundaries(np.repeat(values, counts), buckets)
    waiting = max(queue_batches - result.trial_prefetch_batches, 0)

    # The grid's fitted peaks are the child's whole RSS: above its baseline they are the step's growth.
    baseline = float(result.baseline_rss_bytes or 0)

    def host_constant(strategy: Strategy) -> tuple[float, list[tuple[str, float]]]:
        _, _, parts = host_terms(result, strategy, queue_batches, read_ahead_shards, process_rss_bytes)
        held = [(name, a) for name, a, _ in parts if name not in ("train step", "one batch", "queue", "preprocess")]
        return sum(a for _, a in held), held

    Line = tuple[Budget, float, float, float, list[tuple[str, float, float]]]

    def lines(strategy: Strategy, length: int) -> list[Line]:
        """Per budget: usable, intercept, per-sample slope at ``length`` and named (intercept, slope) parts."""
        out = []
        for budget in budgets:
            usable = float(budget.limit_bytes)
            if budget.kind == "host":
                model = sized.host_model
                constant, held = host_constant(strategy)
                per_batch_bytes = sized.bytes_per_sample + sized.bytes_per_token * length
                parts = [("train step", model.intercept_bytes - baseline, model.per_sample_bytes(length))]
                parts += [(name, a, 0.0) for name, a in held]
                parts.append(("queue", 0.0, waiting * per_batch_bytes))
                parts.append(("preprocess", 0.0, sized.preprocess_peak_per_token * length))
            else:
                model = sized.gpu_model
                if model is None:
                    continue
                parts = [(DEVICE_PART, model.intercept_bytes, 0.0), ("train step", 0.0, model.per_sample_bytes(length))]
            out.append((budget, usable, sum(p[1] for p in parts), sum(p[2] for p in parts), parts))
        return out

    def largest(strategy: Strategy, length: int, n_in_bucket: int | None) -> tuple[int, str]:
        caps: list[tuple[int, str]] = []
        if n_in_bucket is not None:
            caps.append((max(n_in_bucket, 1), "the bucket's samples"))
        if max_batch_size is not None:
            caps.append((max_batch_size, "max_batch_size"))
        failed = sized.failed_batch_size(length)
        if failed is not None:
            caps.append((failed - 1, "a real trial that ran out of memory"))
        for budget, usable, a, s, parts in lines(strategy, length):
            most = allowed(usable, a, s, parts, margin)
            if most is not None:
                caps.append((most, f"{budget.kind} memory"))
        if not caps:
            return max(n_in_bucket or 1, 1), "the bucket's samples"
        return min(caps, key=lambda c: c[0])

    def build(strategy: Strategy) -> tuple[list[Bucket], float]:
        made, lo = [], 1
        cum = np.concatenate([[0], np.cumsum(counts)])
        for hi in boundaries:
            n = int(cum[np.searchsorted(values, hi, side="right")] - cum[np.searchsorted(values, lo, side="left")])
            batch, why = largest(strategy, hi, n)
            host = next((line for line in lines(strategy, hi) if line[0].kind == "host"), None)
            peak = int(round(host[2] + host[3] * max(batch, 1))) if host is not None else 0
            made.append(Bucket(lo, hi, batch, n, peak, why))
            lo = hi + 1
        return made, _epoch_seconds(made)

    def _epoch_seconds(made: list[Bucket]) -> float:
        t0, per_token = sized.step_seconds or (0.0, 1.0)
        return sum(b.steps * (t0 + per_token * b.batch_size * b.hi) for b in made if b.batch_size >= 1)

    strategy: Strategy = "in_memory"
    made, seconds = build("in_memory")
    strategy_reason = "the data is already in memory"
    if result.source == "shards":
        streamed, stream_seconds = build("stream")
        fits = all(b.batch_size >= 1 for b in made)
        if fits and seconds <= 1.1 * stream_seconds:
            strategy_reason = f"the whole dataset ({format_bytes(result.raw_bytes)}) fits next to the buckets' batches"
        else:
            strategy, made, seconds = "stream", streamed, stream_seconds
            strategy_reason = (
                f"holding the whole dataset ({format_bytes(result.raw_bytes)}) would shrink the batches, so shards are "
                f"streamed ({1 + read_ahead_shards} file(s) resident)"
            )
    worst = made[-1]
    if worst.batch_size < 1:
        line = next((ln for ln in lines(strategy, worst.hi) if allowed(ln[1], ln[2], ln[3], ln[4], margin) == 0), None)
        line = line or lines(strategy, worst.hi)[0]
        parts = ", ".join(f"{name} {format_bytes(a + s)}" for name, a, s in line[4])
        one = budget_use(line[0], line[2], line[3], line[4], margin, 1)
        raise BudgetError(
            f"the {line[0].kind} budget cannot hold even one sample of length {worst.hi}: a batch of 1 needs "
            f"{format_bytes(line[2] + line[3])} ({parts}), but {line[0]} with a {safety:.0%} safety margin "
            f"({format_bytes(one.margin_bytes)}) leaves {format_bytes(one.usable_bytes)}. Raise the limit, or cap the "
            "length (truncate) in preprocess."
        )
    longest = sized.max_length
    fixed, _ = largest(strategy, longest, None)
    fixed = min(fixed, result.n_samples)
    fixed_length = expected_batch_max(values, counts, max(fixed, 1))
    mean_padded = float(sum(b.hi * b.n_samples for b in made) / max(sum(b.n_samples for b in made), 1))
    t0, per_token = sized.step_seconds or (0.0, 1.0)
    fixed_seconds = math.ceil(result.n_samples / max(fixed, 1)) * (t0 + per_token * max(fixed, 1) * fixed_length)
    speedup = fixed_seconds / seconds if seconds > 0 else float("inf")
    demanding = max(made, key=lambda b: (b.predicted_peak_bytes, b.batch_size * b.hi))
    uses = [
        budget_use(budget, a, s, parts, margin, demanding.batch_size)
        for budget, _, a, s, parts in lines(strategy, demanding.hi)
    ]
    timing = "the trials' step times" if sized.step_seconds else "padded tokens (no step times measured)"
    explanation = (
        f"{len(made)} length buckets, batch {min(b.batch_size for b in made):,}–{max(b.batch_size for b in made):,} "
        f"(mean {result.n_samples / max(sum(b.steps for b in made), 1):,.1f}); the largest safe fixed batch is "
        f"{fixed:,} (its batch of the longest sequences, length {longest:,}, must fit), which with per-batch padding "
        f"pads to {fixed_length:,.0f} on average against {mean_padded:,.0f} here: expected {speedup:.2f}× the "
        f"samples/s (from {timing}). Strategy {strategy}: {strategy_reason}."
    )
    # A fitting trial at exactly a planned bucket's batch and length confirms that bucket.
    measured, confirmed = None, False
    host = next((u for u in uses if u.budget.kind == "host"), None)
    if host is not None:
        extras = sum(v for name, v in host.components if name != "train step")
        for trial in sized.grid:
            if trial.held_out or not trial.fits or trial.peak_rss_bytes is None:
                continue
            if (trial.batch_size, trial.length) == (demanding.batch_size, demanding.hi):
                total = int(trial.peak_rss_bytes - baseline + extras)
                if total <= host.usable_bytes:
                    measured, confirmed = total, True
    return BucketPlan(
        buckets=tuple(made),
        strategy=strategy,
        n_samples=result.n_samples,
        budgets=tuple(uses),
        fixed_batch_size=fixed,
        fixed_mean_padded_length=fixed_length,
        mean_padded_length=mean_padded,
        expected_speedup=speedup,
        explanation=explanation,
        safety=safety,
        queue_batches=queue_batches,
        confirmed=confirmed,
        measured_peak_bytes=measured,
        sized=sized,
    )

