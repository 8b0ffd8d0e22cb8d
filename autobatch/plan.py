"""Plan: from measurements and budgets to a batch size and a feed strategy.

Pure functions over plain numbers: no TensorFlow, no reading of system state
(the budgets are passed in), so every choice is testable with made-up numbers.

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
"""


from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from autobatch._memory import Budget
from autobatch._units import format_bytes
from autobatch.errors import BudgetError, ConfigError
from autobatch.probe import ProbeResult, StepCurve

if TYPE_CHECKING:
    from autobatch._distribute import Distribution

Strategy = Literal["in_memory", "stream"]

PROCESS_PART = "this process"
"""The measured RSS of the process that will train (less the dataset, a part of its own)."""
CHILD_BASELINE_PART = "runtime + model (probe child)"
"""The probe child's runtime + model, standing for a training process that autobatch does not run (the CLI)."""
DEVICE_PART = "model + runtime on the device"
"""The intercept of a GPU's fitted step line: what the device holds at any batch, measured by every trial."""
_EXACT_PARTS = frozenset(
    {PROCESS_PART, CHILD_BASELINE_PART, DEVICE_PART, "dataset", "gradient accumulators", "tf.data copy"}
)
"""Parts measured or counted exactly, which get no safety margin."""
FEW_STEPS = 10
"""A plan leaving fewer optimizer steps per epoch than this says so: that few updates can starve training."""


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
class Plan:
    """The chosen batch size and feed strategy, with the predicted peaks and why."""

    batch_size: int
    strategy: Strategy
    n_samples: int
    steps_per_epoch: int
    """``ceil(n_samples / batch_size)``: every sample once per epoch, the last batch may be smaller."""
    budgets: tuple[BudgetUse, ...]
    limited_by: str
    """What stopped the batch from growing: a budget kind, a failed trial, ``max_batch_size`` or the dataset size."""
    explanation: str
    safety: float
    queue_batches: int
    confirmed: bool
    """Whether a real training trial ran at exactly this batch size and fitted."""
    measured_peak_bytes: int | None
    """Host peak of the confirming trial plus data and queue, when ``confirmed``."""
    confirmed_batch_size: int | None
    """Batch size of the confirming trial (this size or larger: memory grows with the batch)."""
    gradient_accumulation_steps: int
    """Steps per optimizer update; above 1 when ``target_batch_size`` does not fit in one step."""
    target_batch_size: int | None
    """The batch size the user asked the optimisation to see, if any."""
    probe: ProbeResult
    distribution: Distribution | None = None
    """Under ``tf.distribute``: ``batch_size`` is per replica; the replicas, the global batch and which worker set it."""

    @property
    def global_batch_size(self) -> int:
        """Samples per step over all replicas: ``batch_size × num_replicas_in_sync`` (``batch_size`` on one device)."""
        return self.distribution.global_batch_size if self.distribution is not None else self.batch_size

    @property
    def effective_batch_size(self) -> int:
        """Samples per optimizer update: ``batch_size × gradient_accumulation_steps``."""
        return self.batch_size * self.gradient_accumulation_steps

    def budget(self, kind: str) -> BudgetUse | None:
        """The :class:`BudgetUse` of ``"host"`` or ``"gpu"``, if planned against."""
        return next((use for use in self.budgets if use.budget.kind == kind), None)

    @property
    def predicted_peak_bytes(self) -> int:
        """Predicted peak host RAM of the training process."""
        use = self.budget("host")
        return use.predicted_peak_bytes if use is not None else 0

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["probe"] = self.probe.to_dict()
        return data

    def __rich__(self) -> Any:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        table = Table(title="autobatch plan", header_style="bold")
        table.add_column("budget")
        table.add_column("limit", justify="right")
        table.add_column("usable", justify="right")
        table.add_column("predicted peak", justify="right")
        table.add_column("of which", style="dim")
        table.add_column("max batch", justify="right")
        for use in self.budgets:
            parts = ", ".join(f"{name} {format_bytes(value)}" for name, value in use.components)
            table.add_row(
                f"{use.budget.kind} ({use.budget.source})",
                format_bytes(use.budget.limit_bytes),
                format_bytes(use.usable_bytes),
                format_bytes(use.predicted_peak_bytes),
                parts,
                "∞" if use.max_batch_size is None else f"{use.max_batch_size:,}",
            )
        confirmed = (
            f"confirmed by a real training trial on the worst-case batch of {self.confirmed_batch_size}: "
            f"measured step peak plus data and queue = {format_bytes(self.measured_peak_bytes)}"
            if self.confirmed
            else "not confirmed by a trial at this size"
        )
        header = Text.assemble(
            ("batch_size ", "bold"),
            (f"{self.batch_size:,}", "bold green"),
            (
                f" × {self.gradient_accumulation_steps} accumulation steps = {self.effective_batch_size:,} per update"
                if self.gradient_accumulation_steps > 1
                else ""
            ),
            f"   strategy {self.strategy}   {self.steps_per_epoch:,} steps/epoch over {self.n_samples:,} samples",
        )
        parts = [header, table, Text(self.explanation), Text(confirmed, style="dim")]
        if self.distribution is not None:
            parts.insert(1, self.distribution)
        return Group(*parts)

    def __str__(self) -> str:
        return _as_text(self)

    def feed(
        self,
        data: Any,
        targets: Any = None,
        *,
        preprocess: Any = None,
        shuffle: bool = True,
        seed: int = 0,
        validation_split: float | None = None,
        **kwargs: Any,
    ) -> Any:
        """The feed for this plan: its strategy, batch size and queue depth.

        Args:
            data: the data the plan was made for (in memory, or shard files).
            targets: targets or target column name(s).
            preprocess: the same ``preprocess`` the probe measured.
            shuffle: reshuffle every epoch.
            seed: seed of the shuffle and the validation split.
            validation_split: hold out this fraction (rows in memory, whole shards
                when streaming) and return ``(train, validation)``.
            **kwargs: passed to :func:`autobatch.feeds.make_feed`.

        Returns:
            An :class:`~autobatch.feeds.InMemoryFeed` or :class:`~autobatch.feeds.ShardFeed`,
            or ``(train_feed, validation_feed)`` with ``validation_split``. Every
            batch is checked against the probe's output signature.

        Example:
            >>> train, val = plan.feed("data/csv", "label", preprocess=pad, validation_split=0.1)
            >>> model.fit(train, validation_data=val, epochs=3, shuffle=False)
        """
        import warnings

        from autobatch.feeds import make_feed  # feeds are a later stage than the plan

        queue = max(self.queue_batches, 1)
        waiting = kwargs.get("max_queue_size", queue) * max(kwargs.get("workers", 1), 1)
        if waiting > queue:
            warnings.warn(
                f"the plan budgets {self.queue_batches} waiting batch(es), but max_queue_size × workers = {waiting}: "
                f"memory may exceed the prediction. Plan with queue_batches={waiting} instead.",
                stacklevel=2,
            )
        kwargs.setdefault("max_queue_size", queue)
        kwargs.setdefault("output_signature", self.probe.output_signature)
        worst_batch_bytes = math.ceil(self.probe.worst_preprocessed_bytes_per_sample * self.batch_size)
        kwargs.setdefault("max_batch_bytes", worst_batch_bytes)
        return make_feed(
            data,
            targets,
            batch_size=self.batch_size,
            strategy=self.strategy,
            preprocess=preprocess,
            shuffle=shuffle,
            seed=seed,
            validation_split=validation_split,
            **kwargs,
        )


