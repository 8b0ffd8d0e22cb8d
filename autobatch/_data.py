"""Data sources: in-memory tables and numbered shard files, and sampling them for the probe.

A source is either held in memory (a pandas DataFrame, a dict/tuple of numpy
arrays, plus targets) or a set of shard files (CSV/Parquet) resolved from a
file, a directory or a glob. The probe never needs all rows at once: it needs
the row count, the raw in-memory size, a random sample and the largest rows.
"""

from __future__ import annotations

import dataclasses
import glob as globlib
import hashlib
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from autobatch.errors import DataError

SHARD_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}

Targets = Any  # ndarray | Series | DataFrame | dict[str, ndarray] | None


def _natural_key(path: Path) -> list[Any]:
    # "10.csv" after "9.csv": compare digit runs as numbers, not text.
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


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


def resolve_shards(spec: str | Path) -> list[Path]:
    """Resolve a file, a directory or a glob to shard files in numeric order.

    ``0.csv, 1.csv, …, 10.csv`` sort by number (not as text), as people name shards.

    Raises:
        DataError: the path does not exist, the directory holds no CSV/Parquet
            files, the glob matches nothing, or formats are mixed.
    """
    text = str(spec)
    path = Path(text)
    if any(ch in text for ch in "*?["):
        files = [Path(p) for p in globlib.glob(text, recursive=True) if Path(p).is_file()]
        if not files:
            raise DataError(f"the glob {text!r} matches no files. Check the pattern and the working directory.")
    elif path.is_dir():
        files = [p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SHARD_SUFFIXES]
        if not files:
            raise DataError(
                f"the directory {text!r} holds no shard files (*.csv, *.parquet). "
                "Point at a directory of numbered shards such as 0.csv, 1.csv, …"
            )
    elif path.is_file():
        files = [path]
    else:
        raise DataError(f"data path {text!r} does not exist.")
    unknown = [p for p in files if p.suffix.lower() not in SHARD_SUFFIXES]
    if unknown:
        raise DataError(f"unsupported shard file {str(unknown[0])!r}: expected .csv, .parquet or .pq.")
    formats = {SHARD_SUFFIXES[p.suffix.lower()] for p in files}
    if len(formats) > 1:
        raise DataError(f"shards under {text!r} mix formats {sorted(formats)}; keep one format per dataset.")
    return sorted(files, key=_natural_key)


def shard_format(path: Path) -> Literal["csv", "parquet"]:
    return SHARD_SUFFIXES[path.suffix.lower()]  # type: ignore[return-value]


def _release_arrow_memory() -> None:
    # Arrow's allocator keeps freed blocks cached: after each file that is ~the file's size again, for good.
    try:
        import pyarrow as pa

        pa.default_memory_pool().release_unused()
    except (ImportError, AttributeError):
        pass


def _check_file(path: Path) -> None:
    if not path.exists():
        raise DataError(f"shard {str(path)!r} does not exist (was it removed while reading?).")
    if path.stat().st_size == 0:
        raise DataError(f"shard {str(path)!r} is an empty (zero-byte) file.")


def read_parquet_columns(path: Path, columns: Sequence[str]) -> Any:
    """Columns ``columns`` of one Parquet shard as a ``pyarrow.Table``: Arrow buffers, no pandas objects per cell.

    Raises:
        DataError: the file is missing, empty, unparseable or lacks one of the columns; the message names it.
    """
    import pyarrow.parquet as pq

    _check_file(path)
    try:
        # One thread: shards are read in the background while training keeps every core busy. ParquetFile.read
        # skips read_table's dataset layer (a quarter of the CPU time of a 2,000-row shard).
        table = pq.ParquetFile(path).read(columns=list(columns), use_threads=False)
    except Exception as exc:  # pyarrow raises many types; all mean "cannot read these columns of this file"
        raise DataError(
            f"cannot read columns {list(columns)} of shard {str(path)!r}: {type(exc).__name__}: {exc}"
        ) from exc
    _release_arrow_memory()  # the decoder's scratch, before the caller allocates what it derives from the table
    if table.num_rows == 0:
        raise DataError(f"shard {str(path)!r} has a header but no rows.")
    return table


