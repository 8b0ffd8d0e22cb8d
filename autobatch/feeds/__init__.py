"""Feeds: the data as Keras ``PyDataset`` batches, sized by the plan.

- :class:`InMemoryFeed` slices in-memory data (DataFrame, arrays, dicts of arrays).
- :class:`ShardFeed` streams CSV/Parquet shard files with bounded memory.
- :class:`SizeAwareFeed` / :class:`SizeAwareShardFeed` batch by length bucket, one batch size per bucket.
- :func:`make_feed` picks one for the data and the plan's strategy (:func:`make_size_aware_feed` for a bucket plan).

Both serve every sample exactly once per epoch, reshuffle per epoch from a
seed, split off validation data with ``feed.split(fraction)``, and export to
``tf.data`` with ``feed.to_tf_dataset()``.
"""

from __future__ import annotations

import logging
import os
import reprlib
import warnings
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import pandas as pd

from autobatch._data import InMemoryData, ShardSource
from autobatch._loading import is_callable_spec, resolve_callable
from autobatch.errors import ConfigError, DataError
from autobatch.feeds.base import BaseFeed
from autobatch.feeds.in_memory import InMemoryFeed
from autobatch.feeds.shards import ShardFeed, ShardIndex
from autobatch.feeds.size_aware import SizeAwareFeed, SizeAwareShardFeed, make_size_aware_feed

logger = logging.getLogger(__name__)

__all__ = [
    "BaseFeed",
    "InMemoryFeed",
    "ShardFeed",
    "ShardIndex",
    "SizeAwareFeed",
    "SizeAwareShardFeed",
    "make_feed",
    "make_size_aware_feed",
]

_SHARD_ONLY = ("read_ahead", "index")


def _load_all(source: ShardSource) -> pd.DataFrame:
    frames = [frame for _, frame in source.iter_frames()]
    return frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)


def make_feed(
    x: Any,
    y: Any = None,
    *,
    batch_size: int,
    strategy: Literal["auto", "in_memory", "stream"] = "auto",
    preprocess: Any = None,
    shuffle: bool = True,
    seed: int = 0,
    validation_split: float | None = None,
    **options: Any,
) -> BaseFeed | tuple[BaseFeed, BaseFeed]:
    """Build the feed for ``x`` and a strategy: in-memory slicing or shard streaming.

    Args:
        x: a DataFrame, numpy array, dict/tuple/list of arrays; a directory,
            glob or file of CSV/Parquet shards; or ``"module:function"``
            returning ``(x, y)``.
        y: targets or target column name(s) (for shards: the column name(s)).
        batch_size: samples per batch.
        strategy: ``"stream"`` reads shards a few files at a time;
            ``"in_memory"`` loads shards whole first; ``"auto"`` streams shards
            and slices in-memory data. In-memory data is always sliced.
        preprocess: ``preprocess(batch_x, batch_y) -> (inputs, targets)`` or ``"module:function"``.
        shuffle: reshuffle every epoch.
        seed: seed of the shuffle and of the validation split.
        validation_split: hold out this fraction (rows in memory, whole shards
            when streaming) and return ``(train, validation)``.
        **options: passed to the feed (``drop_remainder``, ``sample_weight``, ``nan_policy``,
            ``output_signature``, ``workers``, ``max_queue_size``, ``read_ahead`` …).

    Returns:
        The feed, or ``(train_feed, validation_feed)`` with ``validation_split``.

    Raises:
        DataError: ``x`` is of an unrecognized type, or the data is bad (the message names the file).
        ConfigError: an option is out of range.

    Example:
        >>> train, val = make_feed("data/csv", "label", batch_size=256, preprocess=pad, validation_split=0.1)
        >>> model.fit(train, validation_data=val, epochs=3, shuffle=False)
    """
    if strategy not in ("auto", "in_memory", "stream"):
        raise ConfigError(f'`strategy` must be "auto", "in_memory" or "stream". Received: strategy={strategy!r}')
    common = dict(batch_size=batch_size, preprocess=preprocess, shuffle=shuffle, seed=seed, **options)
    if isinstance(x, (str, os.PathLike)) and is_callable_spec(str(x)):
        loaded = resolve_callable(str(x), what="data")()
        if not isinstance(loaded, tuple) or len(loaded) != 2:
            raise DataError(f"data function {str(x)!r} must return (x, y); it returned {type(loaded).__name__}.")
        x, y = loaded
    feed: BaseFeed
    if isinstance(x, (str, os.PathLike, ShardSource)):
        if y is not None and not isinstance(y, (str, list, tuple)):
            raise DataError(
                f"with shard files as `x`, `y` must be the target column name(s). Received: y of type {type(y)}"
            )
        source = x if isinstance(x, ShardSource) else ShardSource.from_spec(x, y)
        if strategy == "in_memory":
            ignored = [name for name in _SHARD_ONLY if name in common]
            if ignored:
                warnings.warn(f"{ignored} only apply to streamed shards and are ignored in memory.", stacklevel=2)
                for name in ignored:
                    common.pop(name)
            target = source.target if source.target is None or isinstance(source.target, str) else list(source.target)
            feed = InMemoryFeed(_load_all(source), target, **common)
        else:
            feed = ShardFeed(source, y if isinstance(x, ShardSource) else None, **common)
    elif isinstance(x, (pd.DataFrame, pd.Series, np.ndarray, Mapping, tuple, list, InMemoryData)):
        if strategy == "stream":
            logger.info("the data is already in memory, so it is sliced in memory rather than streamed")
        ignored = [name for name in _SHARD_ONLY if name in common]
        if ignored:
            warnings.warn(f"{ignored} only apply to streamed shards and are ignored for in-memory data.", stacklevel=2)
            for name in ignored:
                common.pop(name)
        feed = InMemoryFeed(x, y, **common)
    else:
        raise DataError(
            f"Unrecognized data type: x={reprlib.repr(x)} (of type {type(x)}). Expected a pandas DataFrame, "
            "a numpy array, a dict/tuple of arrays, or a directory/glob/file of CSV or Parquet shards."
        )
    if validation_split is not None:
        return feed.split(validation_split, seed=seed)
    return feed
