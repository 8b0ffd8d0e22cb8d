"""Running the user's ``preprocess`` on a sample batch: its arrays, their bytes, its transient peak, its signature.

Everything here runs in the caller's process, on a handful of rows: what ``preprocess`` returns is checked
(a pair, one row per sample, rectangular numeric arrays) and compared across batches, and every failure is
a :class:`~autobatch.errors.PreprocessError` (or the :class:`~autobatch.errors.DataError` autobatch's
helpers raised inside it) that says on which batch.
"""

from __future__ import annotations

import dataclasses
import tracemalloc
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pandas as pd

from autobatch._data import InMemoryData
from autobatch._loading import resolve_callable
from autobatch._result import TensorSpec
from autobatch.errors import ConfigError, DataError, PreprocessError

Preprocess = Callable[[Any, Any], tuple[Any, Any]]


def _leaves(value: Any, prefix: str, where: str) -> dict[str, np.ndarray]:
    if value is None:
        return {}
    if isinstance(value, Mapping):
        out: dict[str, np.ndarray] = {}
        for key, item in value.items():
            out.update(_leaves(item, f"{prefix}/{key}", where))
        return out
    if isinstance(value, (tuple, list)):
        out = {}
        for i, item in enumerate(value):
            out.update(_leaves(item, f"{prefix}/{i}", where))
        return out
    try:
        array = np.asarray(value)
    except Exception as exc:
        raise PreprocessError(f"preprocess returned {prefix} that is not an array ({type(value)}) on {where}") from exc
    if array.dtype == object:
        raise PreprocessError(
            f"preprocess returned {prefix} with dtype object on {where}: variable-length rows must be padded "
            "to a rectangular array (e.g. with autobatch's padding helpers or keras.utils.pad_sequences)."
        )
    return {prefix: array}


def _check_text_column(column: pd.Series, what: str) -> None:
    """Name the first cell of a column of scalars that is not a number (e.g. "abc" in a CSV column of numbers).

    Raises:
        DataError: such a cell exists; ``error.row`` is its position in the batch.
    """
    values = column.to_numpy()
    if any(isinstance(v, (list, tuple, np.ndarray, Mapping)) for v in values):
        return  # sequences: the caller asks for a preprocess that pads them
    parsed = pd.to_numeric(column, errors="coerce").to_numpy()
    bad = np.flatnonzero(pd.isna(parsed) & ~pd.isna(column).to_numpy())
    if len(bad):
        i = int(bad[0])
        label = column.index[i]
        label = label.item() if isinstance(label, np.generic) else label
        shown = repr(values[i]) if len(repr(values[i])) <= 40 else repr(values[i])[:37] + "..."
        raise DataError(
            f"column {column.name!r} of {what} holds {shown} at row {i} of the batch (index label {label!r}), which is "
            f"not a number ({len(bad)} such cell(s) in this batch). Fix the data, or pass a `preprocess` that encodes it.",
            row=i,
        )


def default_preprocess(batch_x: Any, batch_y: Any) -> tuple[Any, Any]:
    """Turn a DataFrame batch into a dict of column arrays; pass arrays through unchanged.

    Raises:
        DataError: a column holds text that is not a number (the message names the column and row).
        PreprocessError: a column holds sequences or other objects, which need a ``preprocess``.
    """

    def convert(value: Any, what: str) -> Any:
        if isinstance(value, pd.DataFrame):
            out = {}
            for name in value.columns:
                column = value[name]
                if column.dtype == object or isinstance(column.dtype, pd.StringDtype):
                    _check_text_column(column, what)
                    raise PreprocessError(
                        f"column {name!r} of {what} holds {column.dtype} values (e.g. variable-length sequences "
                        "or strings); pass a `preprocess` function that turns them into padded numeric arrays."
                    )
                out[str(name)] = column.to_numpy()
            return out
        if isinstance(value, pd.Series):
            if value.dtype == object or isinstance(value.dtype, pd.StringDtype):
                _check_text_column(value, what)
            return value.to_numpy()
        return value

    return convert(batch_x, "x"), convert(batch_y, "y")


@dataclasses.dataclass(frozen=True)
class _Preprocessed:
    inputs: Any
    targets: Any
    leaves: dict[str, np.ndarray]
    nbytes: int
    peak_bytes: int
    batch_size: int


