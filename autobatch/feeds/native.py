"""Batches padded by TensorFlow: an in-memory feed whose ``preprocess`` is :class:`~autobatch.PadColumns`.

:meth:`InMemoryFeed.to_tf_dataset` builds the padded columns once as ragged
tensors (values after truncation, in the output dtype) and the targets as one
array; each batch is then an index slice in Python (the epoch's order, the
padded lengths, truncation and NaN/inf counts per row, all looked up) and a
gather and pad in TensorFlow, which holds no GIL and runs beside the step. The
batches are those ``PadColumns`` makes in Python (``tests/test_feeds.py`` checks
them value for value), and the feed's checks, statistics, warnings and epoch
semantics are the same.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from autobatch.errors import DataError
from autobatch.padding import PadColumns, Truncations, _flatten, padded_length

if TYPE_CHECKING:
    from autobatch.feeds.in_memory import InMemoryFeed


@dataclasses.dataclass(frozen=True)
class _Column:
    """One padded column of the feed's rows: ragged values, and per row its kept length, cut and NaN/inf counts."""

    name: str
    values: Any
    """``tf.RaggedTensor`` of the rows' sequences after truncation, in the output dtype."""
    lengths: np.ndarray
    cut: np.ndarray | None
    """Time steps truncation dropped per row (``None``: none anywhere)."""
    nonfinite: np.ndarray | None
    """NaN/inf values per row (``None``: none anywhere, or not checked)."""
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
    columns = []
    for name in pad.columns:
        try:
            flat, lengths = _flatten(x[name], np.dtype(pad.dtype))
        except DataError as exc:
            if exc.row is None:
                raise
            raise DataError(
                f"column {name!r}, {feed._describe_row(int(feed._indices[exc.row]))}: {exc}", row=exc.row
            ) from exc
        flat, kept, cut = _truncated(flat, lengths, pad.maxlen, pad.truncating)
        nonfinite = _nonfinite_per_row(flat, kept) if check else None
        values = tf.RaggedTensor.from_row_lengths(flat, kept, validate=False)
        columns.append(_Column(name, values, kept, cut, nonfinite, flat.shape[1:], flat.nbytes + kept.nbytes))
    targets = pad.targets(y)
    targets_nonfinite = None
    if targets is not None:
        targets = np.asarray(targets)
        if check and targets.dtype.kind in "fc" and not np.isfinite(targets).all():
            targets_nonfinite = (~np.isfinite(targets)).reshape(len(targets), -1).sum(axis=1)
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


class NativePadding:
    """One ``to_tf_dataset`` export: row indices from Python (:meth:`element`), padded by :meth:`assemble`."""

    def __init__(self, feed: InMemoryFeed, pad: PadColumns, store: NativeStore, signature: Any) -> None:
        import tensorflow as tf

        self.feed = feed
        self.pad = pad
        self.store = store
        self.signature = signature
        self.index_signature = (
            tf.TensorSpec((None,), tf.int64, name="rows"),
            tf.TensorSpec((len(store.columns),), tf.int64, name="lengths"),
        )
        inputs = signature[0]
        self._specs = [inputs[column.name] for column in store.columns]
        self._positions: tuple[int, np.ndarray] | None = None

    @classmethod
    def export(cls, feed: InMemoryFeed, pad: PadColumns, store: NativeStore, signature: Any) -> NativePadding | None:
        """The export, or ``None`` when ``signature`` is not the structure and dtypes ``pad`` gives (Python then)."""
        import tensorflow as tf

        expected: list[Any] = [{column.name: pad.dtype for column in store.columns}]
        if store.targets is not None:
            expected.append(store.targets.dtype)
            if store.weights is not None:
                expected.append(store.weights.dtype)
        try:
            tf.nest.assert_same_structure(tuple(signature), tuple(expected))
        except (TypeError, ValueError):
            return None
        for spec, dtype in zip(tf.nest.flatten(signature), tf.nest.flatten(tuple(expected)), strict=True):
            if spec.dtype != tf.as_dtype(dtype):
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
        feed, pad = self.feed, self.pad
        started = time.perf_counter()
        rows = self._store_rows()[lo:hi]
        where = f"batch {index} (rows {lo}-{hi - 1} of epoch {feed.epoch})"
        cut = Truncations()
        lengths = []
        found = False
        for column, spec in zip(self.store.columns, self._specs, strict=True):
            length = padded_length(int(column.lengths[rows].max()) if len(rows) else 0, pad.maxlen, pad.bucket)
            lengths.append(length)
            shape = (len(rows), length, *column.feature_shape) + ((1,) if pad.add_feature_axis else ())
            feed._check_shape(spec, shape, f"batch {index}")
            if column.cut is not None:
                dropped = column.cut[rows]
                count = int(np.count_nonzero(dropped))
                if count:
                    cut.sequences += count
                    cut.values += int(dropped.sum())
                    cut.by_column[column.name] = count
                    cut.maxlen[column.name] = int(length)
            found |= self._nonfinite(f"x/{column.name}", column.nonfinite, rows, where)
        found |= self._nonfinite("y", self.store.targets_nonfinite, rows, where)
        feed._record_batch(started, cut, where, nonfinite=found)
        return rows, np.asarray(lengths, dtype=np.int64)

    def _nonfinite(self, name: str, per_row: np.ndarray | None, rows: np.ndarray, where: str) -> bool:
        if per_row is None:
            return False
        counts = per_row[rows]
        if not counts.any():
            return False
        feed = self.feed
        positions = feed._indices
        origin = lambda p: feed._describe_row(int(positions[rows[p]]))  # noqa: E731
        feed._report_nonfinite(name, int(counts.sum()), counts > 0, where, origin)
        return True

    def assemble(self, rows: Any, lengths: Any) -> tuple[Any, ...]:
        """The batch of ``rows`` (a ``tf.data`` map function): each column gathered and padded to its length."""
        import tensorflow as tf

        pad, store = self.pad, self.store
        n = tf.shape(rows, out_type=tf.int64)[:1]
        inputs = {}
        for k, (column, spec) in enumerate(zip(store.columns, self._specs, strict=True)):
            gathered = tf.gather(column.values, rows)
            if pad.maxlen is None and pad.bucket is None:  # the batch's longest: to_tensor's own length
                padded = gathered.to_tensor(default_value=pad.value)
            else:
                shape = tf.concat([n, lengths[k : k + 1], tf.constant(column.feature_shape, dtype=tf.int64)], axis=0)
                padded = gathered.to_tensor(default_value=pad.value, shape=shape)
            if pad.add_feature_axis:
                padded = padded[..., tf.newaxis]
            inputs[column.name] = tf.ensure_shape(padded, spec.shape)
        element: list[Any] = [inputs]
        if store.targets is not None:
            element.append(tf.ensure_shape(tf.gather(store.targets, rows), self.signature[1].shape))
            if store.weights is not None:
                element.append(tf.ensure_shape(tf.gather(store.weights, rows), self.signature[2].shape))
        return tuple(element)
