"""Shard files on disk: finding them, reading one with errors that name it, and its metadata without its rows.

Numbered CSV/Parquet shards are resolved from a file, a directory or a glob in
numeric order; every read checks the file and says which one is missing, empty,
ragged or of another schema.
"""

from __future__ import annotations

import dataclasses
import glob as globlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from autobatch.errors import DataError

SHARD_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}

def _natural_key(path: Path) -> list[Any]:
    # "10.csv" after "9.csv": compare digit runs as numbers, not text.
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


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


def largest_file(files: Sequence[Path]) -> Path:
    """The shard the probe holds as streaming holds one: the largest file on disk."""
    return max(files, key=lambda path: path.stat().st_size)


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
