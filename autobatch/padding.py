"""Pad variable-length sequences per batch: to the batch max, a fixed length, or a length bucket.

Every new padded shape makes TensorFlow retrace the training function and
fragments memory, so padding to a *bucket* (the next power of two, or the next
multiple of 64) bounds the number of distinct shapes while wasting little.

The semantics follow ``keras.utils.pad_sequences`` where they overlap
(``maxlen``, ``truncating``, ``padding``, ``value``, ``dtype``), except that
``padding`` defaults to ``"post"`` as most sequence models expect. Each
sequence is copied into a preallocated array with one slice assignment (no
Python loop over elements); text is split and parsed by Arrow first.

Padding is consistent with the probe when the same function pads both: the
probe's worst-case batch holds the longest rows, so padding it to the batch max
(or bucket) gives the largest shape any real batch of that size can have.

Truncation to a fixed ``maxlen`` drops data, so it is counted: inside
:func:`count_truncations` (which every feed wraps around ``preprocess``) each
sequence cut short is tallied, per column for :func:`pad_columns`, and a feed
reports the total (``feed.stats.truncated_sequences``, a warning, the monitor's summary).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd

from autobatch._sequences import common_feature_shape, flatten_sequences, numeric_cells
from autobatch.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

Bucket = Literal["pow2"] | int


@dataclasses.dataclass
class Truncations:
    """Sequences the padding helpers cut to ``maxlen`` while :func:`count_truncations` was active."""

    sequences: int = 0
    """Sequences longer than their padded length, cut as ``keras.utils.pad_sequences`` cuts them."""
    values: int = 0
    """Time steps dropped by those cuts."""
    by_column: dict[str, int] = dataclasses.field(default_factory=dict)
    """Cut sequences per column, for :func:`pad_columns` (``pad_sequences_batch`` counts only in the totals)."""
    maxlen: dict[str, int] = dataclasses.field(default_factory=dict)
    """The length each column was cut to (the last one seen)."""

    def add(self, other: Truncations) -> None:
        """Add another tally's counts to this one."""
        self.sequences += other.sequences
        self.values += other.values
        for name, count in other.by_column.items():
            self.by_column[name] = self.by_column.get(name, 0) + count
        self.maxlen.update(other.maxlen)


_ACTIVE: contextvars.ContextVar[tuple[Truncations, ...]] = contextvars.ContextVar("autobatch_truncations", default=())


@contextlib.contextmanager
def count_truncations() -> Iterator[Truncations]:
    """Count the sequences :func:`pad_sequences_batch` and :func:`pad_columns` truncate inside this block.

    Blocks nest (each counts what happens inside it) and are per thread. Every
    feed wraps its calls of ``preprocess`` in one, so truncation during training
    is reported without this; use it to check a ``preprocess`` by hand.

    Example:
        >>> with count_truncations() as cut:
        ...     pad_sequences_batch([[1, 2, 3], [4]], maxlen=2)
        >>> cut.sequences, cut.values
        (1, 1)
    """
    tally = Truncations()
    token = _ACTIVE.set((*_ACTIVE.get(), tally))
    try:
        yield tally
    finally:
        _ACTIVE.reset(token)


def _record_truncation(lengths: np.ndarray, length: int, column: str | None) -> None:
    active = _ACTIVE.get()
    if not active or not len(lengths):
        return
    over = lengths > length
    cut = int(over.sum())
    if not cut:
        return
    dropped = int((lengths[over] - length).sum())
    for tally in active:
        tally.sequences += cut
        tally.values += dropped
        if column is not None:
            tally.by_column[column] = tally.by_column.get(column, 0) + cut
            tally.maxlen[column] = int(length)


