"""A shard feed's export: each shard read once into flat values and row lengths, each batch a few slices.

:func:`ragged_shard` reads one file for the export (on the feed's background
reader), its rows in the epoch's order within the file: Parquet list columns of
numbers straight from Arrow's buffers, anything else via pandas.
:class:`NativeShards` then hands ``tf.data`` each batch's values, row lengths
and padded lengths, cut across file boundaries as the Python path cuts them, and
TensorFlow pads.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from autobatch._data import ShardSource
from autobatch._shard_files import ShardInfo, _release_arrow_memory
from autobatch.errors import PreprocessError
from autobatch.feeds.native.columns import (
    BatchAccounts,
    BatchColumn,
    ColumnValues,
    account_batch,
    column_values,
    converted_targets,
    flat_column,
    pad_ragged,
    signature_matches,
)
from autobatch.padding import PadColumns


class StreamedShards(BatchAccounts, Protocol):
    """What :func:`ragged_shard` and :class:`NativeShards` read of their feed (a :class:`~autobatch.ShardFeed`)."""

    source: ShardSource
    shards: tuple[ShardInfo, ...]
    sample_weight: str | None
    nan_policy: str

    def _target_names(self) -> tuple[str, ...]:
        """The target column name(s)."""
        ...

    def _read_table(self, shard: ShardInfo, columns: Sequence[str]) -> Any:
        """``columns`` of a Parquet shard as a ``pyarrow.Table``; ``None`` for a CSV one (read by pandas)."""
        ...

    def _read_frame(self, shard: ShardInfo) -> Any:
        """The shard's rows as a DataFrame."""
        ...

    def _check_rows(self, shard: ShardInfo, n_rows: int) -> None:
        """Raise when the shard holds another number of rows than the feed counted."""
        ...

    def _batch_parts(
        self, lo: int, hi: int, index: int, *, native: bool = False
    ) -> tuple[list[tuple[Any, int, int]], str, Callable[[int], str]]:
        """The loaded shards holding rows ``[lo, hi)``, each with its span; where they came from, and each row."""
        ...


@dataclasses.dataclass(frozen=True, eq=False)
class RaggedShard:
    """One shard read for a :class:`NativeShards` export, its rows in this epoch's order within the file: each
    padded column's flat values, the targets and the weights, so that a batch's rows of it are one slice."""

    path: Path
    columns: tuple[ColumnValues, ...]
    offsets: tuple[np.ndarray, ...]
    """Where each row's values start in ``columns[k].flat`` (one more entry than rows)."""
    targets: np.ndarray | None
    targets_nonfinite: np.ndarray | None
    sample_weight: np.ndarray | None
    order: np.ndarray | None
    """The file's row at each position (``None``: file order), for messages."""

    @property
    def nbytes(self) -> int:
        """Bytes held: values, lengths and offsets, targets and weights."""
        held = sum(column.nbytes for column in self.columns) + sum(offsets.nbytes for offsets in self.offsets)
        return held + sum(int(a.nbytes) for a in (self.targets, self.sample_weight) if a is not None)


