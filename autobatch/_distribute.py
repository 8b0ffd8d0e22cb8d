"""Planning under ``tf.distribute``: per-replica budgets, agreement across workers, combined summaries.

A ``tf.distribute`` strategy runs one replica per device (one per GPU, or one per
worker's CPU) and steps all replicas together; each replica trains on its own
per-replica batch, and the global batch is the per-replica batch times
``num_replicas_in_sync``. So the batch that must fit is the per-replica one, on
each replica's own device:

- every local replica gets its own budget: its GPU's free memory (or ``gpu_limit``),
  and a share of its host's RAM (or ``ram_limit`` / the cgroup limit), which the
  replicas of one worker share;
- with ``MultiWorkerMirroredStrategy`` every worker plans with its own budgets,
  then all replicas exchange their largest safe per-replica batch through the
  strategy's own collective ops (an all-gather: ``ReduceOp`` has only SUM and
  MEAN) and all take the minimum, so no worker runs out of memory because a peer
  had more. The gathered rows say which worker (and device) set the limit.

The pure parts (:func:`replica_limits`, :func:`agree`, :func:`distribute_plan`) take
plain numbers; only :func:`strategy_layout`, :func:`all_gather_rows` and
:func:`gather_summaries` touch TensorFlow, and only when a strategy is in use.
The results a plan holds (:class:`ReplicaLimit`, :class:`Distribution`) live in
:mod:`autobatch._replicas`, below the plan, and are re-exported here.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from autobatch._memory import Budget, gpu_budget
from autobatch._render import compact_table
from autobatch._replicas import Distribution, ReplicaLimit
from autobatch._result import ProbeResult
from autobatch._units import format_bytes
from autobatch.errors import ConfigError
from autobatch.plan import Plan, make_plan

__all__ = [
    "ClusterSummary",
    "Distribution",
    "Layout",
    "ReplicaLimit",
    "WorkerMemory",
    "agree",
    "all_gather_rows",
    "current_strategy",
    "device_gpu_budgets",
    "distribute_plan",
    "gather_limits",
    "gather_summaries",
    "gpu_memory_preallocated",
    "replica_limits",
    "strategy_layout",
]

logger = logging.getLogger(__name__)

_KINDS = ("host", "gpu", "dataset", "max_batch_size", "trial", "failed")
"""Codes of what limited a replica, as exchanged between workers (an index into this tuple)."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where this process sits in a ``tf.distribute`` strategy."""

    strategy: str
    """The strategy's class name, e.g. ``"MultiWorkerMirroredStrategy"``."""
    num_workers: int
    """Worker processes in the cluster (1 for ``MirroredStrategy``)."""
    worker_index: int
    """This worker's place among them (0 … ``num_workers - 1``; the chief is 0)."""
    local_devices: tuple[str, ...]
    """The devices of this worker's replicas, e.g. ``("/job:worker/replica:0/task:1/device:CPU:0",)``."""
    is_chief: bool = True

    @property
    def local_replicas(self) -> int:
        """Replicas on this worker (one per local device)."""
        return len(self.local_devices)

    @property
    def num_replicas_in_sync(self) -> int:
        """Replicas stepping together across all workers."""
        return self.num_workers * self.local_replicas


# --------------------------------------------------------------------------- the strategy


def current_strategy(strategy: Any = None, *, model: Any = None) -> Any:
    """The strategy to plan for, or ``None`` for one device.

    That is ``strategy`` itself, else the one whose ``scope()`` is active, else the
    one ``model`` was built under (Keras keeps it and trains with it). TensorFlow
    is not imported for this: without it loaded there can be no strategy.
    """
    if strategy is not None:
        return strategy
    own = getattr(model, "_distribute_strategy", None) if model is not None else None
    if own is not None:
        return own
    tf = sys.modules.get("tensorflow")
    if tf is None or not tf.distribute.has_strategy():
        return None
    return tf.distribute.get_strategy()


