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

With a :class:`~autobatch.PadColumns` ``preprocess``, :meth:`~autobatch.BaseFeed.to_tf_dataset`
reads each file once into flat values and row lengths in the epoch's row order
(``feeds.native``) and TensorFlow pads: a batch costs Python a few slices.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from autobatch._data import ShardInfo, ShardSource, read_parquet_columns, read_shard, shard_format, shard_info
from autobatch.errors import ConfigError, DataError
from autobatch.feeds.base import BackgroundReader, BaseFeed, RawBatch, check_fraction
from autobatch.padding import PadColumns

if TYPE_CHECKING:
    from autobatch.feeds.native import NativeShards, RaggedShard

logger = logging.getLogger(__name__)


class ShardIndex:
    """Columns and row counts of shard files, cached per path, size and modification time.

    One index is shared by a feed and the feeds split from it, so each CSV is
    counted once; a file that changed on disk is counted again.
    """

    def __init__(self) -> None:
        self._infos: dict[tuple[str, int, int], ShardInfo] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        with self._lock:
            return {"_infos": dict(self._infos)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._infos = state["_infos"]
        self._lock = threading.Lock()

    def info(self, path: Path) -> ShardInfo:
        """The :class:`ShardInfo` of ``path``, counted on first use."""
        try:
            stat = path.stat()
        except OSError:
            return shard_info(path)  # raises the DataError naming the file
        key = (str(path.resolve()), int(stat.st_size), int(stat.st_mtime_ns))
        with self._lock:
            cached = self._infos.get(key)
        if cached is None:
            cached = shard_info(path)
            with self._lock:
                self._infos[key] = cached
        return cached


@dataclasses.dataclass(frozen=True, eq=False)
class _LoadedShard:
    """One shard read into memory, split into inputs, targets and weights, with this epoch's row order."""

    path: Path
    x: pd.DataFrame
    y: pd.Series | pd.DataFrame | None
    sample_weight: np.ndarray | None
    order: np.ndarray | None
    """Row order within the shard for this epoch (``None``: file order)."""


def shard_row(path: Path, row: int) -> str:
    """How messages name row ``row`` of a shard file."""
    return f"row {row} of shard {str(path)!r} (0-based, not counting the header)"


def _concat(parts: list[Any]) -> Any:
    if parts[0] is None:
        return None
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], (pd.DataFrame, pd.Series)):
        return pd.concat(parts, ignore_index=True)
    return np.concatenate(parts)



def open_shards(
    source: str | os.PathLike[str] | ShardSource,
    target: str | Sequence[str] | None,
    index: ShardIndex | None,
    sample_weight: str | None = None,
) -> tuple[ShardSource, ShardIndex, tuple[ShardInfo, ...]]:
    """The shard source (with ``target``), the row-count index, and each file's :class:`ShardInfo`.

    Raises:
        DataError: a shard's columns differ from the first one's (naming the file and the columns), the
            target or weight columns are missing, or no input column remains.
    """
    resolved = source if isinstance(source, ShardSource) else ShardSource.from_spec(source, target)
    if isinstance(source, ShardSource) and target is not None:
        resolved = dataclasses.replace(resolved, target=target if isinstance(target, str) else tuple(target))
    index = index if index is not None else ShardIndex()
    shards = tuple(index.info(path) for path in resolved.files)
    wanted = list(target_names(resolved)) + ([sample_weight] if sample_weight is not None else [])
    _check_columns(shards, wanted)
    return resolved, index, shards


def target_names(source: ShardSource) -> tuple[str, ...]:
    """The target column name(s) of ``source``."""
    if source.target is None:
        return ()
    return (source.target,) if isinstance(source.target, str) else tuple(source.target)


def _check_columns(shards: Sequence[ShardInfo], wanted: Sequence[str]) -> None:
    first = shards[0]
    for shard in shards[1:]:
        if shard.columns != first.columns:
            missing = [c for c in first.columns if c not in shard.columns]
            extra = [c for c in shard.columns if c not in first.columns]
            raise DataError(
                f"shard {str(shard.path)!r} has columns {list(shard.columns)}, but the first shard "
                f"{str(first.path)!r} has {list(first.columns)} (missing: {missing}, unexpected: {extra}). "
                "All shards must share one schema: fix or remove that file."
            )
    missing = [name for name in wanted if name not in first.columns]
    if missing:
        raise DataError(
            f"column(s) {missing} not found in shard {str(first.path)!r}, whose columns are {list(first.columns)}. "
            "Pass the right `target`/`sample_weight` column name(s)."
        )
    if not [c for c in first.columns if c not in wanted]:
        raise DataError(
            f"every column of shard {str(first.path)!r} ({list(first.columns)}) is a target or weight column, "
            "so no inputs remain. Name only the target column(s) in `target`."
        )