def _as_text(renderable: Any) -> str:
    """What ``renderable`` prints as plain text, 120 columns wide."""
    from rich.console import Console

    console = Console(width=120, record=True, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def _split_target(target: int, fits: int) -> tuple[int, int]:
    """(steps, batch) with batch <= fits and steps × batch == target where a divisor allows."""
    least = math.ceil(target / fits)
    for steps in range(least, 2 * least + 1):
        if target % steps == 0:
            return steps, target // steps
    return least, math.ceil(target / least)


def _max_batch(intercept: float, slope: float, usable: float) -> int | None:
    if slope <= 0:
        return None if intercept <= usable else 0
    return max(int(math.floor((usable - intercept) / slope)), 0)


Part = tuple[str, float, float]
"""One named part of a peak line: (name, bytes, bytes per sample)."""


DEFAULT_SAFETY = 0.1
"""The default ``safety``: 10% of what training adds. It covers what a long run adds beyond the trials' sweep of
padded lengths (peaks up to 1.2% above the prediction, ~4% of the growth, over 30-epoch runs) and the trials'
scatter (BENCHMARKS.md, 4)."""


@dataclasses.dataclass(frozen=True)
class _Margin:
    safety: float

    @classmethod
    def of(cls, safety: float | None) -> _Margin:
        """The margin ``safety`` × the growth, validated; ``safety=None`` takes :data:`DEFAULT_SAFETY`."""
        safety = DEFAULT_SAFETY if safety is None else safety
        if not 0 <= safety < 1:
            raise ConfigError(f"`safety` must be in [0, 1). Received: safety={safety}")
        return cls(float(safety))

    def line(self, parts: Sequence[Part]) -> tuple[float, float]:
        """(intercept, slope) of the margin over ``parts``: ``safety`` × every part not measured or counted exactly."""
        grows = [(pa, ps) for name, pa, ps in parts if name not in _EXACT_PARTS]
        return self.safety * sum(pa for pa, _ in grows), self.safety * sum(ps for _, ps in grows)


def _allowed(limit: float, a: float, s: float, parts: Sequence[Part], margin: _Margin) -> int | None:
    """The largest batch whose predicted peak plus its safety margin fits ``limit`` (``None``: unbounded)."""
    ma, ms = margin.line(parts)
    return _max_batch(a + ma, s + ms, limit)


@dataclasses.dataclass(frozen=True)
class _Piece:
    """The peak line ``a + s·b`` made of ``parts``, from batch ``start`` up to the next piece's start."""

    start: int
    a: float
    s: float
    parts: list[Part]
    between: tuple[int, int] | None = None
    """The real trials the step's growth is interpolated between here, if any."""


def _pieces_allowed(limit: float, pieces: Sequence[_Piece], margin: _Margin) -> int | None:
    """The largest batch whose predicted peak plus margin fits ``limit`` on a rising piecewise line (``None``: unbounded)."""
    for piece, after in zip(pieces, [*pieces[1:], None]):
        most = _allowed(limit, piece.a, piece.s, piece.parts, margin)
        if after is not None and (most is None or most >= after.start - 1):
            continue  # this whole piece fits: the answer lies further up
        return most if most is None else max(most, piece.start - 1, 0)
    return None


def _piece_at(pieces: Sequence[_Piece], batch: int) -> _Piece:
    return [p for p in pieces if p.start <= max(batch, 1)][-1]


def _budget_use(budget: Budget, a: float, s: float, parts: Sequence[Part], margin: _Margin, batch: int) -> BudgetUse:
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
        max_batch_size=_allowed(budget.limit_bytes, a, s, parts, margin),
    )


