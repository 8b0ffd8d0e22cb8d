"""Errors raised by autobatch.

Every error the library raises on purpose derives from one base, so callers
(and the CLI) can catch exactly ours::

    AutobatchError
    ├── ConfigError        bad option value (e.g. an unparseable ``ram_limit``)
    ├── DataError          missing/empty/corrupt data, missing column, ragged rows
    ├── PreprocessError    ``preprocess`` raised or returned inconsistent batches
    ├── ModelError         the model cannot be loaded, built or is not compiled
    ├── ProbeError         a probe trial in the child process failed or hung
    └── BudgetError        the memory budget cannot hold even one sample
"""

from __future__ import annotations


class AutobatchError(Exception):
    """Base class of every error autobatch raises deliberately."""


class ConfigError(AutobatchError, ValueError):
    """An option has a value autobatch cannot use."""


class DataError(AutobatchError, ValueError):
    """The data is missing, empty, unreadable or inconsistent.

    Args:
        message: what is wrong, where, and what to do.
        row: position, within the batch a helper was given, of the row at fault
            (e.g. the sequence :func:`autobatch.pad_columns` could not parse). A
            feed turns it into the file and row the sample came from.
    """

    def __init__(self, message: str = "", *, row: int | None = None) -> None:
        super().__init__(message)
        self.row = row


class PreprocessError(AutobatchError):
    """The user's ``preprocess`` function failed or returned inconsistent batches."""


class ModelError(AutobatchError):
    """The model cannot be loaded or trained as given."""


class ProbeError(AutobatchError):
    """A measurement in the probe's child process failed."""


class BudgetError(AutobatchError):
    """The memory budget is too small for the smallest possible batch."""