def read_shard(path: Path, *, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Read one shard file, with errors that name the file.

    Args:
        path: a CSV or Parquet file.
        columns: the columns the first shard had; a shard with other columns is an error.

    Raises:
        DataError: the file is missing, empty, unparseable (e.g. a ragged CSV row)
            or its columns differ from ``columns``.
    """
    _check_file(path)
    try:
        if shard_format(path) == "parquet":
            # One thread: shards are read in the background while training keeps every core busy.
            frame = pd.read_parquet(path, use_threads=False)
        else:
            frame = pd.read_csv(path)
    except Exception as exc:  # pandas/pyarrow raise many types; all mean "cannot parse this file"
        raise DataError(f"cannot read shard {str(path)!r}: {type(exc).__name__}: {exc}") from exc
    _release_arrow_memory()
    if len(frame) == 0:
        raise DataError(f"shard {str(path)!r} has a header but no rows.")
    if columns is not None and list(frame.columns) != list(columns):
        extra = [c for c in frame.columns if c not in columns]
        missing = [c for c in columns if c not in frame.columns]
        raise DataError(
            f"shard {str(path)!r} has columns {list(frame.columns)}, but the first shard has {list(columns)} "
            f"(missing: {missing}, unexpected: {extra}). All shards must share one schema."
        )
    return frame


def count_rows(path: Path) -> int:
    """Rows in one shard: Parquet from its metadata; CSV by a streaming pass that honours quoting."""
    return shard_info(path).n_rows


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


def largest_file(files: Sequence[Path]) -> Path:
    """The shard the probe holds as streaming holds one: the largest file on disk."""
    return max(files, key=lambda path: path.stat().st_size)


def shards_fingerprint(source: ShardSource) -> str:
    """A fingerprint of shard files from their names, sizes, times and the first one's columns: no rows are read."""
    files = [(str(path), st.st_size, st.st_mtime_ns) for path, st in ((p, p.stat()) for p in source.files)]
    return _fingerprint(files, shard_info_columns(source.files[0]), source.target)


def shard_info_columns(path: Path) -> tuple[str, ...]:
    """The columns of one shard as :func:`read_shard` gives them, from its header or footer."""
    try:
        if shard_format(path) == "parquet":
            import pyarrow.parquet as pq

            # An empty table through pandas gives the columns read_parquet will give (index columns restored).
            return tuple(pq.ParquetFile(path).schema_arrow.empty_table().to_pandas().columns)
        return tuple(pd.read_csv(path, nrows=0).columns)
    except Exception as exc:  # pandas/pyarrow raise many types; all mean "cannot parse this file"
        raise DataError(f"cannot read shard {str(path)!r}: {type(exc).__name__}: {exc}") from exc


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


# --------------------------------------------------------------------------- shard metadata for the feeds


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    """Columns and row count of one shard file, read without loading its rows."""

    path: Path
    columns: tuple[str, ...]
    """Column names exactly as :func:`read_shard` will return them."""
    n_rows: int
    size_bytes: int
    mtime_ns: int


def _csv_row_count(path: Path) -> int:
    """Data rows of a CSV by a streaming pass with the standard library's reader.

    Quoted newlines are honoured and blank lines skipped, as pandas does. Arrow's reader is faster but keeps
    tens of MiB resident in its pools after a few files, which the training process would carry.

    Raises:
        ValueError: a row's field count differs from the header's (the caller lets pandas name the line).
    """
    import csv

    with path.open(newline="", encoding="utf-8") as file:
        rows = csv.reader(file)
        width = len(next(rows, []))
        count = 0
        for row in rows:
            if row:
                if len(row) != width:
                    raise ValueError(f"line {rows.line_num} has {len(row)} fields, the header {width}")
                count += 1
        return count


def shard_info(path: Path) -> ShardInfo:
    """Columns and row count of one shard: Parquet from its footer, CSV from its header and a counting pass.

    Args:
        path: a CSV or Parquet shard.

    Returns:
        The shard's :class:`ShardInfo`.

    Raises:
        DataError: the file is missing, empty (zero bytes or a header without
            rows) or cannot be parsed; the message names the file and, for a
            ragged CSV, the line.
    """
    if not path.exists():
        raise DataError(f"shard {str(path)!r} does not exist (was it removed after listing?).")
    stat = path.stat()
    if stat.st_size == 0:
        raise DataError(f"shard {str(path)!r} is an empty (zero-byte) file. Remove it or write its rows.")
    columns = shard_info_columns(path)
    n_rows = -1
    if shard_format(path) == "parquet":
        import pyarrow.parquet as pq

        n_rows = int(pq.ParquetFile(path).metadata.num_rows)
    if n_rows < 0:
        try:
            n_rows = _csv_row_count(path)
        except Exception:
            # pyarrow is stricter than pandas in places and its messages lack line numbers:
            # let pandas decide, so the file either loads (and is counted) or fails naming the line.
            n_rows = len(read_shard(path))
    if n_rows == 0:
        raise DataError(f"shard {str(path)!r} has a header but no rows. Remove it or write its rows.")
    return ShardInfo(path, columns, n_rows, int(stat.st_size), int(stat.st_mtime_ns))