def _fixed_part(result: ProbeResult, process_rss_bytes: int | None) -> Part | None:
    """What the training process holds before it trains: measured in it, else the probe child's runtime + model."""
    if process_rss_bytes is not None:
        # The dataset is a part of its own; in memory, this process holds it already.
        held = result.raw_bytes if result.source == "in_memory" else 0
        return PROCESS_PART, float(max(process_rss_bytes - held, 0)), 0.0
    if result.baseline_rss_bytes is not None:
        return CHILD_BASELINE_PART, float(result.baseline_rss_bytes), 0.0
    return None


def _host_terms(
    result: ProbeResult,
    strategy: Strategy,
    queue_batches: int,
    read_ahead_shards: int,
    process_rss_bytes: int | None,
    export_bytes: Mapping[str, int] | None = None,
) -> tuple[float, float, list[tuple[str, float, float]]]:
    """Intercept, slope and named (intercept, slope) parts of the host peak line."""
    parts: list[tuple[str, float, float]] = []
    fixed = _fixed_part(result, process_rss_bytes)
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


def _host_pieces(a: float, s: float, parts: list[Part], curve: StepCurve | None) -> list[_Piece]:
    """The host peak line with the step's growth following the measured ``curve``, piece by piece."""
    if curve is None:
        return [_Piece(0, a, s, parts)]
    line = curve.line
    pieces = []
    for step in curve.pieces():
        # Every other part is the same on each piece: only the train step's line changes.
        da, ds = step.intercept_bytes - line.intercept_bytes, step.slope_bytes - line.slope_bytes
        named = [(n, pa + da, ps + ds) if n == "train step" else (n, pa, ps) for n, pa, ps in parts]
        pieces.append(_Piece(step.start, a + da, s + ds, named, step.between))
    return pieces


