"""What the size-aware probe measured: its grid of trials, the memory model fitted to them, the length distribution.

:class:`SizeAwareProbe` is frozen and round-trips through JSON, as :class:`~autobatch.probe.ProbeResult`
does; :func:`fit_length_model` is the fit the planner's bucket sizes rest on, and refits when a
confirming trial joins the grid.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from autobatch._result import ProbeResult
from autobatch._render import as_text
from autobatch._units import format_bytes


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


def lstsq_nonneg(features: np.ndarray, target: np.ndarray) -> np.ndarray:
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
    linear = lstsq_nonneg(np.column_stack([np.ones_like(b), tokens]), peak)
    linear[1] = max(linear[1], floor_per_token)
    residual_linear = peak - (linear[0] + linear[1] * tokens)
    spread = max(float(peak.max() - peak.min()), 1.0)
    kind: Literal["linear", "quadratic"] = "linear"
    coef = (linear[0], linear[1], 0.0)
    if len(set(n.tolist())) >= 3 and len(points) >= 4:
        quad = lstsq_nonneg(np.column_stack([np.ones_like(b), tokens, tokens_len]), peak)
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
        return as_text(self, width=110)