def hold_out_shards(
    shards: Sequence[ShardInfo], validation_split: float, seed: int
) -> tuple[list[Path], list[Path]]:
    """``(train_files, validation_files)``: whole shards, about ``validation_split`` of the rows held out.

    Shards are drawn in a random order fixed by ``seed`` and held out while that
    brings the held-out rows closer to the fraction; each side gets at least one.

    Raises:
        ConfigError: the fraction is out of range, or there is only one shard.
    """
    fraction = check_fraction(validation_split)
    n_files = len(shards)
    if n_files < 2:
        raise ConfigError(
            f"a streaming validation split holds out whole shards, so it needs at least 2; received 1 shard "
            f"({str(shards[0].path)!r}). Write more, smaller shards or load the data in memory."
        )
    counts = np.array([s.n_rows for s in shards], dtype=np.int64)
    chosen = np.random.default_rng([seed, 1]).permutation(n_files)
    held = np.cumsum(counts[chosen])
    # Number of held-out shards whose rows come closest to the target, leaving both sides non-empty.
    k = 1 + int(np.argmin(np.abs(held[: n_files - 1] - fraction * counts.sum())))
    val_set = set(chosen[:k].tolist())
    val_rows = int(held[k - 1])
    logger.info(
        "validation split: %d shard(s) (%d rows, %.1f%%) held out of %d", k, val_rows, 100 * val_rows / counts.sum(),
        n_files,
    )
    val_files = [s.path for i, s in enumerate(shards) if i in val_set]
    train_files = [s.path for i, s in enumerate(shards) if i not in val_set]
    return train_files, val_files


class ShardFeed(BaseFeed):
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
        self.source, self._index, self.shards = open_shards(source, target, index, sample_weight)
        self.read_ahead = read_ahead
        self.sample_weight = sample_weight
        self._counts = np.array([s.n_rows for s in self.shards], dtype=np.int64)
        if self.drop_remainder and self.n_samples < self.batch_size:
            raise ConfigError(
                f"drop_remainder=True with batch_size={self.batch_size} leaves no batch of the {self.n_samples} rows "
                f"in {len(self.shards)} shard(s). Lower the batch size or keep the remainder."
            )

    def _target_names(self) -> tuple[str, ...]:
        return target_names(self.source)

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

    @property
    def n_samples(self) -> int:
        return int(self._counts.sum())

    @property
    def files(self) -> tuple[Path, ...]:
        """The shard files, in numeric order."""
        return tuple(s.path for s in self.shards)

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

    def _read_frame(self, shard: ShardInfo) -> pd.DataFrame:
        """Read one shard's rows (a seam for tests that exercise the batch cutting without files)."""
        return read_shard(shard.path, columns=list(self.shards[0].columns))

    def _read_table(self, shard: ShardInfo, columns: Sequence[str]) -> Any:
        """``columns`` of a Parquet shard as a ``pyarrow.Table`` for a native export; ``None`` for CSV (pandas)."""
        return read_parquet_columns(shard.path, columns) if shard_format(shard.path) == "parquet" else None

    def _check_rows(self, shard: ShardInfo, n_rows: int) -> None:
        if n_rows != shard.n_rows:
            raise DataError(
                f"shard {str(shard.path)!r} has {n_rows} rows now, but {shard.n_rows} were counted when the feed "
                "was made: the file changed (or pandas and pyarrow parse it differently). Re-create the feed."
            )

    def _row_order(self, file_index: int, epoch: int) -> np.ndarray | None:
        """Row order within shard ``file_index`` for ``epoch`` (``None``: file order)."""
        if not self.shuffle:
            return None
        return np.random.default_rng([self.seed, epoch, 1, file_index]).permutation(self.shards[file_index].n_rows)

    def _load_native(self, file_index: int, epoch: int) -> RaggedShard:
        from autobatch.feeds import native

        shard = self.shards[file_index]
        loaded = native.ragged_shard(self, self.preprocess, shard, self._row_order(file_index, epoch))
        logger.debug(
            "loaded shard %s (%d rows, %d bytes) for epoch %d natively", shard.path, shard.n_rows, loaded.nbytes, epoch
        )
        return loaded

    def _load(self, file_index: int, epoch: int) -> _LoadedShard:
        shard = self.shards[file_index]
        frame = self._read_frame(shard)
        self._check_rows(shard, len(frame))
        targets = list(self._target_names())
        y: pd.Series | pd.DataFrame | None = None
        if targets:
            y = frame[targets[0]] if isinstance(self.source.target, str) else frame[targets]
        weights = None
        if self.sample_weight is not None:
            weights = frame[self.sample_weight].to_numpy(dtype=np.float32)
        dropped = targets + ([self.sample_weight] if self.sample_weight is not None else [])
        x = frame.drop(columns=dropped) if dropped else frame
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
        return RawBatch(_concat(xs), _concat(ys), _concat(ws), where, origin=origin)

    def _native_export(self, signature: Any) -> NativeShards | None:
        """With a :class:`~autobatch.PadColumns` ``preprocess``, TensorFlow pads the batches (see ``feeds.native``)."""
        from autobatch.feeds import native

        if not isinstance(self.preprocess, PadColumns):
            return None
        return native.NativeShards.export(self, self.preprocess, signature)

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

    def split(self, validation_split: float, *, seed: int | None = None) -> tuple[ShardFeed, ShardFeed]:
        """Hold out whole shards, about ``validation_split`` of the rows, as a validation feed.

        Shards are drawn in a random order fixed by ``seed`` (default: the feed's)
        and held out while that brings the held-out rows closer to the fraction;
        at least one shard goes to each side. No file is in both feeds, so no
        row leaks between them. The validation feed reads in file order and never shuffles.

        Args:
            validation_split: fraction of the rows to hold out, in (0, 1).
            seed: seed of the draw.

        Returns:
            ``(train_feed, validation_feed)``.

        Raises:
            ConfigError: the fraction is out of range, or there is only one shard.
        """
        train_files, val_files = hold_out_shards(self.shards, validation_split, self.seed if seed is None else seed)
        return self._derive(train_files), self._derive(val_files, shuffle=False, drop_remainder=False)

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", shards={len(self.shards)}, read_ahead={self.read_ahead})"
