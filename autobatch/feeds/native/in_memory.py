"""An in-memory feed's export: its padded columns held once as ragged tensors, each batch a gather and a pad.

:func:`build_store` converts the feed's rows once (values after truncation, in
the output dtype, with per row the counts the checks need); :class:`NativePadding`
then hands ``tf.data`` each batch's store rows and padded lengths, looked up in
Python, and gathers and pads them in TensorFlow.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np

from autobatch.feeds.native.columns import (
    BatchAccounts,
    BatchColumn,
    account_batch,
    converted_targets,
    flat_column,
    pad_ragged,
    signature_matches,
)
from autobatch.padding import PadColumns


class InMemoryRows(BatchAccounts, Protocol):
    """What :class:`NativePadding` reads of its feed (an :class:`~autobatch.InMemoryFeed`)."""

    @property
    def epoch(self) -> int:
        """The epoch whose order the feed serves."""
        ...

    def epoch_order(self) -> np.ndarray:
        """Data rows in the current epoch's order."""
        ...

    def _describe_row(self, row: int) -> str:
        """How messages name data row ``row``."""
        ...


@dataclasses.dataclass(frozen=True)
class _Column:
    """One padded column of the feed's rows: ragged values, and per row its kept length, cut and NaN/inf counts."""

    values: Any
    """``tf.RaggedTensor`` of the rows' sequences after truncation, in the output dtype."""
    per_row: BatchColumn
    nbytes: int

    @property
    def name(self) -> str:
        return self.per_row.name


@dataclasses.dataclass(frozen=True)
class NativeStore:
    """What the export holds for the feed's life: the padded columns, the targets and the sample weights."""

    columns: tuple[_Column, ...]
    targets: Any
    """``tf.Tensor`` of the converted targets, or ``None``."""
    targets_nonfinite: np.ndarray | None
    weights: Any
    data_rows: np.ndarray
    """The data row of each store row (the feed's rows, in the feed's order)."""
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


def build_store(
    pad: PadColumns,
    x: Any,
    y: Any,
    *,
    rows: np.ndarray,
    n_data: int,
    sample_weight: np.ndarray | None,
    check_nonfinite: bool,
    describe_row: Callable[[int], str],
) -> NativeStore | None:
    """The ragged columns, targets and weights of a feed's rows; ``None`` when the data does not suit it.

    Args:
        pad: the feed's ``preprocess``.
        x: the inputs of the feed's rows, in order (a DataFrame or a dict of columns).
        y: their targets.
        rows: the data row of each of them.
        n_data: rows in the whole data (the feed may hold a subset, after a split).
        sample_weight: a weight per data row, or ``None``.
        check_nonfinite: count NaN/inf values per row (the feed's ``nan_policy`` is not ``"ignore"``).
        describe_row: how messages name a data row.

    Raises:
        DataError: a cell of a padded column is not a sequence of numbers; the message names the column and
            the data row (and its index label).
    """
    import tensorflow as tf

    if not pad.pads_in_tensorflow:
        return None
    if not isinstance(x, Mapping) and not hasattr(x, "columns"):
        return None
    available = list(x.columns) if hasattr(x, "columns") else list(x)
    if any(name not in available for name in pad.columns) or isinstance(y, Mapping):
        return None
    data_row = lambda row: describe_row(int(rows[row]))  # noqa: E731
    columns = []
    for name in pad.columns:
        values = flat_column(x[name], pad, name, data_row, check_nonfinite)
        ragged = tf.RaggedTensor.from_row_lengths(values.flat, values.lengths, validate=False)
        per_row = BatchColumn(name, values.lengths, values.cut, values.nonfinite, values.feature_shape)
        columns.append(_Column(ragged, per_row, values.nbytes))
    targets, targets_nonfinite = converted_targets(pad, y, check_nonfinite)
    weights = sample_weight[rows] if sample_weight is not None and targets is not None else None
    inverse = None
    if len(rows) != n_data or not np.array_equal(rows, np.arange(n_data)):
        inverse = np.full(n_data, -1, dtype=np.int64)
        inverse[rows] = np.arange(len(rows))
    return NativeStore(
        columns=tuple(columns),
        targets=None if targets is None else tf.constant(targets),
        targets_nonfinite=targets_nonfinite,
        weights=None if weights is None else tf.constant(weights),
        data_rows=rows,
        inverse=inverse,
    )


class NativePadding:
    """An in-memory feed's export: row indices from Python (:meth:`element`), padded by :meth:`assemble`."""

    def __init__(self, feed: InMemoryRows, pad: PadColumns, store: NativeStore, signature: Any) -> None:
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
    def export(cls, feed: InMemoryRows, pad: PadColumns, store: NativeStore, signature: Any) -> NativePadding | None:
        """The export, or ``None`` when ``signature`` is not the structure and dtypes ``pad`` gives (Python then)."""
        targets = None if store.targets is None else store.targets.dtype
        if not signature_matches(signature, pad, targets, store.weights is not None):
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
        columns = [column.per_row.take(rows) for column in self.store.columns]
        targets_nonfinite = self.store.targets_nonfinite
        data_rows = self.store.data_rows
        origin = lambda p: feed._describe_row(int(data_rows[rows[p]]))  # noqa: E731
        lengths = account_batch(
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
            column.name: pad_ragged(tf.gather(column.values, rows), lengths[k : k + 1], self.pad, spec)
            for k, (column, spec) in enumerate(zip(store.columns, self._specs, strict=True))
        }
        element: list[Any] = [inputs]
        if store.targets is not None:
            element.append(tf.ensure_shape(tf.gather(store.targets, rows), self.signature[1].shape))
            if store.weights is not None:
                element.append(tf.ensure_shape(tf.gather(store.weights, rows), self.signature[2].shape))
        return tuple(element)

