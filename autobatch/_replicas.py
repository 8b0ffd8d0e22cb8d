"""What a plan says about ``tf.distribute``: each replica's own limit and how the plan is split over them.

Plain result dataclasses, so that :class:`~autobatch.plan.Plan` can hold a
:class:`Distribution` without importing the planning under ``tf.distribute``
(:mod:`autobatch._distribute`), which works out these numbers and builds on the plan.
"""

from __future__ import annotations

import dataclasses

from autobatch._units import format_bytes


@dataclasses.dataclass(frozen=True)
class ReplicaLimit:
    """The largest per-replica batch one replica's own budgets allow."""

    worker: int
    """The worker it runs on."""
    replica: int
    """Its replica id in the sync group (``worker × local replicas + local index``)."""
    max_batch_size: int
    limited_by: str
    """``"host"``, ``"gpu"``, ``"dataset"``, ``"max_batch_size"`` or ``"trial"`` (a real trial ran out of memory)."""
    budget_bytes: int
    """The limit of the binding budget (0 when no memory budget binds)."""

    def describe(self) -> str:
        what = f"{self.limited_by} memory {format_bytes(self.budget_bytes)}" if self.budget_bytes else self.limited_by
        return f"worker {self.worker} (replica {self.replica}, {what}): at most {self.max_batch_size:,} per replica"


@dataclasses.dataclass(frozen=True)
class Distribution:
    """How a plan is split over the replicas of a ``tf.distribute`` strategy."""

    strategy: str
    num_workers: int
    worker_index: int
    """The worker this plan was made on."""
    num_replicas_in_sync: int
    per_replica_batch_size: int
    """The batch each replica trains on per step (``plan.batch_size``)."""
    replica_limits: tuple[ReplicaLimit, ...]
    """Every replica's own largest safe batch, as gathered from all workers."""
    limiting: ReplicaLimit
    """The replica (and so the worker) whose budget set the shared batch."""

    @property
    def global_batch_size(self) -> int:
        """Samples per step across all replicas: ``per_replica_batch_size × num_replicas_in_sync``."""
        return self.per_replica_batch_size * self.num_replicas_in_sync

    @property
    def limiting_worker(self) -> int:
        """The worker whose budget set the shared per-replica batch."""
        return self.limiting.worker

    def describe(self) -> str:
        others = sorted({(r.worker, r.max_batch_size) for r in self.replica_limits if r.worker != self.limiting.worker})
        tail = "".join(f"; worker {w} alone would allow {b:,}" for w, b in others[:4])
        return (
            f"{self.strategy}: {self.per_replica_batch_size:,} per replica × {self.num_replicas_in_sync} replica(s) "
            f"on {self.num_workers} worker(s) = global batch {self.global_batch_size:,}; the limit is set by "
            f"{self.limiting.describe()}{tail}"
        )
