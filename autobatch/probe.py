"""Probe: measure what a batch really costs, after the user's preprocessing, on the worst case.

The probe measures, and never guesses from shapes:

1. raw bytes per sample as held in memory;
2. bytes per sample after ``preprocess``, on a random batch and on the worst-case
   batch (the largest rows, e.g. the longest sequences);
3. the transient peak of ``preprocess`` itself (``tracemalloc``);
4. with a model: the peak memory of real training steps (``model.fit`` over a
   prefetching ``tf.data`` pipeline, one shard held as streaming holds it) at a
   few batch sizes, in a child process (``autobatch._trial``) so an OOM cannot
   kill the caller, fitted as intercept + per-sample slope. Each trial first
   steps through the batch cut to a sweep of shorter padded lengths, as training
   meets them: TensorFlow's CPU and GPU pool allocators fragment with every new
   shape, and the worst-case batch arriving after that peaks higher than on a
   fresh process (BENCHMARKS.md, benchmark 4).

The ``Prober`` keeps that child alive so the planner can confirm its choice with
one more real trial at the chosen size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from autobatch import _cache
from autobatch._data import (
    DataSample,
    InMemoryData,
    ShardSource,
    as_in_memory,
    largest_file,
    sample_in_memory,
    sample_shards,
    shards_fingerprint,
)
from autobatch._loading import callable_fingerprint, is_callable_spec, resolve_callable, spec_fingerprint
from autobatch._memory import child_rss_limit_bytes, gpu_memory_totals, rss_bytes
from autobatch._shipping import caller_path, custom_objects, describe, dumps
from autobatch._trial import REPLY_PREFIX, pack_batch
from autobatch._units import format_bytes
from autobatch.errors import ConfigError, DataError, ModelError, PreprocessError, ProbeError

logger = logging.getLogger(__name__)

Preprocess = Callable[[Any, Any], tuple[Any, Any]]
DEFAULT_TRIAL_BATCH_SIZES = (8, 32, 128)
DEFAULT_SWEEP_STEPS = 48
"""Steps at shorter padded lengths before each trial's worst-case steps (see :func:`sweep_lengths`)."""
# Part of every cache key: bump it whenever what or how the probe measures changes.
MEASUREMENT_VERSION = 7


# --------------------------------------------------------------------------- results


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
        from rich.table import Table

        table = Table(title="autobatch probe", show_header=True, header_style="bold")
        table.add_column("measurement")
        table.add_column("value", justify="right")
        table.add_column("how", style="dim")
        table.add_row("samples", f"{self.n_samples:,}", self.source)
        table.add_row("raw bytes / sample", format_bytes(self.raw_bytes_per_sample), self.raw_scope)
        table.add_row("raw dataset", format_bytes(self.raw_bytes), "")
        table.add_row(
            "after preprocess / sample (random)",
            format_bytes(self.preprocessed_bytes_per_sample),
            f"batch of {self.sample_batch_size} random rows",
        )
        table.add_row(
            "after preprocess / sample (worst)",
            format_bytes(self.worst_preprocessed_bytes_per_sample),
            f"largest rows of {self.worst_scope}",
        )
        table.add_row(
            "preprocess transient peak / sample", format_bytes(self.preprocess_peak_bytes_per_sample), "tracemalloc"
        )
        base = self.baseline_rss_bytes or 0
        if self.baseline_rss_bytes is not None:
            table.add_row("runtime + model (child RSS)", format_bytes(self.baseline_rss_bytes), self.device)
        for trial in self.trials:
            grew = f"+{format_bytes(trial.peak_rss_bytes - base)}" if trial.peak_rss_bytes is not None else ""
            value = grew if trial.fits else "does not fit"
            how = f"VmHWM − baseline, {trial.seconds_per_step * 1000:.0f} ms/step" if trial.seconds_per_step else trial.note
            if trial.gpu_peak_bytes is not None:
                value += f" / GPU {format_bytes(trial.gpu_peak_bytes)}"
            table.add_row(f"train step, batch {trial.batch_size}", value, how)
        fit = self.host_fit
        if fit is not None:
            table.add_row(
                "fit: step growth",
                f"{format_bytes(fit.intercept_bytes)} + {format_bytes(fit.slope_bytes)}·batch",
                "least squares, shifted above all points",
            )
        cached = " (from cache)" if self.from_cache else ""
        table.caption = f"probe took {self.wall_seconds:.1f} s{cached}"
        return table

    def __str__(self) -> str:
        from rich.console import Console

        console = Console(width=110, record=True, file=io.StringIO())
        console.print(self)
        return console.export_text()


# --------------------------------------------------------------------------- preprocessing


def _leaves(value: Any, prefix: str, where: str) -> dict[str, np.ndarray]:
    if value is None:
        return {}
    if isinstance(value, Mapping):
        out: dict[str, np.ndarray] = {}
        for key, item in value.items():
            out.update(_leaves(item, f"{prefix}/{key}", where))
        return out
    if isinstance(value, (tuple, list)):
        out = {}
        for i, item in enumerate(value):
            out.update(_leaves(item, f"{prefix}/{i}", where))
        return out
    try:
        array = np.asarray(value)
    except Exception as exc:
        raise PreprocessError(f"preprocess returned {prefix} that is not an array ({type(value)}) on {where}") from exc
    if array.dtype == object:
        raise PreprocessError(
            f"preprocess returned {prefix} with dtype object on {where}: variable-length rows must be padded "
            "to a rectangular array (e.g. with autobatch's padding helpers or keras.utils.pad_sequences)."
        )
    return {prefix: array}


