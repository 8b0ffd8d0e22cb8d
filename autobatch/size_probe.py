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
import logging
import time
from collections.abc import Sequence

import numpy as np

from autobatch._data import InMemoryData, _concat
from autobatch._lengths import LengthFn, accepts_maxlen, fit_length, sample_lengths, shard_lengths
from autobatch._preprocess import run_preprocess
from autobatch._result import ProbeResult
from autobatch._size_result import GridTrial, LengthMemoryModel, SizeAwareProbe, fit_length_model, lstsq_nonneg
from autobatch._wire import pack_batch
from autobatch.errors import ConfigError, ProbeError
from autobatch.probe import Prober

__all__ = [
    "DEFAULT_GRID_BATCH_SIZES", "GridTrial", "LengthMemoryModel", "SizeAwareProbe", "SizeAwareProber", "default_grid",
    "fit_length_model",
]

logger = logging.getLogger(__name__)

DEFAULT_GRID_BATCH_SIZES = (16, 64)
ROUND_LENGTHS_TO = 8


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
    coef = lstsq_nonneg(np.column_stack([np.ones_like(tokens), tokens]), seconds)
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
