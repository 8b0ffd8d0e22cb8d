"""Size-aware batches streamed from CSV/Parquet shards, every row once per epoch, memory about one shard.

A sample's lengths are read once up front (only the sequence columns). Each
epoch's batches are computed from them as indices (:class:`_ShardEpoch`), without
reading a file: the files are visited in a shuffled order and every bucket
collects rows across files until its batch is full. Served in order, the file
completing a batch is held whole while the rows that later batches need of
earlier files are carried (copied), and the next file is read ahead in the
background; any other index reads the files it needs directly.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from autobatch._data import ShardSource
from autobatch._lengths import LengthFn, shard_lengths
from autobatch.errors import ConfigError, DataError
from autobatch.feeds.base import RawBatch, checked_index
from autobatch.feeds.buckets import Bucketed, assign_buckets
from autobatch.feeds.read_ahead import BackgroundReader
from autobatch.feeds.shard_set import ShardIndex, ShardSourced, concat_rows, shard_row


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


class SizeAwareShardFeed(Bucketed, ShardSourced):
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
        boundaries, batch_sizes, sequence_columns, length_fn, variable_leaves: as for :class:`~autobatch.SizeAwareFeed`
            (``length_fn`` is called on each whole shard, target columns removed).
        sample_weight: a column holding per-row weights.
        read_ahead: read the next file in the background (0 or 1).
        preprocess, shuffle, seed, output_signature, nan_policy, workers, use_multiprocessing,
            max_queue_size: as for :class:`~autobatch.feeds.ShardFeed`.

    Raises:
        ConfigError: the buckets are malformed, or ``drop_remainder=True``.
        DataError: a shard is missing, unreadable, or lacks a column.
    """

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
        bounds, sizes = self._bucket_options(boundaries, batch_sizes, options)
        super().__init__(batch_size=int(sizes.max()), **options)
        if isinstance(read_ahead, bool) or read_ahead not in (0, 1):
            raise ConfigError(f"`read_ahead` must be 0 or 1 for a size-aware shard feed. Received: {read_ahead!r}")
        self._open_shards(source, target, index=index, sample_weight=sample_weight, read_ahead=read_ahead)
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
        cuts = np.cumsum(self._counts)[:-1]
        self._bucket_of = np.split(bucket_of, cuts)
        self.batch_size = int(self.batch_sizes.max())
        self._init_padding(variable_leaves, columns)

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
        index = checked_index(index, len(plan.batches))
        lo = sum(len(b[2]) for b in plan.batches[:index]) if index < 64 else self._starts(plan)[index]
        return int(lo), int(lo + len(plan.batches[index][2]))

    def _starts(self, plan: _ShardEpoch) -> np.ndarray:
        cached = self._state.get("starts")
        if cached is None or cached[0] is not plan:
            cached = (plan, np.concatenate([[0], np.cumsum([len(b[2]) for b in plan.batches])]))
            self._state["starts"] = cached
        return cached[1]

    def _batch_bucket(self, index: int) -> int:
        return int(self.epoch_plan().batches[index][0])

    def on_epoch_end(self) -> None:
        """Advance to the next epoch's order and release what this epoch held."""
        super().on_epoch_end()
        with self._state_lock:
            self._state = {}

    # ------------------------------------------------------------------ reading

    def _read(self, file_index: int) -> tuple[pd.DataFrame, Any, np.ndarray | None]:
        return self._read_parts(self.shards[file_index])

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
        x = concat_rows([t[0] for _, t in parts])
        y = concat_rows([t[1] for _, t in parts]) if parts[0][1][1] is not None else None
        w = concat_rows([t[2] for _, t in parts]) if parts[0][1][2] is not None else None
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

    # ------------------------------------------------------------------ splitting

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
