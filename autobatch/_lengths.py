"""Sample lengths along the padded axis, for size-aware batching.

A sample's length is the longest of its sequence columns: cells that are lists,
arrays or strings of whitespace-separated numbers (as CSV shards hold them).
Which columns hold sequences is found from the data (``detect_sequence_columns``)
unless the caller names them (``sequence_columns=``) or gives a ``length_fn``.

No TensorFlow here: the probe, the planner and the feeds all use it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd

from autobatch.errors import ConfigError, DataError, PreprocessError

LengthFn = Callable[[Any], Any]
"""``length_fn(batch_x) -> lengths``: one non-negative int per row of ``batch_x``."""


def _is_sequence_cell(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return True
    if isinstance(value, np.ndarray):
        return value.ndim >= 1
    if isinstance(value, str):
        tokens = value.split()
        if len(tokens) < 2:
            return False
        try:
            float(tokens[0]), float(tokens[-1])
        except ValueError:
            return False
        return True
    return False


def _columns_of(x: Any) -> dict[str, Any]:
    if isinstance(x, pd.DataFrame):
        return {str(name): x[name] for name in x.columns}
    if isinstance(x, Mapping):
        return {str(name): value for name, value in x.items()}
    return {}


def detect_sequence_columns(x: Any, *, probe_rows: int = 16) -> tuple[str, ...]:
    """The columns of a DataFrame (or dict of columns) whose cells are sequences.

    A column is a sequence column when its first ``probe_rows`` non-missing cells are
    lists, arrays or strings of at least two whitespace-separated numbers; a 2-D
    numeric array (already padded) is not one.

    Args:
        x: a DataFrame batch or a dict of column arrays.
        probe_rows: how many cells of each column to look at.

    Returns:
        The names, in the data's column order (empty when there are none).
    """
    found = []
    for name, column in _columns_of(x).items():
        values = column.to_numpy() if isinstance(column, pd.Series) else column
        if isinstance(values, np.ndarray) and values.dtype != object:
            continue
        cells = [v for v in list(values[: probe_rows * 4]) if not (isinstance(v, float) and np.isnan(v))][:probe_rows]
        if cells and all(_is_sequence_cell(v) for v in cells):
            found.append(name)
    return tuple(found)


def _column_lengths(values: Any, name: str) -> np.ndarray:
    if isinstance(values, pd.Series):
        series = values
    else:
        series = pd.Series(list(values))
    array = series.to_numpy()
    if len(array) == 0:
        return np.zeros(0, dtype=np.int64)
    if all(isinstance(v, str) for v in array[:64]) and all(isinstance(v, str) for v in array):
        try:
            import pyarrow as pa
            import pyarrow.compute as pc

            text = pc.ascii_trim_whitespace(pa.array(array, type=pa.large_string()))
            counts = pc.list_value_length(pc.ascii_split_whitespace(text))
            lengths = pc.fill_null(counts, 0).to_numpy(zero_copy_only=False).astype(np.int64)
            empty = pc.equal(text, "").to_numpy(zero_copy_only=False)
            return np.where(empty, 0, lengths)
        except ImportError:
            return np.fromiter((len(v.split()) for v in array), dtype=np.int64, count=len(array))
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            return np.fromiter((len(v.split()) for v in array), dtype=np.int64, count=len(array))
    try:
        return np.fromiter(
            (len(v.split()) if isinstance(v, str) else len(v) for v in array), dtype=np.int64, count=len(array)
        )
    except TypeError:
        bad = next(i for i, v in enumerate(array) if not isinstance(v, str) and not hasattr(v, "__len__"))
        raise DataError(
            f"column {name!r} holds {array[bad]!r} at row {bad}, which is not a sequence: size-aware batching needs "
            "a length for every row. Fix the data, name other `sequence_columns`, or pass `length_fn`.",
            row=bad,
        ) from None


def sample_lengths(
    x: Any, *, sequence_columns: Sequence[str] | None = None, length_fn: LengthFn | None = None
) -> np.ndarray:
    """The length of every row of ``x`` along the padded axis: the longest of its sequence columns.

    Args:
        x: a DataFrame (or a dict of columns; or anything ``length_fn`` takes).
        sequence_columns: the sequence columns; default: detected from the data.
        length_fn: ``length_fn(x) -> lengths`` instead of reading columns.

    Returns:
        An int64 array with one length per row.

    Raises:
        ConfigError: both ``sequence_columns`` and ``length_fn`` are given, or
            ``length_fn`` returns the wrong number of lengths or negative ones.
        DataError: no sequence column is found or named, a named column is
            missing, or a cell is not a sequence.
    """
    if length_fn is not None:
        if sequence_columns is not None:
            raise ConfigError("pass either `sequence_columns` or `length_fn`, not both.")
        lengths = np.asarray(length_fn(x))
        if isinstance(x, Mapping):
            n = len(next(iter(x.values()))) if x else 0
        else:
            n = len(x) if hasattr(x, "__len__") else -1
        if lengths.shape != (n,) or lengths.dtype.kind not in "iuf" or not np.all(np.mod(lengths, 1) == 0):
            raise ConfigError(
                f"`length_fn` must return one integer length per row: expected shape ({n},), received "
                f"{lengths.shape} of {lengths.dtype}."
            )
        lengths = lengths.astype(np.int64)
        if len(lengths) and lengths.min() < 0:
            raise ConfigError(f"`length_fn` returned a negative length ({int(lengths.min())}).")
        return lengths
    columns = _columns_of(x)
    names = (
        resolve_sequence_columns(x, sequence_columns) if sequence_columns is not None else detect_sequence_columns(x)
    )
    if not names:
        raise DataError(
            "size-aware batching needs the length of each sample, but no column of the data holds sequences "
            f"(lists, arrays or strings of numbers); columns are {list(columns)}. Name them with "
            "`sequence_columns=[...]` or pass `length_fn=`."
        )
    missing = [name for name in names if name not in columns]
    if missing:
        raise DataError(
            f"sequence column(s) {missing} not found in the data, whose columns are {list(columns)}. "
            "Pass the right `sequence_columns`."
        )
    lengths = _column_lengths(columns[names[0]], names[0])
    for name in names[1:]:
        lengths = np.maximum(lengths, _column_lengths(columns[name], name))
    return lengths


def resolve_sequence_columns(x: Any, sequence_columns: Sequence[str] | None) -> tuple[str, ...]:
    """``sequence_columns`` as a tuple, or the detected ones (possibly empty)."""
    if sequence_columns is not None:
        if isinstance(sequence_columns, str):
            return (sequence_columns,)
        return tuple(sequence_columns)
    return detect_sequence_columns(x)


def shard_lengths(
    files: Sequence[Any],
    *,
    target: Any = None,
    sequence_columns: Sequence[str] | None = None,
    length_fn: LengthFn | None = None,
) -> tuple[tuple[str, ...], list[np.ndarray]]:
    """The length of every row of every shard, reading only the sequence columns where it can.

    Args:
        files: shard paths, in order.
        target: the target column name(s), left out of detection.
        sequence_columns: the sequence columns; default: detected from the first shard.
        length_fn: ``length_fn(frame) -> lengths`` on each whole shard (target columns removed).

    Returns:
        The sequence columns used (empty with ``length_fn``) and one length array per shard.

    Raises:
        DataError: a shard cannot be read, or no sequence column is found.
    """
    from pathlib import Path

    from autobatch._shard_files import read_shard, shard_format

    names = [] if target is None else ([target] if isinstance(target, str) else list(target))
    out: list[np.ndarray] = []
    columns: tuple[str, ...] = ()
    for i, path in enumerate(files):
        path = Path(path)
        if length_fn is not None or (sequence_columns is None and i == 0):
            frame = read_shard(path)
            frame = frame.drop(columns=[n for n in names if n in frame.columns])
            if length_fn is None:
                columns = detect_sequence_columns(frame)
            out.append(sample_lengths(frame, sequence_columns=columns or None, length_fn=length_fn))
            continue
        if sequence_columns is not None and not columns:
            columns = (sequence_columns,) if isinstance(sequence_columns, str) else tuple(sequence_columns)
        try:
            if shard_format(path) == "parquet":
                frame = pd.read_parquet(path, columns=list(columns))
            else:
                frame = pd.read_csv(path, usecols=list(columns))
        except Exception as exc:  # pandas/pyarrow raise many types; all mean "cannot read these columns"
            raise DataError(f"cannot read sequence column(s) {list(columns)} of shard {str(path)!r}: {exc}") from exc
        out.append(sample_lengths(frame, sequence_columns=columns))
    return columns, out


def accepts_maxlen(preprocess: Callable[..., Any]) -> bool:
    """Whether ``preprocess`` takes a ``maxlen`` keyword (then the size-aware feed passes the bucket's length)."""
    import inspect

    try:
        parameters = inspect.signature(preprocess).parameters
    except (TypeError, ValueError):
        return False
    parameter = parameters.get("maxlen")
    return parameter is not None and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)


