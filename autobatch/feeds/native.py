"""Batches padded by TensorFlow: feeds whose ``preprocess`` is :class:`~autobatch.PadColumns`.

An :class:`~autobatch.InMemoryFeed`'s :meth:`~autobatch.BaseFeed.to_tf_dataset`
builds the padded columns once as ragged tensors (values after truncation, in
the output dtype) and the targets as one array (:class:`NativePadding`); each
batch is then an index slice in Python (the epoch's order, the padded lengths,
truncation and NaN/inf counts per row, all looked up) and a gather and pad in
TensorFlow, which holds no GIL and runs beside the step.

A :class:`~autobatch.ShardFeed`'s export (:class:`NativeShards`) does the same
per shard: its background reader turns each file into flat values and row
lengths once (Parquet list columns straight from Arrow's buffers, with no
pandas object per cell), each batch gathers its rows' values with a few numpy
calls (across file boundaries as the Python path cuts them), and TensorFlow pads.

The batches are those ``PadColumns`` makes in Python (``tests/test_feeds.py`` checks
them value for value), and the feed's checks, statistics, warnings and epoch
semantics are the same.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from autobatch._data import ShardInfo
from autobatch.errors import DataError, PreprocessError
from autobatch.padding import PadColumns, Truncations, _flatten, padded_length

if TYPE_CHECKING:
    from autobatch.feeds.base import BaseFeed
    from autobatch.feeds.in_memory import InMemoryFeed
    from autobatch.feeds.shards import ShardFeed


# --------------------------------------------------------------------------- columns as flat values


@dataclasses.dataclass(frozen=True)
class _Values:
    """One padded column of some rows, as numpy: values after truncation end to end, and per row its counts."""

    flat: np.ndarray
    lengths: np.ndarray
    """Kept length of each row (after truncation)."""
    cut: np.ndarray | None
    """Time steps truncation dropped per row (``None``: none anywhere)."""
    nonfinite: np.ndarray | None
    """NaN/inf values per row (``None``: none anywhere, or not checked)."""

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.flat.shape[1:])

    @property
    def nbytes(self) -> int:
        return int(self.flat.nbytes + self.lengths.nbytes)


def _values(flat: np.ndarray, lengths: np.ndarray, pad: PadColumns, check: bool) -> _Values:
    """Flat values and lengths of one column, cut to ``pad.maxlen`` and counted."""
    flat, kept, cut = _truncated(flat, lengths, pad.maxlen, pad.truncating)
    return _Values(flat, kept, cut, _nonfinite_per_row(flat, kept) if check else None)


def _truncated(
    flat: np.ndarray, lengths: np.ndarray, maxlen: int | None, truncating: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``flat`` with every sequence cut to ``maxlen`` as ``pad_columns`` cuts it; kept lengths; steps cut per row."""
    if maxlen is None or not (lengths > maxlen).any():
        return flat, lengths, None
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    position = np.arange(len(flat)) - starts
    if truncating == "post":
        keep = position < maxlen
    else:  # "pre": the last maxlen steps stay
        keep = position >= np.repeat(lengths, lengths) - maxlen
    kept = np.minimum(lengths, maxlen)
    return flat[keep], kept, lengths - kept


def _nonfinite_per_row(flat: np.ndarray, lengths: np.ndarray) -> np.ndarray | None:
    if flat.dtype.kind not in "fc" or np.isfinite(flat.sum(dtype=np.result_type(flat.dtype, np.float32))):
        return None
    bad = (~np.isfinite(flat)).reshape(len(flat), -1).sum(axis=1)
    if not bad.any():
        return None
    rows = np.repeat(np.arange(len(lengths)), lengths)
    return np.bincount(rows, weights=bad, minlength=len(lengths)).astype(np.int64)


def _targets(pad: PadColumns, y: Any, check: bool) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The converted targets and their NaN/inf values per row (``None``: none, or not checked)."""
    targets = pad.targets(y)
    if targets is None:
        return None, None
    targets = np.asarray(targets)
    if check and targets.dtype.kind in "fc" and not np.isfinite(targets).all():
        return targets, (~np.isfinite(targets)).reshape(len(targets), -1).sum(axis=1)
    return targets, None


def _flattened(sequences: Any, pad: PadColumns, name: str, where: Callable[[int], str]) -> tuple[np.ndarray, ...]:
    """``_flatten`` of one column; a bad cell's :class:`DataError` names the column and ``where(row)``."""
    try:
        return _flatten(sequences, np.dtype(pad.dtype))
    except DataError as exc:
        if exc.row is None:
            raise
        raise DataError(f"column {name!r}, {where(exc.row)}: {exc}", row=exc.row) from exc


# --------------------------------------------------------------------------- what both exports share


