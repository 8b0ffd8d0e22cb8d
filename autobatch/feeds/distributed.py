"""Feeds under ``tf.distribute``: each worker serves its own share, every sample once per epoch across workers.

Every replica of a step must receive a batch, and every worker must take the
same number of steps (a worker that runs out early would leave its peers
waiting in the step's all-reduce). So an epoch is cut into ``steps`` global
steps of ``num_replicas_in_sync`` cells, one cell per replica: the rows are
spread over the cells as evenly as possible (cell sizes differ by at most one
row, and never exceed the per-replica batch), and worker ``w`` serves the cells
of its replicas. How the rows are divided between workers depends on the feed:

- **by data** (an :class:`~autobatch.InMemoryFeed`): every worker holds the data and
  computes the same shuffled order for the epoch (same seed, same epoch), and
  serves only its cells of it;
- **by file** (a :class:`~autobatch.ShardFeed`): the shard files are assigned to
  workers by task index, balanced by row count, so each worker reads only its
  own files (as ``AutoShardPolicy.FILE`` would, but explicit). Every worker knows
  every file's row count, so all agree on the number of steps. When the files
  cannot be balanced (fewer files than workers, or one worker would have fewer
  rows than steps) the feed falls back to sharding by data.

The per-worker ``tf.data`` pipeline yields per-replica batches and is handed to
``strategy.distribute_datasets_from_function``, so tf.distribute neither re-batches
nor auto-shards it. The epoch advances when Keras ends an epoch (the
:attr:`DistributedFeed.callback`), not when a pipeline produces its last element:
Keras starts (and abandons) extra passes, and with shuffling every worker must
be on the same epoch's order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import keras
import numpy as np

from autobatch._distribute import Layout, current_strategy, strategy_layout
from autobatch._result import TensorSpec
from autobatch._tfdata import prefetched
from autobatch.errors import AutobatchError, ConfigError
from autobatch.feeds.base import BaseFeed
from autobatch.feeds.buckets import Bucketed
from autobatch.feeds.shards import ShardFeed

logger = logging.getLogger(__name__)

ShardBy = Literal["auto", "file", "data"]


def cell_bounds(n_rows: int, steps: int, cells_per_step: int) -> np.ndarray:
    """Positions ``[lo, hi)`` of ``steps × cells_per_step`` cells covering ``n_rows`` rows in order.

    Cells differ by at most one row. The extra rows go to whole steps first, so
    each step's cells are the same size wherever the numbers allow (the first
    step always, unless there is only one).

    Returns:
        An int64 array of shape ``(steps, cells_per_step, 2)``.

    Raises:
        ConfigError: fewer rows than cells, so some replica would get an empty batch.
    """
    cells = steps * cells_per_step
    if steps < 1 or cells_per_step < 1 or n_rows < cells:
        raise ConfigError(
            f"{n_rows} row(s) cannot fill {steps} step(s) × {cells_per_step} replica batch(es) with at least one "
            "row each. Use more data, fewer replicas, or a smaller batch."
        )
    base, extra = divmod(n_rows, cells)
    sizes = np.full((steps, cells_per_step), base, dtype=np.int64)
    full, rest = divmod(extra, cells_per_step)
    sizes[:full] += 1
    if rest:
        sizes[steps - 1, :rest] += 1  # full < steps: the last step has no extra row yet
    ends = np.cumsum(sizes.ravel())
    return np.stack([ends - sizes.ravel(), ends], axis=1).reshape(steps, cells_per_step, 2)


def assign_files(row_counts: Sequence[int], num_workers: int) -> list[list[int]]:
    """Shard file indices per worker, balanced by rows (largest file to the least-loaded worker), deterministic."""
    loads = [0] * num_workers
    owned: list[list[int]] = [[] for _ in range(num_workers)]
    for file_index in sorted(range(len(row_counts)), key=lambda i: (-row_counts[i], i)):
        worker = min(range(num_workers), key=lambda w: (loads[w], w))
        owned[worker].append(file_index)
        loads[worker] += int(row_counts[file_index])
    return [sorted(files) for files in owned]


@dataclasses.dataclass(frozen=True)
class WorkerShard:
    """What one worker serves in each epoch."""

    worker: int
    num_workers: int
    by: Literal["file", "data"]
    """``"file"``: this worker reads only ``files``; ``"data"``: it serves its cells of the shared order."""
    cells: np.ndarray
    """``(steps, local replicas, 2)``: positions ``[lo, hi)`` in the epoch order of the feed it serves."""
    files: tuple[Path, ...] | None = None
    """The shard files of this worker (sharding by file)."""

    @property
    def steps_per_epoch(self) -> int:
        return int(self.cells.shape[0])

    @property
    def rows(self) -> int:
        """Rows this worker serves per epoch."""
        return int((self.cells[..., 1] - self.cells[..., 0]).sum())


def shard_for_worker(
    feed: BaseFeed, layout: Layout, per_replica_batch_size: int, *, by: ShardBy = "auto"
) -> tuple[BaseFeed, WorkerShard]:
    """This worker's feed and cells: ``(feed to serve from, shard)``.

    Raises:
        ConfigError: ``by`` is unknown, ``by="file"`` is impossible for this feed, or
            there is too little data for one row per replica per step.
    """
    if by not in ("auto", "file", "data"):
        raise ConfigError(f'`by` must be "auto", "file" or "data". Received: by={by!r}')
    if per_replica_batch_size < 1:
        raise ConfigError(f"the per-replica batch must be >= 1. Received: {per_replica_batch_size}")
    workers, local = layout.num_workers, layout.local_replicas
    if by != "data" and isinstance(feed, ShardFeed) and workers > 1:
        counts = [s.n_rows for s in feed.shards]
        owned = assign_files(counts, workers)
        rows = [sum(counts[i] for i in files) for files in owned]
        steps = max(math.ceil(r / (local * per_replica_batch_size)) for r in rows)
        if all(files for files in owned) and min(rows) >= steps * local:
            files = tuple(feed.shards[i].path for i in owned[layout.worker_index])
            mine = feed._derive(files)
            mine.set_epoch(feed.epoch)
            cells = cell_bounds(rows[layout.worker_index], steps, local)
            shard = WorkerShard(layout.worker_index, workers, "file", cells, files)
            logger.info(
                "worker %d reads %d of %d shard file(s), %d rows", layout.worker_index, len(files), len(counts), shard.rows
            )
            return mine, shard
        reason = (
            f"{len(counts)} shard file(s) cannot give each of {workers} workers rows for all {steps} steps "
            f"(rows per worker would be {rows})"
        )
        if by == "file":
            raise ConfigError(f"cannot shard by file: {reason}. Write more, smaller shards, or pass by='data'.")
        logger.warning("sharding by data instead of by file: %s; every worker reads every file", reason)
    replicas = layout.num_replicas_in_sync
    steps = math.ceil(feed.n_samples / (replicas * per_replica_batch_size))
    if feed.drop_remainder:
        steps = feed.n_samples // (replicas * per_replica_batch_size)
        n_rows = steps * replicas * per_replica_batch_size
    else:
        n_rows = feed.n_samples
    if steps < 1:
        raise ConfigError(
            f"drop_remainder=True leaves no full global step of {replicas} × {per_replica_batch_size} in "
            f"{feed.n_samples} samples. Lower the batch or keep the remainder."
        )
    cells = cell_bounds(n_rows, steps, replicas)
    first = layout.worker_index * local
    return feed, WorkerShard(layout.worker_index, workers, "data", cells[:, first : first + local])


@contextlib.contextmanager
def keras_workarounds(model: Any, strategy: Any, element_spec: Any) -> Iterator[None]:
    """Work around two Keras 3 bugs under tf.distribute, for the duration of one ``fit`` (instance attributes only).

    - Keras builds a model under a strategy from the first batch after
      ``strategy.reduce("MEAN", batch)``, which fails for nested inputs (``reduce``
      takes no nest) and all-reduces data whose padded shapes differ between
      replicas; the signature says all building needs, so the model builds from
      symbolic tensors of it instead.
    - Under a multi-worker ``MultiWorkerMirroredStrategy`` Keras reduces each step's
      logs with ``reduce("MEAN", v, axis=0)``, which fails on scalars ("Invalid
      reduction dimension 0 for input with 0 dimensions"); the step returns them as
      one-element vectors, which that reduce averages back to scalars.

    See keras-team/keras#20329 and #20585.
    """
    import tensorflow as tf

    def symbolic(spec: Any) -> Any:
        return keras.KerasTensor(tuple(spec.shape), spec.dtype.name)

    batch = tuple(keras.tree.map_structure(symbolic, part) for part in element_spec)

    def build(iterator: Any = None, data_batch: Any = None) -> None:
        with strategy.scope():
            model._symbolic_build(data_batch=batch)

    overrides: dict[str, Any] = {"_maybe_symbolic_build": build}
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and strategy.extended._in_multi_worker_mode():

        def as_vectors(step: Any) -> Any:
            def wrapped(data: Any) -> Any:
                return keras.tree.map_structure(lambda v: tf.reshape(v, [1]) if v.shape.rank == 0 else v, step(data))

            return wrapped

        overrides["train_step"] = as_vectors(model.train_step)
        overrides["test_step"] = as_vectors(model.test_step)
    for name, value in overrides.items():
        setattr(model, name, value)  # an instance attribute shadows the method for this call only
    try:
        yield
    finally:
        for name in overrides:
            delattr(model, name)


class _AdvanceEpoch(keras.callbacks.Callback):
    """Moves the feed to the next epoch's order when Keras ends an epoch (on every worker alike)."""

    def __init__(self, feed: BaseFeed) -> None:
        super().__init__()
        self.feed = feed

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self.feed.on_epoch_end()


@dataclasses.dataclass(frozen=True)
class DistributedFeed:
    """A feed's share for this worker, as a ``tf.distribute`` dataset for ``model.fit``."""

    feed: BaseFeed
    """The feed this worker serves from (its own files when sharding by file)."""
    shard: WorkerShard
    dataset: Any
    """The ``tf.distribute.DistributedDataset`` of per-replica batches."""
    callback: Any
    """A Keras callback advancing ``feed``'s epoch at each epoch's end: pass it to ``model.fit`` when training."""
    element_spec: Any
    """The ``tf.TensorSpec`` structure of one per-replica batch."""
    strategy: Any
    """The strategy the dataset is distributed with."""

    def keras_workarounds(self, model: Any) -> contextlib.AbstractContextManager[None]:
        """Around ``model.fit``: work around Keras 3's failures under tf.distribute (see :func:`keras_workarounds`)."""
        return keras_workarounds(model, self.strategy, self.element_spec)

    @property
    def steps_per_epoch(self) -> int:
        return self.shard.steps_per_epoch


def distribute_feed(
    feed: BaseFeed,
    plan: Any,
    strategy: Any = None,
    *,
    output_signature: Sequence[TensorSpec] | None = None,
    prefetch: int = 2,
    by: ShardBy = "auto",
) -> DistributedFeed:
    """Serve this worker's share of ``feed`` as per-replica batches of a ``tf.distribute`` strategy.

    Across all workers each sample is served exactly once per epoch, every
    worker takes the same number of steps, and no replica's batch exceeds the
    per-replica batch of ``plan``.

    Args:
        feed: the feed over the whole dataset (the same on every worker).
        plan: a :class:`~autobatch.Plan` made under the strategy (its ``batch_size`` is
            per replica), or the per-replica batch size as an int.
        strategy: the strategy; default: the one whose ``scope()`` is active.
        output_signature: the probe's signature; default ``plan.probe.output_signature``
            (or the feed's own).
        prefetch: per-replica batches the pipeline prefetches.
        by: ``"file"`` (shard files per worker), ``"data"`` (cells of the shared
            order) or ``"auto"`` (by file for a :class:`~autobatch.ShardFeed` when the
            files balance, else by data).

    Returns:
        A :class:`DistributedFeed`: pass ``.dataset`` to ``model.fit`` with ``.callback``
        among the callbacks, inside ``with share.keras_workarounds(model):``.

    Raises:
        ConfigError: no strategy, a bad option, or too little data for the replicas.

    Example:
        >>> with strategy.scope():
        ...     model = build_and_compile()
        >>> plan = autobatch.plan(df, "label", preprocess=pad, model=model)   # inside the scope, or strategy=
        >>> feed = autobatch.make_feed(df, "label", plan=plan, preprocess=pad)
        >>> share = autobatch.distribute_feed(feed, plan, strategy)
        >>> with share.keras_workarounds(model):
        ...     model.fit(share.dataset, epochs=3, callbacks=[share.callback])
    """
    if isinstance(feed, Bucketed):
        raise ConfigError(
            f"distribute_feed cannot share a {type(feed).__name__} across replicas yet: its batches differ in size "
            "by bucket, and replicas must step together. Use a fixed-batch feed (make_feed(..., plan=plan) with a "
            "fixed-batch Plan) under tf.distribute."
        )
    import tensorflow as tf

    active = current_strategy(strategy)
    if active is None:
        raise ConfigError(
            "distribute_feed needs a tf.distribute strategy: pass strategy=, or call it inside strategy.scope()."
        )
    layout = strategy_layout(active)
    batch = plan if isinstance(plan, int) else plan.batch_size
    if output_signature is None and not isinstance(plan, int):
        output_signature = plan.probe.output_signature
    local, shard = shard_for_worker(feed, layout, int(batch), by=by)
    cells = shard.cells
    steps, replicas = cells.shape[0], cells.shape[1]
    looked = [local._serve(int(cells[0, 0, 0]), int(cells[0, 0, 1]), 0, record=False)]
    signature = local._tf_signature(looked, output_signature or local.output_signature)
    local.close()  # the shards read for the look would otherwise stay until the first epoch ends
    flat_specs = tf.nest.flatten(signature)

    def as_tf(batch: tuple[Any, ...], step: int) -> tuple[Any, ...]:
        return local._conform(batch, flat_specs, f"step {step}")

    def generate() -> Iterator[tuple[Any, ...]]:
        rows_log: list[tuple[int, int]] = []
        with local._lock:
            local._pass = rows_log  # rows of each step on this worker, for the monitor
        try:
            for step in range(steps):
                for replica in range(replicas):
                    lo, hi = int(cells[step, replica, 0]), int(cells[step, replica, 1])
                    element = as_tf(local._serve(lo, hi, step * replicas + replica), step)
                    if replica == replicas - 1:
                        rows_log.append((int((cells[step, :, 1] - cells[step, :, 0]).sum()), 1))
                    yield element
        except AutobatchError as exc:
            with local._lock:
                local._failure = exc  # TensorFlow re-raises it as its own error; autobatch.fit restores it
            raise

    dataset = tf.data.Dataset.from_generator(generate, output_signature=signature)
    dataset = dataset.apply(tf.data.experimental.assert_cardinality(steps * replicas))
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    dataset = prefetched(dataset.with_options(options), max(int(prefetch), 1))
    if replicas > 1:
        # Each step takes one element per local replica: Keras counts steps from the cardinality.
        dataset.cardinality = lambda: tf.constant(steps, dtype=tf.int64)

    def dataset_fn(context: Any) -> Any:
        if context.num_input_pipelines != layout.num_workers or context.input_pipeline_id != layout.worker_index:
            raise ConfigError(
                f"tf.distribute asks for input pipeline {context.input_pipeline_id} of {context.num_input_pipelines}, "
                f"but this is worker {layout.worker_index} of {layout.num_workers}."
            )
        return dataset

    distributed = active.distribute_datasets_from_function(dataset_fn)
    return DistributedFeed(
        feed=local,
        shard=shard,
        dataset=distributed,
        callback=_AdvanceEpoch(local),
        element_spec=signature,
        strategy=active,
    )
