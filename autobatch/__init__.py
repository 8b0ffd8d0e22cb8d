"""autobatch: measure, don't guess, the batch size that fits Keras/TensorFlow training in memory.

The public names are the ones a training script needs; everything else lives in submodules
(``from autobatch.plan import make_plan``, ``from autobatch.padding import count_truncations``, ...)
or is private.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from autobatch._planning import plan, plan_size_aware
from autobatch._units import format_bytes, parse_bytes
from autobatch.api import fit
from autobatch.errors import (
    AutobatchError,
    BudgetError,
    ConfigError,
    DataError,
    ModelError,
    PreprocessError,
    ProbeError,
)
from autobatch.padding import PadColumns, pad_columns
from autobatch.plan import Plan
from autobatch.probe import ProbeResult, probe

__version__ = "0.1.0"

# A library logs but never configures logging: without this, Python's last-resort handler prints our warnings.
logging.getLogger("autobatch").addHandler(logging.NullHandler())

# Feeds and the monitor subclass Keras classes, so importing them loads TensorFlow (seconds):
# they load on first use, keeping `import autobatch` and the planning CLI fast.
_LAZY = {
    "InMemoryFeed": "autobatch.feeds",
    "MemoryMonitor": "autobatch.monitor",
    "ShardFeed": "autobatch.feeds",
    "SizeAwareFeed": "autobatch.feeds",
    "SizeAwareShardFeed": "autobatch.feeds",
    "distribute_feed": "autobatch.feeds.distributed",
    "make_feed": "autobatch.feeds",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'autobatch' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "AutobatchError",
    "BudgetError",
    "ConfigError",
    "DataError",
    "InMemoryFeed",
    "MemoryMonitor",
    "ModelError",
    "PadColumns",
    "Plan",
    "PreprocessError",
    "ProbeError",
    "ProbeResult",
    "ShardFeed",
    "SizeAwareFeed",
    "SizeAwareShardFeed",
    "distribute_feed",
    "fit",
    "format_bytes",
    "make_feed",
    "pad_columns",
    "parse_bytes",
    "plan",
    "plan_size_aware",
    "probe",
]