def _check_text_column(column: pd.Series, what: str) -> None:
    """Name the first cell of a column of scalars that is not a number (e.g. "abc" in a CSV column of numbers).

    Raises:
        DataError: such a cell exists; ``error.row`` is its position in the batch.
    """
    values = column.to_numpy()
    if any(isinstance(v, (list, tuple, np.ndarray, Mapping)) for v in values):
        return  # sequences: the caller asks for a preprocess that pads them
    parsed = pd.to_numeric(column, errors="coerce").to_numpy()
    bad = np.flatnonzero(pd.isna(parsed) & ~pd.isna(column).to_numpy())
    if len(bad):
        i = int(bad[0])
        label = column.index[i]
        label = label.item() if isinstance(label, np.generic) else label
        shown = repr(values[i]) if len(repr(values[i])) <= 40 else repr(values[i])[:37] + "..."
        raise DataError(
            f"column {column.name!r} of {what} holds {shown} at row {i} of the batch (index label {label!r}), which is "
            f"not a number ({len(bad)} such cell(s) in this batch). Fix the data, or pass a `preprocess` that encodes it.",
            row=i,
        )


def default_preprocess(batch_x: Any, batch_y: Any) -> tuple[Any, Any]:
    """Turn a DataFrame batch into a dict of column arrays; pass arrays through unchanged.

    Raises:
        DataError: a column holds text that is not a number (the message names the column and row).
        PreprocessError: a column holds sequences or other objects, which need a ``preprocess``.
    """

    def convert(value: Any, what: str) -> Any:
        if isinstance(value, pd.DataFrame):
            out = {}
            for name in value.columns:
                column = value[name]
                if column.dtype == object or isinstance(column.dtype, pd.StringDtype):
                    _check_text_column(column, what)
                    raise PreprocessError(
                        f"column {name!r} of {what} holds {column.dtype} values (e.g. variable-length sequences "
                        "or strings); pass a `preprocess` function that turns them into padded numeric arrays."
                    )
                out[str(name)] = column.to_numpy()
            return out
        if isinstance(value, pd.Series):
            if value.dtype == object or isinstance(value.dtype, pd.StringDtype):
                _check_text_column(value, what)
            return value.to_numpy()
        return value

    return convert(batch_x, "x"), convert(batch_y, "y")


@dataclasses.dataclass(frozen=True)
class _Preprocessed:
    inputs: Any
    targets: Any
    leaves: dict[str, np.ndarray]
    nbytes: int
    peak_bytes: int
    batch_size: int


def run_preprocess(preprocess: Preprocess, data: InMemoryData, *, where: str) -> _Preprocessed:
    """Call ``preprocess`` on one batch, measuring its output size and transient peak.

    Raises:
        DataError: autobatch's helpers inside ``preprocess`` found bad data (e.g. a value that is not a number).
        PreprocessError: ``preprocess`` raised, returned something other than
            ``(inputs, targets)``, or changed the number of rows.
    """
    batch_x, batch_y = data.take(np.arange(data.n_samples))
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    before, _ = tracemalloc.get_traced_memory()
    try:
        result = preprocess(batch_x, batch_y)
    except DataError as exc:  # bad data found by autobatch's helpers: keep the type, add where
        raise DataError(f"{exc} (on {where})") from exc
    except Exception as exc:
        raise PreprocessError(
            f"preprocess raised {type(exc).__name__}: {exc} on {where}. Fix the function or the data it chokes on."
        ) from exc
    finally:
        _, peak = tracemalloc.get_traced_memory()
        if not tracing:
            tracemalloc.stop()
    if not isinstance(result, tuple) or len(result) != 2:
        raise PreprocessError(
            f"preprocess must return a pair (inputs, targets); on {where} it returned {type(result).__name__}"
            + (f" of length {len(result)}" if isinstance(result, tuple) else "")
            + "."
        )
    inputs, targets = result
    leaves = {**_leaves(inputs, "x", where), **_leaves(targets, "y", where)}
    if not leaves:
        raise PreprocessError(f"preprocess returned no arrays on {where}.")
    for name, array in leaves.items():
        if array.ndim == 0 or array.shape[0] != data.n_samples:
            rows = "a scalar" if array.ndim == 0 else f"{array.shape[0]} rows"
            raise PreprocessError(
                f"preprocess returned {rows} for {name} on {where} of {data.n_samples} samples; "
                "it must keep one row per sample (nothing dropped or added)."
            )
    nbytes = sum(int(a.nbytes) for a in leaves.values())
    return _Preprocessed(inputs, targets, leaves, nbytes, max(int(peak - before), nbytes), data.n_samples)


def _signature(first: _Preprocessed, second: _Preprocessed, where: tuple[str, str]) -> tuple[TensorSpec, ...]:
    """Compare two preprocessed batches; shapes may differ along padded axes, nothing else may."""
    if first.leaves.keys() != second.leaves.keys():
        raise PreprocessError(
            f"preprocess returned different arrays for different batches: {sorted(first.leaves)} on {where[0]} "
            f"but {sorted(second.leaves)} on {where[1]}. Return the same keys for every batch."
        )
    specs = []
    for name, a in first.leaves.items():
        b = second.leaves[name]
        if a.dtype != b.dtype or a.ndim != b.ndim:
            raise PreprocessError(
                f"preprocess returned {name} as {a.dtype}[{a.ndim}-D] on {where[0]} but {b.dtype}[{b.ndim}-D] "
                f"on {where[1]}. Every batch must have the same dtype and rank."
            )
        shape = (None,) + tuple(x if x == y else None for x, y in zip(a.shape[1:], b.shape[1:]))
        specs.append(TensorSpec(name, str(a.dtype), shape))
    return tuple(specs)


