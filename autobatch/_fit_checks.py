"""What :func:`autobatch.fit` checks before it probes: its keywords, the targets, a ``tf.distribute`` setup.

Each check raises a :class:`~autobatch.errors.ConfigError` that says what was
expected and what was received, so a misspelt keyword or missing targets fail in
the call, not minutes later inside the first batch.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from typing import Any

from autobatch.errors import ConfigError

TARGET_WORDS = ("target", "targets", "label", "labels")
"""What users (and the CLI, ``--target``) call ``y``."""

FIT_KEYWORD_HINTS: dict[str, str] = {
    "batch": "autobatch.fit chooses the batch size itself; did you mean max_batch_size= (never train on larger "
    "batches) or target_batch_size= (the batch the optimizer sees, kept by gradient accumulation)?",
    **dict.fromkeys(
        ("memory_limit", "max_memory", "ram", "memory"), "did you mean ram_limit= (e.g. ram_limit='8GiB')?"
    ),
    **dict.fromkeys(("gpu_memory", "vram"), "did you mean gpu_limit= (e.g. gpu_limit='16GiB', per replica)?"),
}
"""Other keywords users reach for that autobatch.fit spells otherwise, and what to say instead."""


def model_fit_parameters(model: Any) -> set[str]:
    """The keyword names ``model.fit`` accepts: its own, and ``keras.Model.fit``'s when it takes ``**kwargs``."""
    import inspect

    import keras

    def named(function: Any) -> tuple[set[str], bool]:
        parameters = inspect.signature(function).parameters.values()
        names = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self"}
        return names, any(p.kind is p.VAR_KEYWORD for p in parameters)

    try:
        names, forwards = named(model.fit)
    except (AttributeError, TypeError, ValueError):  # no introspectable fit: judge by what Keras' takes
        names, forwards = set(), True
    if forwards:  # an override that passes **kwargs on, as subclasses of keras.Model do
        names |= named(keras.Model.fit)[0]
    return names


def check_fit_kwargs(model: Any, fit_kwargs: Mapping[str, Any], *, own: Collection[str]) -> None:
    """A :class:`ConfigError` naming every keyword that neither ``autobatch.fit`` nor ``model.fit`` takes.

    ``autobatch.fit`` passes what it does not take itself on to ``model.fit``, so a misspelt or foreign option
    (``target=``, the CLI's ``--target``) would otherwise fail only after probing, inside the first batch.

    Args:
        model: the model whose ``fit`` gets the keywords.
        fit_kwargs: the keywords ``autobatch.fit`` does not take itself.
        own: the keywords ``autobatch.fit`` takes (close matches among them are suggested too).

    Raises:
        ConfigError: a keyword neither takes, with the closest valid one where there is one.
    """
    import difflib
    import reprlib

    accepted = model_fit_parameters(model)
    unknown = [key for key in fit_kwargs if key not in accepted]
    if not unknown:
        return
    # Not what autobatch.fit decides itself (it warns and ignores those), nor the data it passes.
    candidates = sorted((set(own) | accepted) - {"x", "batch_size", "steps_per_epoch"})
    hints = []
    for key in unknown:
        hint = FIT_KEYWORD_HINTS.get(key.lower())
        value = fit_kwargs[key]
        if key.lower() in TARGET_WORDS:
            named = isinstance(value, str) or (
                isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value)
            )
            hints.append(
                f"`{key}`: did you mean " + (f"y={value!r}" if named else "y=") + "? y is the target column name "
                "(or names) of the data, or the targets themselves (an array, Series or DataFrame)."
            )
        elif hint is not None:
            hints.append(f"`{key}`: {hint}")
        else:
            close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
            hints.append(
                f"`{key}`: did you mean {close[0]}=?" if close
                else f"`{key}`: no close match; see help(autobatch.fit) and help(model.fit)."
            )
    received = ", ".join(f"{key}={reprlib.repr(fit_kwargs[key])}" for key in unknown)
    raise ConfigError(
        f"unknown keyword argument(s) {', '.join(f'`{key}`' for key in unknown)}: autobatch.fit passes the keywords "
        f"it does not take itself to {type(model).__name__}.fit, which does not take "
        f"{'it' if len(unknown) == 1 else 'them'} either. {' '.join(hints)} Received: {received}"
    )


def check_targets(model: Any, x: Any, y: Any, preprocess: Any) -> None:
    """A :class:`ConfigError` when ``model.fit`` would get no targets although the model's loss needs them.

    That is: ``y`` is None, no ``preprocess`` may build targets from the batch (with the default one every
    column is an input), and the model is compiled with a loss. Data from ``"module:function"`` brings its own
    ``y``, and a :class:`~autobatch._data.ShardSource` may name its target.
    """
    import reprlib

    import numpy as np
    import pandas as pd

    from autobatch._data import ShardSource
    from autobatch._loading import is_callable_spec
    from autobatch._shard_files import shard_info

    if y is not None or preprocess is not None or getattr(model, "loss", None) is None:
        return
    columns: list[str] | None = None
    if isinstance(x, ShardSource):
        if x.target is not None:
            return
        columns = list(shard_info(x.files[0]).columns)
    elif isinstance(x, (str, os.PathLike)):
        if is_callable_spec(str(x)):
            return
        columns = list(shard_info(ShardSource.from_spec(x).files[0]).columns)  # a missing path: its DataError
    elif isinstance(x, pd.DataFrame):
        columns = [str(name) for name in x.columns]
    elif not isinstance(x, (np.ndarray, pd.Series, Mapping, tuple, list)):
        return  # not data autobatch takes: the feed's dispatcher says so
    short = reprlib.Repr()
    short.maxlist = 20
    what = (
        f"the target column name (one of: {short.repr(columns)}) or the targets themselves (an array or Series)"
        if columns is not None
        else "the targets (an array with one row per sample, or a dict of them per output)"
    )
    raise ConfigError(
        f"no targets: pass y= {what}. Model {getattr(model, 'name', type(model).__name__)!r} is compiled with a "
        "loss, which needs targets, but y is None and no preprocess builds them (the default one makes every "
        "column an input). If your preprocess builds the targets from the batch's columns, pass it as "
        "preprocess=. Received: y=None"
    )



def check_distributed(model: Any, strategy: Any, *, adaptive: bool) -> None:
    """Refuse what autobatch.fit cannot do under tf.distribute, saying what to do instead."""
    if adaptive:
        raise ConfigError(
            "adaptive=True is not supported under tf.distribute: a worker cutting its batches alone would take more "
            "steps than its peers, which then wait for it. Train with adaptive=False (all workers agree on the plan)."
        )
    own = getattr(model, "_distribute_strategy", None)
    if own is not strategy:
        raise ConfigError(
            f"model {getattr(model, 'name', model)!r} was not built under the strategy autobatch.fit trains with "
            f"({type(strategy).__name__}). Build and compile it inside `with strategy.scope():`."
        )

