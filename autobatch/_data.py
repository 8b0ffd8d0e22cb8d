"""Data sources: in-memory tables and numbered shard files, and sampling them for the probe.

A source is either held in memory (a pandas DataFrame, a dict/tuple of numpy
arrays, plus targets) or a set of shard files (CSV/Parquet, read by
:mod:`autobatch._shard_files`). The probe never needs all rows at once: it needs
the row count, the raw in-memory size, a random sample and the largest rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from autobatch._shard_files import count_rows, largest_file, read_shard, resolve_shards, shard_info_columns
from autobatch.errors import DataError


Targets = Any  # ndarray | Series | DataFrame | dict[str, ndarray] | None


def _length(value: Any) -> int:
    return len(value)


def _take(value: Any, indices: np.ndarray) -> Any:
    if value is None:
        return None
    if isinstance(value, (pd.DataFrame, pd.Series)):
        return value.iloc[indices]
    if isinstance(value, Mapping):
        return {key: _take(item, indices) for key, item in value.items()}
    if isinstance(value, tuple):
        return tuple(_take(item, indices) for item in value)
    return np.asarray(value)[indices] if not isinstance(value, np.ndarray) else value[indices]


_ARRAY_HEADER = sys.getsizeof(np.empty(0))


def _cell_nbytes(value: Any) -> int:
    # An ndarray cell may be a view into an Arrow buffer (read_parquet): getsizeof would miss its data.
    if isinstance(value, np.ndarray):
        return _ARRAY_HEADER + value.nbytes
    if isinstance(value, (list, tuple)):
        return sys.getsizeof(value) + sum(sys.getsizeof(v) for v in value)
    return sys.getsizeof(value)


def _object_nbytes(values: np.ndarray) -> np.ndarray:
    """Bytes of each object cell plus its 8-byte pointer."""
    return np.fromiter((_cell_nbytes(v) for v in values), dtype=np.int64, count=len(values)) + 8


def _row_nbytes(value: Any, n: int) -> np.ndarray:
    """Bytes each row occupies in memory (the pointer plus the object for object columns)."""
    if value is None:
        return np.zeros(n, dtype=np.int64)
    if isinstance(value, pd.DataFrame):
        total = np.zeros(n, dtype=np.int64)
        for name in value.columns:
            total += _row_nbytes(value[name], n)
        return total
    if isinstance(value, pd.Series):
        if value.dtype == object or isinstance(value.dtype, pd.StringDtype):
            if isinstance(value.dtype, pd.StringDtype):
                return value.str.len().fillna(0).to_numpy(dtype=np.int64) + 16
            return _object_nbytes(value.to_numpy())
        itemsize = getattr(value.dtype, "itemsize", None)
        if itemsize is None:  # extension dtypes (categorical, ...): spread the measured total evenly
            return np.full(n, int(value.memory_usage(deep=True, index=False)) // max(n, 1), dtype=np.int64)
        return np.full(n, itemsize, dtype=np.int64)
    if isinstance(value, Mapping):
        total = np.zeros(n, dtype=np.int64)
        for item in value.values():
            total += _row_nbytes(item, n)
        return total
    if isinstance(value, tuple):
        total = np.zeros(n, dtype=np.int64)
        for item in value:
            total += _row_nbytes(item, n)
        return total
    array = np.asarray(value)
    if array.dtype == object:
        return _object_nbytes(array.reshape(n, -1).sum(axis=1) if array.ndim > 1 else array)
    return np.full(n, array.itemsize * int(np.prod(array.shape[1:], dtype=np.int64)), dtype=np.int64)


def _total_nbytes(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, (pd.DataFrame, pd.Series)):
        return int(value.index.memory_usage(deep=True)) + int(_row_nbytes(value, len(value)).sum())
    if isinstance(value, Mapping):
        return sum(_total_nbytes(item) for item in value.values())
    if isinstance(value, tuple):
        return sum(_total_nbytes(item) for item in value)
    array = np.asarray(value)
    if array.dtype == object:
        return int(_object_nbytes(array.ravel()).sum())
    return int(array.nbytes)


def _lengths(value: Any, where: str) -> dict[str, int]:
    if value is None:
        return {}
    if isinstance(value, Mapping):
        out: dict[str, int] = {}
        for key, item in value.items():
            out.update(_lengths(item, f"{where}[{key!r}]"))
        return out
    if isinstance(value, tuple):
        out = {}
        for i, item in enumerate(value):
            out.update(_lengths(item, f"{where}[{i}]"))
        return out
    try:
        return {where: _length(value)}
    except TypeError:
        raise DataError(f"{where} has no length; expected an array, Series or DataFrame. Received: {type(value)}") from None


@dataclasses.dataclass(frozen=True)
class InMemoryData:
    """Inputs and targets held in memory, sliceable by row indices."""

    x: Any
    y: Targets = None

    @property
    def n_samples(self) -> int:
        return next(iter(_lengths(self.x, "x").values()))

    def take(self, indices: Sequence[int] | np.ndarray) -> tuple[Any, Targets]:
        """Rows ``indices`` of the inputs and targets, in the types the user passed."""
        idx = np.asarray(indices, dtype=np.int64)
        return _take(self.x, idx), _take(self.y, idx)

    def row_nbytes(self) -> np.ndarray:
        n = self.n_samples
        return _row_nbytes(self.x, n) + _row_nbytes(self.y, n)

    @property
    def nbytes(self) -> int:
        return _total_nbytes(self.x) + _total_nbytes(self.y)


def as_in_memory(x: Any, y: Any = None) -> InMemoryData:
    """Validate in-memory data and split a target column off a DataFrame.

    Args:
        x: a DataFrame, a numpy array, or a dict/tuple/list of arrays.
        y: targets (array, Series, DataFrame, dict of arrays), a column name of
            ``x`` (or a list of names), or ``None``.

    Raises:
        DataError: the data is empty, of an unsupported type, has a missing
            target column, or its parts disagree on the number of rows.
    """
    if isinstance(x, list):
        x = tuple(x)
    if isinstance(y, (str, list)) and not isinstance(x, pd.DataFrame):
        raise DataError(f"`y` names a column ({y!r}) but `x` is not a DataFrame. Received: x of type {type(x)}")
    if isinstance(x, pd.DataFrame) and isinstance(y, (str, list)):
        names = [y] if isinstance(y, str) else list(y)
        missing = [name for name in names if name not in x.columns]
        if missing:
            raise DataError(
                f"target column(s) {missing} not found in the data; columns are {list(x.columns)}. "
                "Pass the right `target`/`y` column name."
            )
        y = x[names[0]] if isinstance(y, str) else x[names]
        x = x.drop(columns=names)
    if not isinstance(x, (pd.DataFrame, pd.Series, np.ndarray, Mapping, tuple)):
        raise DataError(
            "Unrecognized data type: expected a pandas DataFrame, a numpy array, or a dict/tuple of arrays. "
            f"Received: x={type(x)}"
        )
    lengths = {**_lengths(x, "x"), **_lengths(y, "y")}
    if not lengths:
        raise DataError("`x` holds no arrays: pass at least one input column or array.")
    counts = set(lengths.values())
    if len(counts) > 1:
        detail = ", ".join(f"{where}: {count}" for where, count in lengths.items())
        raise DataError(f"inputs and targets must have the same number of rows; received {detail}.")
    if counts == {0}:
        raise DataError("the dataset is empty (0 rows): there is nothing to probe or train on.")
    return InMemoryData(x, y)


# --------------------------------------------------------------------------- shards


@dataclasses.dataclass(frozen=True)
class ShardSource:
    """Numbered shard files and the target column(s) to split off each one."""

    files: tuple[Path, ...]
    target: str | tuple[str, ...] | None = None
    spec: str = ""

    @classmethod
    def from_spec(cls, spec: str | Path, target: str | Sequence[str] | None = None) -> ShardSource:
        target_value = target if target is None or isinstance(target, str) else tuple(target)
        return cls(tuple(resolve_shards(spec)), target_value, str(spec))

    def split(self, frame: pd.DataFrame, path: Path) -> InMemoryData:
        if self.target is None:
            return as_in_memory(frame)
        names = [self.target] if isinstance(self.target, str) else list(self.target)
        missing = [name for name in names if name not in frame.columns]
        if missing:
            raise DataError(
                f"target column(s) {missing} not found in shard {str(path)!r}; its columns are {list(frame.columns)}."
            )
        return as_in_memory(frame, self.target if isinstance(self.target, str) else names)

    def iter_frames(self, files: Sequence[Path] | None = None) -> Iterator[tuple[Path, pd.DataFrame]]:
        """Read shards one at a time, checking every shard's columns against the first."""
        columns: list[str] | None = None
        for path in self.files if files is None else files:
            frame = read_shard(path, columns=columns)
            if columns is None:
                columns = list(frame.columns)
            yield path, frame