def _arrow_values(column: Any, dtype: np.dtype, order: np.ndarray | None) -> tuple[np.ndarray, np.ndarray] | None:
    """Flat values and lengths of an Arrow list column of numbers without nulls, its rows in ``order``, from its
    buffers; else ``None``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if not (pa.types.is_list(array.type) or pa.types.is_large_list(array.type)) or array.null_count:
        return None
    if not (pa.types.is_integer(array.type.value_type) or pa.types.is_floating(array.type.value_type)):
        return None
    if order is not None:
        array = pc.take(array, order)  # in Arrow's C++, without the GIL the training loop needs
    values = array.flatten()  # respects a sliced array's offset
    if values.null_count:
        return None
    lengths = pc.list_value_length(array).to_numpy().astype(np.int64)
    return values.to_numpy(zero_copy_only=False).astype(dtype, copy=False), lengths


def _arrow_numbers(table: Any, name: str) -> np.ndarray | None:
    """A column of plain numbers without nulls as numpy, as pandas would give it; else ``None`` (pandas decides)."""
    import pyarrow as pa

    column = table.column(name)
    if column.null_count or not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)):
        return None
    return column.to_numpy()


def _offsets(lengths: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths)])


def _reordered(values: ColumnValues, order: np.ndarray) -> ColumnValues:
    """``values`` with its rows in ``order``: one gather of every value, done once per shard on the reader thread."""
    lengths = values.lengths[order]
    # Each value's position: its row's start in the file, plus its place counted from its row's start in the output.
    shift = np.repeat(_offsets(values.lengths)[:-1][order] - (np.cumsum(lengths) - lengths), lengths)
    flat = values.flat[shift + np.arange(len(shift))]
    per_row = [None if a is None else a[order] for a in (values.cut, values.nonfinite)]
    return ColumnValues(flat, lengths, *per_row)


def ragged_shard(
    feed: StreamedShards, pad: PadColumns, shard: ShardInfo, order: np.ndarray | None, *, file_row: Callable[[int], str]
) -> RaggedShard:
    """Read ``shard`` for the export, its rows in ``order``: Parquet list columns of numbers straight from Arrow,
    anything else via pandas. ``file_row(row)`` names row ``row`` of the file in messages.

    Raises:
        DataError: the file cannot be read or changed since the feed counted it, or a cell of a padded column
            is not a sequence of numbers (naming the column, the file and the row).
    """
    targets = list(feed._target_names())
    wanted = [*pad.columns, *targets] + ([feed.sample_weight] if feed.sample_weight is not None else [])
    table = feed._read_table(shard, wanted)
    frame = feed._read_frame(shard) if table is None else None
    n_rows = table.num_rows if table is not None else len(frame)  # type: ignore[arg-type]
    feed._check_rows(shard, n_rows)
    check = feed.nan_policy != "ignore"
    columns = []
    for name in pad.columns:
        found = _arrow_values(table.column(name), np.dtype(pad.dtype), order) if table is not None else None
        if found is not None:
            columns.append(column_values(*found, pad, check))
            continue
        sequences = frame[name] if frame is not None else table.column(name).to_pandas()
        values = flat_column(sequences, pad, name, file_row, check)
        columns.append(values if order is None else _reordered(values, order))
    y: Any = None
    if targets:
        single = isinstance(feed.source.target, str)
        y = _arrow_numbers(table, targets[0]) if table is not None and single else None
        if y is None:
            source = frame if frame is not None else table.select(targets).to_pandas()
            y = source[targets[0]] if single else source[targets]
    weights = None
    if feed.sample_weight is not None:
        weights = _arrow_numbers(table, feed.sample_weight) if table is not None else None
        if weights is None:
            source = frame if frame is not None else table.select([feed.sample_weight]).to_pandas()
            weights = source[feed.sample_weight].to_numpy()
        weights = weights.astype(np.float32, copy=False)
    converted, targets_nonfinite = converted_targets(pad, y, check)
    del table, frame
    _release_arrow_memory()
    if order is not None:
        per_row = (converted, targets_nonfinite, weights)
        converted, targets_nonfinite, weights = (None if a is None else a[order] for a in per_row)
    offsets = tuple(_offsets(column.lengths) for column in columns)
    return RaggedShard(shard.path, tuple(columns), offsets, converted, targets_nonfinite, weights, order)


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _gather(per_shard: list[np.ndarray | None], spans: list[tuple[int, int]]) -> np.ndarray | None:
    """Rows ``[a, b)`` of each shard's per-row array, end to end (a shard without one counts zeros); ``None``: no
    shard has one."""
    if all(array is None for array in per_shard):
        return None
    return _cat(
        [
            array[a:b] if array is not None else np.zeros(b - a, dtype=np.int64)
            for array, (a, b) in zip(per_shard, spans, strict=True)
        ]
    )


class NativeShards:
    """A shard feed's export: each batch's flat values and row lengths from Python (:meth:`element`), padded by
    :meth:`assemble`."""

    def __init__(self, feed: StreamedShards, pad: PadColumns, signature: Any) -> None:
        import tensorflow as tf

        self.feed = feed
        self.pad = pad
        self.signature = signature
        inputs = signature[0]
        self._specs = [inputs[name] for name in pad.columns]
        parts: list[Any] = []
        for name, spec in zip(pad.columns, self._specs, strict=True):
            features = spec.shape[2:-1] if pad.add_feature_axis else spec.shape[2:]
            parts.append(tf.TensorSpec((None, *features), spec.dtype, name=f"{name}/values"))
            parts.append(tf.TensorSpec((None,), tf.int64, name=f"{name}/lengths"))
        parts.append(tf.TensorSpec((len(pad.columns),), tf.int64, name="lengths"))
        parts.extend(signature[1:])
        self.element_signature = tuple(parts)
        self._dtypes = [np.dtype(spec.dtype.as_numpy_dtype) for spec in signature[1:]]

    @classmethod
    def export(cls, feed: StreamedShards, pad: PadColumns, signature: Any) -> NativeShards | None:
        """The export, or ``None`` when ``signature`` is not the structure and dtypes ``pad`` gives (Python then)."""
        inputs = [c for c in feed.shards[0].columns if c not in feed._target_names() and c != feed.sample_weight]
        if not pad.pads_in_tensorflow or any(name not in inputs for name in pad.columns):
            return None
        targets = None if not feed._target_names() else (pad.target_dtype or True)
        if not signature_matches(signature, pad, targets, feed.sample_weight is not None):
            return None
        if any(spec.shape.rank < 2 + pad.add_feature_axis for spec in (signature[0][n] for n in pad.columns)):
            return None
        return cls(feed, pad, tuple(signature))

    def element(self, lo: int, hi: int, index: int) -> tuple[np.ndarray, ...]:
        """Rows ``[lo, hi)`` of the epoch: per column its values and row lengths, the padded lengths, the targets
        (and weights), checked and counted."""
        feed = self.feed
        started = time.perf_counter()
        parts, source, origin = feed._batch_parts(lo, hi, index, native=True)
        where = feed._where(lo, hi, index, source)
        shards: list[RaggedShard] = [shard for shard, _, _ in parts]
        spans = [(a, b) for _, a, b in parts]
        flat: list[np.ndarray] = []
        columns = []
        for k, name in enumerate(self.pad.columns):
            values = [shard.columns[k] for shard in shards]
            taken = [
                c.flat[s.offsets[k][a] : s.offsets[k][b]] for c, s, (a, b) in zip(values, shards, spans, strict=True)
            ]
            lengths = _cat([c.lengths[a:b] for c, (a, b) in zip(values, spans, strict=True)])
            # A copy, not a view: TensorFlow may keep the array it converts, and a view would pin the whole shard.
            flat += [np.concatenate(taken), lengths]
            cut = _gather([c.cut for c in values], spans)
            nonfinite = _gather([c.nonfinite for c in values], spans)
            columns.append(BatchColumn(name, lengths, cut, nonfinite, values[0].feature_shape))
        extra = [_gather([s.targets for s in shards], spans), _gather([s.sample_weight for s in shards], spans)]
        extra = extra[: len(self._dtypes)]
        for array, dtype, spec in zip(extra, self._dtypes, self.signature[1:], strict=True):
            if array is None or array.dtype != dtype:
                raise PreprocessError(
                    f"preprocess must return the same dtype for every batch: expected {spec.name} as {dtype} (as on "
                    f"the first batch), received {None if array is None else array.dtype} on {where}. Pass "
                    "PadColumns(target_dtype=...) so that every shard's targets convert to one dtype."
                )
        targets_nonfinite = _gather([s.targets_nonfinite for s in shards], spans) if self._dtypes else None
        other = sum(int(a.nbytes) for a in extra if a is not None)
        lengths = account_batch(
            feed, self.pad, self._specs, columns, targets_nonfinite, where, f"batch {index}", origin, started, other
        )
        return (*flat, lengths, *extra)  # type: ignore[arg-type]

    def assemble(self, *parts: Any) -> tuple[Any, ...]:
        """The batch (a ``tf.data`` map function): each column's values cut into rows and padded to its length."""
        import tensorflow as tf

        k = len(self.pad.columns)
        lengths = parts[2 * k]
        inputs = {}
        for j, (name, spec) in enumerate(zip(self.pad.columns, self._specs, strict=True)):
            ragged = tf.RaggedTensor.from_row_lengths(parts[2 * j], parts[2 * j + 1], validate=False)
            inputs[name] = pad_ragged(ragged, lengths[j : j + 1], self.pad, spec)
        rest = [tf.ensure_shape(part, spec.shape) for part, spec in zip(parts[2 * k + 1 :], self.signature[1:])]
        return (inputs, *rest)
