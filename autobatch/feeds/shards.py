"""Shard streaming: batches cut across CSV/Parquet files, with a bounded number of files in memory.

The epoch is one long, virtual sequence of rows: the shard files in this epoch's
order (shuffled per epoch), each file's rows in this epoch's order (shuffled
within the file, which is the bounded shuffle buffer). Batch ``i`` is positions
``[i·b, (i+1)·b)`` of that sequence, so batches run across file boundaries (a
file's leftover rows open the next batch), ``len(feed)`` is exact from the row
counts, and every row is served exactly once per epoch.

Batch ``i`` is found from the cumulative row counts (a binary search), so any
index can be served at any time: random access reads the file(s) holding it.
Read in order, as Keras does with ``workers=1`` and ``fit(..., shuffle=False)``,
the next ``read_ahead`` files load in a background thread while the current one
is cut into batches, so reading overlaps training. Loaded files sit in a small
cache of the files the current batch needs plus the read-ahead (plus one per
extra Keras worker): memory is about ``(1 + read_ahead)`` files, whatever the
number of shards.

With a :class:`~autobatch.PadColumns` ``preprocess``, :meth:`~autobatch.feeds.BaseFeed.to_tf_dataset`
reads each file once into flat values and row lengths in the epoch's row order
(``feeds.native``) and TensorFlow pads: a batch costs Python a few slices.

The files, their schema and row counts, and the validation split by whole files
are ``feeds.shard_set``'s.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import os
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from autobatch._data import ShardSource
from autobatch.errors import ConfigError
from autobatch.feeds.base import RawBatch
from autobatch.feeds.native.shards import NativeShards, RaggedShard, ragged_shard
from autobatch.feeds.read_ahead import BackgroundReader
from autobatch.feeds.shard_set import ShardIndex, ShardSourced, concat_rows, shard_row
from autobatch.padding import PadColumns

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, eq=False)
class _LoadedShard:
    """One shard read into memory, split into inputs, targets and weights, with this epoch's row order."""

    path: Path
    x: pd.DataFrame
    y: pd.Series | pd.DataFrame | None
    sample_weight: np.ndarray | None
    order: np.ndarray | None
    """Row order within the shard for this epoch (``None``: file order)."""


