"""Probe: measure what a batch really costs, after the user's preprocessing, on the worst case.

The probe measures, and never guesses from shapes:

1. raw bytes per sample as held in memory;
2. bytes per sample after ``preprocess``, on a random batch and on the worst-case
   batch (the largest rows, e.g. the longest sequences);
3. the transient peak of ``preprocess`` itself (``tracemalloc``);
4. with a model: the peak memory of real training steps (``model.fit`` over a
   prefetching ``tf.data`` pipeline, one shard held as streaming holds it) at a
   few batch sizes, in a child process (``autobatch._child_main``) so an OOM cannot
   kill the caller, fitted as intercept + per-sample slope. Each trial first
   steps through the batch cut to a sweep of shorter padded lengths, as training
   meets them: TensorFlow's CPU and GPU pool allocators fragment with every new
   shape, and the worst-case batch arriving after that peaks higher than on a
   fresh process (BENCHMARKS.md, benchmark 4).

The ``Prober`` keeps that child alive so the planner can confirm its choice with
one more real trial at the chosen size. Its parts: the results (:mod:`autobatch._result`),
running ``preprocess`` (:mod:`autobatch._preprocess`), the sweep (:mod:`autobatch._sweep`),
the child process (:mod:`autobatch._child`) and what the model travels to it as
(:mod:`autobatch._shipping`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from autobatch import _cache
from autobatch._child import Child, InProcess, request_trial, trial_outcome
from autobatch._data import (
    DataSample,
    InMemoryData,
    ShardSource,
    as_in_memory,
    sample_in_memory,
    sample_shards,
    shards_fingerprint,
)
from autobatch._loading import callable_fingerprint, is_callable_spec, resolve_callable
from autobatch._memory import gpu_memory_totals
from autobatch._preprocess import (
    Preprocess,
    _merge_signatures,
    _Preprocessed,
    _resolve_preprocess,
    _signature,
    default_preprocess,
    run_preprocess,
)
from autobatch._result import LinearFit, ProbeResult, StepCurve, StepPiece, StepTrial, TensorSpec
from autobatch._shard_files import largest_file
from autobatch._shipping import model_fingerprint, model_ref
from autobatch._sweep import DEFAULT_SWEEP_STEPS, sample_shapes, sweep_lengths, trial_sweep, typical_shapes
from autobatch.errors import ConfigError, DataError

__all__ = [
    "DEFAULT_SWEEP_STEPS", "DEFAULT_TRIAL_BATCH_SIZES", "MEASUREMENT_VERSION", "LinearFit", "Preprocess", "ProbeResult",
    "Prober", "StepCurve", "StepPiece", "StepTrial", "TensorSpec", "default_preprocess", "probe", "run_preprocess",
    "sweep_lengths",
]

DEFAULT_TRIAL_BATCH_SIZES = (8, 32, 128)
# Part of every cache key: bump it whenever what or how the probe measures changes.
MEASUREMENT_VERSION = 7


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


def _device_key() -> str:
    totals = gpu_memory_totals()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    return f"gpu{len(totals)}:{totals[0][0]}:{visible}" if totals else "cpu"


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
        for name, value in (("sample_batch_size", sample_batch_size), ("steps", steps), ("prefetch_batches", prefetch_batches)):
            if value < 1:
                raise ConfigError(f"`{name}` must be >= 1. Received: {value}")
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
        self._child: Child | InProcess | None = None
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
                self._model_fp = model_fingerprint(self._model)
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
            self._model_ref, self._model_fp = model_ref(self._shipped, self._workdir)
            if self._shipped is not self._model and hasattr(self._model, "count_params"):
                self._model_ref["params"] = int(self._model.count_params())
        return self._model_ref

    def _child_process(self) -> Child | InProcess:
        """The child, started if needed (it loads the model while this process goes on; ``info`` waits for it)."""
        if self._child is None or not self._child.alive:
            if self._child is not None:
                self._child.close()  # a child that died or was stopped: release its pipes
                self._child = None
            shard = largest_file(self._data.files) if isinstance(self._data, ShardSource) else None
            if self._probe == "in_process":
                self._child = InProcess(self._model, shard=shard)
                return self._child
            self._child = Child(self._ship(), timeout_s=self._timeout_s, workdir=self._workdir, shard=shard)
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
            sweep = trial_sweep(
                batch, self._typical_shapes(batch_size), self._sample_shapes(), self._sweep_steps, seed=self._seed
            )
        outcome = self.send_trial(
            batch.inputs, batch.targets, batch_size, rows=rows, what=f"batch {batch_size}",
            shrink="trial_batch_sizes", rss_limit_bytes=rss_limit_bytes, sweep=sweep,
        )
        return StepTrial(batch_size, **outcome)

    def _typical_shapes(self, batch_size: int) -> dict[str, tuple[int, ...]]:
        """Where the sweep at ``batch_size`` begins (:func:`autobatch._sweep.typical_shapes`)."""
        return typical_shapes(self.sample(), self._preprocess, batch_size)

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
            self._shapes = sample_shapes(batches)
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
        child = self._child_process()
        message = {"steps": self._steps, "prefetch": self._prefetch_batches, "sweep": [dict(step) for step in sweep]}
        if rows is not None:
            message.update(rows=rows, batch_size=batch_size)
        reply = request_trial(
            child, inputs, targets, message, workdir=self._workdir, name=f"batch-{batch_size}",
            rss_limit_bytes=rss_limit_bytes,
        )
        return trial_outcome(reply, child, what=what, shrink=shrink, timeout_s=self._timeout_s)

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
