"""Probe for size-aware batching: training-step memory as a function of batch size *and* padded length.

A single batch size must fit the batch that holds the longest sequences. Size-aware
batching gives every length bucket its own batch size instead, which needs memory
as a function of both: the probe runs a small grid of real training trials in the
child process (by default 3 padded lengths × 2 batch sizes, plus one held-out
trial) and fits::

    peak(batch, length) = a + b·batch·length            (linear in the padded tokens)
    peak(batch, length) = a + b·batch·length + c·batch·length²   (when attention-like growth shows)

shifted up so no measured point lies above it. The held-out trial, at a batch and
length mix none of the fitted trials has, is predicted before it is measured and
the error is reported.

Lengths are along the padded axis: the longest of a sample's sequence columns
(see :mod:`autobatch._lengths`). The trial batches are real rows of that length
or shorter, run through ``preprocess`` and brought to the trial's length as the
size-aware feed pads them (to the bucket boundary).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from autobatch._data import InMemoryData, _concat
from autobatch._lengths import LengthFn, accepts_maxlen, fit_length, sample_lengths, shard_lengths
from autobatch._trial import pack_batch
from autobatch._units import format_bytes
from autobatch.errors import ConfigError, ProbeError
from autobatch.probe import Prober, ProbeResult, run_preprocess

logger = logging.getLogger(__name__)

DEFAULT_GRID_BATCH_SIZES = (16, 64)
ROUND_LENGTHS_TO = 8


@dataclasses.dataclass(frozen=True)
class GridTrial:
    """One real training trial at a batch size and a padded length."""

    batch_size: int
    length: int
    """The padded length every sequence input of the batch had."""
    peak_rss_bytes: int | None
    gpu_peak_bytes: int | None = None
    seconds_per_step: float | None = None
    fits: bool = True
    held_out: bool = False
    """Left out of the fit, to measure the model's error on a point it did not see."""
    batch_bytes: int = 0
    """Bytes of the preprocessed batch."""
    preprocess_peak_bytes: int = 0
    """Transient peak of ``preprocess`` on it (tracemalloc)."""
    note: str = ""

    @property
    def tokens(self) -> int:
        return self.batch_size * self.length


@dataclasses.dataclass(frozen=True)
class LengthMemoryModel:
    """``peak(batch, length) = intercept + per_token·batch·length + per_token_length·batch·length²``.

    Fitted by least squares and shifted up until no fitted trial lies above it.
    """

    intercept_bytes: float
    per_token_bytes: float
    per_token_length_bytes: float = 0.0
    """The ``c`` of ``c·batch·length²`` (attention-like growth); 0 for the linear model."""
    kind: Literal["linear", "quadratic"] = "linear"

    def __call__(self, batch_size: float, length: float) -> float:
        return (
            self.intercept_bytes
            + self.per_token_bytes * batch_size * length
            + self.per_token_length_bytes * batch_size * length * length
        )

    def per_sample_bytes(self, length: float) -> float:
        """Bytes one more sample of ``length`` adds to the peak."""
        return self.per_token_bytes * length + self.per_token_length_bytes * length * length

    def describe(self) -> str:
        text = f"{format_bytes(self.intercept_bytes)} + {self.per_token_bytes:,.0f} B·batch·len"
        if self.kind == "quadratic":
            text += f" + {self.per_token_length_bytes:,.2f} B·batch·len²"
        return text


