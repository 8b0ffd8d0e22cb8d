"""Batches padded by TensorFlow: feeds whose ``preprocess`` is :class:`~autobatch.PadColumns`.

An :class:`~autobatch.InMemoryFeed`'s :meth:`~autobatch.feeds.BaseFeed.to_tf_dataset`
builds the padded columns once as ragged tensors (values after truncation, in
the output dtype) and the targets as one array (:class:`NativePadding`); each
batch is then an index slice in Python (the epoch's order, the padded lengths,
truncation and NaN/inf counts per row, all looked up) and a gather and pad in
TensorFlow, which holds no GIL and runs beside the step.

A :class:`~autobatch.ShardFeed`'s export (:class:`NativeShards`) does the same
per shard: its background reader turns each file into flat values and row
lengths once (Parquet list columns straight from Arrow's buffers, with no
pandas object per cell), each batch gathers its rows' values with a few numpy
calls (across file boundaries as the Python path cuts them), and TensorFlow pads.

The batches are those ``PadColumns`` makes in Python (``tests/test_feeds.py`` checks
them value for value), and the feed's checks, statistics, warnings and epoch
semantics are the same: an export checks and counts every batch through the
feed's own methods (:class:`BatchAccounts`), and reads what it needs of the feed
through the protocols :class:`InMemoryRows` and :class:`StreamedShards`. This
package imports no feed module: the feeds use it, not the other way round.
"""

from __future__ import annotations

from autobatch.feeds.native.columns import BatchAccounts
from autobatch.feeds.native.in_memory import InMemoryRows, NativePadding, NativeStore, build_store
from autobatch.feeds.native.shards import NativeShards, RaggedShard, StreamedShards, ragged_shard

__all__ = [
    "BatchAccounts",
    "InMemoryRows",
    "NativePadding",
    "NativeShards",
    "NativeStore",
    "RaggedShard",
    "StreamedShards",
    "build_store",
    "ragged_shard",
]
