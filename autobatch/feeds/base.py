"""The small base every feed shares: batch index math, the preprocess call and its checks, tf.data export.

A feed is a ``keras.utils.PyDataset``: ``len(feed)`` batches per epoch, batch
``i`` by ``feed[i]``, reshuffled in ``on_epoch_end``. Subclasses say how many
samples there are and how to fetch rows ``[lo, hi)`` of the current epoch's
order; the base cuts the epoch into batches, runs ``preprocess`` and checks that
every batch has the same arrays, dtypes and ranks as the first one (or as the
probe measured), so a drifting ``preprocess`` fails on the batch that drifted
instead of deep inside TensorFlow.

Every batch is also checked for NaN/inf values (``nan_policy``), and the
sequences ``preprocess`` truncates to a fixed ``maxlen`` with autobatch's padding
helpers are counted (``feed.stats.truncated_sequences``). Errors about one
row name where it came from: the row of the in-memory data, or the shard file
and its row.

Resume semantics: a feed serves epoch ``feed.epoch`` and moves to the next one
only when the last batch of the epoch has been produced (``on_epoch_end``, which
Keras calls for a ``PyDataset`` and :meth:`BaseFeed.to_tf_dataset` calls itself).
A pass that stops early (an exception, ``KeyboardInterrupt``) leaves the epoch as
it was, so the next pass serves the same epoch from its first batch, in the same
order: every sample exactly once in that pass.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import math
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import keras
import numpy as np

from autobatch._tfdata import prefetched
from autobatch._units import format_bytes
from autobatch.errors import AutobatchError, ConfigError, DataError, PreprocessError
from autobatch.padding import Truncations, count_truncations
from autobatch.probe import Preprocess, TensorSpec, _leaves, _resolve_preprocess

if TYPE_CHECKING:
    from autobatch.feeds.native import NativePadding, NativeShards

logger = logging.getLogger(__name__)

SAMPLE_WEIGHT = "sample_weight"
"""Name of the sample-weight array in signatures (the probe names inputs ``x/...`` and targets ``y...``)."""

NanPolicy = Literal["warn", "error", "ignore"]


@dataclasses.dataclass(frozen=True)
class RawBatch:
    """Rows ``[lo, hi)`` of one epoch's order, before ``preprocess``."""

    x: Any
    y: Any
    sample_weight: np.ndarray | None
    where: str
    """Where the rows came from, for error messages (e.g. ``"shard 'data/3.csv'"``)."""
    origin: Callable[[int], str] | None = None
    """Where row ``p`` of the batch came from (e.g. ``"row 17 of shard 'data/3.csv'"``), for error messages."""
    pad_to: int | None = None
    """The length a size-aware feed pads this batch's sequences to (its bucket's boundary)."""


def _map_leaves(value: Any, fn: Callable[[str, Any], Any], prefix: str) -> Any:
    """Apply ``fn(name, leaf)`` to every array in a dict/tuple/list nest, named as the probe names them."""
    if isinstance(value, Mapping):
        return {key: _map_leaves(item, fn, f"{prefix}/{key}") for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return tuple(_map_leaves(item, fn, f"{prefix}/{i}") for i, item in enumerate(value))
    return fn(prefix, value)


def _check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ConfigError(f"`batch_size` must be a positive int. Received: batch_size={batch_size!r}")
    return int(batch_size)


def _check_nan_policy(nan_policy: str) -> NanPolicy:
    if nan_policy not in ("warn", "error", "ignore"):
        raise ConfigError(f'`nan_policy` must be "warn", "error" or "ignore". Received: nan_policy={nan_policy!r}')
    return nan_policy  # type: ignore[return-value]


def _nonfinite_rows(array: np.ndarray) -> np.ndarray | None:
    """Per row, whether it holds NaN or inf; ``None`` when every value is finite (or the dtype cannot hold NaN)."""
    if array.dtype.kind not in "fc" or array.size == 0:
        return None
    # One pass without a temporary: a NaN or inf anywhere makes the sum non-finite (so does overflow, checked next).
    # Summing in the array's own precision (float16 in float32) avoids a cast of every value.
    with np.errstate(over="ignore", invalid="ignore"):
        total = array.sum(dtype=np.result_type(array.dtype, np.float32))
    if np.isfinite(total):
        return None
    bad = ~np.isfinite(array)
    if not bad.any():
        return None
    return bad.reshape(len(array), -1).any(axis=1)


def check_fraction(validation_split: float) -> float:
    """Validate a validation fraction in (0, 1)."""
    number = isinstance(validation_split, (int, float)) and not isinstance(validation_split, bool)
    if not number or not 0 < validation_split < 1:
        raise ConfigError(
            "`validation_split` must be a fraction strictly between 0 and 1. "
            f"Received: validation_split={validation_split!r}"
        )
    return float(validation_split)


@dataclasses.dataclass
class FeedStats:
    """Work a feed has done producing batches (reading, slicing, preprocessing), for the monitor."""

    batches: int = 0
    seconds: float = 0.0
    truncated_sequences: int = 0
    """Sequences ``preprocess`` cut to a fixed ``maxlen`` with autobatch's padding helpers, over all batches served."""
    truncated_by_column: dict[str, int] = dataclasses.field(default_factory=dict)
    """The same, per column (for :func:`autobatch.pad_columns`)."""
    nonfinite_batches: int = 0
    """Batches that held NaN or inf values after ``preprocess`` (with ``nan_policy="warn"``)."""


class BackgroundReader:
    """One lazily started reader thread for a streaming feed.

    ``stop()`` ends it (a later ``pool()`` starts a new one); the owning feed stops
    it when it is garbage-collected, without waiting.
    """

    def __init__(self, owner: object, name: str) -> None:
        self._name = name
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        weakref.finalize(owner, self.stop, wait=False)

    def pool(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=self._name)
            return self._executor

    def stop(self, *, wait: bool = True) -> None:
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=wait, cancel_futures=True)


