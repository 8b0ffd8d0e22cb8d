"""Size-aware feeds: samples grouped by length bucket, each bucket with its own batch size.

The buckets, their shuffle and the padding to each bucket's boundary are
``feeds.buckets``'s; this module holds the feeds and the functions that build them.

- :class:`SizeAwareFeed` holds the data in memory.
- :class:`SizeAwareShardFeed` (``feeds.size_aware_shards``) streams shard files: a
  sample's lengths are read once up front (only the sequence columns), each epoch
  the files are visited in a shuffled order and every bucket collects rows across
  files until its batch is full, so memory stays at about one shard plus less
  than one batch per bucket.
- :func:`make_size_aware_feed` picks one for the data, with the buckets of a
  :class:`~autobatch.bucket_plan.BucketPlan` (``plan=``) or given ones;
  :func:`bucket_by_sequence_length` batches a ``tf.data`` pipeline with the same buckets.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np

from autobatch._lengths import LengthFn, resolve_sequence_columns, sample_lengths
from autobatch.errors import ConfigError
from autobatch.feeds.base import BaseFeed, RawBatch, build_feed, checked_index
from autobatch.feeds.buckets import Bucketed, assign_buckets, check_buckets, epoch_batches, planned_buckets
from autobatch.feeds.in_memory import InMemoryFeed
from autobatch.feeds.size_aware_shards import SizeAwareShardFeed

logger = logging.getLogger(__name__)

__all__ = ["SizeAwareFeed", "SizeAwareShardFeed", "bucket_by_sequence_length", "make_size_aware_feed"]


class SizeAwareFeed(Bucketed, InMemoryFeed):
    """In-memory batches grouped by length bucket, each bucket at its own batch size, every sample once per epoch.

    Args:
        x: a DataFrame, or a dict of columns (with ``length_fn``: anything ``InMemoryFeed`` takes).
        y: targets, or the target column name(s).
        boundaries: the buckets' upper lengths (inclusive), ascending: bucket ``k``
            holds lengths ``boundaries[k-1]+1 … boundaries[k]`` and is padded to ``boundaries[k]``.
        batch_sizes: one batch size per bucket (``plan.batch_sizes``).
        sequence_columns: the columns whose longest sequence is a sample's length (default: detected).
        length_fn: ``length_fn(x) -> lengths`` instead of reading columns.
        lengths: precomputed lengths, one per row (skips the computation).
        variable_leaves: the preprocessed arrays to pad to the boundary (``x/in1``...);
            default: those ``output_signature`` marks as varying on axis 1, else ``x/<sequence column>``.
        sample_weight, preprocess, shuffle, seed, output_signature, nan_policy, workers,
            use_multiprocessing, max_queue_size: as for :class:`~autobatch.feeds.InMemoryFeed`.

    Raises:
        ConfigError: the buckets are malformed, or ``drop_remainder=True`` (every sample is served).
        DataError: the data is bad, or no sample length can be found.

    Example:
        >>> feed = SizeAwareFeed(df, "label", boundaries=[64, 256, 1024], batch_sizes=[512, 128, 32], preprocess=pad)
        >>> model.fit(feed.to_tf_dataset(plan.probe.output_signature), epochs=3)
    """

    def __init__(
        self,
        x: Any,
        y: Any = None,
        *,
        boundaries: Sequence[int],
        batch_sizes: Sequence[int],
        sequence_columns: Sequence[str] | None = None,
        length_fn: LengthFn | None = None,
        lengths: np.ndarray | None = None,
        variable_leaves: Sequence[str] | None = None,
        **options: Any,
    ) -> None:
        bounds, sizes = self._bucket_options(boundaries, batch_sizes, options)
        super().__init__(x, y, batch_size=int(sizes.max()), **options)
        columns = () if length_fn is not None else resolve_sequence_columns(self.data.x, sequence_columns)
        if lengths is None:
            lengths = sample_lengths(self.data.x, sequence_columns=columns or None, length_fn=length_fn)
        lengths = np.asarray(lengths, dtype=np.int64)
        if lengths.shape != (self.data.n_samples,):
            n = self.data.n_samples
            raise ConfigError(f"`lengths` must hold one length per row ({n}). Received: shape {lengths.shape}")
        self.lengths = lengths
        self.sequence_columns = columns
        self._bucket_of, self.boundaries, self.batch_sizes = assign_buckets(lengths, bounds, sizes)
        self.batch_size = int(self.batch_sizes.max())
        self._init_padding(variable_leaves, columns)

    @classmethod
    def _subset(cls, parent: InMemoryFeed, indices: np.ndarray, **overrides: Any) -> InMemoryFeed:
        if not isinstance(parent, SizeAwareFeed):
            raise TypeError(f"SizeAwareFeed._subset needs a SizeAwareFeed parent, not {type(parent).__name__}")
        feed = super()._subset(parent, indices, **overrides)
        for name in ("lengths", "sequence_columns", "_bucket_of", "boundaries", "batch_sizes", "_padding"):
            setattr(feed, name, getattr(parent, name))
        feed.batch_size = parent.batch_size
        return feed

    # ------------------------------------------------------------------ epochs

    def _runtime_keys(self) -> tuple[str, ...]:
        return (*super()._runtime_keys(), "_layout")

    def _init_runtime(self) -> None:
        super()._init_runtime()
        self._layout: tuple[int, np.ndarray, np.ndarray, np.ndarray] | None = None

    def _epoch_layout(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This epoch's row order, where each batch starts in it, and each batch's bucket."""
        cached = self._layout
        if cached is not None and cached[0] == self._epoch:
            return cached[1], cached[2], cached[3]
        epoch = self._epoch
        batches = epoch_batches(
            self._bucket_of[self._indices], self.batch_sizes, seed=self.seed, epoch=epoch, shuffle=self.shuffle
        )
        order = self._indices[np.concatenate([p for _, p in batches])] if batches else self._indices[:0]
        starts = np.concatenate([[0], np.cumsum([len(p) for _, p in batches])]).astype(np.int64)
        buckets = np.array([k for k, _ in batches], dtype=np.int64)
        self._layout = (epoch, order, starts, buckets)
        return order, starts, buckets

    def epoch_order(self) -> np.ndarray:
        """Row indices (into the data) in the current epoch's order, batch after batch."""
        return self._epoch_layout()[0]

    def __len__(self) -> int:
        return len(self._epoch_layout()[2])

    def batch_bounds(self, index: int) -> tuple[int, int]:
        _, starts, buckets = self._epoch_layout()
        index = checked_index(index, len(buckets))
        return int(starts[index]), int(starts[index + 1])

    def _batch_bucket(self, index: int) -> int:
        return int(self._epoch_layout()[2][index])

    def _rows(self, lo: int, hi: int, index: int) -> RawBatch:
        raw = super()._rows(lo, hi, index)
        return dataclasses.replace(raw, pad_to=self.batch_length(index))

    def split(self, validation_split: float, *, seed: int | None = None) -> tuple[InMemoryFeed, InMemoryFeed]:
        """Hold out a random fraction of the rows as a validation feed with the same buckets (never shuffled)."""
        return super().split(validation_split, seed=seed)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n_samples={self.n_samples}, buckets={self.boundaries.tolist()}, "
            f"batch_sizes={self.batch_sizes.tolist()}, batches={len(self)}, shuffle={self.shuffle}, seed={self.seed}, "
            f"epoch={self._epoch})"
        )