# --------------------------------------------------------------------------- sampling for the probe


def shards_fingerprint(source: ShardSource) -> str:
    """A fingerprint of shard files from their names, sizes, times and the first one's columns: no rows are read."""
    files = [(str(path), st.st_size, st.st_mtime_ns) for path, st in ((p, p.stat()) for p in source.files)]
    return _fingerprint(files, shard_info_columns(source.files[0]), source.target)


@dataclasses.dataclass(frozen=True)
class DataSample:
    """What the probe needs from a dataset, without holding all of it."""

    kind: Literal["in_memory", "shards"]
    n_samples: int
    raw_bytes: int
    """In-memory size of the whole dataset (exact in memory; rows × measured bytes/row for shards)."""
    raw_bytes_scope: str
    """Which rows the raw size was measured on."""
    largest_shard_raw_bytes: int
    """In-memory size of the largest shard (0 for in-memory data): what streaming holds per file."""
    largest_shard: Path | None
    """The largest shard file (by rows), which the probe's child reads as training would."""
    random: InMemoryData
    """Rows drawn uniformly at random."""
    worst: InMemoryData
    """The rows with the largest in-memory size, largest first."""
    smallest: InMemoryData
    """The rows with the smallest in-memory size: with ``worst``, they expose which axes vary."""
    worst_scope: str
    """Which rows the worst-case search covered."""
    row_bytes_max: int
    signature: str
    """Stable fingerprint of the data, for the probe cache."""