def strategy_layout(strategy: Any) -> Layout:
    """Read the number of workers, this worker's index and its local devices from a strategy.

    Raises:
        ConfigError: ``strategy`` is not a ``tf.distribute.Strategy``.
    """
    extended = getattr(strategy, "extended", None)
    devices = getattr(extended, "worker_devices", None)
    if extended is None or devices is None or not hasattr(strategy, "num_replicas_in_sync"):
        raise ConfigError(
            "`strategy` must be a tf.distribute.Strategy (e.g. tf.distribute.MirroredStrategy() or "
            f"tf.distribute.MultiWorkerMirroredStrategy()). Received: strategy={strategy!r} (of type {type(strategy)})"
        )
    workers = int(getattr(extended, "_num_workers", 1) or 1)
    index = int(getattr(extended, "_id_in_cluster", 0) or 0)
    name = type(strategy).__name__
    layout = Layout(
        strategy="MultiWorkerMirroredStrategy" if name == "CollectiveAllReduceStrategy" else name,
        num_workers=workers,
        worker_index=index,
        local_devices=tuple(str(d) for d in devices),
        is_chief=bool(getattr(extended, "_is_chief", index == 0)),
    )
    if layout.num_replicas_in_sync != int(strategy.num_replicas_in_sync):
        raise ConfigError(
            f"{layout.strategy} reports {strategy.num_replicas_in_sync} replicas in sync, but {workers} worker(s) × "
            f"{layout.local_replicas} local device(s) = {layout.num_replicas_in_sync}: autobatch needs the same number "
            "of devices on every worker. Give each worker the same devices."
        )
    return layout


def gpu_memory_preallocated() -> bool:
    """Whether TensorFlow reserves (almost) all GPU memory up front: a GPU without ``set_memory_growth``."""
    if os.environ.get("TF_FORCE_GPU_ALLOW_GROWTH", "").lower() == "true":
        return False
    tf = sys.modules.get("tensorflow")
    if tf is None:
        return False
    return any(not tf.config.experimental.get_memory_growth(gpu) for gpu in tf.config.list_physical_devices("GPU"))


def device_gpu_budgets(
    layout: Layout, gpu_limit: int | str | None, *, preallocated: Callable[[], bool] = gpu_memory_preallocated
) -> list[Budget | None]:
    """One GPU budget per local replica: ``gpu_limit`` each, or that device's free memory (``None`` on CPU).

    TensorFlow numbers the visible GPUs; NVML numbers all of them, so a numeric
    ``CUDA_VISIBLE_DEVICES`` maps one to the other.

    Raises:
        ConfigError: the replicas are on GPUs whose memory TensorFlow reserved whole
            when the strategy was created (no ``set_memory_growth``), so their free
            memory says nothing, and no ``gpu_limit`` was given.
    """
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    budgets: list[Budget | None] = []
    on_gpu = any("GPU" in device.rsplit("device:", 1)[-1].upper() for device in layout.local_devices)
    if on_gpu and gpu_limit is None and preallocated():
        raise ConfigError(
            "TensorFlow reserved all GPU memory when the strategy was created, so the free GPU memory autobatch "
            "budgets from is gone. Call tf.config.experimental.set_memory_growth(gpu, True) for every GPU before "
            "creating the strategy (or set TF_FORCE_GPU_ALLOW_GROWTH=true), or pass gpu_limit= (per GPU)."
        )
    for device in layout.local_devices:
        name = device.rsplit("device:", 1)[-1].upper()
        if not name.startswith("GPU"):
            budgets.append(None)
            continue
        index = int(name.split(":")[1]) if ":" in name else 0
        if gpu_limit is None and visible and all(v.isdigit() for v in visible) and index < len(visible):
            index = int(visible[index])
        budget = gpu_budget(gpu_limit, device_index=index)
        if budget is not None and gpu_limit is None:
            budget = dataclasses.replace(budget, source=f"{budget.source} for {device.rsplit('/', 1)[-1]}")
        budgets.append(budget)
    return budgets


# --------------------------------------------------------------------------- pure planning


def _reason(plan: Plan) -> str:
    if plan.limited_by in ("host memory", "gpu memory"):
        return plan.limited_by.split()[0]
    if "ran out of memory" in plan.limited_by or plan.limited_by == "confirming trials":
        return "trial"
    if plan.limited_by == "max_batch_size":
        return "max_batch_size"
    return "dataset"


def replica_limits(
    result: ProbeResult,
    local_plan: Plan,
    device_budgets: Sequence[Budget | None],
    layout: Layout,
    *,
    options: Mapping[str, Any],
    plan_fn: Callable[..., Plan] = make_plan,
) -> list[ReplicaLimit]:
    """Each local replica's largest safe per-replica batch, from its own budgets.

    Args:
        result: the probe's measurements (a training step on one device).
        local_plan: the plan (usually confirmed by a real trial) against this
            worker's host budget alone; its batch is what the whole process may hold.
            The worker's replicas share the host, so each gets ``1 / local_replicas`` of it.
        device_budgets: per local replica, its GPU budget (``None`` on CPU).
        layout: this worker's place in the strategy.
        options: the planner's options (``safety``, ``queue_batches``, ...).
        plan_fn: the planner (injectable for tests).

    Returns:
        One :class:`ReplicaLimit` per local replica.

    Raises:
        BudgetError: one device cannot hold even one sample.
    """
    per_device_options = {k: v for k, v in options.items() if k not in ("process_rss_bytes", "export_bytes")}
    host_share = local_plan.batch_size // layout.local_replicas
    host_use = local_plan.budget("host")
    host_reason = _reason(local_plan)
    limits = []
    host_bytes = host_use.budget.limit_bytes if host_use is not None and host_reason == "host" else 0
    for local, budget in enumerate(device_budgets):
        batch, reason, budget_bytes = host_share, host_reason, host_bytes
        if budget is not None and result.gpu_fit is not None:
            device_plan = plan_fn(result, [budget], **per_device_options)
            if device_plan.batch_size < batch:
                batch, reason, budget_bytes = device_plan.batch_size, "gpu", budget.limit_bytes
        limits.append(
            ReplicaLimit(
                worker=layout.worker_index,
                replica=layout.worker_index * layout.local_replicas + local,
                max_batch_size=max(batch, 0),
                limited_by=reason,
                budget_bytes=int(budget_bytes),
            )
        )
    return limits