def _lstsq_nonneg(features: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Least squares with the slope coefficients (all but the intercept) kept >= 0, by dropping negative ones."""
    active = list(range(features.shape[1]))
    while True:
        coef = np.zeros(features.shape[1])
        solved, *_ = np.linalg.lstsq(features[:, active], target, rcond=None)
        coef[active] = solved
        negative = [i for i in active[1:] if coef[i] < 0]
        if not negative:
            return coef
        active.remove(min(negative, key=lambda i: coef[i]))


def fit_length_model(
    trials: Sequence[GridTrial], attr: str = "peak_rss_bytes", *, floor_per_token: float = 0.0
) -> LengthMemoryModel | None:
    """Fit the memory model to the fitting (not held-out) trials that completed.

    The quadratic term is kept only when it explains the data clearly better: the
    linear fit's residuals exceed 5% of the measured range and the quadratic
    fit halves them (attention-like growth in the length).

    Args:
        trials: the grid trials.
        attr: ``"peak_rss_bytes"`` (host) or ``"gpu_peak_bytes"``.
        floor_per_token: the per-token slope is never below this (a batch is resident during its step).

    Returns:
        The model, or ``None`` with fewer than two distinct token counts measured.
    """
    trials = _unshadowed(trials) if attr == "peak_rss_bytes" else list(trials)
    points = [
        (t.batch_size, t.length, getattr(t, attr)) for t in trials if not t.held_out and t.fits and getattr(t, attr)
    ]
    # A trial stopped at the limit measured only a lower bound of its peak: the line must pass above it, not fit it.
    bounds = [(t.batch_size, t.length, getattr(t, attr)) for t in trials if not t.fits and getattr(t, attr)]
    if len({b * n for b, n, _ in points}) < 2:
        return None
    b = np.array([p[0] for p in points], dtype=float)
    n = np.array([p[1] for p in points], dtype=float)
    peak = np.array([p[2] for p in points], dtype=float)
    tokens, tokens_len = b * n, b * n * n
    linear = _lstsq_nonneg(np.column_stack([np.ones_like(b), tokens]), peak)
    linear[1] = max(linear[1], floor_per_token)
    residual_linear = peak - (linear[0] + linear[1] * tokens)
    spread = max(float(peak.max() - peak.min()), 1.0)
    kind: Literal["linear", "quadratic"] = "linear"
    coef = (linear[0], linear[1], 0.0)
    if len(set(n.tolist())) >= 3 and len(points) >= 4:
        quad = _lstsq_nonneg(np.column_stack([np.ones_like(b), tokens, tokens_len]), peak)
        residual_quad = peak - (quad[0] + quad[1] * tokens + quad[2] * tokens_len)
        rms_linear = float(np.sqrt(np.mean(residual_linear**2)))
        rms_quad = float(np.sqrt(np.mean(residual_quad**2)))
        if quad[2] > 0 and rms_linear > 0.05 * spread and rms_quad < 0.5 * rms_linear:
            kind = "quadratic"
            coef = (quad[0], max(quad[1], floor_per_token if quad[1] > 0 else 0.0), quad[2])
    above = [(float(p), float(bb) * n_, float(bb) * n_ * n_) for bb, n_, p in [*points, *bounds]]
    # One byte above the highest point: evaluating the model rounds differently, and must never land below a point.
    intercept = max(p - coef[1] * t - coef[2] * tl for p, t, tl in above) + 1.0
    return LengthMemoryModel(intercept, float(coef[1]), float(coef[2]), kind)


def _unshadowed(trials: Sequence[GridTrial]) -> list[GridTrial]:
    """The trials (in the order they ran) whose host peak is their own.

    TensorFlow's pool allocators keep what a trial used, so the child's RSS never
    drops back: a trial run after one with more tokens (in the same child) only
    measures what that one left, e.g. a bucket's confirmation at 40 × 2,046 read
    the 882 MiB of the grid's 64 × 2,046 and shifted the fit up by 85 MiB. A child
    stopped at the limit is replaced, so a stopped trial shadows nothing; it stays
    a lower bound the fit passes above.
    """
    kept, most = [], 0
    for trial in trials:
        if trial.tokens >= most or not trial.fits:  # a lower bound stays one, only more conservative
            kept.append(trial)
        if trial.fits and trial.peak_rss_bytes:
            most = max(most, trial.tokens)
    return kept


@dataclasses.dataclass(frozen=True)
class SizeAwareProbe:
    """What size-aware planning needs: the length distribution and memory as a function of batch and length."""

    probe: ProbeResult
    """The ordinary probe (bytes per sample, signature, the child's baseline)."""
    sequence_columns: tuple[str, ...]
    """The columns whose longest sequence is a sample's length (empty with ``length_fn``)."""
    variable_leaves: tuple[str, ...]
    """The preprocessed arrays whose axis 1 is the padded length (``x/in1``, ...)."""
    length_values: tuple[int, ...]
    """Distinct sample lengths, ascending."""
    length_counts: tuple[int, ...]
    """How many samples have each length."""
    grid: tuple[GridTrial, ...]
    host_model: LengthMemoryModel | None
    gpu_model: LengthMemoryModel | None = None
    bytes_per_token: float = 0.0
    """Preprocessed bytes per sample per unit of padded length (from the longest trial)."""
    bytes_per_sample: float = 0.0
    """Preprocessed bytes per sample that do not grow with the length (targets, scalar inputs)."""
    preprocess_peak_per_token: float = 0.0
    """Transient peak of ``preprocess`` per sample per unit of padded length."""
    step_seconds: tuple[float, float] | None = None
    """``(t0, per_token)``: seconds per training step ≈ t0 + per_token·batch·length, from the trials."""
    wall_seconds: float = 0.0

    @property
    def n_samples(self) -> int:
        return int(sum(self.length_counts))

    @property
    def max_length(self) -> int:
        return int(self.length_values[-1])

    def lengths(self) -> np.ndarray:
        """Every sample's length (sorted), expanded from the distinct values and their counts."""
        return np.repeat(np.asarray(self.length_values, dtype=np.int64), np.asarray(self.length_counts, dtype=np.int64))

    @property
    def held_out(self) -> GridTrial | None:
        return next((t for t in self.grid if t.held_out and t.fits and t.peak_rss_bytes), None)

    @property
    def held_out_error(self) -> float | None:
        """(predicted − measured) ÷ measured peak on the held-out trial; positive: the model over-predicts (safe)."""
        trial, model = self.held_out, self.host_model
        if trial is None or model is None:
            return None
        return (model(trial.batch_size, trial.length) - trial.peak_rss_bytes) / trial.peak_rss_bytes

    @property
    def held_out_error_above_baseline(self) -> float | None:
        """The same error relative to what the held-out step added above the runtime + model (a stricter view)."""
        trial, model, base = self.held_out, self.host_model, self.probe.baseline_rss_bytes
        if trial is None or model is None or base is None or trial.peak_rss_bytes <= base:
            return None
        return (model(trial.batch_size, trial.length) - trial.peak_rss_bytes) / (trial.peak_rss_bytes - base)

    def with_trial(self, trial: GridTrial) -> SizeAwareProbe:
        """A copy with one more fitting trial (a confirmation), and the models refitted."""
        grid = (*self.grid, trial)
        floor = self.bytes_per_token
        return dataclasses.replace(
            self,
            grid=grid,
            host_model=fit_length_model(grid, floor_per_token=floor) or self.host_model,
            gpu_model=fit_length_model(grid, "gpu_peak_bytes", floor_per_token=floor) or self.gpu_model,
        )

    def failed_batch_size(self, length: int) -> int | None:
        """The smallest batch that ran out of memory at a padded length ≤ ``length`` (so it fails at ``length``)."""
        failed = [t.batch_size for t in self.grid if not t.fits and t.length <= length]
        return min(failed) if failed else None

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["probe"] = self.probe.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SizeAwareProbe:
        fields = dict(data)
        fields["probe"] = ProbeResult.from_dict(fields["probe"])
        fields["grid"] = tuple(GridTrial(**t) for t in fields["grid"])
        for key in ("host_model", "gpu_model"):
            if fields.get(key) is not None:
                fields[key] = LengthMemoryModel(**fields[key])
        for key in ("sequence_columns", "variable_leaves", "length_values", "length_counts"):
            fields[key] = tuple(fields[key])
        if fields.get("step_seconds") is not None:
            fields["step_seconds"] = tuple(fields["step_seconds"])
        return cls(**fields)

    def __rich__(self) -> Any:
        from rich.table import Table

        table = Table(title="autobatch size-aware probe", header_style="bold")
        table.add_column("batch", justify="right")
        table.add_column("length", justify="right")
        table.add_column("measured peak", justify="right")
        table.add_column("model", justify="right")
        table.add_column("error", justify="right")
        table.add_column("", style="dim")
        for trial in sorted(self.grid, key=lambda t: (t.tokens, t.batch_size)):
            measured = format_bytes(trial.peak_rss_bytes) if trial.fits and trial.peak_rss_bytes else "does not fit"
            predicted = error = ""
            if self.host_model is not None:
                value = self.host_model(trial.batch_size, trial.length)
                predicted = format_bytes(value)
                if trial.fits and trial.peak_rss_bytes:
                    error = f"{(value - trial.peak_rss_bytes) / trial.peak_rss_bytes:+.1%}"
            how = "held out" if trial.held_out else "fitted"
            if trial.seconds_per_step:
                how += f", {trial.seconds_per_step * 1000:.0f} ms/step"
            table.add_row(f"{trial.batch_size:,}", f"{trial.length:,}", measured, predicted, error, how + trial.note)
        lengths = self.lengths()
        quantiles = np.percentile(lengths, [50, 90, 99]).round().astype(int)
        caption = [
            f"{self.n_samples:,} samples, length median {quantiles[0]}, p90 {quantiles[1]}, p99 {quantiles[2]}, "
            f"max {self.max_length}"
            + (f" (columns {', '.join(self.sequence_columns)})" if self.sequence_columns else " (length_fn)"),
        ]
        if self.host_model is not None:
            model = self.host_model
            caption.append(f"host model ({model.kind}): {model.describe()}, above every fitted trial")
        held = self.held_out_error
        if held is not None:
            above = self.held_out_error_above_baseline
            caption.append(
                f"held-out trial: predicted {held:+.1%} of its measured peak"
                + (f" ({above:+.1%} of what it added above the runtime)" if above is not None else "")
            )
        table.caption = "\n".join(caption)
        return table

    def __str__(self) -> str:
        from rich.console import Console

        console = Console(width=110, record=True, file=io.StringIO())
        console.print(self)
        return console.export_text()


# --------------------------------------------------------------------------- measuring


def _round_up(value: float, multiple: int = ROUND_LENGTHS_TO) -> int:
    return max(int(-(-int(np.ceil(value)) // multiple) * multiple), 1)


def default_grid(max_length: int, batch_sizes: Sequence[int]) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """The fitted ``(batch, length)`` points (3 lengths × the batch sizes) and the held-out point.

    Lengths are a quarter, a half and all of the longest sample (rounded up to a
    multiple of 8, never past the longest). The held-out point pairs twice the
    largest batch with half the shortest length: as many tokens as a fitted point,
    in a mix no fitted point has (what a short bucket's large batch looks like).
    """
    lengths = sorted({min(_round_up(max_length * f), max_length) for f in (0.25, 0.5, 1.0)})
    sizes = sorted(set(int(b) for b in batch_sizes))
    fitted = [(b, n) for n in lengths for b in sizes]
    held = (2 * sizes[-1], max(lengths[0] // 2, 1))
    return fitted, held


def _variable_leaves(result: ProbeResult) -> tuple[str, ...]:
    return tuple(s.name for s in result.output_signature if len(s.shape) >= 2 and s.shape[1] is None)


class _Pool:
    """Rows to build trial batches from, with their lengths."""

    def __init__(self, data: InMemoryData, lengths: np.ndarray) -> None:
        self.data = data
        self.lengths = lengths
        self.order = np.argsort(-lengths, kind="stable")

    def rows_for(self, batch_size: int, length: int) -> np.ndarray:
        """The ``batch_size`` longest rows no longer than ``length`` (cycled), or the shortest rows if none is."""
        fitting = self.order[self.lengths[self.order] <= length]
        if not len(fitting):
            fitting = self.order[::-1][:1]
        fitting = fitting[: max(batch_size, 1)]
        return fitting[np.arange(batch_size) % len(fitting)]


def _trial(
    prober: Prober,
    pool: _Pool,
    batch_size: int,
    length: int,
    variable: frozenset[str],
    *,
    held_out: bool = False,
    rss_limit_bytes: int | None = None,
) -> GridTrial:
    rows = pool.rows_for(batch_size, length)
    preprocess = prober._preprocess
    call = (lambda bx, by: preprocess(bx, by, maxlen=length)) if accepts_maxlen(preprocess) else preprocess
    where = f"a trial batch of {batch_size} × {length}"
    batch = run_preprocess(call, InMemoryData(*pool.data.take(rows)), where=where)
    inputs = fit_length(batch.inputs, length, variable, "x")
    targets = fit_length(batch.targets, length, variable, "y")
    nbytes = sum(int(np.asarray(a).nbytes) for a in pack_batch(inputs, targets)[0].values())
    outcome = prober.send_trial(
        inputs, targets, batch_size, what=f"batch {batch_size}, length {length}", shrink="grid_batch_sizes",
        rss_limit_bytes=rss_limit_bytes,
    )
    if "note" in outcome:
        outcome["note"] = "; " + outcome["note"]
    return GridTrial(
        batch_size, length, held_out=held_out, batch_bytes=nbytes, preprocess_peak_bytes=batch.peak_bytes, **outcome
    )


def _data_lengths(
    prober: Prober, sequence_columns: Sequence[str] | None, length_fn: LengthFn | None
) -> tuple[tuple[str, ...], np.ndarray, _Pool]:
    """Every sample's length, the columns used, and a pool of rows to build trial batches from."""
    from autobatch._data import ShardSource, _detached

    data = prober._data
    if isinstance(data, ShardSource):
        columns, per_shard = shard_lengths(
            data.files, target=data.target, sequence_columns=sequence_columns, length_fn=length_fn
        )
        lengths = np.concatenate(per_shard)
        sample = prober.sample()
        pool_data = _concat([sample.random, sample.worst, sample.smallest])
        pool_lengths = sample_lengths(pool_data.x, sequence_columns=columns or None, length_fn=length_fn)
        return columns, lengths, _Pool(_detached(pool_data), pool_lengths)
    from autobatch._lengths import resolve_sequence_columns

    columns = () if length_fn is not None else resolve_sequence_columns(data.x, sequence_columns)
    lengths = sample_lengths(data.x, sequence_columns=columns or None, length_fn=length_fn)
    return columns, lengths, _Pool(data, lengths)


def _time_model(trials: Sequence[GridTrial]) -> tuple[float, float] | None:
    points = [(t.tokens, t.seconds_per_step) for t in trials if t.fits and t.seconds_per_step]
    if len({p[0] for p in points}) < 2:
        return None
    tokens = np.array([p[0] for p in points], dtype=float)
    seconds = np.array([p[1] for p in points], dtype=float)
    coef = _lstsq_nonneg(np.column_stack([np.ones_like(tokens), tokens]), seconds)
    return max(float(coef[0]), 0.0), float(coef[1])


class SizeAwareProber:
    """The grid of real trials for size-aware planning, on an open :class:`~autobatch.probe.Prober`'s child.

    Args:
        prober: the open prober (its child process, data and ``preprocess`` are reused).
        sequence_columns: the columns whose longest sequence is a sample's length; default: detected.
        length_fn: ``length_fn(batch_x) -> lengths`` instead.
        grid_batch_sizes: the trials' batch sizes (default 16 and 64).
        grid_lengths: the trials' padded lengths (default a quarter, a half and all of the longest sample).

    Example:
        >>> with Prober(df, "label", preprocess=pad, model=model) as prober:
        ...     sized = SizeAwareProber(prober).measure(prober.measure())
    """

    def __init__(
        self,
        prober: Prober,
        *,
        sequence_columns: Sequence[str] | None = None,
        length_fn: LengthFn | None = None,
        grid_batch_sizes: Sequence[int] | None = None,
        grid_lengths: Sequence[int] | None = None,
    ) -> None:
        sizes = tuple(grid_batch_sizes or DEFAULT_GRID_BATCH_SIZES)
        if not sizes or min(sizes) < 1:
            raise ConfigError(f"`grid_batch_sizes` must be positive integers. Received: {grid_batch_sizes}")
        if grid_lengths is not None and (not grid_lengths or min(grid_lengths) < 1):
            raise ConfigError(f"`grid_lengths` must be positive integers. Received: {grid_lengths}")
        self.prober = prober
        self.sequence_columns = sequence_columns
        self.length_fn = length_fn
        self.grid_batch_sizes = sizes
        self.grid_lengths = grid_lengths
        self._pool: _Pool | None = None

    def measure(self, result: ProbeResult, *, rss_limit_bytes: int | None = None) -> SizeAwareProbe:
        """Measure memory over the grid of batch sizes × padded lengths, and the data's length distribution.

        Args:
            result: the prober's :meth:`~autobatch.probe.Prober.measure` result.
            rss_limit_bytes: stop a trial whose child passes this RSS (it counts as "does not fit").

        Returns:
            The :class:`SizeAwareProbe`.

        Raises:
            ConfigError: no model was given, or the preprocessed batches have no padded axis.
            DataError: no sample length can be found.
            ProbeError, ModelError: a trial failed for a reason other than memory.
        """
        start = time.perf_counter()
        prober = self.prober
        if prober._model is None:
            raise ConfigError("size-aware batching fits memory against real training steps: pass `model=`.")
        variable = _variable_leaves(result)
        if not variable:
            raise ConfigError(
                "size-aware batching needs a padded axis, but every array preprocess returns has the same shape on "
                "every batch (the probe found no axis 1 that varies). Pad to the batch's longest sequence in "
                "preprocess, or use batching='fixed'."
            )
        columns, lengths, self._pool = _data_lengths(prober, self.sequence_columns, self.length_fn)
        if not len(lengths) or int(lengths.max()) < 1:
            raise ConfigError("every sample has length 0: there is nothing to bucket. Use batching='fixed'.")
        sizes = self.grid_batch_sizes
        fitted, held = default_grid(int(lengths.max()), sizes)
        if self.grid_lengths is not None:
            chosen = sorted({int(n) for n in self.grid_lengths})
            fitted = [(b, n) for n in chosen for b in sorted(set(sizes))]
            held = (2 * max(sizes), max(chosen[0] // 2, 1))
        points = [(b, n, False) for b, n in fitted] + [(held[0], held[1], True)]
        # Ascending tokens: an allocator keeps what a larger trial took, which would inflate a smaller one after it.
        points.sort(key=lambda p: (p[0] * p[1], p[0]))
        trials: list[GridTrial] = []
        frozen = frozenset(variable)
        for b, n, is_held in points:
            if trials and not trials[-1].fits:
                break  # larger ones would not fit either
            trial = _trial(prober, self._pool, b, n, frozen, held_out=is_held, rss_limit_bytes=rss_limit_bytes)
            logger.info("size-aware trial batch %d × length %d: %s", b, n, trial.peak_rss_bytes)
            trials.append(trial)
        per_sample, per_token, peak_per_token = _batch_bytes_model(trials)
        host = fit_length_model(trials, floor_per_token=per_token)
        if host is None:
            raise ProbeError(
                "the size-aware grid did not give two measured trials to fit (the trials ran out of memory). "
                "Probe with smaller `grid_batch_sizes` or a larger budget."
            )
        values, counts = np.unique(lengths, return_counts=True)
        return SizeAwareProbe(
            probe=result,
            sequence_columns=tuple(columns),
            variable_leaves=variable,
            length_values=tuple(int(v) for v in values),
            length_counts=tuple(int(c) for c in counts),
            grid=tuple(trials),
            host_model=host,
            gpu_model=fit_length_model(trials, "gpu_peak_bytes", floor_per_token=per_token),
            bytes_per_token=float(per_token),
            bytes_per_sample=float(per_sample),
            preprocess_peak_per_token=float(peak_per_token),
            step_seconds=_time_model(trials),
            wall_seconds=time.perf_counter() - start,
        )

    def confirm(
        self, probe: SizeAwareProbe, batch_size: int, length: int, *, rss_limit_bytes: int | None
    ) -> SizeAwareProbe:
        """Run one more real trial at a planned bucket's batch and length; it joins the fit."""
        start = time.perf_counter()
        if self._pool is None:
            columns = probe.sequence_columns or self.sequence_columns
            _, _, self._pool = _data_lengths(self.prober, columns, self.length_fn)
        trial = _trial(
            self.prober,
            self._pool,
            batch_size,
            length,
            frozenset(probe.variable_leaves),
            rss_limit_bytes=rss_limit_bytes,
        )
        updated = probe.with_trial(trial)
        return dataclasses.replace(updated, wall_seconds=probe.wall_seconds + time.perf_counter() - start)


def _batch_bytes_model(trials: Sequence[GridTrial]) -> tuple[float, float, float]:
    """(bytes per sample, bytes per token) of preprocessed batches, and preprocess's transient peak per token."""
    measured = [t for t in trials if t.batch_bytes]
    if not measured:
        return 0.0, 0.0, 0.0
    longest = max(measured, key=lambda t: (t.length, t.batch_size))
    peak_per_token = longest.preprocess_peak_bytes / longest.tokens
    if len({t.length for t in measured}) < 2:
        return 0.0, longest.batch_bytes / longest.tokens, peak_per_token
    features = np.column_stack([[t.batch_size for t in measured], [t.tokens for t in measured]]).astype(float)
    per_sample, per_token = np.linalg.lstsq(features, np.array([t.batch_bytes for t in measured], float), rcond=None)[0]
    return max(float(per_sample), 0.0), max(float(per_token), 0.0), peak_per_token