def bucket_length(length: int, bucket: Bucket | None) -> int:
    """Round a sequence length up to its bucket.

    Args:
        length: the longest sequence (after any truncation).
        bucket: ``None`` (no rounding), ``"pow2"`` (next power of two) or a
            positive int (next multiple of it). A length of 0 rounds to the
            smallest bucket (1 or the multiple), so a batch never has an empty time axis.

    Returns:
        The padded length.

    Raises:
        ConfigError: ``bucket`` is neither ``"pow2"`` nor a positive int.
    """
    if bucket is None:
        return length
    if bucket == "pow2":
        return 1 << max(int(length) - 1, 0).bit_length()
    if isinstance(bucket, (int, np.integer)) and not isinstance(bucket, bool) and bucket >= 1:
        return max(-(-int(length) // int(bucket)), 1) * int(bucket)
    raise ConfigError(f'`bucket` must be "pow2" or a positive int (a multiple such as 64). Received: bucket={bucket!r}')


def pad_sequences_batch(
    sequences: Sequence[Any] | np.ndarray | pd.Series,
    *,
    maxlen: int | None = None,
    bucket: Bucket | None = None,
    dtype: str | np.dtype = "float32",
    value: float = 0.0,
    truncating: Literal["pre", "post"] = "pre",
    padding: Literal["pre", "post"] = "post",
) -> np.ndarray:
    """Pad one batch of variable-length sequences into a rectangular array.

    The padded length is, as with ``keras.utils.pad_sequences``, ``maxlen`` when
    given, else the longest sequence in the batch. With ``bucket``, it is the
    longest sequence rounded up to the bucket, and ``maxlen`` only caps it.
    Sequences longer than that are truncated as ``keras.utils.pad_sequences``
    does: ``truncating="pre"`` drops values from the start, ``"post"`` from the end.

    Args:
        sequences: a list/array/Series of sequences (lists, arrays, or strings of
            whitespace-separated numbers); each may have trailing feature axes,
            which must agree.
        maxlen: the padded length (with ``bucket``: the largest one); longer
            sequences are truncated.
        bucket: ``"pow2"`` or an int multiple to round the batch's longest
            sequence up to, so few distinct shapes reach the model.
        dtype: dtype of the result.
        value: the padding value.
        truncating: which end of a too-long sequence is dropped.
        padding: which end the padding goes at (``"post"``: after the values).

    Returns:
        An array of shape ``(len(sequences), length) + feature_shape``. Sequences
        cut short are counted by an enclosing :func:`count_truncations`.

    Raises:
        ConfigError: an option is out of range.
        DataError: a sequence is a scalar, missing, holds a value that is not a
            number, or its feature shape differs from the others; the message
            names the sequence and ``error.row`` is its position.

    Example:
        >>> pad_sequences_batch([[1, 2, 3], [4]], bucket=4)
        array([[1., 2., 3., 0.],
               [4., 0., 0., 0.]], dtype=float32)
    """
    return _pad(sequences, maxlen, bucket, dtype, value, truncating, padding, column=None)


def _pad(
    sequences: Any,
    maxlen: int | None,
    bucket: Bucket | None,
    dtype: str | np.dtype,
    value: float,
    truncating: str,
    padding: str,
    *,
    column: str | None,
) -> np.ndarray:
    _check_options(maxlen, bucket, truncating, padding)
    dtype = np.dtype(dtype)
    cells = numeric_cells(sequences)
    if cells is not None:
        lengths = np.fromiter(map(len, cells), dtype=np.int64, count=len(cells))
        feature_shape = common_feature_shape(cells)
    else:
        flat, lengths = flatten_sequences(sequences, dtype)
        feature_shape = flat.shape[1:]
        ends = np.cumsum(lengths).tolist()
        cells = [flat[end - k : end] for end, k in zip(ends, lengths.tolist(), strict=True)]
    n = len(lengths)
    length = padded_length(int(lengths.max()) if n else 0, maxlen, bucket)
    shape = (n, length) + feature_shape
    out = np.zeros(shape, dtype=dtype) if value == 0 and not np.signbit(value) else np.full(shape, value, dtype=dtype)
    _record_truncation(lengths, length, column)
    if length == 0:
        return out
    # One slice assignment per sequence: faster than a boolean-mask scatter at every batch size measured
    # (fewer passes over the padded array), and it copies array cells without concatenating them first.
    for row, cell in enumerate(cells):
        k = len(cell)
        if k > length:
            cell = cell[:length] if truncating == "post" else cell[k - length :]
            k = length
        if k:
            if padding == "post":
                out[row, :k] = cell
            else:
                out[row, length - k :] = cell
    return out


def _check_options(maxlen: int | None, bucket: Bucket | None, truncating: str, padding: str) -> None:
    if truncating not in ("pre", "post"):
        raise ConfigError(f'`truncating` must be "pre" or "post". Received: truncating={truncating!r}')
    if padding not in ("pre", "post"):
        raise ConfigError(f'`padding` must be "pre" or "post". Received: padding={padding!r}')
    if maxlen is not None and (not isinstance(maxlen, (int, np.integer)) or maxlen < 0):
        raise ConfigError(f"`maxlen` must be a non-negative int or None. Received: maxlen={maxlen!r}")
    if bucket is not None:
        bucket_length(1, bucket)  # validates


def padded_length(longest: int, maxlen: int | None, bucket: Bucket | None) -> int:
    """The length a batch whose longest sequence is ``longest`` is padded to (see :func:`pad_sequences_batch`)."""
    if bucket is None:
        return longest if maxlen is None else int(maxlen)
    length = bucket_length(longest if maxlen is None else min(longest, int(maxlen)), bucket)
    return length if maxlen is None else min(length, int(maxlen))


def pad_columns(
    frame: pd.DataFrame | Mapping[str, Any],
    columns: Sequence[str],
    *,
    maxlen: int | Mapping[str, int] | None = None,
    bucket: Bucket | None = None,
    dtype: str | np.dtype = "float32",
    value: float = 0.0,
    truncating: Literal["pre", "post"] = "pre",
    padding: Literal["pre", "post"] = "post",
    add_feature_axis: bool = False,
) -> dict[str, np.ndarray]:
    """Pad named sequence columns of a batch, each to its own length, into a dict of arrays.

    Args:
        frame: a DataFrame batch (or a dict of columns).
        columns: the sequence columns to pad; the dict keys of the result, in this order.
        maxlen: one cap for all columns, or a per-column mapping.
        bucket: ``"pow2"`` or an int multiple (see :func:`pad_sequences_batch`).
        dtype: dtype of the results.
        value: the padding value.
        truncating: which end of a too-long sequence is dropped.
        padding: which end the padding goes at.
        add_feature_axis: append an axis of size 1, for models whose inputs are
            ``(None, 1)`` sequences of scalars.

    Returns:
        ``{column: padded array}``.

    Raises:
        DataError: a named column is missing, or a cell is not a sequence of
            numbers; the message names the column and the row (position in the
            batch and index label), and ``error.row`` is the position.

    Example:
        >>> def preprocess(batch_x, batch_y):
        ...     inputs = pad_columns(batch_x, ["in1", "in2"], bucket=64, add_feature_axis=True)
        ...     return inputs, batch_y.to_numpy("float32")
    """
    available = list(frame.columns) if isinstance(frame, pd.DataFrame) else list(frame)
    missing = [c for c in columns if c not in available]
    if missing:
        raise DataError(f"cannot pad column(s) {missing}: not in the batch, whose columns are {available}.")
    out = {}
    for name in columns:
        cap = maxlen.get(name) if isinstance(maxlen, Mapping) else maxlen
        with naming_the_cell(frame[name], name, "of the batch"):
            padded = _pad(frame[name], cap, bucket, dtype, value, truncating, padding, column=str(name))
        out[name] = padded[..., None] if add_feature_axis else padded
    return out


@contextlib.contextmanager
def naming_the_cell(column: Any, name: str, of: str) -> Iterator[None]:
    """Re-raise a :class:`DataError` about a row of ``column`` naming the column, the row and its index label."""
    try:
        yield
    except DataError as exc:
        if exc.row is None:
            raise
        where = f"row {exc.row} {of}"
        index = getattr(column, "index", None)
        if index is not None and exc.row < len(index):
            label = index[exc.row]
            where += f" (index label {label.item() if isinstance(label, np.generic) else label!r})"
        raise DataError(f"column {name!r}, {where}: {exc}", row=exc.row) from exc


@dataclasses.dataclass(frozen=True)
class PadColumns:
    """A ``preprocess`` that pads named sequence columns and converts the targets, which feeds can run in tf.data.

    ``PadColumns(columns, ...)(batch_x, batch_y)`` returns
    ``(pad_columns(batch_x, columns, ...), targets)``, so it works wherever a
    ``preprocess`` function does (probes, plans, ``feed[i]``). An
    :class:`~autobatch.InMemoryFeed` or a :class:`~autobatch.ShardFeed` given one
    exports it natively: its :meth:`~autobatch.feeds.BaseFeed.to_tf_dataset` (and so
    :func:`autobatch.fit`) pads each batch with TensorFlow ops, instead of in
    Python. The batches are the same; the Python work per batch, which on a
    machine whose cores the training step keeps busy costs its time again in
    the step, becomes a slice. In memory the export keeps one copy of the padded
    columns' values (after truncation) and of the targets, in ``dtype``, for the
    feed's life; streaming, each shard is read once into flat values in the epoch's
    row order (one shard's copy). :func:`autobatch.plan` budgets either.
    ``feed.stats.seconds`` then counts only the Python part of each batch.
    ``padding="pre"``, a non-finite ``value``, dict targets, size-aware feeds and
    ``adaptive`` exports pad in Python.

    Args:
        columns: the sequence columns to pad; the keys of the inputs dict, in this order.
        maxlen, bucket, dtype, value, truncating, padding, add_feature_axis: as for :func:`pad_columns`.
        target_dtype: dtype of the targets array (``None``: as they are).
        target_axis: give 1-D targets a trailing axis of size 1 (``(n,)`` → ``(n, 1)``), as
            a model with one output unit expects.

    Raises:
        ConfigError: an option is out of range.

    Example:
        >>> pad = autobatch.PadColumns(["in1", "in2"], add_feature_axis=True, target_axis=True)
        >>> autobatch.fit(model, df, "label", preprocess=pad, ram_limit="8GiB")
    """

    columns: tuple[str, ...]
    maxlen: int | None = None
    bucket: Bucket | None = None
    dtype: str = "float32"
    value: float = 0.0
    truncating: Literal["pre", "post"] = "pre"
    padding: Literal["pre", "post"] = "post"
    add_feature_axis: bool = False
    target_dtype: str | None = "float32"
    target_axis: bool = False

    def __post_init__(self) -> None:
        columns = (self.columns,) if isinstance(self.columns, str) else tuple(self.columns)
        if not columns:
            raise ConfigError("PadColumns needs at least one column to pad. Received: columns=()")
        object.__setattr__(self, "columns", columns)
        _check_options(self.maxlen, self.bucket, self.truncating, self.padding)
        np.dtype(self.dtype)  # validates
        if self.target_dtype is not None:
            np.dtype(self.target_dtype)

    def __call__(self, batch_x: Any, batch_y: Any) -> tuple[dict[str, np.ndarray], Any]:
        inputs = pad_columns(
            batch_x,
            self.columns,
            maxlen=self.maxlen,
            bucket=self.bucket,
            dtype=self.dtype,
            value=self.value,
            truncating=self.truncating,
            padding=self.padding,
            add_feature_axis=self.add_feature_axis,
        )
        return inputs, self.targets(batch_y)

    @property
    def pads_in_tensorflow(self) -> bool:
        """Whether a feed's tf.data export pads with TensorFlow ops (not for ``padding="pre"`` or a NaN/inf
        ``value``: those pad in Python)."""
        return self.padding == "post" and bool(np.isfinite(self.value))

    def export_bytes(self, x: Any, y: Any = None) -> int:
        """Bytes an in-memory feed's tf.data export of ``x``, ``y`` holds besides them: the padded columns' values
        after truncation (and one length per row) and the targets, in their output dtypes; 0 when it pads in Python.

        Raises:
            DataError: a cell of a padded column is not a sequence of numbers.
        """
        if not self.pads_in_tensorflow:
            return 0
        itemsize = np.dtype(self.dtype).itemsize
        total = 0
        for name in self.columns:
            column = x[name]
            cells = numeric_cells(column)
            if cells is not None:
                lengths = np.fromiter(map(len, cells), dtype=np.int64, count=len(cells))
                steps = int(np.prod(common_feature_shape(cells), dtype=np.int64))
            else:
                with naming_the_cell(column, name, "of the data"):
                    flat, lengths = flatten_sequences(column, np.dtype(self.dtype))
                steps = int(np.prod(flat.shape[1:], dtype=np.int64))
            kept = lengths if self.maxlen is None else np.minimum(lengths, self.maxlen)
            total += int(kept.sum()) * steps * itemsize + lengths.nbytes
        targets = self.targets(y)
        if isinstance(targets, Mapping):
            return total
        return total + (int(np.asarray(targets).nbytes) if targets is not None else 0)

    def targets(self, y: Any) -> Any:
        """``y`` (of a batch, or of the whole data) as the targets array; ``None`` stays ``None``."""
        if y is None:
            return None
        if isinstance(y, Mapping):
            return {name: self.targets(value) for name, value in y.items()}
        array = np.asarray(y) if self.target_dtype is None else np.asarray(y, dtype=self.target_dtype)
        return array[:, None] if self.target_axis and array.ndim == 1 else array
