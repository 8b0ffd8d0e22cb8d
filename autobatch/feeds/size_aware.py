"""Size-aware feeds: samples grouped by length bucket, each bucket with its own batch size.

Every epoch, each bucket's samples are shuffled and cut into batches of that
bucket's size (its last batch may be smaller), and the batches of all buckets
are shuffled together: every sample exactly once per epoch, short batches large
and long batches small, each padded to its bucket's boundary so at most one
padded shape per bucket reaches the model (bounded retracing).

The padding to the boundary: ``preprocess(batch_x, batch_y)`` runs on the
batch's rows as usual; when it takes a ``maxlen`` keyword it is called with
``maxlen=boundary`` (pad exactly there, e.g. ``pad_columns(..., maxlen=maxlen)``),
and either way the feed then pads the padded axis (axis 1) of each sequence
array it returns with zeros after the values up to the boundary. Which arrays
are padded: those the probe found varying along axis 1 (``variable_leaves``,
from ``plan.probe.output_signature``), else the outputs named like the sequence
columns.

- :class:`SizeAwareFeed` holds the data in memory.
- :class:`SizeAwareShardFeed` streams shard files: a sample's lengths are read
  once up front (only the sequence columns), each epoch the files are visited in a
  shuffled order and every bucket collects rows across files until its batch is
  full, so memory stays at about one shard plus less than one batch per bucket.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from autobatch._data import ShardSource, read_shard
from autobatch._lengths import (
    LengthFn,
    accepts_maxlen,
    fit_length,
    resolve_sequence_columns,
    sample_lengths,
    shard_lengths,
)
from autobatch.errors import ConfigError, DataError
from autobatch.feeds.base import BackgroundReader, BaseFeed, RawBatch, build_feed
from autobatch.feeds.in_memory import InMemoryFeed
from autobatch.feeds.shards import ShardIndex, _concat, hold_out_shards, open_shards, shard_row, target_names

logger = logging.getLogger(__name__)

NO_DROP_REMAINDER = "a size-aware feed serves every sample once per epoch: drop_remainder=True is not supported."


def _check_buckets(boundaries: Sequence[int], batch_sizes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    bounds = np.asarray(list(boundaries), dtype=np.int64)
    sizes = np.asarray(list(batch_sizes), dtype=np.int64)
    if bounds.ndim != 1 or not len(bounds) or (bounds < 1).any() or (np.diff(bounds) <= 0).any():
        raise ConfigError(f"`boundaries` must be strictly increasing positive ints. Received: {list(boundaries)}")
    if sizes.shape != bounds.shape or (sizes < 1).any():
        raise ConfigError(
            f"`batch_sizes` must hold one positive batch size per boundary ({len(bounds)}). "
            f"Received: {list(batch_sizes)}"
        )
    return bounds, sizes


def assign_buckets(
    lengths: np.ndarray, boundaries: np.ndarray, batch_sizes: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each sample's bucket index, and the boundaries and batch sizes (with an overflow bucket if needed).

    Samples longer than the last boundary (data the plan did not see, such as a
    validation set) go to one more bucket, padded to their longest length, with
    a batch holding no more padded tokens than the last planned bucket's.
    """
    longest = int(lengths.max()) if len(lengths) else 0
    if longest > boundaries[-1]:
        last = max(int(batch_sizes[-1] * boundaries[-1] // longest), 1)
        logger.warning(
            "%d sample(s) are longer than the last bucket boundary %d (up to %d): they form one more bucket, "
            "padded to %d, at batch %d (as many padded positions as the last bucket's batch)",
            int((lengths > boundaries[-1]).sum()),
            int(boundaries[-1]),
            longest,
            longest,
            last,
        )
        boundaries = np.append(boundaries, longest)
        batch_sizes = np.append(batch_sizes, last)
    return np.searchsorted(boundaries, lengths, side="left"), boundaries, batch_sizes


def epoch_batches(
    bucket_of: np.ndarray, batch_sizes: np.ndarray, *, seed: int, epoch: int, shuffle: bool
) -> list[tuple[int, np.ndarray]]:
    """One epoch's batches as ``(bucket, positions)``: every position once, buckets cut then interleaved.

    Positions index ``bucket_of``. With ``shuffle`` each bucket's positions are
    permuted, then the batches of all buckets are permuted, both from
    ``(seed, epoch)``; without it buckets come in order, positions ascending.
    """
    batches: list[tuple[int, np.ndarray]] = []
    for k, size in enumerate(batch_sizes.tolist()):
        members = np.flatnonzero(bucket_of == k)
        if shuffle:
            members = members[np.random.default_rng([seed, epoch, 2, k]).permutation(len(members))]
        batches += [(k, members[i : i + size]) for i in range(0, len(members), size)]
    if shuffle:
        order = np.random.default_rng([seed, epoch, 3]).permutation(len(batches))
        batches = [batches[i] for i in order]
    return batches


class _BucketPadding:
    """Calls ``preprocess`` for one batch and pads its sequence arrays to the batch's bucket boundary."""

    def __init__(self, variable: Sequence[str] | None, sequence_columns: Sequence[str]) -> None:
        self.variable = frozenset(variable) if variable else None
        self.sequence_columns = tuple(sequence_columns)

    def leaves(self) -> frozenset[str]:
        """The arrays to pad: the probe's varying ones, else those named like a sequence column."""
        if self.variable is not None:
            return self.variable
        names = set(self.sequence_columns)
        return frozenset(f"x/{name}" for name in names)

    def __call__(self, preprocess: Callable[..., Any], raw: RawBatch) -> Any:
        if raw.pad_to is None:
            return preprocess(raw.x, raw.y)
        if accepts_maxlen(preprocess):
            result = preprocess(raw.x, raw.y, maxlen=raw.pad_to)
        else:
            result = preprocess(raw.x, raw.y)
        if not isinstance(result, tuple) or len(result) != 2:
            return result  # the base names what is wrong
        inputs, targets = result
        variable = self.leaves()
        # Wider than the boundary (a preprocess padding to its own bucket): only padding can lie beyond it, as
        # no sample of the bucket is longer; drop it, so the batch is the shape the plan measured.
        return (
            fit_length(inputs, raw.pad_to, variable, "x", cut="padding"),
            fit_length(targets, raw.pad_to, variable, "y", cut="padding"),
        )


class SizeAwareFeed(InMemoryFeed):
    """In-memory batches grouped by length bucket, each bucket at its own batch size, every sample once per epoch.

    Args:
        x: a DataFrame, or a dict of columns (with ``length_fn``: anything ``InMemoryFeed`` takes).
        y: targets, or the target column name(s).
        boundaries: the buckets' upper lengths (inclusive), ascending: bucket ``k``
            holds lengths ``boundaries[k-1]+1 … boundaries[k]`` and is padded to ``boundaries[k]``.
        batch_sizes: one batch size per bucket (``plan.batch_sizes``).
        sequence_columns: the columns whose longest sequence is a sample's length (default: detected).
        length_fn: ``length_fn(x) -> lengths`` instead of reading columns.
        lengths: precomputed lengths, one per row (skips the computation).
        variable_leaves: the preprocessed arrays to pad to the boundary (``x/in1``...);
            default: those ``output_signature`` marks as varying on axis 1, else ``x/<sequence column>``.
        sample_weight, preprocess, shuffle, seed, output_signature, nan_policy, workers,
            use_multiprocessing, max_queue_size: as for :class:`~autobatch.feeds.InMemoryFeed`.

    Raises:
        ConfigError: the buckets are malformed, or ``drop_remainder=True`` (every sample is served).
        DataError: the data is bad, or no sample length can be found.

    Example:
        >>> feed = SizeAwareFeed(df, "label", boundaries=[64, 256, 1024], batch_sizes=[512, 128, 32], preprocess=pad)
        >>> model.fit(feed.to_tf_dataset(plan.probe.output_signature), epochs=3)
    """

    _steps_fixed = False  # the buckets' batches per epoch vary with the shuffle

    def __init__(
        self,
        x: Any,
        y: Any = None,
        *,
        boundaries: Sequence[int],
        batch_sizes: Sequence[int],
        sequence_columns: Sequence[str] | None = None,
        length_fn: LengthFn | None = None,
        lengths: np.ndarray | None = None,
        variable_leaves: Sequence[str] | None = None,
        **options: Any,
    ) -> None:
        bounds, sizes = _check_buckets(boundaries, batch_sizes)
        if options.pop("drop_remainder", False):
            raise ConfigError(NO_DROP_REMAINDER)
        options.pop("batch_size", None)
        options.pop("max_batch_bytes", None)  # the probe's worst case is per fixed batch, not per bucket
        super().__init__(x, y, batch_size=int(sizes.max()), **options)
        columns = () if length_fn is not None else resolve_sequence_columns(self.data.x, sequence_columns)
        if lengths is None:
            lengths = sample_lengths(self.data.x, sequence_columns=columns or None, length_fn=length_fn)
        lengths = np.asarray(lengths, dtype=np.int64)
        if lengths.shape != (self.data.n_samples,):
            n = self.data.n_samples
            raise ConfigError(f"`lengths` must hold one length per row ({n}). Received: shape {lengths.shape}")
        self.lengths = lengths
        self.sequence_columns = columns
        self._bucket_of, self.boundaries, self.batch_sizes = assign_buckets(lengths, bounds, sizes)
        self.batch_size = int(self.batch_sizes.max())
        if variable_leaves is None and self.output_signature is not None:
            variable_leaves = [s.name for s in self.output_signature if len(s.shape) >= 2 and s.shape[1] is None]
        self._padding = _BucketPadding(variable_leaves, columns)

    @classmethod
    def _subset(cls, parent: InMemoryFeed, indices: np.ndarray, **overrides: Any) -> InMemoryFeed:
        if not isinstance(parent, SizeAwareFeed):
            raise TypeError(f"SizeAwareFeed._subset needs a SizeAwareFeed parent, not {type(parent).__name__}")
        feed = super()._subset(parent, indices, **overrides)
        for name in ("lengths", "sequence_columns", "_bucket_of", "boundaries", "batch_sizes", "_padding"):
            setattr(feed, name, getattr(parent, name))
        feed.batch_size = parent.batch_size
        return feed

    # ------------------------------------------------------------------ epochs

    def _runtime_keys(self) -> tuple[str, ...]:
        return (*super()._runtime_keys(), "_layout")

    def _init_runtime(self) -> None:
        super()._init_runtime()
        self._layout: tuple[int, np.ndarray, np.ndarray, np.ndarray] | None = None

    def _epoch_layout(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This epoch's row order, where each batch starts in it, and each batch's bucket."""
        cached = self._layout
        if cached is not None and cached[0] == self._epoch:
            return cached[1], cached[2], cached[3]
        epoch = self._epoch
        batches = epoch_batches(
            self._bucket_of[self._indices], self.batch_sizes, seed=self.seed, epoch=epoch, shuffle=self.shuffle
        )
        order = self._indices[np.concatenate([p for _, p in batches])] if batches else self._indices[:0]
        starts = np.concatenate([[0], np.cumsum([len(p) for _, p in batches])]).astype(np.int64)
        buckets = np.array([k for k, _ in batches], dtype=np.int64)
        self._layout = (epoch, order, starts, buckets)
        return order, starts, buckets

    def epoch_order(self) -> np.ndarray:
        """Row indices (into the data) in the current epoch's order, batch after batch."""
        return self._epoch_layout()[0]

    def __len__(self) -> int:
        return len(self._epoch_layout()[2])

    def batch_bounds(self, index: int) -> tuple[int, int]:
        _, starts, buckets = self._epoch_layout()
        count = len(buckets)
        if index < 0:
            index += count
        if not 0 <= index < count:
            raise IndexError(f"batch index {index} is out of range for a feed of {count} batches.")
        return int(starts[index]), int(starts[index + 1])

    def batch_length(self, index: int) -> int:
        """The length batch ``index`` of this epoch is padded to (its bucket's boundary)."""
        return int(self.boundaries[self._epoch_layout()[2][index]])

    def _rows(self, lo: int, hi: int, index: int) -> RawBatch:
        raw = super()._rows(lo, hi, index)
        return dataclasses.replace(raw, pad_to=self.batch_length(index))

    def _call_preprocess(self, raw: RawBatch) -> Any:
        return self._padding(self.preprocess, raw)

    def _native_export(self, signature: Any) -> None:
        """Batches are padded to their bucket's boundary in Python, whatever the ``preprocess``."""
        return None

    def split(self, validation_split: float, *, seed: int | None = None) -> tuple[InMemoryFeed, InMemoryFeed]:
        """Hold out a random fraction of the rows as a validation feed with the same buckets (never shuffled)."""
        return super().split(validation_split, seed=seed)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n_samples={self.n_samples}, buckets={self.boundaries.tolist()}, "
            f"batch_sizes={self.batch_sizes.tolist()}, batches={len(self)}, shuffle={self.shuffle}, seed={self.seed}, "
            f"epoch={self._epoch})"
        )


@dataclasses.dataclass(frozen=True)
class _ShardEpoch:
    """One epoch of a :class:`SizeAwareShardFeed`, as indices only (no data read)."""

    files: np.ndarray
    """File index at each slot (the epoch's file order)."""
    batches: list[tuple[int, np.ndarray, np.ndarray]]
    """``(bucket, slots, rows)`` of each batch, in serving order; ``rows`` are positions within each file."""
    completes: np.ndarray
    """The slot whose file completes each batch (batches are served in this order)."""
    last_use: np.ndarray
    """For each slot, the last batch that uses one of its rows (-1: none)."""
    uses: list[list[tuple[int, np.ndarray]]]
    """For each slot, ``(batch, rows of that file)`` of every batch using its rows."""

    def rows_needed(self, slot: int, from_batch: int) -> np.ndarray:
        """The rows of the file at ``slot`` that batches ``from_batch`` and later use, ascending."""
        parts = [rows for i, rows in self.uses[slot] if i >= from_batch]
        return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)


class SizeAwareShardFeed(BaseFeed):
    """Size-aware batches streamed from CSV/Parquet shards, every row once per epoch, memory about one shard.

    Each epoch visits the files in a shuffled order and the rows of each file in
    a shuffled order; every bucket collects rows across files and emits a batch
    when it holds its batch size (the rows it carries between files are copied
    out, so at most one shard plus less than one batch per bucket is held, and
    the next file is read ahead in the background). The batches that fill while a
    file is read are served in a shuffled order; each bucket's last, partial batch
    comes at the end of the epoch. Reading in order (as Keras and
    :meth:`to_tf_dataset` do) reads every file once; any other index reads the
    files it needs directly.

    Args:
        source: a directory, glob or file of shards, or a :class:`~autobatch._data.ShardSource`.
        target: the target column name(s).
        boundaries, batch_sizes, sequence_columns, length_fn, variable_leaves: as for :class:`SizeAwareFeed`
            (``length_fn`` is called on each whole shard, target columns removed).
        sample_weight: a column holding per-row weights.
        read_ahead: read the next file in the background (0 or 1).
        preprocess, shuffle, seed, output_signature, nan_policy, workers, use_multiprocessing,
            max_queue_size: as for :class:`~autobatch.feeds.ShardFeed`.

    Raises:
        ConfigError: the buckets are malformed, or ``drop_remainder=True``.
        DataError: a shard is missing, unreadable, or lacks a column.
    """

    _steps_fixed = False  # the buckets' batches per epoch vary with the shuffle

    def __init__(
        self,
        source: str | os.PathLike[str] | ShardSource,
        target: str | Sequence[str] | None = None,
        *,
        boundaries: Sequence[int],
        batch_sizes: Sequence[int],
        sequence_columns: Sequence[str] | None = None,
        length_fn: LengthFn | None = None,
        variable_leaves: Sequence[str] | None = None,
        sample_weight: str | None = None,
        read_ahead: int = 1,
        index: ShardIndex | None = None,
        lengths: dict[str, np.ndarray] | None = None,
        **options: Any,
    ) -> None:
        bounds, sizes = _check_buckets(boundaries, batch_sizes)
        if options.pop("drop_remainder", False):
            raise ConfigError(NO_DROP_REMAINDER)
        options.pop("batch_size", None)
        options.pop("max_batch_bytes", None)
        super().__init__(batch_size=int(sizes.max()), **options)
        if isinstance(read_ahead, bool) or read_ahead not in (0, 1):
            raise ConfigError(f"`read_ahead` must be 0 or 1 for a size-aware shard feed. Received: {read_ahead!r}")
        self.source, self._index, self.shards = open_shards(source, target, index, sample_weight)
        self.read_ahead = read_ahead
        self.sample_weight = sample_weight
        self._length_fn = length_fn
        known = lengths or {}
        missing = [p for p in self.source.files if str(p) not in known]
        columns: tuple[str, ...] = tuple(sequence_columns) if sequence_columns is not None else ()
        if missing:
            columns, measured = shard_lengths(
                missing, target=self.source.target, sequence_columns=sequence_columns, length_fn=length_fn
            )
            known = {**known, **{str(p): a for p, a in zip(missing, measured, strict=True)}}
        self._lengths = {str(p): known[str(p)] for p in self.source.files}
        for shard in self.shards:
            if len(self._lengths[str(shard.path)]) != shard.n_rows:
                raise DataError(
                    f"shard {str(shard.path)!r} has {shard.n_rows} rows but {len(self._lengths[str(shard.path)])} "
                    "lengths: the file changed while the feed was made. Re-create the feed."
                )
        self.sequence_columns = columns
        all_lengths = np.concatenate([self._lengths[str(p)] for p in self.source.files])
        self._planned_buckets = len(bounds)  # an overflow bucket is per feed: a split recomputes its own
        bucket_of, self.boundaries, self.batch_sizes = assign_buckets(all_lengths, bounds, sizes)
        cuts = np.cumsum([s.n_rows for s in self.shards])[:-1]
        self._bucket_of = np.split(bucket_of, cuts)
        self.batch_size = int(self.batch_sizes.max())
        if variable_leaves is None and self.output_signature is not None:
            variable_leaves = [s.name for s in self.output_signature if len(s.shape) >= 2 and s.shape[1] is None]
        self._padding = _BucketPadding(variable_leaves, columns)

    # ------------------------------------------------------------------ runtime state

    def _runtime_keys(self) -> tuple[str, ...]:
        return (*super()._runtime_keys(), "_plan", "_state", "_reader", "_state_lock")

    def _init_runtime(self) -> None:
        super()._init_runtime()
        self._plan: tuple[int, _ShardEpoch] | None = None
        self._state: dict[str, Any] = {}
        self._reader = BackgroundReader(self, "autobatch-sized")
        self._state_lock = threading.RLock()

    def close(self) -> None:
        """Drop what is held and stop the background reader."""
        with self._state_lock:
            self._state = {}
        self._reader.stop()

    @property
    def n_samples(self) -> int:
        return int(sum(s.n_rows for s in self.shards))

    @property
    def files(self) -> tuple[Path, ...]:
        return tuple(s.path for s in self.shards)

    # ------------------------------------------------------------------ the epoch's batches, as indices

    def epoch_plan(self) -> _ShardEpoch:
        """This epoch's file order and batches (computed from the lengths, without reading the files)."""
        cached = self._plan
        epoch = self.epoch
        if cached is not None and cached[0] == epoch:
            return cached[1]
        n_files = len(self.shards)
        rng_files = np.random.default_rng([self.seed, epoch, 0])
        files = rng_files.permutation(n_files) if self.shuffle else np.arange(n_files)
        n_buckets = len(self.batch_sizes)
        pending_slots: list[list[np.ndarray]] = [[] for _ in range(n_buckets)]
        pending_rows: list[list[np.ndarray]] = [[] for _ in range(n_buckets)]
        pending_count = [0] * n_buckets
        batches: list[tuple[int, np.ndarray, np.ndarray]] = []
        completes: list[int] = []
        for slot, f in enumerate(files.tolist()):
            buckets = self._bucket_of[f]
            rows = np.arange(len(buckets))
            if self.shuffle:
                rows = rows[np.random.default_rng([self.seed, epoch, 1, f]).permutation(len(rows))]
            made: list[tuple[int, np.ndarray, np.ndarray]] = []
            for k in range(n_buckets):
                mine = rows[buckets[rows] == k]
                size = int(self.batch_sizes[k])
                while len(mine):
                    take = min(size - pending_count[k], len(mine))
                    pending_slots[k].append(np.full(take, slot, dtype=np.int64))
                    pending_rows[k].append(mine[:take])
                    pending_count[k] += take
                    mine = mine[take:]
                    if pending_count[k] == size:
                        made.append((k, np.concatenate(pending_slots[k]), np.concatenate(pending_rows[k])))
                        pending_slots[k], pending_rows[k], pending_count[k] = [], [], 0
            if self.shuffle and made:
                made = [made[i] for i in np.random.default_rng([self.seed, epoch, 4, slot]).permutation(len(made))]
            batches += made
            completes += [slot] * len(made)
        for k in range(n_buckets):
            if pending_count[k]:
                batches.append((k, np.concatenate(pending_slots[k]), np.concatenate(pending_rows[k])))
                completes.append(n_files - 1)
        last_use = np.full(n_files, -1, dtype=np.int64)
        uses: list[list[tuple[int, np.ndarray]]] = [[] for _ in range(n_files)]
        for i, (_, slots, rows) in enumerate(batches):
            for slot in np.unique(slots).tolist():
                uses[slot].append((i, rows[slots == slot]))
                last_use[slot] = i
        plan = _ShardEpoch(files, batches, np.asarray(completes, dtype=np.int64), last_use, uses)
        self._plan = (epoch, plan)
        return plan

    def __len__(self) -> int:
        return len(self.epoch_plan().batches)

    def batch_bounds(self, index: int) -> tuple[int, int]:
        plan = self.epoch_plan()
        count = len(plan.batches)
        if index < 0:
            index += count
        if not 0 <= index < count:
            raise IndexError(f"batch index {index} is out of range for a feed of {count} batches.")
        lo = sum(len(b[2]) for b in plan.batches[:index]) if index < 64 else self._starts(plan)[index]
        return int(lo), int(lo + len(plan.batches[index][2]))

    def _starts(self, plan: _ShardEpoch) -> np.ndarray:
        cached = self._state.get("starts")
        if cached is None or cached[0] is not plan:
            cached = (plan, np.concatenate([[0], np.cumsum([len(b[2]) for b in plan.batches])]))
            self._state["starts"] = cached
        return cached[1]

    def batch_length(self, index: int) -> int:
        """The length batch ``index`` of this epoch is padded to (its bucket's boundary)."""
        return int(self.boundaries[self.epoch_plan().batches[index][0]])

    def on_epoch_end(self) -> None:
        """Advance to the next epoch's order and release what this epoch held."""
        super().on_epoch_end()
        with self._state_lock:
            self._state = {}

    # ------------------------------------------------------------------ reading

    def _read(self, file_index: int) -> tuple[pd.DataFrame, Any, np.ndarray | None]:
        shard = self.shards[file_index]
        frame = read_shard(shard.path, columns=list(self.shards[0].columns))
        if len(frame) != shard.n_rows:
            raise DataError(
                f"shard {str(shard.path)!r} has {len(frame)} rows now, but {shard.n_rows} were counted when the feed "
                "was made: the file changed. Re-create the feed."
            )
        target = self.source.target
        names = list(target_names(self.source))
        y = None if not names else (frame[names[0]] if isinstance(target, str) else frame[names])
        weights = frame[self.sample_weight].to_numpy(dtype=np.float32) if self.sample_weight is not None else None
        dropped = names + ([self.sample_weight] if self.sample_weight is not None else [])
        x = frame.drop(columns=dropped) if dropped else frame
        return x, y, weights

    def _take(self, held: tuple[pd.DataFrame, Any, np.ndarray | None], rows: np.ndarray) -> tuple[Any, Any, Any]:
        x, y, w = held
        return x.iloc[rows], (y.iloc[rows] if y is not None else None), (w[rows] if w is not None else None)

    def _loaded(self, slot: int, plan: _ShardEpoch) -> tuple[pd.DataFrame, Any, np.ndarray | None]:
        futures: dict[int, concurrent.futures.Future[Any]] = self._state.setdefault("futures", {})
        if slot not in futures:
            futures[slot] = self._reader.pool().submit(self._read, int(plan.files[slot]))
        if self.read_ahead and slot + 1 < len(plan.files) and slot + 1 not in futures:
            futures[slot + 1] = self._reader.pool().submit(self._read, int(plan.files[slot + 1]))
        return futures[slot].result()

    def _rows(self, lo: int, hi: int, index: int) -> RawBatch:
        plan = self.epoch_plan()
        bucket, slots, rows = plan.batches[index]
        start, _ = self.batch_bounds(index)
        part = slice(lo - start, hi - start)
        slots, rows = slots[part], rows[part]
        with self._state_lock:
            if self._state.get("next", 0) != index and index != 0:
                x, y, w = self._direct(plan, slots, rows)
            else:
                last = hi == start + len(plan.batches[index][2])
                x, y, w = self._sequential(plan, index, slots, rows, last_piece=last)
        names = ", ".join(repr(str(self.shards[int(plan.files[s])].path)) for s in np.unique(slots))

        def origin(p: int) -> str:
            path = self.shards[int(plan.files[int(slots[p])])].path
            return shard_row(path, int(rows[p]))

        return RawBatch(x, y, w, f"from shard(s) {names}", origin=origin, pad_to=int(self.boundaries[bucket]))

    def _direct(self, plan: _ShardEpoch, slots: np.ndarray, rows: np.ndarray) -> tuple[Any, Any, Any]:
        """Rows of a batch read straight from their files (random access: no carried state used or changed)."""
        parts = []
        for slot in np.unique(slots).tolist():
            mine = slots == slot
            parts.append((np.flatnonzero(mine), self._take(self._read(int(plan.files[slot])), rows[mine])))
        return self._assemble(parts, len(rows))

    def _assemble(self, parts: list[tuple[np.ndarray, tuple[Any, Any, Any]]], n: int) -> tuple[Any, Any, Any]:
        positions = np.concatenate([p for p, _ in parts])
        back = np.argsort(positions, kind="stable")
        x = _concat([t[0] for _, t in parts])
        y = _concat([t[1] for _, t in parts]) if parts[0][1][1] is not None else None
        w = _concat([t[2] for _, t in parts]) if parts[0][1][2] is not None else None
        x = x.iloc[back].reset_index(drop=True)
        y = y.iloc[back].reset_index(drop=True) if y is not None else None
        w = w[back] if w is not None else None
        return x, y, w

    def _carry(self, plan: _ShardEpoch, slot: int, held: tuple[Any, Any, Any], index: int) -> None:
        """Keep (copied) only the rows of ``slot``'s file that batch ``index`` and later use."""
        needed = plan.rows_needed(slot, index)
        if len(needed):
            values = tuple(v.copy() if v is not None else None for v in self._take(held, needed))
            self._state.setdefault("carry", {})[slot] = (needed, values)
        self._state.get("futures", {}).pop(slot, None)

    def _sequential(
        self, plan: _ShardEpoch, index: int, slots: np.ndarray, rows: np.ndarray, *, last_piece: bool
    ) -> tuple[Any, Any, Any]:
        """Rows of batch ``index`` served in order: the file completing it held whole, earlier files' rows carried."""
        state = self._state
        if index == 0 and state.get("next") != 0:
            for future in state.get("futures", {}).values():
                future.cancel()
            state.clear()
        done = state.get("done", -1)
        complete = int(plan.completes[index])
        if complete > done:
            current = state.pop("current", None)
            if current is not None:
                self._carry(plan, current[0], current[1], index)
            for slot in range(done + 1, complete):
                self._carry(plan, slot, self._loaded(slot, plan), index)
            state["current"] = (complete, self._loaded(complete, plan))
            state["done"] = complete
        carry = state.setdefault("carry", {})
        parts = []
        for slot in np.unique(slots).tolist():
            mine = slots == slot
            if slot == complete:
                parts.append((np.flatnonzero(mine), self._take(state["current"][1], rows[mine])))
            else:
                kept, values = carry[slot]
                parts.append((np.flatnonzero(mine), self._take(values, np.searchsorted(kept, rows[mine]))))
        out = self._assemble(parts, len(rows))
        state["next"] = index + 1 if last_piece else index
        if last_piece:
            for slot in [s for s in carry if plan.last_use[s] <= index]:
                del carry[slot]
        return out

    def _call_preprocess(self, raw: RawBatch) -> Any:
        return self._padding(self.preprocess, raw)

    # ------------------------------------------------------------------ splitting

    def split(
        self, validation_split: float, *, seed: int | None = None
    ) -> tuple[SizeAwareShardFeed, SizeAwareShardFeed]:
        """Hold out whole shards, about ``validation_split`` of the rows, as a validation feed (never shuffled)."""
        train, val = hold_out_shards(self.shards, validation_split, self.seed if seed is None else seed)
        return self._derive(train), self._derive(val, shuffle=False)

    def _derive(self, files: Sequence[Path], **overrides: Any) -> SizeAwareShardFeed:
        options = {**self._options(), **overrides}
        options.pop("batch_size", None)
        options.pop("drop_remainder", None)
        planned = self._planned_buckets
        return SizeAwareShardFeed(
            dataclasses.replace(self.source, files=tuple(files)),
            boundaries=self.boundaries[:planned].tolist(),
            batch_sizes=self.batch_sizes[:planned].tolist(),
            sequence_columns=self.sequence_columns or None,
            length_fn=self._length_fn,
            variable_leaves=sorted(self._padding.variable) if self._padding.variable else None,
            sample_weight=self.sample_weight,
            read_ahead=self.read_ahead,
            index=self._index,
            lengths={str(p): self._lengths[str(p)] for p in files},
            **options,
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n_samples={self.n_samples}, shards={len(self.shards)}, "
            f"buckets={self.boundaries.tolist()}, batch_sizes={self.batch_sizes.tolist()}, shuffle={self.shuffle}, "
            f"epoch={self.epoch})"
        )


def make_size_aware_feed(
    x: Any,
    y: Any = None,
    *,
    boundaries: Sequence[int],
    batch_sizes: Sequence[int],
    strategy: Literal["auto", "in_memory", "stream"] = "auto",
    preprocess: Any = None,
    shuffle: bool = True,
    seed: int = 0,
    validation_split: float | None = None,
    **options: Any,
) -> BaseFeed | tuple[BaseFeed, BaseFeed]:
    """Build the size-aware feed for ``x``: in memory, or streaming shards.

    Args:
        x: a DataFrame (or dict of columns); or a directory, glob or file of shards.
        y: targets or target column name(s).
        boundaries: the buckets' upper lengths (inclusive), ascending.
        batch_sizes: one batch size per bucket.
        strategy: ``"stream"`` streams shards, ``"in_memory"`` loads them first; ``"auto"`` streams shards.
        preprocess: ``preprocess(batch_x, batch_y[, maxlen=...]) -> (inputs, targets)``.
        shuffle: reshuffle within and across buckets every epoch.
        seed: seed of the shuffle and of the validation split.
        validation_split: hold out this fraction and return ``(train, validation)``.
        **options: ``sequence_columns``, ``length_fn``, ``variable_leaves``, ``output_signature``,
            ``nan_policy``, ``sample_weight``, ``read_ahead``, ``max_queue_size`` ...

    Returns:
        The feed, or ``(train_feed, validation_feed)``.

    Raises:
        ConfigError: an option is out of range.
        DataError: ``x`` is of an unrecognized type or the data is bad.
    """
    common = dict(boundaries=boundaries, batch_sizes=batch_sizes, preprocess=preprocess, shuffle=shuffle, seed=seed)
    return build_feed(
        x, y, strategy=strategy, in_memory=SizeAwareFeed, stream=SizeAwareShardFeed, options={**common, **options},
        validation_split=validation_split, seed=seed,
    )


def bucket_by_sequence_length(
    dataset: Any,
    element_length_func: Callable[..., Any],
    *,
    boundaries: Sequence[int],
    batch_sizes: Sequence[int],
    pad_to_bucket_boundary: bool = True,
    **options: Any,
) -> Any:
    """Batch an unbatched ``tf.data.Dataset`` with ``Dataset.bucket_by_sequence_length`` and the planned buckets.

    For pipelines that stay in ``tf.data``: the same buckets and per-bucket batch sizes
    as the size-aware feed (``plan.boundaries``, ``plan.batch_sizes``), translated to
    TensorFlow's convention (its boundaries are exclusive and it pads to ``boundary − 1``).

    Args:
        dataset: unbatched elements with variable-length sequences.
        element_length_func: ``fn(*element) -> tf.int32/int64 length`` along the padded axis.
        boundaries: the planned boundaries (inclusive upper lengths).
        batch_sizes: one batch size per bucket.
        pad_to_bucket_boundary: pad every batch to its bucket's boundary (bounded shapes).
        **options: more ``bucket_by_sequence_length`` arguments (``padded_shapes``, ``padding_values``,
            ``drop_remainder`` ...).

    Returns:
        The batched dataset. With ``pad_to_bucket_boundary``, an element longer than the
        last boundary fails inside TensorFlow, as ``bucket_by_sequence_length`` does.

    Example:
        >>> batched = bucket_by_sequence_length(ds, lambda x, y: tf.shape(x["in1"])[0],
        ...                                     boundaries=plan.boundaries, batch_sizes=plan.batch_sizes)
    """
    bounds, sizes = _check_buckets(boundaries, batch_sizes)
    return dataset.bucket_by_sequence_length(
        element_length_func,
        bucket_boundaries=[int(b) + 1 for b in bounds],
        bucket_batch_sizes=[int(s) for s in sizes] + [1],
        pad_to_bucket_boundary=pad_to_bucket_boundary,
        **options,
    )
