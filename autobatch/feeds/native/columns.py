"""What both TensorFlow-padded exports share: a padded column as flat values, and the checks of one batch.

A column's sequences become one array of values end to end plus each row's
length, cut to ``maxlen`` as ``pad_columns`` cuts them, with per row the time
steps truncation dropped and the NaN/inf values found. Each batch of an export is
checked and counted through the feed's own methods (:class:`BatchAccounts`), as
the Python path checks it, and padded in TensorFlow by :func:`pad_ragged`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from autobatch._sequences import flatten_sequences
from autobatch.errors import DataError
from autobatch.padding import PadColumns, Truncations, padded_length


class BatchAccounts(Protocol):
    """What an export checks and counts each batch through: the feed's methods that check its Python batches.

    A :class:`~autobatch.feeds.base.BaseFeed` provides them (``feeds.checks``, ``feeds.export``).
    """

    def _where(self, lo: int, hi: int, index: int, source: str = "") -> str:
        """How messages name rows ``[lo, hi)`` of batch ``index``."""
        ...

    def _check_shape(self, spec: Any, shape: tuple[int, ...], what: str) -> None:
        """Raise when ``shape`` does not fit the dataset's ``tf.TensorSpec`` ``spec``."""
        ...

    def _check_batch_bytes(self, nbytes: int, where: str) -> None:
        """Warn once when a batch holds more than the probe's worst case."""
        ...

    def _report_nonfinite(
        self, name: str, values: int, bad_rows: np.ndarray, where: str, origin: Callable[[int], str] | None
    ) -> None:
        """Warn once about NaN/inf values (or raise, as the feed's ``nan_policy`` says)."""
        ...

    def _record_batch(self, started: float, cut: Truncations, where: str, *, nonfinite: bool = False) -> None:
        """Count one batch served and the sequences cut in it."""
        ...


# --------------------------------------------------------------------------- columns as flat values


@dataclasses.dataclass(frozen=True)
class ColumnValues:
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


def column_values(flat: np.ndarray, lengths: np.ndarray, pad: PadColumns, check: bool) -> ColumnValues:
    """Flat values and lengths of one column, cut to ``pad.maxlen`` and counted."""
    flat, kept, cut = _truncated(flat, lengths, pad.maxlen, pad.truncating)
    return ColumnValues(flat, kept, cut, _nonfinite_per_row(flat, kept) if check else None)


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


def converted_targets(pad: PadColumns, y: Any, check: bool) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The converted targets and their NaN/inf values per row (``None``: none, or not checked)."""
    targets = pad.targets(y)
    if targets is None:
        return None, None
    targets = np.asarray(targets)
    if check and targets.dtype.kind in "fc" and not np.isfinite(targets).all():
        return targets, (~np.isfinite(targets)).reshape(len(targets), -1).sum(axis=1)
    return targets, None


def flat_column(
    sequences: Any, pad: PadColumns, name: str, where: Callable[[int], str], check: bool
) -> ColumnValues:
    """One column's cells (a Series or sequence of sequences) as :func:`column_values`.

    Raises:
        DataError: a cell is not a sequence of numbers; the message names the column and ``where(row)``.
    """
    return column_values(*_flattened(sequences, pad, name, where), pad, check)


def _flattened(sequences: Any, pad: PadColumns, name: str, where: Callable[[int], str]) -> tuple[np.ndarray, ...]:
    """``flatten_sequences`` of one column; a bad cell's :class:`DataError` names the column and ``where(row)``."""
    try:
        return flatten_sequences(sequences, np.dtype(pad.dtype))
    except DataError as exc:
        if exc.row is None:
            raise
        raise DataError(f"column {name!r}, {where(exc.row)}: {exc}", row=exc.row) from exc


# --------------------------------------------------------------------------- one batch: its checks and its padding


def signature_matches(signature: Any, pad: PadColumns, targets: Any, weights: bool) -> bool:
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
class BatchColumn:
    """One padded column of some rows (a batch's), before padding: what the checks and the statistics need."""

    name: str
    lengths: np.ndarray
    """Kept length of each row (after truncation)."""
    cut: np.ndarray | None
    nonfinite: np.ndarray | None
    feature_shape: tuple[int, ...]

    def take(self, rows: np.ndarray) -> BatchColumn:
        """The same counts for ``rows`` only."""
        cut = None if self.cut is None else self.cut[rows]
        nonfinite = None if self.nonfinite is None else self.nonfinite[rows]
        return BatchColumn(self.name, self.lengths[rows], cut, nonfinite, self.feature_shape)


def account_batch(
    feed: BatchAccounts,
    pad: PadColumns,
    specs: Sequence[Any],
    columns: Sequence[BatchColumn],
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
    feed: BatchAccounts, name: str, counts: np.ndarray | None, where: str, origin: Callable[[int], str]
) -> bool:
    if counts is None or not counts.any():
        return False
    feed._report_nonfinite(name, int(counts.sum()), counts > 0, where, origin)
    return True


def pad_ragged(ragged: Any, length: Any, pad: PadColumns, spec: Any) -> Any:
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