def agree(limits: Sequence[ReplicaLimit], *, n_samples: int) -> tuple[int, ReplicaLimit]:
    """The shared per-replica batch: the smallest limit of all replicas, and the replica that set it.

    It is also capped so that one global step does not exceed the dataset
    (``ceil(n_samples / replicas)`` per replica).

    Raises:
        ConfigError: no limits, or one replica allows no batch at all.
    """
    if not limits:
        raise ConfigError("no replica reported a batch limit; is the strategy running any replica?")
    limiting = min(limits, key=lambda r: (r.max_batch_size, r.worker, r.replica))
    if limiting.max_batch_size < 1:
        raise ConfigError(
            f"{limiting.describe()}, so not even one sample fits there. Raise that worker's ram_limit/gpu_limit or free "
            "memory there."
        )
    cap = max(math.ceil(n_samples / len(limits)), 1)
    if cap < limiting.max_batch_size:
        return cap, dataclasses.replace(limiting, max_batch_size=cap, limited_by="dataset", budget_bytes=0)
    return limiting.max_batch_size, limiting


def distribute_plan(
    local_plan: Plan,
    limits: Sequence[ReplicaLimit],
    layout: Layout,
    budgets: Sequence[Budget],
    *,
    options: Mapping[str, Any],
    plan_fn: Callable[..., Plan] = make_plan,
) -> Plan:
    """The plan at the agreed per-replica batch, with its :class:`Distribution`.

    Args:
        local_plan: this worker's own plan (its batch is what this process may hold).
        limits: every replica's limit, gathered from all workers.
        layout: this worker's place in the strategy.
        budgets: the budgets ``local_plan`` was made against.
        options: the planner's options.
        plan_fn: the planner (injectable for tests).

    Returns:
        A plan whose ``batch_size`` is the per-replica batch every worker uses, whose
        ``steps_per_epoch`` counts global steps, and whose ``distribution`` says who set it.
    """
    result = local_plan.probe
    batch, limiting = agree(limits, n_samples=result.n_samples)
    cap = options.get("max_batch_size")
    if batch == local_plan.batch_size:
        # This worker's own plan is the agreement: keep the trials that confirmed it or bracket it.
        chosen = local_plan
    else:
        chosen = plan_fn(result, budgets, **{**options, "max_batch_size": batch if cap is None else min(cap, batch)})
    distribution = Distribution(
        strategy=layout.strategy,
        num_workers=layout.num_workers,
        worker_index=layout.worker_index,
        num_replicas_in_sync=layout.num_replicas_in_sync,
        per_replica_batch_size=chosen.batch_size,
        replica_limits=tuple(limits),
        limiting=limiting,
    )
    limited_by, explanation = chosen.limited_by, chosen.explanation
    if chosen.limited_by == "max_batch_size" and (cap is None or cap > batch):
        # The cap passed above is the agreement, not the user's max_batch_size: say whose limit it is.
        where = "" if limiting.worker == layout.worker_index else f"worker {limiting.worker}'s "
        limited_by = {
            "host": f"{where}host memory",
            "gpu": f"{where}gpu memory",
            "trial": "a real trial that ran out of memory" + (f" on worker {limiting.worker}" if where else ""),
            "dataset": "the dataset size over all replicas",
        }.get(limiting.limited_by, f"{where}{limiting.limited_by}")
        explanation = explanation.replace("is limited by max_batch_size", f"per replica is limited by {limited_by}", 1)
    return dataclasses.replace(
        chosen,
        limited_by=limited_by,
        steps_per_epoch=math.ceil(result.n_samples / distribution.global_batch_size),
        explanation=f"{explanation} {distribution.describe()}.",
        distribution=distribution,
    )