def fit_length(
    value: Any,
    length: int,
    variable: frozenset[str] | set[str],
    prefix: str,
    *,
    cut: bool | Literal["padding"] = True,
) -> Any:
    """``value`` with the padded axis (axis 1) of the leaves named in ``variable`` brought to ``length``.

    Shorter arrays are padded with zeros after their values; longer ones are cut
    at the end (``cut=True``), left as they are (``False``), or stripped of the
    zeros on whichever side holds only zeros (``"padding"``: pre- or post-padding;
    a :class:`PreprocessError` if both sides hold values). Leaves are named as the
    probe names them (``x/in1``, ``y``).
    """
    if isinstance(value, Mapping):
        return {key: fit_length(item, length, variable, f"{prefix}/{key}", cut=cut) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return tuple(fit_length(item, length, variable, f"{prefix}/{i}", cut=cut) for i, item in enumerate(value))
    if prefix not in variable or value is None:
        return value
    array = np.asarray(value)
    if array.ndim < 2 or array.shape[1] == length:
        return array
    if array.shape[1] > length:
        if cut == "padding":
            extra = array.shape[1] - length
            if not np.any(array[:, length:]):
                return array[:, :length]
            if not np.any(array[:, :extra]):
                return array[:, extra:]
            raise PreprocessError(
                f"preprocess returned {prefix} with {array.shape[1]} steps for a bucket padded to {length}, and values "
                f"on both sides beyond {length}: its samples are longer than their bucket says. Make the length "
                "(`sequence_columns=` / `length_fn=`) match what preprocess pads, or accept a `maxlen` keyword."
            )
        return array[:, :length] if cut else array
    widths = [(0, 0)] * array.ndim
    widths[1] = (0, length - array.shape[1])
    return np.pad(array, widths)