def _signature_matches(signature: Any, pad: PadColumns, targets: Any, weights: bool) -> bool:
    """Whether ``signature`` has the structure and input dtypes ``pad`` gives (``targets``: a dtype, ``True`` for
    any dtype, ``None`` for none)."""
    import tensorflow as tf

    signature = tuple(signature)
    inputs = signature[0]
    if not isinstance(inputs, Mapping) or set(inputs) != set(pad.columns):
        return False
    if any(inputs[name].dtype != tf.as_dtype(pad.dtype) or inputs[name].shape.rank is None for name in pad.columns):
        return False
    parts = 1 + (targets is not None) + (targets is not None and weights)
    if len(signature) != parts or any(isinstance(part, (Mapping, tuple, list)) for part in signature[1:]):
        return False
    if targets is not None and targets is not True and signature[1].dtype != tf.as_dtype(targets):
        return False
    return not (parts == 3 and signature[2].dtype != tf.float32)


@dataclasses.dataclass(frozen=True)
class _BatchColumn:
    """One padded column of one batch, before padding: what the checks and the statistics need."""

    name: str
    lengths: np.ndarray
    cut: np.ndarray | None
    nonfinite: np.ndarray | None
    feature_shape: tuple[int, ...]


def _account(
    feed: BaseFeed,
    pad: PadColumns,
    specs: Sequence[Any],
    columns: Sequence[_BatchColumn],
    targets_nonfinite: np.ndarray | None,
    where: str,
    what: str,
    origin: Callable[[int], str],
    started: float,
    other_bytes: int,
) -> np.ndarray:
    """Check and count one batch as ``feed._serve`` does for the Python path; the padded length of each column.

    ``other_bytes``: the batch's targets and weights, for the batch-size check against the probe's worst case.
    """
    cut = Truncations()
    lengths = []
    found = False
    nbytes = other_bytes
    for column, spec in zip(columns, specs, strict=True):
        rows = len(column.lengths)
        length = padded_length(int(column.lengths.max()) if rows else 0, pad.maxlen, pad.bucket)
        lengths.append(length)
        shape = (rows, length, *column.feature_shape) + ((1,) if pad.add_feature_axis else ())
        feed._check_shape(spec, shape, what)
        nbytes += int(np.prod(shape, dtype=np.int64)) * np.dtype(pad.dtype).itemsize
        if column.cut is not None:
            count = int(np.count_nonzero(column.cut))
            if count:
                cut.sequences += count
                cut.values += int(column.cut.sum())
                cut.by_column[column.name] = count
                cut.maxlen[column.name] = int(length)
        found |= _nonfinite(feed, f"x/{column.name}", column.nonfinite, where, origin)
    found |= _nonfinite(feed, "y", targets_nonfinite, where, origin)
    feed._check_batch_bytes(nbytes, where)
    feed._record_batch(started, cut, where, nonfinite=found)
    return np.asarray(lengths, dtype=np.int64)


def _nonfinite(
    feed: BaseFeed, name: str, counts: np.ndarray | None, where: str, origin: Callable[[int], str]
) -> bool:
    if counts is None or not counts.any():
        return False
    feed._report_nonfinite(name, int(counts.sum()), counts > 0, where, origin)
    return True


def _padded(ragged: Any, length: Any, pad: PadColumns, spec: Any) -> Any:
    """A batch's ragged column padded to ``length`` (a 1-element tensor) as ``pad_columns`` pads it."""
    import tensorflow as tf

    if pad.maxlen is None and pad.bucket is None:  # the batch's longest: to_tensor's own length
        padded = ragged.to_tensor(default_value=pad.value)
    else:
        rows = tf.reshape(ragged.nrows(out_type=tf.int64), [1])
        features = tf.shape(ragged.flat_values, out_type=tf.int64)[1:]
        padded = ragged.to_tensor(default_value=pad.value, shape=tf.concat([rows, length, features], axis=0))
    if pad.add_feature_axis:
        padded = padded[..., tf.newaxis]
    return tf.ensure_shape(padded, spec.shape)


# --------------------------------------------------------------------------- in memory


@dataclasses.dataclass(frozen=True)
class _Column:
    """One padded column of the feed's rows: ragged values, and per row its kept length, cut and NaN/inf counts."""

    name: str
    values: Any
    """``tf.RaggedTensor`` of the rows' sequences after truncation, in the output dtype."""
    lengths: np.ndarray
    cut: np.ndarray | None
    nonfinite: np.ndarray | None
    feature_shape: tuple[int, ...]
    nbytes: int