# --------------------------------------------------------------------------- collectives


def all_gather_rows(strategy: Any, layout: Layout, rows: Sequence[Sequence[int]]) -> list[list[int]]:
    """Exchange one row of integers per local replica with every replica, through the strategy's collectives.

    Each replica contributes its own row; every worker gets all
    ``num_replicas_in_sync`` rows, in replica order (an all-gather, which is how a
    minimum travels when ``ReduceOp`` offers only SUM and MEAN).
    """
    import tensorflow as tf

    if len(rows) != layout.local_replicas:
        raise ConfigError(f"expected one row per local replica ({layout.local_replicas}), received {len(rows)}.")
    if layout.num_replicas_in_sync == 1:
        return [list(map(int, rows[0]))]

    def value_fn(context: Any) -> Any:
        return tf.constant([list(rows[context.replica_id_in_sync_group % layout.local_replicas])], dtype=tf.int64)

    values = strategy.experimental_distribute_values_from_function(value_fn)
    gathered = strategy.gather(values, axis=0)
    return [[int(v) for v in row] for row in gathered.numpy()]


def gather_limits(strategy: Any, layout: Layout, limits: Sequence[ReplicaLimit]) -> list[ReplicaLimit]:
    """Every replica's :class:`ReplicaLimit`, exchanged through the strategy's collectives."""
    rows = [[r.worker, r.replica, r.max_batch_size, _KINDS.index(r.limited_by), r.budget_bytes] for r in limits]
    return [
        ReplicaLimit(worker=w, replica=p, max_batch_size=b, limited_by=_KINDS[k], budget_bytes=m)
        for w, p, b, k, m in all_gather_rows(strategy, layout, rows)
    ]


# --------------------------------------------------------------------------- the combined memory summary


@dataclasses.dataclass(frozen=True)
class WorkerMemory:
    """What one worker's monitor measured during training."""

    worker: int
    peak_rss_bytes: int
    host_budget_bytes: int | None
    predicted_peak_bytes: int | None
    peak_gpu_bytes: int | None
    samples: int
    seconds: float


@dataclasses.dataclass(frozen=True)
class ClusterSummary:
    """Every worker's memory and throughput in one table (printed by the chief)."""

    workers: tuple[WorkerMemory, ...]

    @property
    def samples(self) -> int:
        return sum(w.samples for w in self.workers)

    def __rich__(self) -> Any:
        # One row per worker that fits 80 columns: no cell wraps.
        table = compact_table("autobatch workers")
        for name in ("worker", "peak RSS", "predicted", "budget", "peak GPU", "samples", "samples/s"):
            table.add_column(name, justify="left" if name == "worker" else "right", no_wrap=True)
        for w in self.workers:
            pct = f" ({w.peak_rss_bytes / w.host_budget_bytes:.0%})" if w.host_budget_bytes else ""
            table.add_row(
                str(w.worker),
                format_bytes(w.peak_rss_bytes) + pct,
                format_bytes(w.predicted_peak_bytes),
                format_bytes(w.host_budget_bytes),
                format_bytes(w.peak_gpu_bytes) if w.peak_gpu_bytes is not None else "-",
                f"{w.samples:,}",
                f"{w.samples / w.seconds:,.1f}" if w.seconds > 0 else "-",
            )
        table.caption = f"{self.samples:,} samples trained over {len(self.workers)} worker(s)"
        return table


def gather_summaries(strategy: Any, layout: Layout, summary: Any) -> ClusterSummary:
    """Exchange each worker's :class:`~autobatch.monitor.MonitorSummary` so every worker (and the chief) holds all of them."""
    missing = -1
    row = [
        layout.worker_index,
        int(summary.peak_rss_bytes),
        int(summary.host_budget_bytes or missing),
        int(summary.predicted_peak_bytes or missing),
        int(summary.peak_gpu_bytes if summary.peak_gpu_bytes is not None else missing),
        int(summary.samples),
        int(round(summary.seconds * 1000)),
    ]
    rows = all_gather_rows(strategy, layout, [row] * layout.local_replicas)
    seen: dict[int, WorkerMemory] = {}
    for worker, peak, budget, predicted, gpu, samples, millis in rows:
        seen.setdefault(
            worker,
            WorkerMemory(
                worker=worker,
                peak_rss_bytes=peak,
                host_budget_bytes=None if budget == missing else budget,
                predicted_peak_bytes=None if predicted == missing else predicted,
                peak_gpu_bytes=None if gpu == missing else gpu,
                samples=samples,
                seconds=millis / 1000,
            ),
        )
    return ClusterSummary(tuple(seen[w] for w in sorted(seen)))