def make_plan(
    result: ProbeResult,
    budgets: Sequence[Budget],
    *,
    safety: float | None = None,
    max_batch_size: int | None = None,
    multiple_of: int | None = None,
    queue_batches: int = 2,
    read_ahead_shards: int = 1,
    target_batch_size: int | None = None,
    process_rss_bytes: int | None = None,
    export_bytes: Mapping[str, int] | None = None,
) -> Plan:
    """Choose the largest batch size whose predicted peak fits every budget.

    Args:
        result: the probe's measurements.
        budgets: the host budget and, on a GPU, the device budget.
        safety: margin kept free on top of what training adds: ``safety`` × (the step's
            growth above the runtime, the queue, preprocessing, the shards being read),
            so 0.1 plans 10% more memory for them than predicted. The measured fixed
            part and the exact dataset bytes get no margin. Default: :data:`DEFAULT_SAFETY`.
        max_batch_size: never plan a larger batch.
        multiple_of: round the batch size down to a multiple of this.
        queue_batches: batches the feed may hold waiting (queue depth × workers).
        read_ahead_shards: shard files read ahead of the current one when streaming.
        process_rss_bytes: the resident memory of the process that will train, measured in
            it before training (:func:`autobatch.plan` in the calling process): the fixed part.
            ``None``: the probe child's runtime + model stands for it (the CLI).
        export_bytes: per strategy (``"in_memory"``, ``"stream"``), what the feed's tf.data export
            holds besides the data: a :class:`~autobatch.PadColumns` feed's copy of the padded
            values (see :func:`autobatch.plan`).
        target_batch_size: the batch the optimisation should see. When it does not fit,
            the plan keeps it by gradient accumulation (Keras optimizers'
            ``gradient_accumulation_steps``) instead of silently training on less.

    Returns:
        The :class:`Plan`.

    Raises:
        ConfigError: an option is out of range.
        BudgetError: even one sample does not fit a budget.
    """
    margin = _Margin.of(safety)
    safety = margin.safety
    if max_batch_size is not None and max_batch_size < 1:
        raise ConfigError(f"`max_batch_size` must be >= 1. Received: max_batch_size={max_batch_size}")
    if multiple_of is not None and multiple_of < 1:
        raise ConfigError(f"`multiple_of` must be >= 1. Received: multiple_of={multiple_of}")
    if target_batch_size is not None and target_batch_size < 1:
        raise ConfigError(f"`target_batch_size` must be >= 1. Received: target_batch_size={target_batch_size}")
    if process_rss_bytes is not None and process_rss_bytes < 0:
        raise ConfigError(f"`process_rss_bytes` must be >= 0. Received: {process_rss_bytes}")
    if export_bytes is not None and any(v < 0 for v in export_bytes.values()):
        raise ConfigError(f"`export_bytes` must be >= 0 per strategy. Received: {dict(export_bytes)}")
    if queue_batches < 0:
        raise ConfigError(f"`queue_batches` must be >= 0. Received: queue_batches={queue_batches}")
    if not budgets:
        raise ConfigError("make_plan needs at least one budget (the host's).")

    Lines = list[tuple[Budget, list[_Piece]]]

    def lines_for(strategy: Strategy, accumulators: bool) -> Lines:
        lines = []
        for budget in budgets:
            if budget.kind == "host":
                a, s, parts = _host_terms(
                    result, strategy, queue_batches, read_ahead_shards, process_rss_bytes, export_bytes
                )
                pieces = _host_pieces(a, s, parts, result.host_curve)
            else:
                fit = result.gpu_fit
                if fit is None:
                    continue
                # The line's intercept is the model, optimizer and runtime on the device, measured by every trial.
                parts = [(DEVICE_PART, fit.intercept_bytes, 0.0), ("train step", 0.0, fit.slope_bytes)]
                pieces = [_Piece(0, fit.intercept_bytes, fit.slope_bytes, parts)]
            if accumulators and result.model_params:
                # One float32 accumulator per weight: the probe's steps ran without them.
                extra = 4.0 * result.model_params
                pieces = [
                    dataclasses.replace(p, a=p.a + extra, parts=[*p.parts, ("gradient accumulators", extra, 0.0)])
                    for p in pieces
                ]
            lines.append((budget, pieces))
        return lines

    def largest(lines: Lines) -> tuple[int, str]:
        caps: list[tuple[int, str]] = [(result.n_samples, "the dataset size")]
        if max_batch_size is not None:
            caps.append((max_batch_size, "max_batch_size"))
        failed = result.failed_batch_size()
        if failed is not None:
            caps.append((failed - 1, f"a real trial at batch {failed} that ran out of memory"))
        for budget, pieces in lines:
            most = _pieces_allowed(budget.limit_bytes, pieces, margin)
            if most is not None:
                caps.append((most, f"{budget.kind} memory"))
        batch, limited_by = min(caps, key=lambda c: c[0])
        if multiple_of is not None and batch >= multiple_of:
            batch -= batch % multiple_of
        return batch, limited_by

    def uses_at(lines: Lines, batch: int) -> list[BudgetUse]:
        uses = []
        for budget, pieces in lines:
            piece = _piece_at(pieces, batch)
            use = _budget_use(budget, piece.a, piece.s, piece.parts, margin, batch)
            uses.append(dataclasses.replace(use, max_batch_size=_pieces_allowed(budget.limit_bytes, pieces, margin)))
        return uses

    strategy: Strategy = "in_memory"
    lines = lines_for("in_memory", False)
    batch, limited_by = largest(lines)
    strategy_reason = "the data is already in memory"
    if result.source == "shards":
        stream_lines = lines_for("stream", False)
        stream_batch, stream_limit = largest(stream_lines)
        # Holding everything avoids re-reading files each epoch; worth it unless it costs >10% of the batch.
        if batch >= 1 and batch >= 0.9 * stream_batch:
            strategy_reason = (
                f"the whole dataset ({format_bytes(result.raw_bytes)}) fits in memory next to the working set of batch {batch}"
            )
        else:
            strategy = "stream"
            strategy_reason = (
                f"holding the whole dataset ({format_bytes(result.raw_bytes)}) would "
                + (f"cut the batch to {batch}" if batch >= 1 else "not fit at all")
                + f", so shards are streamed ({1 + read_ahead_shards} file(s) resident)"
            )
            batch, limited_by, lines = stream_batch, stream_limit, stream_lines
    accumulation_steps = 1
    target_note = ""
    if target_batch_size is not None and batch >= 1:
        if target_batch_size <= batch:
            batch, limited_by = target_batch_size, "target_batch_size"
        else:
            lines = lines_for(strategy, True)
            fits, _ = largest(lines)
            if fits >= 1:
                accumulation_steps, batch = _split_target(target_batch_size, fits)
                target_note = (
                    f"; the target batch {target_batch_size:,} does not fit (at most {fits:,}), so each optimizer "
                    f"update accumulates gradients over {accumulation_steps} steps of {batch:,} = "
                    f"{batch * accumulation_steps:,} samples"
                )
            else:
                batch = fits
    uses = uses_at(lines, batch)
    if batch < 1:
        use = next(u for u in uses if u.max_batch_size == 0) if any(u.max_batch_size == 0 for u in uses) else uses[0]
        parts = ", ".join(f"{name} {format_bytes(v)}" for name, v in use.components)
        raise BudgetError(
            f"the {use.budget.kind} budget cannot hold even one sample: a batch of 1 needs "
            f"{format_bytes(use.predicted_peak_bytes)} ({parts}), but {use.budget} with a {safety:.0%} safety margin "
            f"({format_bytes(use.margin_bytes)}) leaves {format_bytes(use.usable_bytes)}. Raise the limit, free memory, "
            "or stream smaller shards."
        )
    binding = next((u for u in uses if f"{u.budget.kind} memory" == limited_by), None)
    if binding is not None:
        explanation = (
            f"batch {batch:,} is limited by {binding.budget.kind} memory: predicted "
            f"{format_bytes(binding.predicted_peak_bytes)} of {format_bytes(binding.budget.limit_bytes)} "
            f"({binding.budget.source}), keeping a {safety:.0%} margin on what training adds "
            f"({format_bytes(binding.margin_bytes)})"
        )
        between = next(_piece_at(p, batch).between for b, p in lines if b is binding.budget)
        if between is not None:
            explanation += (
                f"; the step's memory is interpolated between real trials at batch {between[0]:,} and {between[1]:,}"
            )
    else:
        host = uses[0] if uses else None
        explanation = f"batch {batch:,} is limited by {limited_by}" + (
            f"; predicted {format_bytes(host.predicted_peak_bytes)} of {format_bytes(host.usable_bytes)} usable {host.budget.kind}"
            if host
            else ""
        )
    explanation += target_note
    if not result.has_model:
        explanation += "; no model was probed, so the training step's memory is not included (pass a model)"
    explanation += f". Strategy {strategy}: {strategy_reason}."
    if result.has_model and process_rss_bytes is None and result.baseline_rss_bytes is not None:
        explanation += (
            f" The fixed part is the probe child's runtime + model ({format_bytes(result.baseline_rss_bytes)}), "
            "standing for the process that will train; autobatch.fit measures that process itself."
        )
    updates = math.ceil(result.n_samples / max(batch * accumulation_steps, 1))
    if updates < FEW_STEPS and result.n_samples >= FEW_STEPS:
        explanation += (
            f" Only {updates} optimizer step(s) per epoch: that few updates can starve training. Pass "
            "max_batch_size= for more, smaller steps, or target_batch_size= to choose the batch the optimizer sees."
        )

    # Memory grows with batch size, so a fitting trial at this size or above confirms the plan.
    host = next((u for u in uses if u.budget.kind == "host"), None)
    measured = confirmed_batch = None
    confirmed = False
    if host is not None:
        parts = next(pieces[0].parts for budget, pieces in lines if budget.kind == "host")
        for trial in sorted(result.trials, key=lambda t: t.batch_size):
            if trial.batch_size < batch or not trial.fits or trial.peak_rss_bytes is None:
                continue
            extras = sum(pa + ps * trial.batch_size for name, pa, ps in parts if name != "train step")
            total = int(trial.peak_rss_bytes - (result.baseline_rss_bytes or 0) + extras)
            if total <= host.usable_bytes:
                measured, confirmed, confirmed_batch = total, True, trial.batch_size
                break
    return Plan(
        batch_size=batch,
        strategy=strategy,
        n_samples=result.n_samples,
        steps_per_epoch=math.ceil(result.n_samples / batch),
        budgets=tuple(uses),
        limited_by=limited_by,
        explanation=explanation,
        safety=safety,
        queue_batches=queue_batches,
        confirmed=confirmed,
        gradient_accumulation_steps=accumulation_steps,
        target_batch_size=target_batch_size,
        measured_peak_bytes=measured,
        confirmed_batch_size=confirmed_batch,
        probe=result,
    )