@dataclasses.dataclass(frozen=True)
class NativeStore:
    """What the export holds for the feed's life: the padded columns, the targets and the sample weights."""

    columns: tuple[_Column, ...]
    targets: Any
    """``tf.Tensor`` of the converted targets, or ``None``."""
    targets_nonfinite: np.ndarray | None
    weights: Any
    inverse: np.ndarray | None
    """Position in the store of each data row (``None``: the feed holds every row, in order)."""

    @property
    def nbytes(self) -> int:
        """Bytes of the values, lengths, targets and weights held (what :func:`autobatch.plan` budgets)."""
        held = sum(column.nbytes for column in self.columns)
        for tensor in (self.targets, self.weights):
            if tensor is not None:
                held += int(np.prod(tensor.shape)) * tensor.dtype.size
        return held


def build_store(feed: InMemoryFeed, pad: PadColumns) -> NativeStore | None:
    """The ragged columns, targets and weights of ``feed``'s rows; ``None`` when the data does not suit it.

    Raises:
        DataError: a cell of a padded column is not a sequence of numbers; the message names the column and
            the data row (and its index label).
    """
    import tensorflow as tf

    if not pad.pads_in_tensorflow:
        return None
    x, y = feed.data.take(feed._indices)
    if not isinstance(x, Mapping) and not hasattr(x, "columns"):
        return None
    available = list(x.columns) if hasattr(x, "columns") else list(x)
    if any(name not in available for name in pad.columns) or isinstance(y, Mapping):
        return None
    check = feed.nan_policy != "ignore"
    data_row = lambda row: feed._describe_row(int(feed._indices[row]))  # noqa: E731
    columns = []
    for name in pad.columns:
        values = _values(*_flattened(x[name], pad, name, data_row), pad, check)
        ragged = tf.RaggedTensor.from_row_lengths(values.flat, values.lengths, validate=False)
        columns.append(
            _Column(name, ragged, values.lengths, values.cut, values.nonfinite, values.feature_shape, values.nbytes)
        )
    targets, targets_nonfinite = _targets(pad, y, check)
    weights = feed.sample_weight[feed._indices] if feed.sample_weight is not None and targets is not None else None
    n_data = feed.data.n_samples
    inverse = None
    if len(feed._indices) != n_data or not np.array_equal(feed._indices, np.arange(n_data)):
        inverse = np.full(n_data, -1, dtype=np.int64)
        inverse[feed._indices] = np.arange(len(feed._indices))
    return NativeStore(
        columns=tuple(columns),
        targets=None if targets is None else tf.constant(targets),
        targets_nonfinite=targets_nonfinite,
        weights=None if weights is None else tf.constant(weights),
        inverse=inverse,
    )


