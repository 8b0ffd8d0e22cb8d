"""The checks every batch passes after ``preprocess``, and the counts a feed keeps of them.

Every batch must hold the same arrays, dtypes and ranks as the first one (or as
the probe measured), one row per sample, so a drifting ``preprocess`` fails on
the batch that drifted instead of deep inside TensorFlow. Every batch is also
checked for NaN/inf values (``nan_policy``), and the sequences ``preprocess``
truncates to a fixed ``maxlen`` with autobatch's padding helpers are counted
(``feed.stats.truncated_sequences``). Errors about one row name where it came
from: the row of the in-memory data, or the shard file and its row.

:class:`BatchChecks` is the part of :class:`~autobatch.feeds.base.BaseFeed` that
does this; the TensorFlow-padded exports (``feeds.native``) call the same
methods for the batches they assemble.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any, Literal

import numpy as np

from autobatch._preprocess import _leaves
from autobatch._units import format_bytes
from autobatch.errors import ConfigError, DataError, PreprocessError
from autobatch.padding import Truncations

logger = logging.getLogger(__name__)

NanPolicy = Literal["warn", "error", "ignore"]


def _check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ConfigError(f"`batch_size` must be a positive int. Received: batch_size={batch_size!r}")
    return int(batch_size)


def _check_nan_policy(nan_policy: str) -> NanPolicy:
    if nan_policy not in ("warn", "error", "ignore"):
        raise ConfigError(f'`nan_policy` must be "warn", "error" or "ignore". Received: nan_policy={nan_policy!r}')
    return nan_policy  # type: ignore[return-value]


def _nonfinite_rows(array: np.ndarray) -> np.ndarray | None:
    """Per row, whether it holds NaN or inf; ``None`` when every value is finite (or the dtype cannot hold NaN)."""
    if array.dtype.kind not in "fc" or array.size == 0:
        return None
    # One pass without a temporary: a NaN or inf anywhere makes the sum non-finite (so does overflow, checked next).
    # Summing in the array's own precision (float16 in float32) avoids a cast of every value.
    with np.errstate(over="ignore", invalid="ignore"):
        total = array.sum(dtype=np.result_type(array.dtype, np.float32))
    if np.isfinite(total):
        return None
    bad = ~np.isfinite(array)
    if not bad.any():
        return None
    return bad.reshape(len(array), -1).any(axis=1)


@dataclasses.dataclass
class FeedStats:
    """Work a feed has done producing batches (reading, slicing, preprocessing), for the monitor."""

    batches: int = 0
    seconds: float = 0.0
    truncated_sequences: int = 0
    """Sequences ``preprocess`` cut to a fixed ``maxlen`` with autobatch's padding helpers, over all batches served."""
    truncated_by_column: dict[str, int] = dataclasses.field(default_factory=dict)
    """The same, per column (for :func:`autobatch.pad_columns`)."""
    nonfinite_batches: int = 0
    """Batches that held NaN or inf values after ``preprocess`` (with ``nan_policy="warn"``)."""