# --------------------------------------------------------------------------- size-aware: one batch size per length bucket


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
    to a multiple of ``multiple`` and the last one the longest length, so that padding every sample to its bucket's boundary adds the fewest
    padded positions (an exact dynamic programme). Given boundaries are sorted; a
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
        """Size-aware plans are for one worker (see :class:`Plan` for tf.distribute)."""
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
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        table = Table(title="autobatch size-aware plan", header_style="bold")
        table.add_column("lengths", justify="right")
        table.add_column("padded to", justify="right")
        table.add_column("batch", justify="right")
        table.add_column("samples", justify="right")
        table.add_column("steps", justify="right")
        table.add_column("predicted peak", justify="right")
        table.add_column("limited by", style="dim")
        for b in self.buckets:
            table.add_row(
                f"{b.lo:,}–{b.hi:,}",
                f"{b.hi:,}",
                f"{b.batch_size:,}",
                f"{b.n_samples:,}",
                f"{b.steps:,}",
                format_bytes(b.predicted_peak_bytes),
                b.limited_by,
            )
        header = Text.assemble(
            ("size-aware batching ", "bold"),
            (f"{len(self.buckets)} buckets", "bold green"),
            f"   strategy {self.strategy}   {self.steps_per_epoch:,} steps/epoch over {self.n_samples:,} samples "
            f"(mean batch {self.mean_batch_size:,.1f})",
        )
        confirmed = (
            f"confirmed by a real training trial at the most demanding bucket: measured step peak plus data and "
            f"queue = {format_bytes(self.measured_peak_bytes)}"
            if self.confirmed
            else "not confirmed by a trial at a planned bucket"
        )
        return Group(header, table, Text(self.explanation), Text(confirmed, style="dim"))

    def __str__(self) -> str:
        return _as_text(self)

    def feed(
        self,
        data: Any,
        targets: Any = None,
        *,
        preprocess: Any = None,
        shuffle: bool = True,
        seed: int = 0,
        validation_split: float | None = None,
        **kwargs: Any,
    ) -> Any:
        """The size-aware feed for this plan: its buckets, batch sizes, strategy and queue depth.

        Args:
            data: the data the plan was made for.
            targets: targets or target column name(s).
            preprocess: the same ``preprocess`` the probe measured.
            shuffle: reshuffle within and across buckets every epoch.
            seed: seed of the shuffle and of the validation split.
            validation_split: hold out this fraction and return ``(train, validation)``.
            **kwargs: passed to :func:`autobatch.feeds.size_aware.make_size_aware_feed`.

        Returns:
            A :class:`~autobatch.feeds.SizeAwareFeed` (or ``SizeAwareShardFeed`` when streaming), or
            ``(train_feed, validation_feed)`` with ``validation_split``.
        """
        from autobatch.feeds.size_aware import make_size_aware_feed  # feeds are a later stage than the plan

        kwargs.setdefault("max_queue_size", max(self.queue_batches, 1))
        kwargs.setdefault("output_signature", self.probe.output_signature)
        kwargs.setdefault("variable_leaves", self.sized.variable_leaves)
        if self.sized.sequence_columns and "length_fn" not in kwargs:
            kwargs.setdefault("sequence_columns", self.sized.sequence_columns)
        return make_size_aware_feed(
            data,
            targets,
            boundaries=self.boundaries,
            batch_sizes=self.batch_sizes,
            strategy=self.strategy,
            preprocess=preprocess,
            shuffle=shuffle,
            seed=seed,
            validation_split=validation_split,
            **kwargs,
        )


    def bucket_by_sequence_length(self, dataset: Any, element_length_func: Any, **options: Any) -> Any:
        """``dataset`` (unbatched ``tf.data``) batched by TensorFlow's ``bucket_by_sequence_length`` with these buckets.

        See :func:`autobatch.feeds.size_aware.bucket_by_sequence_length`.
        """
        from autobatch.feeds.size_aware import bucket_by_sequence_length

        return bucket_by_sequence_length(
            dataset, element_length_func, boundaries=self.boundaries, batch_sizes=self.batch_sizes, **options
        )


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
    (dataset or shards, as :func:`make_plan` counts it), batches waiting in the
    queue beyond what the trials prefetched, and preprocessing's transient peak,
    both measured per padded token. The fixed batch it is compared with is the
    largest whose batch of the longest sequences fits the same budget.

    Args:
        sized: the :class:`~autobatch.size_probe.SizeAwareProbe`.
        budgets: the host budget and, on a GPU, the device budget.
        buckets: how many length buckets to choose from the distribution, or their boundaries.
        safety: safety margin on what training adds (default :data:`DEFAULT_SAFETY`), as in :func:`make_plan`.
        max_batch_size: never plan a larger batch in any bucket.
        queue_batches: batches the feed may hold waiting.
        read_ahead_shards: shard files read ahead when streaming.
        process_rss_bytes: the training process's measured RSS (the fixed part), as in :func:`make_plan`.

    Returns:
        The :class:`BucketPlan`.

    Raises:
        ConfigError: an option is out of range.
        BudgetError: one sample of the longest bucket does not fit a budget.
    """
    margin = _Margin.of(safety)
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
        _, _, parts = _host_terms(result, strategy, queue_batches, read_ahead_shards, process_rss_bytes)
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
            allowed = _allowed(usable, a, s, parts, margin)
            if allowed is not None:
                caps.append((allowed, f"{budget.kind} memory"))
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
        line = next((ln for ln in lines(strategy, worst.hi) if _allowed(ln[1], ln[2], ln[3], ln[4], margin) == 0), None)
        line = line or lines(strategy, worst.hi)[0]
        parts = ", ".join(f"{name} {format_bytes(a + s)}" for name, a, s in line[4])
        one = _budget_use(line[0], line[2], line[3], line[4], margin, 1)
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
        _budget_use(budget, a, s, parts, margin, demanding.batch_size)
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