def _merge_signatures(a: tuple[TensorSpec, ...], b: tuple[TensorSpec, ...]) -> tuple[TensorSpec, ...]:
    return tuple(
        TensorSpec(x.name, x.dtype, tuple(p if p == q else None for p, q in zip(x.shape, y.shape))) for x, y in zip(a, b)
    )


# --------------------------------------------------------------------------- the child process


class _Child:
    """A running ``autobatch._trial`` process and the lines it answers with.

    It starts loading TensorFlow and the model at once; :attr:`info` waits for that, so the caller can sample
    and preprocess the data meanwhile.
    """

    def __init__(
        self, model_ref: dict[str, Any], *, timeout_s: float, workdir: Path, shard: Path | None = None
    ) -> None:
        self._timeout_s = timeout_s
        self._model_kind = model_ref["kind"]
        self._expected_params: int | None = model_ref.get("params")
        self._stderr_path = workdir / "child-stderr.log"
        self._stderr = open(self._stderr_path, "w+b")
        env = dict(os.environ)
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "autobatch._trial"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env=env,
            cwd=os.getcwd(),
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self._info: dict[str, Any] | None = None
        self._loading = self._send(
            {"cmd": "load", "model": model_ref, "shard": str(shard) if shard else None, "sys_path": caller_path()}
        )

    @property
    def info(self) -> dict[str, Any]:
        """The child's answer to loading the model (waits for it).

        Raises:
            ProbeError: the child exited or hung while loading.
            ModelError: the model could not be loaded there.
        """
        if self._info is not None:
            return self._info
        info = self._loading or self._wait(rss_limit_bytes=None)
        if info.get("timeout"):
            self.close()
            raise ProbeError(
                f"loading the model in the probe's child process took longer than {self._timeout_s:.0f} s and was "
                "killed. Check that the model function returns promptly, or raise `timeout_s`."
            )
        if info.get("died"):
            tail = self.stderr_tail()
            self.close()
            raise ProbeError(f"the probe's child process exited while loading the model. Its last output:\n{tail}")
        if not info.get("ok"):
            self.close()
            hint = f" {_WAYS_OUT}" if self._model_kind == "file" else ""
            raise ModelError(f"cannot load the model in the probe's child process: {info.get('error')}.{hint}")
        if self._expected_params is not None and info.get("param_count") != self._expected_params:
            self.close()
            raise ModelError(
                f"the model the probe's child loaded has {info.get('param_count'):,} parameters, the caller's "
                f"{self._expected_params:,}: it did not arrive intact. {_WAYS_OUT}"
            )
        self._info = info
        return info

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(REPLY_PREFIX):
                self._lines.put(line[len(REPLY_PREFIX) :])
        self._lines.put(None)

    def stderr_tail(self, chars: int = 1500) -> str:
        self._stderr.flush()
        text = self._stderr_path.read_bytes().decode(errors="replace")
        return text[-chars:].strip()

    def _send(self, message: dict[str, Any]) -> dict[str, Any] | None:
        """Write one command; the answer that stands for it when the child is gone, else ``None``."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(message) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return {"ok": False, "died": True, "error": "the child process is gone"}
        return None

    def request(self, message: dict[str, Any], *, rss_limit_bytes: int | None) -> dict[str, Any]:
        """Send one command and wait for its answer, killing the child past the RSS limit or timeout.

        Whatever ``rss_limit_bytes`` says, the child is also stopped before it and this process together would
        pass what the machine or the cgroup they share can give (:func:`autobatch._memory.child_rss_limit_bytes`).
        """
        self.info  # noqa: B018 (the model is loaded before any other command)
        return self._send(message) or self._wait(rss_limit_bytes=rss_limit_bytes, guard=True)

    def _wait(self, *, rss_limit_bytes: int | None, guard: bool = False) -> dict[str, Any]:
        deadline = time.monotonic() + self._timeout_s
        peak_seen = 0
        while True:
            try:
                line = self._lines.get(timeout=0.05)
            except queue.Empty:
                line = ""
            if line is None:
                code = self.proc.wait()
                return {"ok": False, "died": True, "returncode": code, "peak_seen": peak_seen}
            if line:
                return json.loads(line)
            if guard and self.proc.poll() is None:
                current = rss_bytes(self.proc.pid)
                peak_seen = max(peak_seen, current)
                ceiling = child_rss_limit_bytes(current)
                limit = ceiling if rss_limit_bytes is None else min(rss_limit_bytes, ceiling)
                if current > limit:
                    self.kill()
                    return {"ok": False, "over_limit": True, "peak_seen": peak_seen, "limit": limit,
                            "ceiling": limit == ceiling}
            if time.monotonic() > deadline:
                self.kill()
                return {"ok": False, "timeout": True}

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"cmd": "exit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.kill()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass
        self._stderr.close()


class _InProcess:
    """Trials on the caller's own model in the caller's process (``probe="in_process"``): no child, no guard.

    An out-of-memory trial here kills the caller; it is the explicit choice for a model that cannot travel
    to a child. The model's weights and optimizer state are put back after every trial, so probing does not
    train it.
    """

    def __init__(self, model: Any, *, shard: Path | None = None) -> None:
        import tensorflow as tf

        from autobatch._trial import session

        if not getattr(model, "compiled", False) or model.optimizer is None:
            raise ModelError(f"model {model.name!r} is not compiled: call model.compile(optimizer=..., loss=...).")
        gpu = bool(tf.config.list_physical_devices("GPU"))
        (self._model, self._held), self._info = session(model, str(shard) if shard else None, gpu=gpu)
        self._gpu, self._shard = gpu, str(shard) if shard else None
        self.alive = True

    @property
    def info(self) -> dict[str, Any]:
        return self._info

    def request(self, message: dict[str, Any], *, rss_limit_bytes: int | None) -> dict[str, Any]:
        from autobatch._trial import error_reply, trial

        model = self._model
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)  # so its state before the trial can be put back
        weights = [v.numpy() for v in model.variables]
        state = [v.numpy() for v in model.optimizer.variables]
        try:
            return trial(model, message, self._gpu, self._shard)
        except Exception as exc:  # noqa: BLE001 (answered as the child answers a failed command)
            return error_reply(exc)
        finally:
            for variable, value in zip(model.variables, weights):
                variable.assign(value)
            for variable, value in zip(model.optimizer.variables, state):
                variable.assign(value)

    def stderr_tail(self, chars: int = 1500) -> str:
        return ""

    def kill(self) -> None:
        self.close()

    def close(self) -> None:
        self._held, self.alive = None, False


# --------------------------------------------------------------------------- the prober


def _resolve_data(x: Any, y: Any) -> InMemoryData | ShardSource:
    if isinstance(x, (str, os.PathLike)):
        text = str(x)
        if is_callable_spec(text):
            loaded = resolve_callable(text, what="data")()
            if not isinstance(loaded, tuple) or len(loaded) != 2:
                raise DataError(f"data function {text!r} must return (x, y); it returned {type(loaded).__name__}.")
            return as_in_memory(*loaded)
        if y is not None and not isinstance(y, (str, list, tuple)):
            raise DataError("with shard files as `x`, `y` must be the target column name(s).")
        return ShardSource.from_spec(text, y if y is None or isinstance(y, str) else list(y))
    return as_in_memory(x, y)


def _resolve_preprocess(preprocess: Preprocess | str | None) -> Preprocess:
    if preprocess is None:
        return default_preprocess
    if isinstance(preprocess, str):
        return resolve_callable(preprocess, what="preprocess")
    if not callable(preprocess):
        raise ConfigError(f"`preprocess` must be a function (batch_x, batch_y) -> (inputs, targets). Received: {preprocess!r}")
    return preprocess


def _model_ref(model: Any, workdir: Path) -> tuple[dict[str, Any], str]:
    """How the child loads the model, and a fingerprint of its architecture."""
    if isinstance(model, (str, os.PathLike)):
        text = str(model)
        if is_callable_spec(text):
            return {"kind": "callable", "spec": text}, spec_fingerprint(text)
        path = Path(text)
        if not path.is_file():
            raise ModelError(f"model file {text!r} does not exist. Pass a .keras file, 'module:function' or a model.")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        return {"kind": "file", "path": str(path.resolve())}, digest
    import keras

    if callable(model) and not isinstance(model, keras.Model):
        return _builder_ref(model, workdir)
    if not isinstance(model, keras.Model):
        raise ModelError(
            "`model` must be a keras.Model, a .keras path, 'module:function' or a zero-argument function that "
            f"builds and compiles one. Received: {type(model)}"
        )
    if not getattr(model, "compiled", False) or model.optimizer is None:
        raise ModelError(
            f"model {model.name!r} is not compiled: call model.compile(optimizer=..., loss=...) before probing."
        )
    path = workdir / "model.keras"
    with _sending(f"model {model.name!r}", _WAYS_OUT):
        model.save(path)
        objects = custom_objects(model)
        (workdir / "custom_objects.pkl").write_bytes(dumps(objects))
    if not any(c.__name__ in ("Functional", "Sequential") for c in type(model).__mro__):
        # A subclassed model may have to be rebuilt by a call in the child, then given these weights.
        np.savez(workdir / "weights.npz", **{f"w{i}": w for i, w in enumerate(model.get_weights())})
    ref = {
        "kind": "file",
        "path": str(path),
        "custom_objects": str(workdir / "custom_objects.pkl"),
        "params": int(model.count_params()),
    }
    return ref, _model_fingerprint(model, objects)


def _model_fingerprint(model: Any, objects: Mapping[str, Any] | None = None) -> str:
    """The architecture, compile settings and custom code of a live model, for the cache key."""
    try:
        config = json.dumps([model.to_json(), model.get_compile_config()], sort_keys=True, default=str)
    except Exception:  # noqa: BLE001 (a config that cannot be made: the class and its size stand for it)
        config = f"{describe(type(model))}:{model.count_params()}"
    digest = hashlib.sha256(config.encode())
    for name, obj in sorted((objects if objects is not None else custom_objects(model)).items()):
        digest.update(f"{name}={callable_fingerprint(obj)}".encode())  # the custom code is part of the architecture
    return digest.hexdigest()[:16]


_WAYS_OUT = (
    "Two ways out: register each custom class or function with @keras.saving.register_keras_serializable() "
    "(and give classes whose __init__ takes more than plain values a get_config()), or pass a builder "
    "(model_builder='module:function' or a zero-argument function that builds and compiles the model). "
    "probe='in_process' measures in this process instead, where an out-of-memory trial kills it."
)


@contextlib.contextmanager
def _sending(what: str, ways_out: str) -> Iterator[None]:
    """Any failure inside, as a :class:`ModelError` saying ``what`` could not reach the child and the ways out."""
    try:
        yield
    except Exception as exc:
        raise ModelError(
            f"cannot send {what} to the probe's child process: {type(exc).__name__}: {exc}. {ways_out}"
        ) from exc


def _builder_ref(builder: Callable[[], Any], workdir: Path) -> tuple[dict[str, Any], str]:
    """A zero-argument function that builds and compiles the model, pickled for the child."""
    with _sending(f"the model builder {describe(builder)}", "Pass it as 'module:function' instead."):
        (workdir / "builder.pkl").write_bytes(dumps(builder))
    return {"kind": "builder", "path": str(workdir / "builder.pkl")}, callable_fingerprint(builder)


def _oom_summary(error: str) -> str:
    """The line of an out-of-memory error that says what failed (TensorFlow's carry a long graph traceback)."""
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    line = next((line for line in lines if line.startswith("OOM when allocating")), lines[0] if lines else error)
    return line if len(line) <= 200 else line[:197] + "..."


def _device_key() -> str:
    totals = gpu_memory_totals()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    return f"gpu{len(totals)}:{totals[0][0]}:{visible}" if totals else "cpu"


def sweep_lengths(
    observed: Mapping[str, Sequence[tuple[int, ...]]], steps: int, *, seed: int = 0
) -> list[dict[str, list[int | None]]]:
    """Padded lengths for a trial's sweep: up to ``steps`` entries of ``{array: [length or None per axis]}``.

    Args:
        observed: per packed array, the trial batch's shape first, then its shape on the
            row where the lengths a run at the trial's batch size meets begin (see
            ``Prober._typical_shapes``), then its shapes on other preprocessed batches (a
            random one, the smallest rows). An axis after the batch axis whose size differs
            between them is padded; the others are kept (``None``).
        steps: how many lengths at most.
        seed: fixes their order.

    Returns:
        One dict per sweep step. On every padded axis the lengths are spread evenly
        from the second shape's length up to, not including, the trial's own, in a
        shuffled order, and rounded down to a multiple of the lengths seen (so a
        ``preprocess`` that pads to buckets of 64 is swept over multiples of 64); each
        length once. The same fraction applies to every padded axis of a step, so arrays
        of equal lengths stay equal. No sweep where the second length is the trial's:
        batches of that size nearly all pad to the longest rows.
    """
    fractions = (np.random.default_rng([seed, 2]).permutation(steps) / max(steps, 1)).tolist()
    spans: dict[str, list[tuple[int, int, int] | None]] = {}
    for name, shapes in observed.items():
        trial = shapes[0]
        others = [shape for shape in shapes[1:] if len(shape) == len(trial)]
        axes = [_sweep_span([trial[k], *(shape[k] for shape in others)]) for k in range(1, len(trial))]
        if any(axes):
            spans[name] = axes

    def length(span: tuple[int, int, int] | None, fraction: float) -> int | None:
        if span is None:
            return None
        shortest, longest, multiple = span
        return max(multiple, int(shortest + (longest - shortest) * fraction) // multiple * multiple)

    steps_at: dict[str, Any] = {}
    for f in fractions:  # a length already swept adds nothing a run would not reuse: each once
        step = {name: [length(span, f) for span in axes] for name, axes in spans.items()}
        steps_at.setdefault(repr(step), step)
    return list(steps_at.values()) if spans else []


def _sweep_span(seen: Sequence[int]) -> tuple[int, int, int] | None:
    """``(shortest, longest, multiple)`` of one axis's sweep, from its lengths seen (the trial's first, then the
    typical row's, then the other batches'); ``None`` for an axis that never varies or has nothing to sweep."""
    if len(set(seen)) == 1 or seen[1] >= seen[0]:
        return None
    return seen[1], seen[0], math.gcd(*seen)


class Prober:
    """Measures a dataset, a preprocessing function and (optionally) a model's training step.

    Use as a context manager: the model's child process stays alive between
    :meth:`measure` and any :meth:`confirm` trials, so TensorFlow loads once.
    ``model_builder`` (a zero-argument function or ``"module:function"``) builds the
    child's copy of ``model`` instead of sending it; ``probe="in_process"`` runs the
    trials on ``model`` in this process, unguarded (see :func:`autobatch.fit`).

    Example:
        >>> with Prober(df, "label", preprocess=pad, model=model) as prober:
        ...     result = prober.measure()
        ...     result = prober.confirm(result, batch_size=512, rss_limit_bytes=6 * 2**30)
    """

    def __init__(
        self,
        x: Any,
        y: Any = None,
        *,
        preprocess: Preprocess | str | None = None,
        model: Any = None,
        sample_batch_size: int = 32,
        trial_batch_sizes: Sequence[int] | None = None,
        steps: int = 3,
        sweep_steps: int = DEFAULT_SWEEP_STEPS,
        seed: int = 0,
        timeout_s: float = 600.0,
        scan_bytes: int = 512 * 1024**2,
        prefetch_batches: int = 2,
        model_builder: Callable[[], Any] | str | None = None,
        probe: Literal["child", "in_process"] = "child",
    ) -> None:
        if probe not in ("child", "in_process"):
            raise ConfigError(f'`probe` must be "child" or "in_process". Received: probe={probe!r}')
        if probe == "in_process" and model is not None and not hasattr(model, "fit"):
            raise ConfigError("probe='in_process' measures the keras.Model itself: pass the compiled model.")
        if model_builder is not None and not (callable(model_builder) or is_callable_spec(model_builder)):
            raise ConfigError(
                "`model_builder` must be 'module:function' or a zero-argument function that builds and compiles the "
                f"model. Received: {model_builder!r}"
            )
        if sample_batch_size < 1:
            raise ConfigError(f"`sample_batch_size` must be >= 1. Received: {sample_batch_size}")
        if steps < 1:
            raise ConfigError(f"`steps` must be >= 1. Received: {steps}")
        if prefetch_batches < 1:
            raise ConfigError(f"`prefetch_batches` must be >= 1. Received: {prefetch_batches}")
        if isinstance(sweep_steps, bool) or not isinstance(sweep_steps, int) or sweep_steps < 0:
            raise ConfigError(f"`sweep_steps` must be an int >= 0. Received: sweep_steps={sweep_steps!r}")
        if trial_batch_sizes is not None and (not trial_batch_sizes or min(trial_batch_sizes) < 1):
            raise ConfigError(f"`trial_batch_sizes` must be positive integers. Received: {trial_batch_sizes}")
        self._data = _resolve_data(x, y)
        self._preprocess = _resolve_preprocess(preprocess)
        self._model = model
        self._probe = probe
        # What travels to the child: the builder when given (it must build the same model), else the model.
        self._shipped = model_builder if model_builder is not None and model is not None else model
        self._sample_batch_size = sample_batch_size
        self._trial_batch_sizes = tuple(trial_batch_sizes or DEFAULT_TRIAL_BATCH_SIZES)
        self._steps = steps
        self._sweep_steps = sweep_steps
        self._seed = seed
        self._timeout_s = timeout_s
        self._scan_bytes = scan_bytes
        self._prefetch_batches = prefetch_batches
        self._tmp = tempfile.TemporaryDirectory(prefix="autobatch-probe-")
        self._workdir = Path(self._tmp.name)
        self._child: _Child | _InProcess | None = None
        self._sample: DataSample | None = None
        self._model_ref: dict[str, Any] | None = None
        self._model_fp = "none"
        self._key: str | None = None
        self._shapes: dict[str, list[tuple[int, ...]]] | None = None

    def __enter__(self) -> Prober:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the child process and remove temporary files."""
        if self._child is not None:
            self._child.close()
            self._child = None
        self._tmp.cleanup()

    def sample(self) -> DataSample:
        """The random and worst-case rows (read once, then kept)."""
        if self._sample is None:
            k = self._sample_batch_size
            if isinstance(self._data, ShardSource):
                self._sample = sample_shards(self._data, k=k, seed=self._seed, scan_bytes=self._scan_bytes)
            else:
                self._sample = sample_in_memory(self._data, k=k, seed=self._seed)
        return self._sample

    @property
    def data(self) -> InMemoryData | ShardSource:
        """The data being probed, resolved (in-memory rows and targets, or the shard files)."""
        return self._data

    @property
    def preprocess(self) -> Preprocess:
        """The ``preprocess`` being probed, resolved."""
        return self._preprocess

    def cache_key(self) -> str:
        """Fingerprint of data, preprocess, model architecture, device and probe settings.

        Shards are fingerprinted by their files' names, sizes, times and columns, without reading their rows,
        so a cache hit answers without sampling them.
        """
        if self._key is None:
            if self._model is not None and self._probe == "child":
                self._ship()
            elif self._model is not None and self._probe == "in_process":
                self._model_fp = _model_fingerprint(self._model)
            data = shards_fingerprint(self._data) if isinstance(self._data, ShardSource) else self.sample().signature
            parts = [
                MEASUREMENT_VERSION,
                data,
                callable_fingerprint(self._preprocess),
                self._model_fp,
                _device_key(),
                self._sample_batch_size,
                self._trial_batch_sizes,
                self._steps,
                self._sweep_steps,
                self._prefetch_batches,
                self._seed,
            ]
            self._key = hashlib.sha256(repr(parts).encode()).hexdigest()[:24]
        return self._key

    def _ship(self) -> dict[str, Any]:
        """How the child gets the model (made once): a builder must build one the size of the caller's model."""
        if self._model_ref is None:
            self._model_ref, self._model_fp = _model_ref(self._shipped, self._workdir)
            if self._shipped is not self._model and hasattr(self._model, "count_params"):
                self._model_ref["params"] = int(self._model.count_params())
        return self._model_ref

    def _child_process(self) -> _Child | _InProcess:
        """The child, started if needed (it loads the model while this process goes on; ``info`` waits for it)."""
        if self._child is None or not self._child.alive:
            if self._child is not None:
                self._child.close()  # a child that died or was stopped: release its pipes
                self._child = None
            shard = largest_file(self._data.files) if isinstance(self._data, ShardSource) else None
            if self._probe == "in_process":
                self._child = _InProcess(self._model, shard=shard)
                return self._child
            self._child = _Child(self._ship(), timeout_s=self._timeout_s, workdir=self._workdir, shard=shard)
        return self._child

    def worst_batch(self, batch_size: int) -> _Preprocessed:
        """The worst-case batch of ``batch_size``: the largest rows, cycled, after ``preprocess``.

        With per-batch padding every row of a batch holding the longest sequence is
        padded to it, so cycling the largest rows bounds any real batch of that size.
        """
        worst = self.sample().worst
        rows = np.arange(batch_size) % worst.n_samples
        return run_preprocess(
            self._preprocess, InMemoryData(*worst.take(rows)), where=f"the worst-case batch of {batch_size}"
        )

    def run_trial(self, batch_size: int, *, rss_limit_bytes: int | None = None) -> StepTrial:
        """One real training trial at ``batch_size`` on the worst-case batch, in the child process."""
        # The child cycles the preprocessed worst rows up to the batch size itself, so this process never
        # holds a full trial batch (it would count in the training process's own peak when planning in-process).
        rows = min(batch_size, self.sample().worst.n_samples)
        batch = self.worst_batch(rows)
        sweep: list[dict[str, list[int | None]]] = []
        if self._sweep_steps:
            shapes = self._sample_shapes()
            typical = self._typical_shapes(batch_size)
            trial = {name: a.shape for name, a in pack_batch(batch.inputs, batch.targets)[0].items()}
            observed = {
                name: [shape, typical.get(name, shape), *shapes.get(name, ())] for name, shape in trial.items()
            }
            sweep = sweep_lengths(observed, self._sweep_steps, seed=self._seed)
        outcome = self.send_trial(
            batch.inputs, batch.targets, batch_size, rows=rows, what=f"batch {batch_size}",
            shrink="trial_batch_sizes", rss_limit_bytes=rss_limit_bytes, sweep=sweep,
        )
        return StepTrial(batch_size, **outcome)

    def _typical_shapes(self, batch_size: int) -> dict[str, tuple[int, ...]]:
        """Each packed array's shape on the row that nine in ten batches of ``batch_size`` hold one as large as.

        A batch pads to its largest row, so that row's own padded length is where the lengths a run at this
        batch size meets begin: at a large batch nearly every batch holds one of the longest rows (and a run
        meets few shapes), at a small one the lengths spread far down. The row is found by size among the
        largest rows sampled, else among the random ones.
        """
        sample = self.sample()
        quantile = 0.1 ** (1 / max(batch_size, 1))
        larger = (1 - quantile) * sample.n_samples  # rows larger than it, in the whole dataset
        if larger < sample.worst.n_samples:
            rows = sample.worst.take([min(int(larger), sample.worst.n_samples - 1)])
        else:
            order = np.argsort(sample.random.row_nbytes(), kind="stable")
            rows = sample.random.take([order[min(int(quantile * len(order)), len(order) - 1)]])
        done = run_preprocess(self._preprocess, InMemoryData(*rows), where=f"a typical row of a batch of {batch_size}")
        return {name: array.shape for name, array in pack_batch(done.inputs, done.targets)[0].items()}

    def _sample_shapes(self, *batches: _Preprocessed) -> dict[str, list[tuple[int, ...]]]:
        """Each packed array's shapes on the random and the smallest sample batches (what the sweep spans).

        ``batches``: those two, already preprocessed (by :meth:`measure`); else they are preprocessed here.
        """
        if self._shapes is None:
            if not batches:
                sample = self.sample()
                batches = (
                    run_preprocess(self._preprocess, sample.random, where="a random batch"),
                    run_preprocess(self._preprocess, sample.smallest, where="the batch of smallest rows"),
                )
            shapes: dict[str, list[tuple[int, ...]]] = {}
            for done in batches:
                for name, array in pack_batch(done.inputs, done.targets)[0].items():
                    shapes.setdefault(name, []).append(array.shape)
            self._shapes = shapes
        return self._shapes

    def send_trial(
        self,
        inputs: Any,
        targets: Any,
        batch_size: int,
        *,
        rows: int | None = None,
        what: str,
        shrink: str,
        rss_limit_bytes: int | None,
        sweep: Sequence[Mapping[str, list[int | None]]] = (),
    ) -> dict[str, Any]:
        """Train on this preprocessed batch in the child (``rows`` of it cycled to ``batch_size``).

        ``sweep`` (from :func:`sweep_lengths`) adds a step per entry first, on the batch cut to those lengths.

        Returns:
            The :class:`StepTrial` fields measured: ``peak_rss_bytes``, ``gpu_peak_bytes``,
            ``seconds_per_step``, and ``fits``/``note`` for a trial that did not fit.

        Raises:
            ProbeError: the child exited or timed out (``shrink`` names the option to lower).
            ModelError: the training step itself failed.
        """
        arrays, structure = pack_batch(inputs, targets)
        path = self._workdir / f"batch-{batch_size}-{os.getpid()}-{time.monotonic_ns()}.npz"
        np.savez(path, **arrays)
        del arrays
        child = self._child_process()
        message = {"cmd": "trial", "arrays": str(path), "structure": structure, "steps": self._steps,
                   "prefetch": self._prefetch_batches, "sweep": [dict(step) for step in sweep]}
        if rows is not None:
            message.update(rows=rows, batch_size=batch_size)
        try:
            reply = child.request(message, rss_limit_bytes=rss_limit_bytes)
        finally:
            path.unlink(missing_ok=True)
        if reply.get("ok"):
            return {
                "peak_rss_bytes": reply["peak_rss_bytes"],
                "gpu_peak_bytes": reply.get("gpu_peak_bytes"),
                "seconds_per_step": reply.get("seconds_per_step"),
            }
        if reply.get("over_limit"):
            # What it reached before being stopped is a lower bound on its peak: keep it for the fit.
            note = f"stopped: child RSS passed the limit of {format_bytes(reply.get('limit'))}" + (
                " (what the machine or cgroup can give this process and the child together)" if reply.get("ceiling") else ""
            )
            return {"peak_rss_bytes": reply.get("peak_seen") or None, "fits": False, "note": note}
        if reply.get("oom"):
            return {"peak_rss_bytes": None, "fits": False, "note": f"out of memory: {_oom_summary(str(reply.get('error')))}"}
        if reply.get("died"):
            code = reply.get("returncode")
            if code is not None and code < 0:
                note = f"child killed by signal {-code} (likely out of memory)"
                return {"peak_rss_bytes": None, "fits": False, "note": note}
            raise ProbeError(
                f"the probe's child process exited (code {code}) during a trial at {what}.\n"
                f"Its last output:\n{child.stderr_tail()}"
            )
        if reply.get("timeout"):
            raise ProbeError(
                f"a training trial at {what} took longer than {self._timeout_s:.0f} s and was killed. "
                f"Raise `timeout_s` or probe with smaller `{shrink}`."
            )
        raise ModelError(f"training step failed at {what}: {reply.get('error')}\n{reply.get('traceback', '')}".rstrip())

    def measure(self) -> ProbeResult:
        """Measure data, preprocessing and (with a model) training-step memory."""
        start = time.perf_counter()
        if self._model is not None:
            self._child_process()  # TensorFlow loads in the child while the data is sampled here
        sample = self.sample()
        random = run_preprocess(self._preprocess, sample.random, where=f"a random batch of {sample.random.n_samples}")
        worst = run_preprocess(
            self._preprocess, sample.worst, where=f"the worst-case batch of {sample.worst.n_samples} largest rows"
        )
        smallest = run_preprocess(
            self._preprocess, sample.smallest, where=f"the batch of {sample.smallest.n_samples} smallest rows"
        )
        signature = _signature(random, worst, ("a random batch", "the worst-case batch"))
        signature = _merge_signatures(
            signature, _signature(random, smallest, ("a random batch", "the batch of smallest rows"))
        )
        self._sample_shapes(random, smallest)
        trials: list[StepTrial] = []
        info: dict[str, Any] = {}
        if self._model is not None:
            child = self._child_process()
            info = child.info
            cap = max(sample.n_samples, 1)
            for batch_size in sorted({min(b, cap) for b in self._trial_batch_sizes}):
                trial = self.run_trial(batch_size)
                trials.append(trial)
                if not trial.fits:
                    break
        return ProbeResult(
            n_samples=sample.n_samples,
            source=sample.kind,
            raw_bytes=sample.raw_bytes,
            raw_bytes_per_sample=sample.raw_bytes / sample.n_samples,
            raw_scope=sample.raw_bytes_scope,
            largest_shard_raw_bytes=sample.largest_shard_raw_bytes,
            sample_batch_size=sample.random.n_samples,
            preprocessed_bytes_per_sample=random.nbytes / random.batch_size,
            worst_preprocessed_bytes_per_sample=worst.nbytes / worst.batch_size,
            worst_scope=sample.worst_scope,
            preprocess_peak_bytes_per_sample=worst.peak_bytes / worst.batch_size,
            output_signature=signature,
            device=info.get("device", "none"),
            model_name=info.get("model_name"),
            model_params=info.get("param_count"),
            baseline_rss_bytes=info.get("baseline_rss_bytes"),
            trials=tuple(trials),
            trial_prefetch_batches=self._prefetch_batches if trials else 0,
            trial_holds_shard=bool(trials) and sample.largest_shard is not None,
            shard_read_peak_bytes=info.get("shard_read_peak_bytes"),
            trial_reads_shard=bool(trials) and bool(info.get("reads_during_steps")),
            wall_seconds=time.perf_counter() - start,
            cache_key=self.cache_key(),
        )

    def confirm(
        self, result: ProbeResult, batch_size: int, *, rss_limit_bytes: int | None, fresh: bool = False
    ) -> ProbeResult:
        """Run one more real trial at ``batch_size`` and return the result including it.

        ``fresh``: in a new child that first replays the probe's trials, so the trial starts from the state
        the probe's own trials left, not from what a larger trial left.
        """
        start = time.perf_counter()
        if fresh:
            if self._child is not None:
                self._child.close()
                self._child = None
            for replayed in sorted({min(b, max(result.n_samples, 1)) for b in self._trial_batch_sizes}):
                self.run_trial(replayed)
        trial = self.run_trial(batch_size, rss_limit_bytes=rss_limit_bytes)
        updated = result.with_trial(trial)
        return dataclasses.replace(updated, wall_seconds=result.wall_seconds + time.perf_counter() - start)


def probe(
    x: Any,
    y: Any = None,
    *,
    preprocess: Preprocess | str | None = None,
    model: Any = None,
    sample_batch_size: int = 32,
    trial_batch_sizes: Sequence[int] | None = None,
    steps: int = 3,
    sweep_steps: int = DEFAULT_SWEEP_STEPS,
    seed: int = 0,
    timeout_s: float = 600.0,
    cache: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
) -> ProbeResult:
    """Measure the memory a training batch needs, after preprocessing, on the worst case.

    Args:
        x: a DataFrame, numpy array(s) or dict of arrays; a CSV/Parquet file, a
            directory or glob of shard files; or ``"module:function"`` returning ``(x, y)``.
        y: targets, or the target column name(s) of a DataFrame or of the shards.
        preprocess: ``preprocess(batch_x, batch_y) -> (inputs, targets)``, or its
            ``"module:function"``; ``None`` turns DataFrame columns into arrays.
        model: a compiled ``keras.Model``, a ``.keras`` file or ``"module:function"``
            building a compiled model. Without one, only data memory is measured.
        sample_batch_size: rows in the random and the worst-case sample batches.
        trial_batch_sizes: batch sizes of the real training trials (default 8, 32, 128).
        steps: training steps per trial on the worst-case batch.
        sweep_steps: steps before those on the batch cut to shorter padded lengths
            (:func:`sweep_lengths`), so the peak includes what varying shapes leave in
            TensorFlow's allocators; 0 skips them.
        seed: for the random sample.
        timeout_s: a trial that takes longer is killed and reported.
        cache: reuse an earlier identical probe from the on-disk cache.
        cache_dir: where the cache lives (default: the user cache directory).

    Returns:
        The measurements as a frozen :class:`ProbeResult`.

    Raises:
        DataError: the data is empty, missing or unreadable.
        PreprocessError: ``preprocess`` failed or is inconsistent between batches.
        ModelError: the model cannot be loaded or is not compiled.
        ProbeError: the child process failed or hung.

    Example:
        >>> result = autobatch.probe(df, "label", preprocess=pad, model=model)
        >>> result.worst_preprocessed_bytes_per_sample
    """
    with Prober(
        x,
        y,
        preprocess=preprocess,
        model=model,
        sample_batch_size=sample_batch_size,
        trial_batch_sizes=trial_batch_sizes,
        steps=steps,
        sweep_steps=sweep_steps,
        seed=seed,
        timeout_s=timeout_s,
    ) as prober:
        key = prober.cache_key()
        if cache:
            cached = ProbeResult.load_cached(key, cache_dir)
            if cached is not None:
                return cached
        result = prober.measure()
        if cache:
            _cache.store(key, result.to_dict(), cache_dir)
        return result