def run_preprocess(preprocess: Preprocess, data: InMemoryData, *, where: str) -> _Preprocessed:
    """Call ``preprocess`` on one batch, measuring its output size and transient peak.

    Raises:
        DataError: autobatch's helpers inside ``preprocess`` found bad data (e.g. a value that is not a number).
        PreprocessError: ``preprocess`` raised, returned something other than
            ``(inputs, targets)``, or changed the number of rows.
    """
    batch_x, batch_y = data.take(np.arange(data.n_samples))
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    before, _ = tracemalloc.get_traced_memory()
    try:
        result = preprocess(batch_x, batch_y)
    except DataError as exc:  # bad data found by autobatch's helpers: keep the type, add where
        raise DataError(f"{exc} (on {where})") from exc
    except Exception as exc:
        raise PreprocessError(
            f"preprocess raised {type(exc).__name__}: {exc} on {where}. Fix the function or the data it chokes on."
        ) from exc
    finally:
        _, peak = tracemalloc.get_traced_memory()
        if not tracing:
            tracemalloc.stop()
    if not isinstance(result, tuple) or len(result) != 2:
        raise PreprocessError(
            f"preprocess must return a pair (inputs, targets); on {where} it returned {type(result).__name__}"
            + (f" of length {len(result)}" if isinstance(result, tuple) else "")
            + "."
        )
    inputs, targets = result
    leaves = {**_leaves(inputs, "x", where), **_leaves(targets, "y", where)}
    if not leaves:
        raise PreprocessError(f"preprocess returned no arrays on {where}.")
    for name, array in leaves.items():
        if array.ndim == 0 or array.shape[0] != data.n_samples:
            rows = "a scalar" if array.ndim == 0 else f"{array.shape[0]} rows"
            raise PreprocessError(
                f"preprocess returned {rows} for {name} on {where} of {data.n_samples} samples; "
                "it must keep one row per sample (nothing dropped or added)."
            )
    nbytes = sum(int(a.nbytes) for a in leaves.values())
    return _Preprocessed(inputs, targets, leaves, nbytes, max(int(peak - before), nbytes), data.n_samples)


def _signature(first: _Preprocessed, second: _Preprocessed, where: tuple[str, str]) -> tuple[TensorSpec, ...]:
    """Compare two preprocessed batches; shapes may differ along padded axes, nothing else may."""
    if first.leaves.keys() != second.leaves.keys():
        raise PreprocessError(
            f"preprocess returned different arrays for different batches: {sorted(first.leaves)} on {where[0]} "
            f"but {sorted(second.leaves)} on {where[1]}. Return the same keys for every batch."
        )
    specs = []
    for name, a in first.leaves.items():
        b = second.leaves[name]
        if a.dtype != b.dtype or a.ndim != b.ndim:
            raise PreprocessError(
                f"preprocess returned {name} as {a.dtype}[{a.ndim}-D] on {where[0]} but {b.dtype}[{b.ndim}-D] "
                f"on {where[1]}. Every batch must have the same dtype and rank."
            )
        shape = (None,) + tuple(x if x == y else None for x, y in zip(a.shape[1:], b.shape[1:]))
        specs.append(TensorSpec(name, str(a.dtype), shape))
    return tuple(specs)


def _merge_signatures(a: tuple[TensorSpec, ...], b: tuple[TensorSpec, ...]) -> tuple[TensorSpec, ...]:
    return tuple(
        TensorSpec(x.name, x.dtype, tuple(p if p == q else None for p, q in zip(x.shape, y.shape))) for x, y in zip(a, b)
    )


def _resolve_preprocess(preprocess: Preprocess | str | None) -> Preprocess:
    """The ``preprocess`` to call: :func:`default_preprocess` for ``None``, a ``"module:function"`` imported."""
    if preprocess is None:
        return default_preprocess
    if isinstance(preprocess, str):
        return resolve_callable(preprocess, what="preprocess")
    if not callable(preprocess):
        raise ConfigError(f"`preprocess` must be a function (batch_x, batch_y) -> (inputs, targets). Received: {preprocess!r}")
    return preprocess

