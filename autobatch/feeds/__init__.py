"""Feeds: the data as Keras ``PyDataset`` batches, sized by the plan.

- :class:`InMemoryFeed` slices in-memory data (DataFrame, arrays, dicts of arrays).
- :class:`ShardFeed` streams CSV/Parquet shard files with bounded memory.
- :class:`SizeAwareFeed` / :class:`SizeAwareShardFeed` batch by length bucket, one batch size per bucket.
- :func:`make_feed` picks one for the data and a plan (``plan=``): its strategy and
  batch size, or a bucket plan's buckets (:func:`make_size_aware_feed`).

Both serve every sample exactly once per epoch, reshuffle per epoch from a
seed, split off validation data with ``feed.split(fraction)``, and export to
``tf.data`` with ``feed.to_tf_dataset()``.

The plan is a lower stage than the feeds: it knows nothing of them, and the
feeds read what they need of it (duck-typed: a plan with ``boundaries`` is a
bucket plan).
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any, Literal

from autobatch.errors import ConfigError
from autobatch.feeds.base import BaseFeed, build_feed
from autobatch.feeds.in_memory import InMemoryFeed
from autobatch.feeds.shard_set import ShardIndex
from autobatch.feeds.shards import ShardFeed
from autobatch.feeds.size_aware import SizeAwareFeed, make_size_aware_feed
from autobatch.feeds.size_aware_shards import SizeAwareShardFeed

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


def _plan_options(plan: Any, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with what a fixed-batch :class:`~autobatch.Plan` sets on its feed where they do not say otherwise.

    Warns (pointing at the caller of :func:`make_feed`) when the queue asked for
    holds more batches than the plan budgets.
    """
    queue = max(plan.queue_batches, 1)
    waiting = options.get("max_queue_size", queue) * max(options.get("workers", 1), 1)
    if waiting > queue:
        warnings.warn(
            f"the plan budgets {plan.queue_batches} waiting batch(es), but max_queue_size × workers = {waiting}: "
            f"memory may exceed the prediction. Plan with queue_batches={waiting} instead.",
            stacklevel=3,
        )
    options = dict(options)
    options.setdefault("max_queue_size", queue)
    options.setdefault("output_signature", plan.probe.output_signature)
    options.setdefault("max_batch_bytes", math.ceil(plan.probe.worst_preprocessed_bytes_per_sample * plan.batch_size))
    return options


def make_feed(
    x: Any,
    y: Any = None,
    *,
    plan: Any = None,
    batch_size: int | None = None,
    strategy: Literal["auto", "in_memory", "stream"] | None = None,
    preprocess: Any = None,
    shuffle: bool = True,
    seed: int = 0,
    validation_split: float | None = None,
    **options: Any,
) -> BaseFeed | tuple[BaseFeed, BaseFeed]:
    """Build the feed for ``x``: in-memory slicing or shard streaming, at a plan's or a given batch size.

    With a fixed-batch :class:`~autobatch.Plan`, the feed has the plan's batch size
    and strategy, its queue depth (``max_queue_size``; a warning when
    ``max_queue_size × workers`` exceeds what the plan budgets), and checks every
    batch against the probe's ``output_signature`` and worst-case batch bytes. With a
    :class:`~autobatch.bucket_plan.BucketPlan` (a plan with ``boundaries``) it is the size-aware
    feed :func:`make_size_aware_feed` builds for that plan. An option passed here
    wins over the plan's.

    Args:
        x: a DataFrame, numpy array, dict/tuple/list of arrays; a directory,
            glob or file of CSV/Parquet shards; or ``"module:function"``
            returning ``(x, y)``.
        y: targets or target column name(s) (for shards: the column name(s)).
        plan: the plan made for this data (:func:`autobatch.plan`); exactly one of ``plan`` and ``batch_size``.
        batch_size: samples per batch, without a plan.
        strategy: ``"stream"`` reads shards a few files at a time;
            ``"in_memory"`` loads shards whole first; ``"auto"`` streams shards
            and slices in-memory data. In-memory data is always sliced.
            Default: the plan's, else ``"auto"``.
        preprocess: ``preprocess(batch_x, batch_y) -> (inputs, targets)`` or ``"module:function"``;
            with a plan, the same the probe measured.
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
        ConfigError: both or neither of ``plan`` and ``batch_size`` are given, or an option is out of range.

    Example:
        >>> plan = autobatch.plan(df, "label", preprocess=pad, model=model)
        >>> train, val = make_feed(df, "label", plan=plan, preprocess=pad, validation_split=0.1)
        >>> model.fit(train, validation_data=val, epochs=3, shuffle=False)
        >>> feed = make_feed("data/csv", "label", batch_size=256, preprocess=pad)  # without a plan
    """
    if plan is not None and batch_size is not None:
        raise ConfigError(
            "make_feed takes the batch size from `plan` or from `batch_size`, not both. "
            f"Received: plan and batch_size={batch_size!r}"
        )
    if plan is None and batch_size is None:
        raise ConfigError(
            "make_feed needs `plan` (from autobatch.plan() or autobatch.plan_size_aware()) or `batch_size`. Received: neither"
        )
    if plan is not None and hasattr(plan, "boundaries"):
        return make_size_aware_feed(
            x,
            y,
            plan=plan,
            strategy=strategy,
            preprocess=preprocess,
            shuffle=shuffle,
            seed=seed,
            validation_split=validation_split,
            **options,
        )
    if plan is not None:
        options = _plan_options(plan, options)
        batch_size = plan.batch_size
        strategy = plan.strategy if strategy is None else strategy
    common = dict(batch_size=batch_size, preprocess=preprocess, shuffle=shuffle, seed=seed, **options)
    return build_feed(
        x, y, strategy=strategy, in_memory=InMemoryFeed, stream=ShardFeed, options=common,
        validation_split=validation_split, seed=seed,
    )
