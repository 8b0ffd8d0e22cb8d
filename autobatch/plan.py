"""Plan: from measurements and budgets to a batch size and a feed strategy.

Pure functions over plain numbers: no TensorFlow, no reading of system state
(the budgets are passed in), so every choice is testable with made-up numbers.
The predicted peak at batch ``b`` is a sum of named lines ``a + s·b`` (the fixed
part, the step, the data held, the queue, preprocessing; on a GPU the fitted
device peak), with one safety margin on what training adds: see
:mod:`autobatch._peak_lines`. Size-aware plans (one batch per length bucket) are
in :mod:`autobatch.bucket_plan`.

The plan does not build its feed (feeds are a later stage):
``autobatch.feeds.make_feed(x, y, plan=plan)`` does.
"""


from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from autobatch._memory import Budget
from autobatch._peak_lines import (
    CHILD_BASELINE_PART,
    DEFAULT_SAFETY,
    DEVICE_PART,
    PROCESS_PART,
    BudgetUse,
    Margin,
    Piece,
    Strategy,
    budget_use,
    host_pieces,
    host_terms,
    piece_at,
    pieces_allowed,
)
from autobatch._plan_render import budget_line, peak_table, plan_view
from autobatch._render import as_text
from autobatch._replicas import Distribution
from autobatch._result import ProbeResult
from autobatch._units import format_bytes
from autobatch.errors import BudgetError, ConfigError

__all__ = [
    "CHILD_BASELINE_PART",
    "DEFAULT_SAFETY",
    "DEVICE_PART",
    "FEW_STEPS",
    "PROCESS_PART",
    "BudgetUse",
    "Plan",
    "Strategy",
    "make_plan",
]

FEW_STEPS = 10
"""A plan leaving fewer optimizer steps per epoch than this says so: that few updates can starve training."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """The chosen batch size and feed strategy, with the predicted peaks and why.

    ``autobatch.feeds.make_feed(x, y, plan=plan)`` builds the feed it was made for.
    """

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
        from rich.text import Text

        per_replica = " per replica" if self.distribution is not None else ""
        accumulation = (
            f" × {self.gradient_accumulation_steps} accumulation steps = {self.effective_batch_size:,} per update"
            if self.gradient_accumulation_steps > 1
            else ""
        )
        header = [
            Text.assemble(
                ("autobatch plan", "bold"),
                "  batch_size ",
                (f"{self.batch_size:,}", "bold green"),
                per_replica,
                accumulation,
            ),
            Text(f"strategy {self.strategy}, {self.steps_per_epoch:,} steps/epoch over {self.n_samples:,} samples"),
        ]
        if self.distribution is not None:
            split = self.distribution
            header.append(
                Text(
                    f"{split.strategy}: {split.num_replicas_in_sync} replica(s) on {split.num_workers} worker(s), "
                    f"global batch {split.global_batch_size:,}",
                    style="cyan",
                )
            )
        header += [budget_line(use) for use in self.budgets]
        header.append(Text.assemble(("limited by ", "bold"), self.limited_by))
        note = (
            f"confirmed by a real training trial on the worst-case batch of {self.confirmed_batch_size:,}: "
            f"measured step peak plus data and queue = {format_bytes(self.measured_peak_bytes)}"
            if self.confirmed
            else "not confirmed by a trial at this size"
        )
        return plan_view(header, peak_table(self.budgets), self.explanation, note)

    def __str__(self) -> str:
        return as_text(self)


def _split_target(target: int, fits: int) -> tuple[int, int]:
    """(steps, batch) with batch <= fits and steps × batch == target where a divisor allows."""
    least = math.ceil(target / fits)
    for steps in range(least, 2 * least + 1):
        if target % steps == 0:
            return steps, target // steps
    return least, math.ceil(target / least)



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
    margin = Margin.of(safety)
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

    Lines = list[tuple[Budget, list[Piece]]]

    def lines_for(strategy: Strategy, accumulators: bool) -> Lines:
        lines = []
        for budget in budgets:
            if budget.kind == "host":
                a, s, parts = host_terms(
                    result, strategy, queue_batches, read_ahead_shards, process_rss_bytes, export_bytes
                )
                pieces = host_pieces(a, s, parts, result.host_curve)
            else:
                fit = result.gpu_fit
                if fit is None:
                    continue
                # The line's intercept is the model, optimizer and runtime on the device, measured by every trial.
                parts = [(DEVICE_PART, fit.intercept_bytes, 0.0), ("train step", 0.0, fit.slope_bytes)]
                pieces = [Piece(0, fit.intercept_bytes, fit.slope_bytes, parts)]
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
            most = pieces_allowed(budget.limit_bytes, pieces, margin)
            if most is not None:
                caps.append((most, f"{budget.kind} memory"))
        batch, limited_by = min(caps, key=lambda c: c[0])
        if multiple_of is not None and batch >= multiple_of:
            batch -= batch % multiple_of
        return batch, limited_by

    def uses_at(lines: Lines, batch: int) -> list[BudgetUse]:
        uses = []
        for budget, pieces in lines:
            piece = piece_at(pieces, batch)
            use = budget_use(budget, piece.a, piece.s, piece.parts, margin, batch)
            uses.append(dataclasses.replace(use, max_batch_size=pieces_allowed(budget.limit_bytes, pieces, margin)))
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
        between = next(piece_at(p, batch).between for b, p in lines if b is binding.budget)
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

