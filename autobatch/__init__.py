"""autobatch: measure, don't guess, the batch size that fits Keras/TensorFlow training in memory."""

from __future__ import annotations

import importlib
import logging
from typing import Any

from autobatch._distribute import ClusterSummary, Distribution, ReplicaLimit, WorkerMemory
from autobatch._memory import Budget
from autobatch._units import format_bytes, parse_bytes
from autobatch.api import fit, plan, plan_size_aware
from autobatch.errors import (
    AutobatchError,
    BudgetError,
    ConfigError,
    DataError,
    ModelError,
    PreprocessError,
    ProbeError,
)
from autobatch.padding import PadColumns, bucket_length, count_truncations, pad_columns, pad_sequences_batch
from autobatch.plan import Bucket, BucketPlan, BudgetUse, Plan, make_bucket_plan, make_plan
from autobatch.probe import ProbeResult, StepTrial, TensorSpec, probe
from autobatch.size_probe import GridTrial, LengthMemoryModel, SizeAwareProbe

__version__ = "0.1.0"

# A library logs but never configures logging: without this, Python's last-resort handler prints our warnings.
logging.getLogger("autobatch").addHandler(logging.NullHandler())

# Feeds and the monitor subclass Keras classes, so importing them loads TensorFlow (seconds):
# they load on first use, keeping `import autobatch` and the planning CLI fast.
_LAZY = {
    "BaseFeed": "autobatch.feeds",
    "DistributedFeed": "autobatch.feeds.distributed",
    "FeedStats": "autobatch.feeds.base",
    "InMemoryFeed": "autobatch.feeds",
    "MemoryMonitor": "autobatch.monitor",
    "MemoryReading": "autobatch.monitor",
    "MonitorSummary": "autobatch.monitor",
    "ShardFeed": "autobatch.feeds",
    "distribute_feed": "autobatch.feeds.distributed",
    "SizeAwareFeed": "autobatch.feeds.size_aware",
    "SizeAwareShardFeed": "autobatch.feeds.size_aware",
    "make_feed": "autobatch.feeds",
    "make_size_aware_feed": "autobatch.feeds.size_aware",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'autobatch' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "AutobatchError",
    "BaseFeed",
    "Bucket",
    "BucketPlan",
    "Budget",
    "BudgetError",
    "BudgetUse",
    "ClusterSummary",
    "ConfigError",
    "DataError",
    "DistributedFeed",
    "Distribution",
    "FeedStats",
    "GridTrial",
    "InMemoryFeed",
    "LengthMemoryModel",
    "MemoryMonitor",
    "MemoryReading",
    "ModelError",
    "MonitorSummary",
    "PadColumns",
    "Plan",
    "PreprocessError",
    "ProbeError",
    "ProbeResult",
    "ReplicaLimit",
    "ShardFeed",
    "SizeAwareFeed",
    "SizeAwareProbe",
    "SizeAwareShardFeed",
    "StepTrial",
    "TensorSpec",
    "WorkerMemory",
    "bucket_length",
    "count_truncations",
    "distribute_feed",
    "fit",
    "format_bytes",
    "make_bucket_plan",
    "make_feed",
    "make_plan",
    "make_size_aware_feed",
    "pad_columns",
    "pad_sequences_batch",
    "parse_bytes",
    "plan",
    "plan_size_aware",
    "probe",
]
