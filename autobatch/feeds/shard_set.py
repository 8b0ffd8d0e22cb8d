"""A streaming feed's set of shard files: their schema and row counts, reading one, holding some out.

Every shard must have the first one's columns, and the target and weight
columns must be among them (checked when a feed is made, naming the file). Row
counts come from a :class:`ShardIndex`, shared with the feeds split from a feed,
so each file is counted once. A validation split holds out whole files
(:func:`hold_out_shards`), so no row is in both feeds.

:class:`ShardSourced` is what :class:`~autobatch.ShardFeed` and
:class:`~autobatch.SizeAwareShardFeed` share of this.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from autobatch._data import ShardSource
from autobatch._shard_files import ShardInfo, read_parquet_columns, read_shard, shard_format, shard_info
from autobatch.errors import ConfigError, DataError
from autobatch.feeds.base import BaseFeed, check_fraction

logger = logging.getLogger(__name__)


class ShardIndex:
    """Columns and row counts of shard files, cached per path, size and modification time.

    One index is shared by a feed and the feeds split from it, so each CSV is
    counted once; a file that changed on disk is counted again.
    """

    def __init__(self) -> None:
        self._infos: dict[tuple[str, int, int], ShardInfo] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        with self._lock:
            return {"_infos": dict(self._infos)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._infos = state["_infos"]
        self._lock = threading.Lock()

    def info(self, path: Path) -> ShardInfo:
        """The :class:`ShardInfo` of ``path``, counted on first use."""
        try:
            stat = path.stat()
        except OSError:
            return shard_info(path)  # raises the DataError naming the file
        key = (str(path.resolve()), int(stat.st_size), int(stat.st_mtime_ns))
        with self._lock:
            cached = self._infos.get(key)
        if cached is None:
            cached = shard_info(path)
            with self._lock:
                self._infos[key] = cached
        return cached


def shard_row(path: Path, row: int) -> str:
    """How messages name row ``row`` of a shard file."""
    return f"row {row} of shard {str(path)!r} (0-based, not counting the header)"


def concat_rows(parts: list[Any]) -> Any:
    """Parts of a batch end to end (DataFrames, Series or arrays; ``None`` parts: ``None``)."""
    if parts[0] is None:
        return None
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], (pd.DataFrame, pd.Series)):
        return pd.concat(parts, ignore_index=True)
    return np.concatenate(parts)


def open_shards(
    source: str | os.PathLike[str] | ShardSource,
    target: str | Sequence[str] | None,
    index: ShardIndex | None,
    sample_weight: str | None = None,
) -> tuple[ShardSource, ShardIndex, tuple[ShardInfo, ...]]:
    """The shard source (with ``target``), the row-count index, and each file's :class:`ShardInfo`.

    Raises:
        DataError: a shard's columns differ from the first one's (naming the file and the columns), the
            target or weight columns are missing, or no input column remains.
    """
    resolved = source if isinstance(source, ShardSource) else ShardSource.from_spec(source, target)
    if isinstance(source, ShardSource) and target is not None:
        resolved = dataclasses.replace(resolved, target=target if isinstance(target, str) else tuple(target))
    index = index if index is not None else ShardIndex()
    shards = tuple(index.info(path) for path in resolved.files)
    wanted = list(target_names(resolved)) + ([sample_weight] if sample_weight is not None else [])
    _check_columns(shards, wanted)
    return resolved, index, shards


def target_names(source: ShardSource) -> tuple[str, ...]:
    """The target column name(s) of ``source``."""
    if source.target is None:
        return ()
    return (source.target,) if isinstance(source.target, str) else tuple(source.target)


def _check_columns(shards: Sequence[ShardInfo], wanted: Sequence[str]) -> None:
    first = shards[0]
    for shard in shards[1:]:
        if shard.columns != first.columns:
            missing = [c for c in first.columns if c not in shard.columns]
            extra = [c for c in shard.columns if c not in first.columns]
            raise DataError(
                f"shard {str(shard.path)!r} has columns {list(shard.columns)}, but the first shard "
                f"{str(first.path)!r} has {list(first.columns)} (missing: {missing}, unexpected: {extra}). "
                "All shards must share one schema: fix or remove that file."
            )
    missing = [name for name in wanted if name not in first.columns]
    if missing:
        raise DataError(
            f"column(s) {missing} not found in shard {str(first.path)!r}, whose columns are {list(first.columns)}. "
            "Pass the right `target`/`sample_weight` column name(s)."
        )
    if not [c for c in first.columns if c not in wanted]:
        raise DataError(
            f"every column of shard {str(first.path)!r} ({list(first.columns)}) is a target or weight column, "
            "so no inputs remain. Name only the target column(s) in `target`."
        )


def hold_out_shards(
    shards: Sequence[ShardInfo], validation_split: float, seed: int
) -> tuple[list[Path], list[Path]]:
    """``(train_files, validation_files)``: whole shards, about ``validation_split`` of the rows held out.

    Shards are drawn in a random order fixed by ``seed`` and held out while that
    brings the held-out rows closer to the fraction; each side gets at least one.

    Raises:
        ConfigError: the fraction is out of range, or there is only one shard.
    """
    fraction = check_fraction(validation_split)
    n_files = len(shards)
    if n_files < 2:
        raise ConfigError(
            f"a streaming validation split holds out whole shards, so it needs at least 2; received 1 shard "
            f"({str(shards[0].path)!r}). Write more, smaller shards or load the data in memory."
        )
    counts = np.array([s.n_rows for s in shards], dtype=np.int64)
    chosen = np.random.default_rng([seed, 1]).permutation(n_files)
    held = np.cumsum(counts[chosen])
    # Number of held-out shards whose rows come closest to the target, leaving both sides non-empty.
    k = 1 + int(np.argmin(np.abs(held[: n_files - 1] - fraction * counts.sum())))
    val_set = set(chosen[:k].tolist())
    val_rows = int(held[k - 1])
    logger.info(
        "validation split: %d shard(s) (%d rows, %.1f%%) held out of %d", k, val_rows, 100 * val_rows / counts.sum(),
        n_files,
    )
    val_files = [s.path for i, s in enumerate(shards) if i in val_set]
    train_files = [s.path for i, s in enumerate(shards) if i not in val_set]
    return train_files, val_files


class ShardSourced(BaseFeed):
    """A feed streaming shard files: its files and row counts, reading one shard, and splitting by whole files.

    Subclasses call :meth:`_open_shards` in their constructor and implement :meth:`_derive`.
    """

    source: ShardSource
    shards: tuple[ShardInfo, ...]
    """Each file's columns and row count, in numeric order."""
    sample_weight: str | None
    """The column holding per-row weights."""
    read_ahead: int
    _index: ShardIndex
    _counts: np.ndarray

    def _open_shards(
        self,
        source: str | os.PathLike[str] | ShardSource,
        target: str | Sequence[str] | None,
        *,
        index: ShardIndex | None,
        sample_weight: str | None,
        read_ahead: int,
    ) -> None:
        """Resolve and check the shards (see :func:`open_shards`) and keep what every streaming feed keeps."""
        self.source, self._index, self.shards = open_shards(source, target, index, sample_weight)
        self.read_ahead = read_ahead
        self.sample_weight = sample_weight
        self._counts = np.array([s.n_rows for s in self.shards], dtype=np.int64)

    @property
    def n_samples(self) -> int:
        return int(self._counts.sum())

    @property
    def files(self) -> tuple[Path, ...]:
        """The shard files, in numeric order."""
        return tuple(s.path for s in self.shards)

    def _target_names(self) -> tuple[str, ...]:
        return target_names(self.source)

    # ------------------------------------------------------------------ reading one shard

    def _read_frame(self, shard: ShardInfo) -> pd.DataFrame:
        """Read one shard's rows (a seam for tests that exercise the batch cutting without files)."""
        return read_shard(shard.path, columns=list(self.shards[0].columns))

    def _read_table(self, shard: ShardInfo, columns: Sequence[str]) -> Any:
        """``columns`` of a Parquet shard as a ``pyarrow.Table`` for a native export; ``None`` for CSV (pandas)."""
        return read_parquet_columns(shard.path, columns) if shard_format(shard.path) == "parquet" else None

    def _check_rows(self, shard: ShardInfo, n_rows: int) -> None:
        if n_rows != shard.n_rows:
            raise DataError(
                f"shard {str(shard.path)!r} has {n_rows} rows now, but {shard.n_rows} were counted when the feed "
                "was made: the file changed (or pandas and pyarrow parse it differently). Re-create the feed."
            )

    def _read_parts(self, shard: ShardInfo) -> tuple[pd.DataFrame, pd.Series | pd.DataFrame | None, np.ndarray | None]:
        """One shard's rows, checked against its count, as ``(inputs, targets, sample weights)``.

        Raises:
            DataError: the file cannot be read, or holds another number of rows than the feed counted.
        """
        frame = self._read_frame(shard)
        self._check_rows(shard, len(frame))
        targets = list(self._target_names())
        y: pd.Series | pd.DataFrame | None = None
        if targets:
            y = frame[targets[0]] if isinstance(self.source.target, str) else frame[targets]
        weights = None
        if self.sample_weight is not None:
            weights = frame[self.sample_weight].to_numpy(dtype=np.float32)
        dropped = targets + ([self.sample_weight] if self.sample_weight is not None else [])
        x = frame.drop(columns=dropped) if dropped else frame
        return x, y, weights

    # ------------------------------------------------------------------ splitting

    def _derive(self, files: Sequence[Path], **overrides: Any) -> ShardSourced:
        """A feed like this one over ``files`` (options as here, but for ``overrides``)."""
        raise NotImplementedError

    def split(self, validation_split: float, *, seed: int | None = None) -> tuple[ShardSourced, ShardSourced]:
        """Hold out whole shards, about ``validation_split`` of the rows, as a validation feed.

        Shards are drawn in a random order fixed by ``seed`` (default: the feed's)
        and held out while that brings the held-out rows closer to the fraction;
        at least one shard goes to each side. No file is in both feeds, so no
        row leaks between them. The validation feed reads in file order and never shuffles.

        Args:
            validation_split: fraction of the rows to hold out, in (0, 1).
            seed: seed of the draw.

        Returns:
            ``(train_feed, validation_feed)``.

        Raises:
            ConfigError: the fraction is out of range, or there is only one shard.
        """
        train_files, val_files = hold_out_shards(self.shards, validation_split, self.seed if seed is None else seed)
        return self._derive(train_files), self._derive(val_files, shuffle=False, drop_remainder=False)