class ShardFeed(ShardSourced):
    """Batches streamed from CSV or Parquet shard files, every row exactly once per epoch.

    Args:
        source: a directory of shards (``0.csv … N.csv``, in numeric order), a
            glob, one file, or a :class:`~autobatch._data.ShardSource`.
        target: the target column name(s), split off each batch as ``batch_y``;
            ``None`` if ``preprocess`` builds targets itself from ``batch_x``.
        batch_size: rows per batch; the last batch of an epoch may be smaller.
        preprocess: ``preprocess(batch_x, batch_y) -> (inputs, targets)`` on a
            DataFrame of the batch's rows (target columns removed).
        shuffle: shuffle the file order and the rows within each file, anew every epoch.
        seed: seed of the shuffle.
        drop_remainder: drop the last, smaller batch of each epoch.
        sample_weight: a column holding per-row weights, returned as the third element.
        read_ahead: files loaded in the background ahead of the current one.
        output_signature, max_batch_bytes, nan_policy, workers, use_multiprocessing, max_queue_size:
            as for :class:`~autobatch.feeds.InMemoryFeed`.

    Raises:
        DataError: the path is missing or matches no shards; a shard is empty,
            unparseable, or its columns differ from the first shard's; the target
            or weight column is missing. Every message names the file.
        ConfigError: an option is out of range.

    Example:
        >>> feed = ShardFeed("data/csv", "label", batch_size=256, preprocess=pad)
        >>> model.fit(feed, epochs=3, shuffle=False)  # the feed shuffles; keep Keras reading in order
    """

    def __init__(
        self,
        source: str | os.PathLike[str] | ShardSource,
        target: str | Sequence[str] | None = None,
        *,
        batch_size: int,
        sample_weight: str | None = None,
        read_ahead: int = 1,
        index: ShardIndex | None = None,
        **options: Any,
    ) -> None:
        super().__init__(batch_size=batch_size, **options)
        if isinstance(read_ahead, bool) or not isinstance(read_ahead, int) or read_ahead < 0:
            raise ConfigError(
                f"`read_ahead` must be an int >= 0 (files loaded ahead). Received: read_ahead={read_ahead!r}"
            )
        self._open_shards(source, target, index=index, sample_weight=sample_weight, read_ahead=read_ahead)
        if self.drop_remainder and self.n_samples < self.batch_size:
            raise ConfigError(
                f"drop_remainder=True with batch_size={self.batch_size} leaves no batch of the {self.n_samples} rows "
                f"in {len(self.shards)} shard(s). Lower the batch size or keep the remainder."
            )

    # ------------------------------------------------------------------ runtime state

    def _runtime_keys(self) -> tuple[str, ...]:
        return (*super()._runtime_keys(), "_cache", "_reader", "_last_index", "_loads", "_warned_reread", "_layout")

    def _init_runtime(self) -> None:
        super()._init_runtime()
        # Keyed (epoch, file index, for a native export): a shard read for tf.data's padding and one for feed[i].
        self._cache: OrderedDict[tuple[int, int, bool], concurrent.futures.Future[Any]] = OrderedDict()
        self._reader = BackgroundReader(self, "autobatch-shards")
        self._last_index: int | None = None
        self._loads: dict[tuple[int, int, bool], int] = {}
        self._warned_reread = False
        self._layout: tuple[int, np.ndarray, np.ndarray] | None = None

    def close(self) -> None:
        """Drop the loaded shards and stop the background reader (a later batch restarts it)."""
        with self._lock:
            cache, self._cache = self._cache, OrderedDict()
        for future in cache.values():
            future.cancel()
        self._reader.stop()

    # ------------------------------------------------------------------ epochs

    def _epoch_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """This epoch's file order and where each file starts in the epoch's row sequence."""
        cached = self._layout
        if cached is not None and cached[0] == epoch:
            return cached[1], cached[2]
        n_files = len(self.shards)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch, 0]).permutation(n_files)
        else:
            order = np.arange(n_files)
        starts = np.concatenate([[0], np.cumsum(self._counts[order])])
        self._layout = (epoch, order, starts)
        return order, starts

    @property
    def resident_files(self) -> list[Path]:
        """Shards held in memory or being read now, least recently used first (for diagnostics)."""
        with self._lock:
            keys = list(self._cache)
        return [self.shards[key[1]].path for key in keys]

    def epoch_files(self) -> list[Path]:
        """The shard files in the current epoch's order."""
        order, _ = self._epoch_layout(self._epoch)
        return [self.shards[k].path for k in order]

    def on_epoch_end(self) -> None:
        """Advance to the next epoch's shuffle and release this epoch's loaded shards.

        Keras calls this after every epoch (and once as ``fit`` starts).
        """
        super().on_epoch_end()
        with self._lock:
            cache, self._cache = self._cache, OrderedDict()
            self._last_index = None
            self._loads.clear()
        for future in cache.values():
            future.cancel()

    # ------------------------------------------------------------------ loading

    def _row_order(self, file_index: int, epoch: int) -> np.ndarray | None:
        """Row order within shard ``file_index`` for ``epoch`` (``None``: file order)."""
        if not self.shuffle:
            return None
        return np.random.default_rng([self.seed, epoch, 1, file_index]).permutation(self.shards[file_index].n_rows)

    def _load_native(self, file_index: int, epoch: int) -> RaggedShard:
        shard = self.shards[file_index]
        order = self._row_order(file_index, epoch)
        loaded = ragged_shard(self, self.preprocess, shard, order, file_row=functools.partial(shard_row, shard.path))
        logger.debug(
            "loaded shard %s (%d rows, %d bytes) for epoch %d natively", shard.path, shard.n_rows, loaded.nbytes, epoch
        )
        return loaded

    def _load(self, file_index: int, epoch: int) -> _LoadedShard:
        shard = self.shards[file_index]
        x, y, weights = self._read_parts(shard)
        order = self._row_order(file_index, epoch)
        logger.debug("loaded shard %s (%d rows) for epoch %d", shard.path, shard.n_rows, epoch)
        return _LoadedShard(shard.path, x, y, weights, order)

    def _fetch(
        self, slots: range, prefetch: range, epoch: int, order: np.ndarray, *, sequential: bool, native: bool
    ) -> list[Any]:
        """The loaded shards at ``slots`` of the epoch's file order, loading ``prefetch`` slots in the background.

        Read in order, a finished shard is released at once; read out of order,
        up to ``read_ahead`` recently used shards stay, as the next batch may need them.
        ``native``: read as :class:`~autobatch.feeds.native.RaggedShard` for a native export.
        """
        load = self._load_native if native else self._load
        keys = [(epoch, int(order[s]), native) for s in slots]
        ahead = [(epoch, int(order[s]), native) for s in prefetch]
        with self._lock:
            pool = self._reader.pool()
            rereads = []
            for key in keys + ahead:
                if key not in self._cache:
                    if key in self._loads:
                        rereads.append(key)
                    self._loads[key] = self._loads.get(key, 0) + 1
                    self._cache[key] = pool.submit(load, key[1], epoch)
                self._cache.move_to_end(key)
            # Keep what this batch needs and the read-ahead, plus one recent shard per extra worker (its
            # neighbouring batch may still need it); evict the least recently used beyond that.
            capacity = len(keys) + (len(ahead) if sequential else self.read_ahead) + max(self._workers, 1) - 1
            protected = set(keys) | set(ahead)
            for key in list(self._cache):
                if len(self._cache) <= capacity:
                    break
                if key not in protected:
                    self._cache.pop(key).cancel()
            futures = [self._cache[key] for key in keys]
            warn = bool(rereads) and not self._warned_reread
            if warn:
                self._warned_reread = True
        if warn:
            warnings.warn(
                f"ShardFeed read shard {str(self.shards[rereads[0][1]].path)!r} twice in epoch {epoch}: batches are "
                "requested out of order (Keras `fit` shuffles batch order unless shuffle=False), so files are re-read. "
                "Pass shuffle=False to model.fit: the feed already shuffles files and rows every epoch.",
                stacklevel=4,
            )
        loaded = []
        for key, future in zip(keys, futures, strict=True):
            try:
                loaded.append(future.result())
            except concurrent.futures.CancelledError:
                loaded.append(load(key[1], epoch))  # evicted by a concurrent batch; read it here
            except BaseException:
                with self._lock:
                    if self._cache.get(key) is future:
                        del self._cache[key]  # a later request retries (and fails again, loudly)
                raise
        return loaded

    def _batch_parts(
        self, lo: int, hi: int, index: int, *, native: bool = False
    ) -> tuple[list[tuple[Any, int, int]], str, Callable[[int], str]]:
        """The loaded shards holding rows ``[lo, hi)`` of the epoch, each with the positions ``[a, b)`` of its rows
        in this epoch's order within the file; where they came from, and where row ``p`` of the batch came from."""
        epoch = self._epoch
        order, starts = self._epoch_layout(epoch)
        first = int(np.searchsorted(starts, lo, side="right")) - 1
        last = int(np.searchsorted(starts, hi - 1, side="right")) - 1
        with self._lock:
            previous, self._last_index = self._last_index, index
            if index == 0:
                self._loads.clear()  # a new pass over the epoch reads every shard again, legitimately
        # In-order reading (0, 1, 2, … also with a few concurrent workers) is worth reading ahead for.
        sequential = index == 0 or (previous is not None and 0 < index - previous <= max(self._workers, 1))
        ahead = range(last + 1, min(last + 1 + self.read_ahead, len(order))) if sequential else range(0)
        loaded = self._fetch(range(first, last + 1), ahead, epoch, order, sequential=sequential, native=native)
        pieces: list[tuple[Any, int, int]] = []
        segments: list[tuple[int, Path, int, np.ndarray | None]] = []  # (first position in the batch, file, a, order)
        position = 0
        for slot, shard in zip(range(first, last + 1), loaded, strict=True):
            a = max(lo, int(starts[slot])) - int(starts[slot])
            b = min(hi, int(starts[slot + 1])) - int(starts[slot])
            pieces.append((shard, a, b))
            segments.append((position, shard.path, a, shard.order))
            position += b - a
        names = ", ".join(repr(str(s.path)) for s in loaded)
        where = f"from shard {names}" if len(loaded) == 1 else f"from shards {names}"

        def origin(p: int) -> str:
            start, path, a, rows = next(seg for seg in reversed(segments) if seg[0] <= p)
            return shard_row(path, a + p - start if rows is None else int(rows[a + p - start]))

        return pieces, where, origin

    def _rows(self, lo: int, hi: int, index: int) -> RawBatch:
        parts, where, origin = self._batch_parts(lo, hi, index)
        pieces = [(shard, shard.order[a:b] if shard.order is not None else slice(a, b)) for shard, a, b in parts]
        xs = [shard.x.iloc[rows] for shard, rows in pieces]
        ys = [shard.y.iloc[rows] if shard.y is not None else None for shard, rows in pieces]
        ws = [shard.sample_weight[rows] if shard.sample_weight is not None else None for shard, rows in pieces]
        return RawBatch(concat_rows(xs), concat_rows(ys), concat_rows(ws), where, origin=origin)

    def _native_export(self, signature: Any) -> NativeShards | None:
        """With a :class:`~autobatch.PadColumns` ``preprocess``, TensorFlow pads the batches (see ``feeds.native``)."""
        if not isinstance(self.preprocess, PadColumns):
            return None
        return NativeShards.export(self, self.preprocess, signature)

    # ------------------------------------------------------------------ splitting

    def _derive(self, files: Sequence[Path], **overrides: Any) -> ShardFeed:
        source = dataclasses.replace(self.source, files=tuple(files))
        options = {**self._options(), **overrides}
        return ShardFeed(
            source,
            sample_weight=self.sample_weight,
            read_ahead=self.read_ahead,
            index=self._index,
            **options,
        )

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", shards={len(self.shards)}, read_ahead={self.read_ahead})"