def _plan_options(plan: Any, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with what a :class:`~autobatch.bucket_plan.BucketPlan` sets on its feed where they do not say otherwise."""
    options = dict(options)
    options.setdefault("max_queue_size", max(plan.queue_batches, 1))
    options.setdefault("output_signature", plan.probe.output_signature)
    options.setdefault("variable_leaves", plan.sized.variable_leaves)
    if plan.sized.sequence_columns and "length_fn" not in options:
        options.setdefault("sequence_columns", plan.sized.sequence_columns)
    return options


def make_size_aware_feed(
    x: Any,
    y: Any = None,
    *,
    plan: Any = None,
    boundaries: Sequence[int] | None = None,
    batch_sizes: Sequence[int] | None = None,
    strategy: Literal["auto", "in_memory", "stream"] | None = None,
    preprocess: Any = None,
    shuffle: bool = True,
    seed: int = 0,
    validation_split: float | None = None,
    **options: Any,
) -> BaseFeed | tuple[BaseFeed, BaseFeed]:
    """Build the size-aware feed for ``x``: in memory, or streaming shards.

    The buckets come from ``plan`` or from ``boundaries`` and ``batch_sizes``. A
    :class:`~autobatch.bucket_plan.BucketPlan` also sets the strategy, the queue depth
    (``max_queue_size``), the probe's ``output_signature``, the ``variable_leaves``
    padded to each boundary and the ``sequence_columns`` (unless ``length_fn`` is
    given); an option passed here wins over the plan's.

    Args:
        x: a DataFrame (or dict of columns); or a directory, glob or file of shards.
        y: targets or target column name(s).
        plan: the :class:`~autobatch.bucket_plan.BucketPlan` made for this data (``batching="size-aware"``).
        boundaries: the buckets' upper lengths (inclusive), ascending (without ``plan``).
        batch_sizes: one batch size per bucket (without ``plan``).
        strategy: ``"stream"`` streams shards, ``"in_memory"`` loads them first; ``"auto"`` streams shards.
            Default: the plan's, else ``"auto"``.
        preprocess: ``preprocess(batch_x, batch_y[, maxlen=...]) -> (inputs, targets)``; the same the probe measured.
        shuffle: reshuffle within and across buckets every epoch.
        seed: seed of the shuffle and of the validation split.
        validation_split: hold out this fraction and return ``(train, validation)``.
        **options: ``sequence_columns``, ``length_fn``, ``variable_leaves``, ``output_signature``,
            ``nan_policy``, ``sample_weight``, ``read_ahead``, ``max_queue_size`` ...

    Returns:
        A :class:`SizeAwareFeed` (or :class:`SizeAwareShardFeed` when streaming), or
        ``(train_feed, validation_feed)`` with ``validation_split``.

    Raises:
        ConfigError: both or neither of ``plan`` and the buckets are given, ``plan`` is not a bucket plan,
            or an option is out of range.
        DataError: ``x`` is of an unrecognized type or the data is bad.

    Example:
        >>> plan = autobatch.plan(df, "label", preprocess=pad, model=model, batching="size-aware")
        >>> train, val = make_size_aware_feed(df, "label", plan=plan, preprocess=pad, validation_split=0.1)
        >>> model.fit(train, validation_data=val, epochs=3)
    """
    bounds, sizes = planned_buckets(plan, boundaries, batch_sizes, caller="make_size_aware_feed")
    if plan is not None:
        options = _plan_options(plan, options)
        strategy = plan.strategy if strategy is None else strategy
    common = dict(boundaries=bounds, batch_sizes=sizes, preprocess=preprocess, shuffle=shuffle, seed=seed)
    return build_feed(
        x, y, strategy=strategy, in_memory=SizeAwareFeed, stream=SizeAwareShardFeed, options={**common, **options},
        validation_split=validation_split, seed=seed,
    )


def bucket_by_sequence_length(
    dataset: Any,
    element_length_func: Callable[..., Any],
    *,
    plan: Any = None,
    boundaries: Sequence[int] | None = None,
    batch_sizes: Sequence[int] | None = None,
    pad_to_bucket_boundary: bool = True,
    **options: Any,
) -> Any:
    """Batch an unbatched ``tf.data.Dataset`` with ``Dataset.bucket_by_sequence_length`` and the planned buckets.

    For pipelines that stay in ``tf.data``: the same buckets and per-bucket batch sizes
    as the size-aware feed (a :class:`~autobatch.bucket_plan.BucketPlan`'s, or ``boundaries`` and
    ``batch_sizes``), translated to TensorFlow's convention (its boundaries are
    exclusive and it pads to ``boundary − 1``).

    Args:
        dataset: unbatched elements with variable-length sequences.
        element_length_func: ``fn(*element) -> tf.int32/int64 length`` along the padded axis.
        plan: the :class:`~autobatch.bucket_plan.BucketPlan` whose buckets to use.
        boundaries: the planned boundaries (inclusive upper lengths), without ``plan``.
        batch_sizes: one batch size per bucket, without ``plan``.
        pad_to_bucket_boundary: pad every batch to its bucket's boundary (bounded shapes).
        **options: more ``bucket_by_sequence_length`` arguments (``padded_shapes``, ``padding_values``,
            ``drop_remainder`` ...).

    Returns:
        The batched dataset. With ``pad_to_bucket_boundary``, an element longer than the
        last boundary fails inside TensorFlow, as ``bucket_by_sequence_length`` does.

    Raises:
        ConfigError: both or neither of ``plan`` and the buckets are given, ``plan`` is not a bucket plan,
            or the buckets are malformed.

    Example:
        >>> batched = bucket_by_sequence_length(ds, lambda x, y: tf.shape(x["in1"])[0], plan=plan)
    """
    planned = planned_buckets(plan, boundaries, batch_sizes, caller="bucket_by_sequence_length")
    bounds, sizes = check_buckets(*planned)
    return dataset.bucket_by_sequence_length(
        element_length_func,
        bucket_boundaries=[int(b) + 1 for b in bounds],
        bucket_batch_sizes=[int(s) for s in sizes] + [1],
        pad_to_bucket_boundary=pad_to_bucket_boundary,
        **options,
    )