class BaseFeed(keras.utils.PyDataset):
    """A batched, shuffled, preprocessed view of a dataset, for ``model.fit``.

    Subclasses implement :attr:`n_samples`, :meth:`_rows` and :meth:`_options`.
    """

    _steps_fixed: bool = True
    """Every epoch has ``len(self)`` batches at the same ``batch_bounds`` (what ``to_tf_dataset(repeat=True)`` needs)."""

    def __init__(
        self,
        *,
        batch_size: int,
        preprocess: Preprocess | str | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_remainder: bool = False,
        output_signature: Sequence[TensorSpec] | None = None,
        max_batch_bytes: int | None = None,
        nan_policy: NanPolicy = "warn",
        workers: int = 1,
        use_multiprocessing: bool = False,
        max_queue_size: int = 10,
    ) -> None:
        super().__init__(workers=workers, use_multiprocessing=use_multiprocessing, max_queue_size=max_queue_size)
        self.batch_size = _check_batch_size(batch_size)
        self.nan_policy = _check_nan_policy(nan_policy)
        self._pieces = 1
        self._preprocess_arg = preprocess
        self.preprocess = _resolve_preprocess(preprocess)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_remainder = bool(drop_remainder)
        self.output_signature = tuple(output_signature) if output_signature is not None else None
        self.max_batch_bytes = max_batch_bytes
        self._epoch = 0
        self.stats = FeedStats()
        self._init_runtime()

    # ------------------------------------------------------------------ runtime state (not pickled)

    def _init_runtime(self) -> None:
        self._lock = threading.Lock()
        self._reference: tuple[dict[str, tuple[str, int]], str] | None = None
        if self.output_signature is not None:
            specs = {s.name: (s.dtype, len(s.shape)) for s in self.output_signature}
            self._reference = (specs, "the batch the probe measured")
        self._warned_bytes = False
        self._warned: set[str] = set()
        self._failure: AutobatchError | None = None
        self._pass: list[tuple[int, int]] | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Locks, threads and caches stay behind; Keras' multiprocessing workers rebuild them.
        state = dict(self.__dict__)
        for key in self._runtime_keys():
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    def _runtime_keys(self) -> tuple[str, ...]:
        return ("_lock", "_reference", "_warned_bytes", "_warned", "_failure", "_pass")

    # ------------------------------------------------------------------ what subclasses provide

    @property
    def n_samples(self) -> int:
        """Samples in one epoch (all of them, before ``drop_remainder``)."""
        raise NotImplementedError

    def _rows(self, lo: int, hi: int, index: int) -> RawBatch:
        """Rows ``[lo, hi)`` of the current epoch's order, for batch ``index``."""
        raise NotImplementedError

    def split(self, validation_split: float, *, seed: int | None = None) -> tuple[BaseFeed, BaseFeed]:
        """Hold out ``validation_split`` of the data: ``(train_feed, validation_feed)``."""
        raise NotImplementedError

    def _options(self) -> dict[str, Any]:
        """Keyword arguments of this feed's constructor, to describe it and to derive split feeds."""
        return dict(
            batch_size=self.batch_size,
            preprocess=self._preprocess_arg,
            shuffle=self.shuffle,
            seed=self.seed,
            drop_remainder=self.drop_remainder,
            output_signature=self.output_signature,
            max_batch_bytes=self.max_batch_bytes,
            nan_policy=self.nan_policy,
            workers=self._workers,
            use_multiprocessing=self._use_multiprocessing,
            max_queue_size=self._max_queue_size,
        )

    # ------------------------------------------------------------------ epochs and batches

    @property
    def epoch(self) -> int:
        """The epoch whose order ``feed[i]`` serves; ``on_epoch_end`` advances it."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Serve the order of ``epoch`` (e.g. when resuming training), as if ``on_epoch_end`` had run that often."""
        if epoch < 0:
            raise ConfigError(f"`epoch` must be >= 0. Received: epoch={epoch}")
        self._epoch = int(epoch)

    def on_epoch_end(self) -> None:
        """Advance to the next epoch: a new shuffle order (Keras calls this after every epoch)."""
        self._epoch += 1

    def close(self) -> None:
        """Release what the feed holds between batches (nothing here; loaded shards in a streaming feed)."""

    def __len__(self) -> int:
        n = self.n_samples
        return n // self.batch_size if self.drop_remainder else math.ceil(n / self.batch_size)

    def batch_bounds(self, index: int) -> tuple[int, int]:
        """Positions ``[lo, hi)`` of batch ``index`` in the epoch's order (negative indices count from the end).

        Raises:
            IndexError: ``index`` is outside ``range(len(self))``.
        """
        count = len(self)
        if index < 0:
            index += count
        if not 0 <= index < count:
            raise IndexError(f"batch index {index} is out of range for a feed of {count} batches.")
        lo = index * self.batch_size
        return lo, min(lo + self.batch_size, self.n_samples)

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        """Batch ``index`` of the current epoch: ``(inputs, targets)``, plus sample weights when given.

        Raises:
            IndexError: ``index`` is out of range.
            DataError: a shard cannot be read, or the batch holds bad values (a
                value that is not a number, NaN/inf with ``nan_policy="error"``);
                the message names the file or data row.
            PreprocessError: ``preprocess`` failed or returned arrays unlike the previous batches'.
        """
        if index < 0:
            index += len(self)
        lo, hi = self.batch_bounds(index)
        return self._serve(lo, hi, index)

    def _serve(self, lo: int, hi: int, index: int, *, record: bool = True) -> tuple[Any, ...]:
        """Rows ``[lo, hi)`` of the epoch's order (all of batch ``index``, or a piece of it), preprocessed and checked.

        ``record=False`` leaves the statistics alone (a batch looked at to infer a signature).
        """
        started = time.perf_counter()
        raw = self._rows(lo, hi, index)
        where = self._where(lo, hi, index, raw.where)
        try:
            with count_truncations() as cut:
                result = self._call_preprocess(raw)
        except PreprocessError as exc:  # already says what is wrong (e.g. the default preprocess); add where
            raise PreprocessError(f"{exc} (on {where})") from exc
        except DataError as exc:  # bad data found by autobatch's helpers: name the row's origin too
            origin = f"; that is {raw.origin(exc.row)}" if exc.row is not None and raw.origin is not None else ""
            raise DataError(f"{exc} (on {where}{origin})") from exc
        except Exception as exc:
            raise PreprocessError(
                f"preprocess raised {type(exc).__name__}: {exc} on {where}. Fix the function or the data it chokes on."
            ) from exc
        if not isinstance(result, tuple) or len(result) != 2:
            raise PreprocessError(
                f"preprocess must return a pair (inputs, targets); on {where} it returned {type(result).__name__}."
            )
        inputs, targets = result
        self._check(inputs, targets, hi - lo, where, raw.origin, record=record)
        if record:
            self._record_batch(started, cut, where)
        if targets is None:
            return (inputs,)
        if raw.sample_weight is not None:
            return inputs, targets, raw.sample_weight
        return inputs, targets

    def _where(self, lo: int, hi: int, index: int, source: str = "") -> str:
        """How messages name rows ``[lo, hi)`` of batch ``index`` (and ``source``, where they came from)."""
        return f"batch {index} (rows {lo}-{hi - 1} of epoch {self._epoch}{', ' + source if source else ''})"

    def _record_batch(self, started: float, cut: Truncations, where: str, *, nonfinite: bool = False) -> None:
        """Count a batch served since ``started`` (``perf_counter``), the sequences cut in it, and report the cuts."""
        with self._lock:
            self.stats.batches += 1
            self.stats.seconds += time.perf_counter() - started
            self.stats.nonfinite_batches += int(nonfinite)
            if cut.sequences:
                self.stats.truncated_sequences += cut.sequences
                for name, count in cut.by_column.items():
                    self.stats.truncated_by_column[name] = self.stats.truncated_by_column.get(name, 0) + count
        if cut.sequences:
            self._report_truncation(cut.sequences, cut.by_column, cut.maxlen, where)

    def _call_preprocess(self, raw: RawBatch) -> Any:
        """``preprocess`` on one batch's rows (a size-aware feed also pads to the batch's bucket)."""
        return self.preprocess(raw.x, raw.y)

    def _warn_once(self, key: str, message: str, category: type[Warning]) -> None:
        with self._lock:
            if key in self._warned:
                return
            self._warned.add(key)
        logger.warning("%s", message)
        warnings.warn(message, category, stacklevel=4)

    def _report_truncation(self, count: int, by_column: dict[str, int], maxlen: dict[str, int], where: str) -> None:
        columns = ", ".join(f"{name!r} cut to {maxlen[name]}: {n}" for name, n in by_column.items())
        logger.debug("%d sequence(s) truncated on %s (%s)", count, where, columns)
        self._warn_once(
            "truncation",
            f"preprocess truncated {count} sequence(s) longer than maxlen on {where}"
            + (f" ({columns})" if columns else "")
            + "; later batches are counted in feed.stats.truncated_sequences (and the monitor's summary), not warned "
            "about again. Raise maxlen if those time steps matter.",
            UserWarning,
        )

    def _check(
        self,
        inputs: Any,
        targets: Any,
        rows: int,
        where: str,
        origin: Callable[[int], str] | None = None,
        *,
        record: bool = True,
    ) -> None:
        leaves = {**_leaves(inputs, "x", where), **_leaves(targets, "y", where)}
        if not leaves:
            raise PreprocessError(f"preprocess returned no arrays on {where}.")
        for name, array in leaves.items():
            if array.ndim == 0 or array.shape[0] != rows:
                got = "a scalar" if array.ndim == 0 else f"{array.shape[0]} rows"
                raise PreprocessError(
                    f"preprocess must keep one row per sample: expected {rows} rows for {name} on {where}, "
                    f"received {got}. Do not drop or add rows in preprocess."
                )
        found = {name: (str(a.dtype), a.ndim) for name, a in leaves.items()}
        with self._lock:
            if self._reference is None:
                self._reference = (found, where)
        expected, first = self._reference
        if found.keys() != expected.keys():
            raise PreprocessError(
                f"preprocess must return the same arrays for every batch: expected {sorted(expected)} "
                f"(as on {first}), received {sorted(found)} on {where}. Return the same keys every time."
            )
        for name, (dtype, ndim) in found.items():
            if (dtype, ndim) != expected[name]:
                want_dtype, want_ndim = expected[name]
                raise PreprocessError(
                    f"preprocess must return the same dtype and rank for every batch: expected {name} as "
                    f"{want_dtype} ({want_ndim}-D, as on {first}), received {dtype} ({ndim}-D) on {where}. "
                    "Cast explicitly (e.g. .astype('float32')) and pad to the same number of axes."
                )
        if self.nan_policy != "ignore":
            self._check_finite(leaves, where, origin, record=record)
        if self.max_batch_bytes is not None and not self._warned_bytes:
            self._check_batch_bytes(sum(int(a.nbytes) for a in leaves.values()), where)

    def _check_batch_bytes(self, nbytes: int, where: str) -> None:
        """Warn once when a batch holds more than the probe's worst-case batch (``max_batch_bytes``)."""
        if self.max_batch_bytes is not None and not self._warned_bytes and nbytes > self.max_batch_bytes:
            self._warned_bytes = True
            logger.warning(
                "%s holds %s after preprocess, more than the %s of the probe's worst-case batch: "
                "the plan may underestimate memory. Probe with the same preprocess and data as you train on.",
                where,
                format_bytes(nbytes),
                format_bytes(self.max_batch_bytes),
            )

    def _check_finite(
        self, leaves: dict[str, np.ndarray], where: str, origin: Callable[[int], str] | None, *, record: bool
    ) -> None:
        found = False
        for name, array in leaves.items():
            bad_rows = _nonfinite_rows(array)
            if bad_rows is None:
                continue
            found = True
            self._report_nonfinite(name, int((~np.isfinite(array)).sum()), bad_rows, where, origin)
        if found and record:
            with self._lock:
                self.stats.nonfinite_batches += 1

    def _report_nonfinite(
        self, name: str, values: int, bad_rows: np.ndarray, where: str, origin: Callable[[int], str] | None
    ) -> None:
        """Warn once about ``values`` NaN/inf in the rows ``bad_rows`` flags (raise with ``nan_policy="error"``)."""
        first = int(np.argmax(bad_rows))
        message = (
            f"{name} holds {values} NaN/inf value(s) in {int(bad_rows.sum())} row(s) on {where}; the first is row "
            f"{first} of the batch" + (f" ({origin(first)})" if origin is not None else "") + ". NaN or inf "
            "inputs make the loss NaN: clean the data (or what preprocess computes from it)"
        )
        if self.nan_policy == "error":
            raise DataError(message + ", or pass nan_policy='warn' or 'ignore'.")
        self._warn_once(
            f"nonfinite:{name}",
            message + ". Later batches are counted in feed.stats.nonfinite_batches, not warned about again; "
            "pass nan_policy='error' to stop at the first one or 'ignore' to skip the check.",
            RuntimeWarning,
        )

    # ------------------------------------------------------------------ memory pressure

    @property
    def pieces(self) -> int:
        """How many pieces :meth:`to_tf_dataset` (``adaptive=True``) cuts each following batch into (1: whole)."""
        return self._pieces

    @property
    def current_batch_size(self) -> int:
        """The largest batch served now: ``ceil(batch_size / pieces)``."""
        return math.ceil(self.batch_size / self._pieces)

    def shrink(self, factor: int = 2) -> int:
        """Serve the following batches in ``factor`` times as many, smaller pieces, to use less memory per step.

        Only a dataset made with ``to_tf_dataset(adaptive=True)`` follows it (a
        ``PyDataset``'s batches are fixed by ``len``). The epoch's order and the
        batch boundaries stay as they are, so every sample is still served exactly
        once per epoch; each batch not yet produced is split into ``pieces``
        nearly equal parts. A piece is never smaller than one row.

        Args:
            factor: multiply the number of pieces by this (>= 2).

        Returns:
            The number of pieces per batch from now on.

        Raises:
            ConfigError: ``factor`` is not an int >= 2.
        """
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 2:
            raise ConfigError(f"`factor` must be an int >= 2. Received: factor={factor!r}")
        with self._lock:
            before = self._pieces
            self._pieces = min(before * factor, self.batch_size)
            after = self._pieces
        if after != before:
            logger.warning(
                "serving batches of at most %d samples (batch %d in %d pieces) to use less memory",
                math.ceil(self.batch_size / after),
                self.batch_size,
                after,
            )
        return after

    def step_rows(self, step: int) -> int | None:
        """Rows in element ``step`` of the latest ``to_tf_dataset`` pass (``None`` if that pass has not produced it)."""
        current = self._pass
        if current is None or not 0 <= step < len(current):
            return None
        return current[step][0]

    def step_pieces(self, step: int) -> int | None:
        """How many pieces the batch of element ``step`` of the latest ``to_tf_dataset`` pass was cut into."""
        current = self._pass
        if current is None or not 0 <= step < len(current):
            return None
        return current[step][1]

    def _pop_failure(self) -> AutobatchError | None:
        """The autobatch error that stopped the latest ``to_tf_dataset`` pass, once (TensorFlow re-wraps it)."""
        with self._lock:
            failure, self._failure = self._failure, None
        return failure

    # ------------------------------------------------------------------ tf.data export

    def _tf_signature(self, batches: Sequence[tuple[Any, ...]], output_signature: Sequence[TensorSpec] | None) -> Any:
        import tensorflow as tf

        probe_specs = {s.name: s for s in (output_signature or ())}
        names = ("x", "y", SAMPLE_WEIGHT)
        shapes: dict[str, list[tuple[int, ...]]] = {}
        dtypes: dict[str, np.dtype] = {}
        for batch in batches:
            for part, name in zip(batch, names, strict=False):  # (x,), (x, y) or (x, y, w)

                def collect(leaf_name: str, leaf: Any) -> None:
                    array = np.asarray(leaf)
                    shapes.setdefault(leaf_name, []).append(array.shape)
                    dtypes[leaf_name] = array.dtype

                _map_leaves(part, collect, name)

        def spec(leaf_name: str, leaf: Any) -> Any:
            measured = probe_specs.get(leaf_name)
            if measured is not None:
                if len(measured.shape) != np.ndim(leaf) or np.dtype(measured.dtype) != dtypes[leaf_name]:
                    raise PreprocessError(
                        f"the output signature says {leaf_name} is {measured.dtype} ({len(measured.shape)}-D), but "
                        f"batch 0 holds {dtypes[leaf_name]} ({np.ndim(leaf)}-D). Pass the signature of this preprocess."
                    )
                return tf.TensorSpec((None, *measured.shape[1:]), tf.as_dtype(measured.dtype), name=leaf_name)
            seen = shapes[leaf_name]
            dims = tuple(d if all(s[k] == d for s in seen) else None for k, d in enumerate(seen[0]))
            return tf.TensorSpec((None, *dims[1:]), tf.as_dtype(dtypes[leaf_name]), name=leaf_name)

        return tuple(_map_leaves(part, spec, name) for part, name in zip(batches[0], names, strict=False))

    def to_tf_dataset(
        self,
        output_signature: Sequence[TensorSpec] | None = None,
        *,
        infer_batches: int = 2,
        prefetch: int | Literal["autotune"] = 2,
        adaptive: bool = False,
        repeat: bool = False,
        epochs: int | None = None,
    ) -> Any:
        """This feed as a ``tf.data.Dataset`` of the same batches, ``prefetch`` of them produced ahead.

        Each full pass over the dataset is one epoch of the feed: as the last
        batch is produced the feed moves to the next epoch's shuffle order, as
        with Keras. A pass that stops early leaves the epoch unchanged (see the
        module's resume semantics).

        With ``repeat=True`` one pass serves epoch after epoch: train it with
        ``model.fit(..., epochs=n, steps_per_epoch=len(feed))``, as :func:`autobatch.fit`
        does. Keras then keeps one iterator for the whole ``fit`` instead of making a
        new one every epoch (on the canonical example that costs 30–50 ms an epoch,
        more with a ``PadColumns`` export, whose map function is instantiated anew),
        and the next epoch's first batches are made while the current one's last
        steps train. Pass ``epochs=n`` (the epochs the fit trains) and the pass ends
        after the last batch of its ``n``-th epoch: without it, the prefetch and
        the generator run on into an epoch that never trains, preprocessing (and,
        streaming, reading shards for) up to ``prefetch`` more batches.

        Args:
            output_signature: the probe's :class:`~autobatch.TensorSpec` tuple
                (``plan.probe.output_signature``); default: the one the feed was
                built with, else inferred from the first ``infer_batches``
                batches (axes that differ between them become ``None``).
            infer_batches: how many batches to look at when inferring.
            prefetch: batches to prefetch: a fixed number — what a memory plan budgets
                (``plan.queue_batches``, 2 by default) — or ``"autotune"`` (tf.data decides,
                and may hold more than the plan budgets). A fixed number also turns tf.data's
                autotuning off for this pipeline (see ``autobatch._tfdata.prefetched``).
            adaptive: follow :meth:`shrink`: each batch is produced in ``self.pieces``
                pieces, so an epoch may hold more elements than ``len(self)``. The
                dataset then reports the rows per epoch as its ``cardinality()`` (an
                upper bound: Keras, told an unknown count, would fix every epoch at the
                first epoch's count) and each pass ends when the epoch's rows are
                served; Keras warns "Your input ran out of data" at the end of each epoch,
                which :func:`autobatch.fit` silences.
            repeat: serve every epoch from one pass (above); the dataset's cardinality
                is then infinite, or ``epochs × len(self)``. Not with ``adaptive``, nor
                for feeds whose batches per epoch vary (size-aware feeds).
            epochs: with ``repeat``, how many epochs the pass serves before it ends
                (``None``: without end). Each epoch is the feed's next one, from
                :attr:`epoch` on.

        Returns:
            A ``tf.data.Dataset`` of ``(inputs, targets[, sample_weight])`` with an
            exact ``element_spec`` and known cardinality ``len(self)`` (rows per epoch
            with ``adaptive``; with ``repeat``, ``epochs × len(self)`` or infinite).

        Raises:
            PreprocessError: ``output_signature`` disagrees with the first batch's
                dtypes or ranks. A later batch that does not fit the signature
                (e.g. an axis inferred as fixed varies) fails while iterating, as
                ``tf.errors.UnknownError`` carrying the ``PreprocessError`` message:
                pass the probe's signature, or pad that axis to a fixed length.
            ConfigError: ``repeat`` with ``adaptive``, or for a feed whose batches per epoch vary;
                ``epochs`` without ``repeat``, or not a positive int.
        """
        import tensorflow as tf

        if repeat and (adaptive or not self._steps_fixed):
            why = "adaptive=True" if adaptive else f"a {type(self).__name__}, whose batches per epoch vary"
            raise ConfigError(
                f"repeat=True needs the same batches every epoch (steps_per_epoch=len(feed)); received {why}. "
                "Pass repeat=False: Keras then makes a new iterator every epoch."
            )
        if epochs is not None:
            if not repeat:
                raise ConfigError(
                    "`epochs` bounds a repeating pass: pass repeat=True with it (without, every pass is one epoch). "
                    f"Received: epochs={epochs!r}, repeat=False"
                )
            if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 1:
                raise ConfigError(f"`epochs` must be a positive int or None. Received: epochs={epochs!r}")
            epochs = int(epochs)
        signature_specs = output_signature if output_signature is not None else self.output_signature
        count = len(self)
        if count == 0:
            raise ConfigError("the feed has no batches (drop_remainder=True with fewer samples than batch_size).")
        looked = [
            self._serve(*self.batch_bounds(i), i, record=False)
            for i in range(min(max(infer_batches, 1), count) if signature_specs is None else 1)
        ]
        signature = self._tf_signature(looked, signature_specs)
        # Whatever the look loaded (shards) would otherwise stay resident until this feed's first epoch ends,
        # e.g. a validation feed's shards through the whole training epoch.
        self.close()
        flat_specs = tf.nest.flatten(signature)
        native = None if adaptive else self._native_export(signature)

        def make(lo: int, hi: int, index: int) -> tuple[Any, ...]:
            if native is not None:
                return native.element(lo, hi, index)
            return self._conform(self._serve(lo, hi, index), flat_specs, f"batch {index}")

        def generate() -> Iterator[tuple[Any, ...]]:
            rows_log: list[tuple[int, int]] | None = None if repeat else []
            with self._lock:
                # What the monitor reads: (rows, pieces of its batch) of each element, in order. A repeating pass
                # runs ahead into the next epoch; its batches are batch_bounds', which the monitor falls back to.
                self._pass = rows_log
            try:
                served = 0
                while True:
                    yield from self._pass_elements(make, rows_log, adaptive)
                    served += 1
                    # Past the last epoch that trains, nothing is prepared (or read ahead): the pass just ends.
                    if not repeat or (epochs is not None and served >= epochs):
                        break
            except AutobatchError as exc:
                with self._lock:
                    self._failure = exc  # TensorFlow re-raises it as UnknownError; autobatch.fit restores it
                raise

        if native is None:
            dataset = tf.data.Dataset.from_generator(generate, output_signature=signature)
        else:  # the generator hands out row indices (or rows' values and lengths); TensorFlow pads them
            dataset = tf.data.Dataset.from_generator(generate, output_signature=native.element_signature)
            dataset = dataset.map(native.assemble)
        if not adaptive:
            cardinality = count
            if repeat:
                cardinality = tf.data.INFINITE_CARDINALITY if epochs is None else count * epochs
            dataset = dataset.apply(tf.data.experimental.assert_cardinality(cardinality))
        dataset = prefetched(dataset, prefetch)
        if adaptive:
            upper = count * self.batch_size if self.drop_remainder else self.n_samples
            dataset.cardinality = lambda: tf.constant(upper, dtype=tf.int64)
        return dataset

    def _conform(self, batch: tuple[Any, ...], flat_specs: Sequence[Any], what: str) -> tuple[Any, ...]:
        """``batch`` as numpy arrays, checked against the dataset's flat ``tf.TensorSpec`` list."""
        import tensorflow as tf

        converted = tuple(_map_leaves(part, lambda _, leaf: np.asarray(leaf), "") for part in batch)
        for spec, array in zip(flat_specs, tf.nest.flatten(converted), strict=True):
            self._check_shape(spec, array.shape, what)
        return converted

    def _check_shape(self, spec: Any, shape: tuple[int, ...], what: str) -> None:
        """A :class:`PreprocessError` when ``shape`` does not fit the dataset's ``tf.TensorSpec`` ``spec``."""
        if not spec.shape.is_compatible_with(shape):
            raise PreprocessError(
                f"{what} of epoch {self._epoch} gives {spec.name} the shape {shape}, "
                f"which does not fit the dataset's signature {spec.shape}. Pass "
                "output_signature=plan.probe.output_signature (axes that vary are None there) "
                "or pad that axis to a fixed length."
            )

    def _native_export(self, signature: Any) -> NativePadding | NativeShards | None:
        """How to make this feed's batches with TensorFlow ops for ``to_tf_dataset``; ``None``: in Python."""
        return None

    def _pass_elements(
        self,
        make: Callable[[int, int, int], tuple[Any, ...]],
        rows_log: list[tuple[int, int]] | None,
        adaptive: bool,
    ) -> Iterator[tuple[Any, ...]]:
        """One epoch's elements, ``make(lo, hi, batch)``: each batch whole, or (``adaptive``) in ``self.pieces``."""
        count = len(self)
        for i in range(count):
            lo, hi = self.batch_bounds(i)
            split = self._pieces if adaptive else 1
            pieces = min(split, hi - lo)
            cuts = np.linspace(lo, hi, pieces + 1).round().astype(np.int64)
            for j in range(pieces):
                element = make(int(cuts[j]), int(cuts[j + 1]), i)
                if rows_log is not None:
                    rows_log.append((int(cuts[j + 1] - cuts[j]), split))
                if i == count - 1 and j == pieces - 1:
                    # The epoch is complete once its last batch exists: advance now, not after the consumer asks
                    # for one more element (Keras stops at the known count and may never ask).
                    self.on_epoch_end()
                yield element

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n_samples={self.n_samples}, batch_size={self.batch_size}, batches={len(self)}, "
            f"shuffle={self.shuffle}, seed={self.seed}, drop_remainder={self.drop_remainder}, epoch={self._epoch})"
        )


