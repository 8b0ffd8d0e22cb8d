"""The small base every feed shares: batch index math, the preprocess call, epochs, and the dispatch on data type.

A feed is a ``keras.utils.PyDataset``: ``len(feed)`` batches per epoch, batch
``i`` by ``feed[i]``, reshuffled in ``on_epoch_end``. Subclasses say how many
samples there are and how to fetch rows ``[lo, hi)`` of the current epoch's
order; the base cuts the epoch into batches, runs ``preprocess`` and checks the
result (:class:`~autobatch.feeds.checks.BatchChecks`). Every feed also exports to
``tf.data`` (:class:`~autobatch.feeds.export.TfDataExport`).

Resume semantics: a feed serves epoch ``feed.epoch`` and moves to the next one
only when the last batch of the epoch has been produced (``on_epoch_end``, which
Keras calls for a ``PyDataset`` and :meth:`BaseFeed.to_tf_dataset` calls itself).
A pass that stops early (an exception, ``KeyboardInterrupt``) leaves the epoch as
it was, so the next pass serves the same epoch from its first batch, in the same
order: every sample exactly once in that pass.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import keras
import numpy as np

from autobatch._preprocess import Preprocess, _resolve_preprocess
from autobatch._result import TensorSpec
from autobatch.errors import AutobatchError, ConfigError, DataError, PreprocessError
from autobatch.feeds.checks import BatchChecks, FeedStats, NanPolicy, _check_batch_size, _check_nan_policy
from autobatch.feeds.export import TfDataExport
from autobatch.padding import count_truncations

logger = logging.getLogger(__name__)


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


def check_fraction(validation_split: float) -> float:
    """Validate a validation fraction in (0, 1)."""
    number = isinstance(validation_split, (int, float)) and not isinstance(validation_split, bool)
    if not number or not 0 < validation_split < 1:
        raise ConfigError(
            "`validation_split` must be a fraction strictly between 0 and 1. "
            f"Received: validation_split={validation_split!r}"
        )
    return float(validation_split)


def checked_index(index: int, count: int) -> int:
    """``index`` among ``count`` batches, a negative one counted from the end.

    Raises:
        IndexError: ``index`` is outside ``range(count)`` (after counting from the end).
    """
    if index < 0:
        index += count
    if not 0 <= index < count:
        raise IndexError(f"batch index {index} is out of range for a feed of {count} batches.")
    return index


class BaseFeed(BatchChecks, TfDataExport, keras.utils.PyDataset):
    """A batched, shuffled, preprocessed view of a dataset, for ``model.fit``.

    Subclasses implement :attr:`n_samples`, :meth:`_rows` and :meth:`_options`.
    """

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
        lo = checked_index(index, len(self)) * self.batch_size
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

    def _call_preprocess(self, raw: RawBatch) -> Any:
        """``preprocess`` on one batch's rows (a size-aware feed also pads to the batch's bucket)."""
        return self.preprocess(raw.x, raw.y)

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
    strategy: str | None,
    in_memory: Callable[..., BaseFeed],
    stream: Callable[..., BaseFeed],
    options: dict[str, Any],
    validation_split: float | None,
    seed: int,
) -> BaseFeed | tuple[BaseFeed, BaseFeed]:
    """Dispatch ``x`` to the in-memory or the streaming feed class (what ``make_feed`` and its kin share).

    ``strategy=None`` is ``"auto"``.

    Raises:
        ConfigError: ``strategy`` is not one of ``"auto"``, ``"in_memory"``, ``"stream"``.
        DataError: ``x`` is of an unrecognized type, or a data function returns something else than ``(x, y)``.
    """
    import os
    import reprlib

    import pandas as pd

    from autobatch._data import InMemoryData, ShardSource
    from autobatch._loading import is_callable_spec, resolve_callable

    strategy = "auto" if strategy is None else strategy
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
