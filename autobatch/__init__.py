"""autobatch: measure, don't guess, the batch size that fits Keras/TensorFlow training in memory."""

from autobatch._memory import Budget
from autobatch._units import format_bytes, parse_bytes
from autobatch.api import plan
from autobatch.errors import (
    AutobatchError,
    BudgetError,
    ConfigError,
    DataError,
    ModelError,
    PreprocessError,
    ProbeError,
)
from autobatch.plan import BudgetUse, Plan, make_plan
from autobatch.probe import ProbeResult, StepTrial, TensorSpec, probe

__version__ = "0.1.0"

__all__ = [
    "AutobatchError",
    "Budget",
    "BudgetError",
    "BudgetUse",
    "ConfigError",
    "DataError",
    "ModelError",
    "Plan",
    "PreprocessError",
    "ProbeError",
    "ProbeResult",
    "StepTrial",
    "TensorSpec",
    "format_bytes",
    "make_plan",
    "parse_bytes",
    "plan",
    "probe",
]