class NativePadding:
    """An in-memory feed's export: row indices from Python (:meth:`element`), padded by :meth:`assemble`."""

    def __init__(self, feed: InMemoryFeed, pad: PadColumns, store: NativeStore, signature: Any) -> None:
        import tensorflow as tf

        self.feed = feed
        self.pad = pad
        self.store = store
        self.signature = signature
        self.element_signature = (
            tf.TensorSpec((None,), tf.int64, name="rows"),
            tf.TensorSpec((len(store.columns),), tf.int64, name="lengths"),
        )
        inputs = signature[0]
        self._specs = [inputs[column.name] for column in store.columns]
        self._positions: tuple[int, np.ndarray] | None = None
        per_row = [t for t in (store.targets, store.weights) if t is not None]
        self._row_bytes = sum(int(np.prod(t.shape[1:], dtype=np.int64)) * t.dtype.size for t in per_row)

    @classmethod
    def export(cls, feed: InMemoryFeed, pad: PadColumns, store: NativeStore, signature: Any) -> NativePadding | None:
        """The export, or ``None`` when ``signature`` is not the structure and dtypes ``pad`` gives (Python then)."""
        targets = None if store.targets is None else store.targets.dtype
        if not _signature_matches(signature, pad, targets, store.weights is not None):
            return None
        return cls(feed, pad, store, tuple(signature))

    def _store_rows(self) -> np.ndarray:
        """The epoch's order as positions in the store."""
        feed = self.feed
        cached = self._positions
        if cached is not None and cached[0] == feed.epoch:
            return cached[1]
        order = feed.epoch_order()
        positions = order if self.store.inverse is None else self.store.inverse[order]
        self._positions = (feed.epoch, positions)
        return positions

    def element(self, lo: int, hi: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``[lo, hi)`` of the epoch as ``(store rows, padded length of each column)``, checked and counted."""
        feed = self.feed
        started = time.perf_counter()
        rows = self._store_rows()[lo:hi]
        where = feed._where(lo, hi, index)
        columns = [
            _BatchColumn(
                column.name,
                column.lengths[rows],
                None if column.cut is None else column.cut[rows],
                None if column.nonfinite is None else column.nonfinite[rows],
                column.feature_shape,
            )
            for column in self.store.columns
        ]
        targets_nonfinite = self.store.targets_nonfinite
        positions = feed._indices
        origin = lambda p: feed._describe_row(int(positions[rows[p]]))  # noqa: E731
        lengths = _account(
            feed,
            self.pad,
            self._specs,
            columns,
            None if targets_nonfinite is None else targets_nonfinite[rows],
            where,
            f"batch {index}",
            origin,
            started,
            len(rows) * self._row_bytes,
        )
        return rows, lengths

    def assemble(self, rows: Any, lengths: Any) -> tuple[Any, ...]:
        """The batch of ``rows`` (a ``tf.data`` map function): each column gathered and padded to its length."""
        import tensorflow as tf

        store = self.store
        inputs = {
            column.name: _padded(tf.gather(column.values, rows), lengths[k : k + 1], self.pad, spec)
            for k, (column, spec) in enumerate(zip(store.columns, self._specs, strict=True))
        }
        element: list[Any] = [inputs]
        if store.targets is not None:
            element.append(tf.ensure_shape(tf.gather(store.targets, rows), self.signature[1].shape))
            if store.weights is not None:
                element.append(tf.ensure_shape(tf.gather(store.weights, rows), self.signature[2].shape))
        return tuple(element)


# --------------------------------------------------------------------------- shards


@dataclasses.dataclass(frozen=True, eq=False)
class RaggedShard:
    """One shard read for a :class:`NativeShards` export, its rows in this epoch's order within the file: each
    padded column's flat values, the targets and the weights, so that a batch's rows of it are one slice."""

    path: Path
    columns: tuple[_Values, ...]
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


def _reordered(values: _Values, order: np.ndarray) -> _Values:
    """``values`` with its rows in ``order``: one gather of every value, done once per shard on the reader thread."""
    lengths = values.lengths[order]
    # Each value's position: its row's start in the file, plus its place counted from its row's start in the output.
    shift = np.repeat(_offsets(values.lengths)[:-1][order] - (np.cumsum(lengths) - lengths), lengths)
    flat = values.flat[shift + np.arange(len(shift))]
    per_row = [None if a is None else a[order] for a in (values.cut, values.nonfinite)]
    return _Values(flat, lengths, *per_row)


def ragged_shard(feed: ShardFeed, pad: PadColumns, shard: ShardInfo, order: np.ndarray | None) -> RaggedShard:
    """Read ``shard`` for the export, its rows in ``order``: Parquet list columns of numbers straight from Arrow,
    anything else via pandas.

    Raises:
        DataError: the file cannot be read or changed since the feed counted it, or a cell of a padded column
            is not a sequence of numbers (naming the column, the file and the row).
    """
    from autobatch._data import _release_arrow_memory
    from autobatch.feeds.shards import shard_row

    targets = list(feed._target_names())
    wanted = [*pad.columns, *targets] + ([feed.sample_weight] if feed.sample_weight is not None else [])
    table = feed._read_table(shard, wanted)
    frame = feed._read_frame(shard) if table is None else None
    n_rows = table.num_rows if table is not None else len(frame)  # type: ignore[arg-type]
    feed._check_rows(shard, n_rows)
    check = feed.nan_policy != "ignore"
    file_row = lambda row: shard_row(shard.path, row)  # noqa: E731
    columns = []
    for name in pad.columns:
        found = _arrow_values(table.column(name), np.dtype(pad.dtype), order) if table is not None else None
        if found is not None:
            columns.append(_values(*found, pad, check))
            continue
        sequences = frame[name] if frame is not None else table.column(name).to_pandas()
        values = _values(*_flattened(sequences, pad, name, file_row), pad, check)
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
    converted, targets_nonfinite = _targets(pad, y, check)
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

    def __init__(self, feed: ShardFeed, pad: PadColumns, signature: Any) -> None:
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
    def export(cls, feed: ShardFeed, pad: PadColumns, signature: Any) -> NativeShards | None:
        """The export, or ``None`` when ``signature`` is not the structure and dtypes ``pad`` gives (Python then)."""
        inputs = [c for c in feed.shards[0].columns if c not in feed._target_names() and c != feed.sample_weight]
        if not pad.pads_in_tensorflow or any(name not in inputs for name in pad.columns):
            return None
        targets = None if not feed._target_names() else (pad.target_dtype or True)
        if not _signature_matches(signature, pad, targets, feed.sample_weight is not None):
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
            columns.append(_BatchColumn(name, lengths, cut, nonfinite, values[0].feature_shape))
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
        lengths = _account(
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
            inputs[name] = _padded(ragged, lengths[j : j + 1], self.pad, spec)
        rest = [tf.ensure_shape(part, spec.shape) for part, spec in zip(parts[2 * k + 1 :], self.signature[1:])]
        return (inputs, *rest)