def _fingerprint(*parts: Any) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(repr(part).encode())
    return digest.hexdigest()[:16]


def _schema(data: InMemoryData) -> str:
    def describe(value: Any) -> Any:
        if isinstance(value, pd.DataFrame):
            return [(str(c), str(t)) for c, t in value.dtypes.items()]
        if isinstance(value, pd.Series):
            return (str(value.name), str(value.dtype))
        if isinstance(value, Mapping):
            return {k: describe(v) for k, v in value.items()}
        if isinstance(value, tuple):
            return [describe(v) for v in value]
        if value is None:
            return None
        array = np.asarray(value)
        return (str(array.dtype), array.shape[1:])

    return repr((describe(data.x), describe(data.y)))


def sample_in_memory(data: InMemoryData, *, k: int, seed: int = 0) -> DataSample:
    """Sample an in-memory dataset: ``k`` random rows and the ``k`` largest rows."""
    n = data.n_samples
    sizes = data.row_nbytes()
    rng = np.random.default_rng(seed)
    k = min(k, n)
    random_idx = np.sort(rng.choice(n, size=k, replace=False))
    order = np.argsort(-sizes, kind="stable")
    worst_idx, smallest_idx = order[:k], order[::-1][:k]
    return DataSample(
        kind="in_memory",
        n_samples=n,
        raw_bytes=data.nbytes,
        raw_bytes_scope=f"all {n:,} rows (pandas memory_usage(deep=True) / numpy nbytes)",
        largest_shard_raw_bytes=0,
        largest_shard=None,
        random=InMemoryData(*data.take(random_idx)),
        worst=InMemoryData(*data.take(worst_idx)),
        smallest=InMemoryData(*data.take(smallest_idx)),
        worst_scope=f"all {n:,} rows",
        row_bytes_max=int(sizes.max()),
        signature=_fingerprint(_schema(data), n, int(sizes.sum()), sizes[:: max(1, n // 64)].tolist()),
    )


def _concat(parts: Sequence[InMemoryData]) -> InMemoryData:
    def join(values: list[Any]) -> Any:
        first = values[0]
        if first is None:
            return None
        if isinstance(first, (pd.DataFrame, pd.Series)):
            return pd.concat(values, ignore_index=True)
        if isinstance(first, Mapping):
            return {key: join([v[key] for v in values]) for key in first}
        if isinstance(first, tuple):
            return tuple(join([v[i] for v in values]) for i in range(len(first)))
        return np.concatenate(values)

    return InMemoryData(join([p.x for p in parts]), join([p.y for p in parts]))


def _detached(data: InMemoryData) -> InMemoryData:
    """Copy array cells out of their shard's buffer.

    ``read_parquet`` gives list cells as views into one Arrow buffer per column
    chunk: keeping a few rows as views would keep every shard read so far alive.
    """

    def copy(value: Any) -> Any:
        if isinstance(value, pd.DataFrame):
            return pd.DataFrame({name: copy(value[name]) for name in value.columns}, index=value.index)
        if isinstance(value, pd.Series) and value.dtype == object:
            cells = [v.copy() if isinstance(v, np.ndarray) else v for v in value]
            return pd.Series(cells, index=value.index, name=value.name, dtype=object)
        if isinstance(value, Mapping):
            return {key: copy(item) for key, item in value.items()}
        return value.copy() if hasattr(value, "copy") else value

    return InMemoryData(copy(data.x), copy(data.y))


def sample_shards(source: ShardSource, *, k: int, seed: int = 0, scan_bytes: int = 512 * 1024**2) -> DataSample:
    """Sample shard files with memory bounded by about one shard plus ``2k`` rows.

    Row counts come from every shard (Parquet metadata, CSV counting pass). The
    worst-case search reads every shard while their files total at most
    ``scan_bytes``; beyond that, an evenly spaced subset of shards is read and
    the result says so.
    """
    files = list(source.files)
    counts = [count_rows(path) for path in files]
    n = sum(counts)
    file_bytes = [path.stat().st_size for path in files]
    if sum(file_bytes) <= scan_bytes:
        scanned = files
    else:
        budget, scanned = 0, []
        for i in range(0, len(files), max(1, len(files) // 64)):
            if budget and budget + file_bytes[i] > scan_bytes:
                break
            scanned.append(files[i])
            budget += file_bytes[i]
    rng = np.random.default_rng(seed)
    # Three running selections of k rows each, ranked by a key (smallest key kept):
    # largest rows (key -size), smallest rows (key size), a uniform reservoir (random key).
    kept: dict[str, tuple[InMemoryData, np.ndarray]] = {}
    raw_total = rows_read = largest = 0
    for path, frame in source.iter_frames(scanned):
        data = source.split(frame, path)
        sizes = data.row_nbytes()
        raw = data.nbytes
        raw_total += raw
        rows_read += data.n_samples
        largest = max(largest, raw)
        keys = {"worst": -sizes.astype(float), "smallest": sizes.astype(float), "random": rng.random(data.n_samples)}
        for name, key in keys.items():
            low = np.argsort(key, kind="stable")[:k]
            rows, row_keys = _detached(InMemoryData(*data.take(low))), key[low]
            if name in kept:
                rows = _concat([kept[name][0], rows])
                row_keys = np.concatenate([kept[name][1], row_keys])
                keep = np.argsort(row_keys, kind="stable")[:k]
                rows, row_keys = InMemoryData(*rows.take(keep)), row_keys[keep]
            kept[name] = (rows, row_keys)
    per_row = raw_total / max(rows_read, 1)
    scope = (
        f"all {len(files)} shards ({n:,} rows)"
        if len(scanned) == len(files)
        else f"{len(scanned)} of {len(files)} shards ({rows_read:,} of {n:,} rows; raise scan_bytes to read all)"
    )
    if len(scanned) < len(files):
        largest = int(max(largest, per_row * max(counts)))
    return DataSample(
        kind="shards",
        n_samples=n,
        raw_bytes=int(round(per_row * n)),
        raw_bytes_scope=f"{scope}: {per_row:,.0f} B/row in memory after reading",
        largest_shard_raw_bytes=int(largest),
        largest_shard=largest_file(files),
        random=kept["random"][0],
        worst=kept["worst"][0],
        smallest=kept["smallest"][0],
        worst_scope=scope,
        row_bytes_max=int(-kept["worst"][1].min()),
        signature=_fingerprint(
            [(p.name, s, c, p.stat().st_mtime_ns) for p, s, c in zip(files, file_bytes, counts)],
            _schema(kept["random"][0]),
            source.target,
        ),
    )
