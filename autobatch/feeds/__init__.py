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
from typing import Any, Literal

from autobatch.feeds.base import BaseFeed, build_feed
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
    common = dict(batch_size=batch_size, preprocess=preprocess, shuffle=shuffle, seed=seed, **options)
    return build_feed(
        x, y, strategy=strategy, in_memory=InMemoryFeed, stream=ShardFeed, options=common,
        validation_split=validation_split, seed=seed,
    )