_SHARD_ONLY = ("read_ahead", "index")
"""Feed options that only mean something to a streaming feed."""


def build_feed(
    x: Any,
    y: Any,
    *,
    strategy: str,
    in_memory: Callable[..., BaseFeed],
    stream: Callable[..., BaseFeed],
    options: dict[str, Any],
    validation_split: float | None,
    seed: int,
) -> BaseFeed | tuple[BaseFeed, BaseFeed]:
    """Dispatch ``x`` to the in-memory or the streaming feed class (what ``make_feed`` and its kin share).

    Raises:
        ConfigError: ``strategy`` is not one of ``"auto"``, ``"in_memory"``, ``"stream"``.
        DataError: ``x`` is of an unrecognized type, or a data function returns something else than ``(x, y)``.
    """
    import os
    import reprlib

    import pandas as pd

    from autobatch._data import InMemoryData, ShardSource
    from autobatch._loading import is_callable_spec, resolve_callable

    if strategy not in ("auto", "in_memory", "stream"):
        raise ConfigError(f'`strategy` must be "auto", "in_memory" or "stream". Received: strategy={strategy!r}')
    options = dict(options)
    if isinstance(x, (str, os.PathLike)) and is_callable_spec(str(x)):
        loaded = resolve_callable(str(x), what="data")()
        if not isinstance(loaded, tuple) or len(loaded) != 2:
            raise DataError(f"data function {str(x)!r} must return (x, y); it returned {type(loaded).__name__}.")
        x, y = loaded

    def drop_shard_only(where: str) -> None:
        ignored = [name for name in _SHARD_ONLY if name in options]
        if ignored:
            warnings.warn(f"{ignored} only apply to streamed shards and are ignored {where}.", stacklevel=3)
            for name in ignored:
                options.pop(name)

    feed: BaseFeed
    if isinstance(x, (str, os.PathLike, ShardSource)):
        if y is not None and not isinstance(y, (str, list, tuple)):
            raise DataError(
                f"with shard files as `x`, `y` must be the target column name(s). Received: y of type {type(y)}"
            )
        source = x if isinstance(x, ShardSource) else ShardSource.from_spec(x, y)
        if strategy == "in_memory":
            drop_shard_only("in memory")
            frames = [frame for _, frame in source.iter_frames()]
            frame = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
            target = source.target if source.target is None or isinstance(source.target, str) else list(source.target)
            feed = in_memory(frame, target, **options)
        else:
            feed = stream(source, y if isinstance(x, ShardSource) else None, **options)
    elif isinstance(x, (pd.DataFrame, pd.Series, np.ndarray, Mapping, tuple, list, InMemoryData)):
        if strategy == "stream":
            logger.info("the data is already in memory, so it is sliced in memory rather than streamed")
        drop_shard_only("for in-memory data")
        feed = in_memory(x, y, **options)
    else:
        raise DataError(
            f"Unrecognized data type: x={reprlib.repr(x)} (of type {type(x)}). Expected a pandas DataFrame, "
            "a numpy array, a dict/tuple of arrays, or a directory/glob/file of CSV or Parquet shards."
        )
    if validation_split is not None:
        return feed.split(validation_split, seed=seed)
    return feed