class BatchChecks:
    """Checks a preprocessed batch, counts it in :attr:`stats`, and warns once per kind of trouble.

    A mixin of :class:`~autobatch.feeds.base.BaseFeed`, which sets the attributes
    below (``_reference``, ``_warned`` and ``_warned_bytes`` are runtime state,
    rebuilt after unpickling).
    """

    nan_policy: NanPolicy
    max_batch_bytes: int | None
    stats: FeedStats
    _lock: threading.Lock
    _reference: tuple[dict[str, tuple[str, int]], str] | None
    """Names, dtypes and ranks every batch must have, and where they were first seen."""
    _warned: set[str]
    _warned_bytes: bool

    def _record_batch(self, started: float, cut: Truncations, where: str, *, nonfinite: bool = False) -> None:
        """Count a batch served since ``started`` (``perf_counter``), the sequences cut in it, and report the cuts."""
        with self._lock:
            self.stats.batches += 1
            self.stats.seconds += time.perf_counter() - started
            self.stats.nonfinite_batches += int(nonfinite)
            if cut.sequences:
                self.stats.truncated_sequences += cut.sequences
                for name, count in cut.by_column.items():
                    self.stats.truncated_by_column[name] = self.stats.truncated_by_column.get(name, 0) + count
        if cut.sequences:
            self._report_truncation(cut.sequences, cut.by_column, cut.maxlen, where)

    def _warn_once(self, key: str, message: str, category: type[Warning]) -> None:
        with self._lock:
            if key in self._warned:
                return
            self._warned.add(key)
        logger.warning("%s", message)
        warnings.warn(message, category, stacklevel=4)

    def _report_truncation(self, count: int, by_column: dict[str, int], maxlen: dict[str, int], where: str) -> None:
        columns = ", ".join(f"{name!r} cut to {maxlen[name]}: {n}" for name, n in by_column.items())
        logger.debug("%d sequence(s) truncated on %s (%s)", count, where, columns)
        self._warn_once(
            "truncation",
            f"preprocess truncated {count} sequence(s) longer than maxlen on {where}"
            + (f" ({columns})" if columns else "")
            + "; later batches are counted in feed.stats.truncated_sequences (and the monitor's summary), not warned "
            "about again. Raise maxlen if those time steps matter.",
            UserWarning,
        )

    def _check(
        self,
        inputs: Any,
        targets: Any,
        rows: int,
        where: str,
        origin: Callable[[int], str] | None = None,
        *,
        record: bool = True,
    ) -> None:
        leaves = {**_leaves(inputs, "x", where), **_leaves(targets, "y", where)}
        if not leaves:
            raise PreprocessError(f"preprocess returned no arrays on {where}.")
        for name, array in leaves.items():
            if array.ndim == 0 or array.shape[0] != rows:
                got = "a scalar" if array.ndim == 0 else f"{array.shape[0]} rows"
                raise PreprocessError(
                    f"preprocess must keep one row per sample: expected {rows} rows for {name} on {where}, "
                    f"received {got}. Do not drop or add rows in preprocess."
                )
        found = {name: (str(a.dtype), a.ndim) for name, a in leaves.items()}
        with self._lock:
            if self._reference is None:
                self._reference = (found, where)
        expected, first = self._reference
        if found.keys() != expected.keys():
            raise PreprocessError(
                f"preprocess must return the same arrays for every batch: expected {sorted(expected)} "
                f"(as on {first}), received {sorted(found)} on {where}. Return the same keys every time."
            )
        for name, (dtype, ndim) in found.items():
            if (dtype, ndim) != expected[name]:
                want_dtype, want_ndim = expected[name]
                raise PreprocessError(
                    f"preprocess must return the same dtype and rank for every batch: expected {name} as "
                    f"{want_dtype} ({want_ndim}-D, as on {first}), received {dtype} ({ndim}-D) on {where}. "
                    "Cast explicitly (e.g. .astype('float32')) and pad to the same number of axes."
                )
        if self.nan_policy != "ignore":
            self._check_finite(leaves, where, origin, record=record)
        if self.max_batch_bytes is not None and not self._warned_bytes:
            self._check_batch_bytes(sum(int(a.nbytes) for a in leaves.values()), where)

    def _check_batch_bytes(self, nbytes: int, where: str) -> None:
        """Warn once when a batch holds more than the probe's worst-case batch (``max_batch_bytes``)."""
        if self.max_batch_bytes is not None and not self._warned_bytes and nbytes > self.max_batch_bytes:
            self._warned_bytes = True
            logger.warning(
                "%s holds %s after preprocess, more than the %s of the probe's worst-case batch: "
                "the plan may underestimate memory. Probe with the same preprocess and data as you train on.",
                where,
                format_bytes(nbytes),
                format_bytes(self.max_batch_bytes),
            )

    def _check_finite(
        self, leaves: dict[str, np.ndarray], where: str, origin: Callable[[int], str] | None, *, record: bool
    ) -> None:
        found = False
        for name, array in leaves.items():
            bad_rows = _nonfinite_rows(array)
            if bad_rows is None:
                continue
            found = True
            self._report_nonfinite(name, int((~np.isfinite(array)).sum()), bad_rows, where, origin)
        if found and record:
            with self._lock:
                self.stats.nonfinite_batches += 1

    def _report_nonfinite(
        self, name: str, values: int, bad_rows: np.ndarray, where: str, origin: Callable[[int], str] | None
    ) -> None:
        """Warn once about ``values`` NaN/inf in the rows ``bad_rows`` flags (raise with ``nan_policy="error"``)."""
        first = int(np.argmax(bad_rows))
        message = (
            f"{name} holds {values} NaN/inf value(s) in {int(bad_rows.sum())} row(s) on {where}; the first is row "
            f"{first} of the batch" + (f" ({origin(first)})" if origin is not None else "") + ". NaN or inf "
            "inputs make the loss NaN: clean the data (or what preprocess computes from it)"
        )
        if self.nan_policy == "error":
            raise DataError(message + ", or pass nan_policy='warn' or 'ignore'.")
        self._warn_once(
            f"nonfinite:{name}",
            message + ". Later batches are counted in feed.stats.nonfinite_batches, not warned about again; "
            "pass nan_policy='error' to stop at the first one or 'ignore' to skip the check.",
            RuntimeWarning,
        )
