"""Ragged sequences as one flat array of values and a length per sequence, with errors that name the bad one.

What padding and the native ``tf.data`` paths read: lists, arrays, Parquet
list cells, and strings of whitespace-separated numbers (as CSV shards hold,
split and parsed by Arrow's kernels, not per token in Python).
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from autobatch.errors import DataError


def _not_numbers(i: int, seq: Any, dtype: np.dtype) -> DataError:
    """The error for sequence ``i``, naming its first value that is not a number of ``dtype``."""
    tokens = list(seq) if isinstance(seq, (list, tuple, np.ndarray)) else [seq]
    bad = next((t for t in tokens if not _parses(t, dtype)), seq)
    shown = repr(bad) if len(repr(bad)) <= 40 else repr(bad)[:37] + "..."
    return DataError(
        f"sequence {i} holds {shown}, which is not a {dtype} number. Fix the data, or clean it in preprocess "
        "before padding.",
        row=i,
    )


def _parses(token: Any, dtype: np.dtype) -> bool:
    try:
        np.asarray(token, dtype=dtype)
    except (TypeError, ValueError):
        return False
    return True


def _parse_text(sequences: Any, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray] | None:
    """Strings of whitespace-separated numbers (as CSV shards hold), split and parsed by Arrow; else ``None``.

    Splitting and parsing in Arrow's C++ kernels creates no Python object per number,
    which the per-string path in :func:`flatten_sequences` does (``str.split`` and a list of
    tokens): that path made reading CSV shards about three times slower. Only ASCII
    text without missing values, parsed to a float dtype, takes this path; ``None``
    (text Arrow cannot parse, or anything else) leaves the per-string path to give
    the same values or name the bad sequence.
    """
    if dtype.kind != "f" or dtype.itemsize > 8:
        return None
    values: Any = sequences
    if isinstance(sequences, pd.Series):
        values = sequences.array
        if sequences.dtype == object:
            values = sequences.to_numpy()
        elif not isinstance(sequences.dtype, pd.StringDtype):
            return None  # e.g. an object-free numeric Series: not text
    if isinstance(values, (list, tuple)) or (isinstance(values, np.ndarray) and values.dtype == object):
        if len(values) == 0 or not all(isinstance(seq, str) for seq in values):
            return None
    elif not isinstance(values, pd.api.extensions.ExtensionArray) or len(values) == 0:
        return None
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        text = pa.array(values, type=pa.large_string())  # a pandas Arrow string column converts without copying
        if text.null_count or not pc.all(pc.string_is_ascii(text)).as_py():
            return None
        # Python's str.split() drops leading/trailing whitespace; Arrow's split keeps an empty token for it.
        text = pc.ascii_trim_whitespace(text)
        tokens = pc.ascii_split_whitespace(pc.if_else(pc.equal(text, ""), pa.scalar(None, pa.large_string()), text))
        lengths = pc.fill_null(pc.list_value_length(tokens), 0).to_numpy(zero_copy_only=False).astype(np.int64)
        # Parse as double, then cast: the values numpy gives (it parses text to a double first, too).
        flat = pc.cast(pc.list_flatten(tokens), pa.float64()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return None
    return flat.astype(dtype, copy=False), lengths


def flatten_sequences(sequences: Any, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """All values end to end, and each sequence's length.

    Fast path: one ``len`` per sequence and one ``np.concatenate``, both in C.
    Strings of whitespace-separated numbers (as CSV shards hold) are parsed by Arrow
    (:func:`_parse_text`), or split first where it declines;
    anything ``np.concatenate`` refuses is examined sequence by sequence to say which one is wrong.
    """
    parsed = _parse_text(sequences, dtype)
    if parsed is not None:
        return parsed
    if isinstance(sequences, pd.Series):
        sequences = sequences.to_numpy()
    if isinstance(sequences, np.ndarray) and sequences.dtype != object:
        if sequences.ndim < 2:
            raise DataError(
                "`sequences` must hold one sequence per row (a 2-D or larger array, or a list of sequences). "
                f"Received: an array of shape {sequences.shape}"
            )
        lengths = np.full(len(sequences), sequences.shape[1], dtype=np.int64)
        return sequences.reshape((-1,) + sequences.shape[2:]).astype(dtype, copy=False), lengths
    sequences = list(sequences)
    if not sequences:
        return np.zeros(0, dtype=dtype), np.zeros(0, dtype=np.int64)
    if any(isinstance(seq, str) for seq in sequences):
        sequences = [seq.split() if isinstance(seq, str) else seq for seq in sequences]
        if all(isinstance(seq, list) for seq in sequences):
            # One conversion of all tokens: numpy parses numeric strings far faster per call than per sequence.
            lengths = np.fromiter(map(len, sequences), dtype=np.int64, count=len(sequences))
            try:
                return np.array(list(itertools.chain.from_iterable(sequences)), dtype=dtype), lengths
            except (TypeError, ValueError):
                pass  # find the sequence at fault below, to name it
    try:
        lengths = np.fromiter(map(len, sequences), dtype=np.int64, count=len(sequences))
        flat = np.concatenate(sequences, axis=0, dtype=dtype, casting="unsafe")
        if flat.ndim >= 1 and len(flat) == lengths.sum():
            return flat, lengths
    except (TypeError, ValueError):
        pass
    arrays = []
    for i, seq in enumerate(sequences):
        try:
            if isinstance(seq, np.ndarray) and seq.dtype == object and seq.ndim == 1 and len(seq):
                seq = np.stack(seq)  # a Parquet list-of-lists cell reads as an object array of arrays
            array = np.asarray(seq, dtype=dtype)
        except (TypeError, ValueError):
            raise _not_numbers(i, seq, dtype) from None
        if array.ndim == 0:
            if isinstance(seq, float) and np.isnan(seq):
                raise DataError(
                    f"sequence {i} is missing (NaN, e.g. an empty CSV cell); expected a list, an array or a string "
                    "of numbers. Fill or drop that row.",
                    row=i,
                )
            raise DataError(
                f"sequence {i} is a scalar ({seq!r}); expected a list, an array or a string of numbers.", row=i
            )
        arrays.append(array)
    feature_shape = common_feature_shape(arrays)
    lengths = np.array([len(a) for a in arrays], dtype=np.int64)
    return np.concatenate([a.reshape((len(a),) + feature_shape) for a in arrays]), lengths


def numeric_cells(sequences: Any) -> list[np.ndarray] | None:
    """The sequences themselves when every one is a numeric array of one or more axes (as ``read_parquet``
    gives list cells), so they can be copied straight into the padded array; else ``None``."""
    if isinstance(sequences, pd.Series):
        if sequences.dtype != object:
            return None
        sequences = sequences.to_numpy()
    if isinstance(sequences, np.ndarray):
        if sequences.dtype != object:
            return None
    elif not isinstance(sequences, (list, tuple)):
        return None
    cells = list(sequences)
    # Whole-column checks through map (C loops): a per-cell Python test cost as much as copying the values.
    if not cells or set(map(type, cells)) != {np.ndarray} or 0 in set(map(_NDIM, cells)):
        return None
    if not all(dtype.kind in "biuf" for dtype in set(map(_DTYPE, cells))):
        return None
    return cells


_NDIM = operator.attrgetter("ndim")
_DTYPE = operator.attrgetter("dtype")


def common_feature_shape(arrays: Sequence[np.ndarray]) -> tuple[int, ...]:
    """The trailing axes every non-empty sequence shares; a :class:`DataError` naming the first that differs."""
    if set(map(_NDIM, arrays)) == {1}:
        return ()
    feature_shape = next((a.shape[1:] for a in arrays if len(a)), arrays[0].shape[1:])
    for i, array in enumerate(arrays):
        if len(array) and array.shape[1:] != feature_shape:
            raise DataError(
                f"sequence {i} has feature shape {array.shape[1:]}, but the first non-empty sequence has "
                f"{feature_shape}; every sequence must share its trailing axes.",
                row=i,
            )
    return feature_shape
