"""The public entry points that wire probe → plan (→ feed → fit, in later stages)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol

from autobatch import _cache, _distribute
from autobatch._memory import Budget, gpu_budget, host_budget, rss_bytes
from autobatch.plan import Plan, make_plan
from autobatch.errors import AutobatchError, ConfigError, ProbeError
from autobatch.probe import Preprocess, Prober, ProbeResult, StepTrial

if TYPE_CHECKING:
    from rich.console import Console

logger = logging.getLogger(__name__)

MAX_CONFIRMATIONS = 6
CONFIRM_GROWTH = 1.10
"""A plan at most 10% above a size a trial confirmed takes that size instead of one more trial."""
BRACKET = 1.3
"""A plan between a trial that fits and one over the budget at most 30% larger is interpolated between them."""


def _budget_bucket(budgets: Sequence[Budget]) -> str:
    # Quarter-octave buckets: free memory drifts a little between runs without invalidating the cache.
    return ",".join(f"{b.kind}:{round(math.log2(max(b.limit_bytes, 1)) * 4)}" for b in budgets)


class _Confirmer(Protocol):
    def confirm(
        self, result: ProbeResult, batch_size: int, *, rss_limit_bytes: int | None, fresh: bool = False
    ) -> ProbeResult: ...


def confirm_plan(
    prober: _Confirmer, result: ProbeResult, budgets: Sequence[Budget], **options: Any
) -> tuple[Plan, ProbeResult]:
    """Plan, then confirm the batch size with real trials.

    Each trial's measurement joins the fit (whose line lies above every measured point). A trial measures
    the same thing whatever was tried before it: trials go up in batch size within one child process, and
    a trial below one already run starts a fresh child that replays the probe's trials first (a trial after
    a larger one would start from the memory the larger one left in TensorFlow's allocators). So:

    - a plan at or below a trial that fits its budget is confirmed;
    - between a trial that fits and one over the budget at most ``BRACKET`` times larger, the plan is
      interpolated between the two (memory grows with the batch), not tried again;
    - otherwise the planned size is tried; a trial that ran out of memory (or was stopped at what the machine
      can give) caps the batch below it, and the plan bisects down.

    Returns:
        The plan and the probe result including the new trials.
    """
    user_cap = options.pop("max_batch_size", None)

    def planned(of: ProbeResult, cap: int | None = None) -> Plan:
        caps = [c for c in (user_cap, cap) if c is not None]
        return make_plan(of, budgets, max_batch_size=min(caps) if caps else None, **options)

    def within(trial: StepTrial) -> bool:
        at = planned(result, trial.batch_size)
        return trial.fits and at.confirmed and at.confirmed_batch_size == trial.batch_size

    chosen = planned(result)
    for _ in range(MAX_CONFIRMATIONS):
        failed = result.failed_batch_size()
        cap = None
        if failed is not None:
            # Bisect between the largest fitting trial and the smallest failed one.
            fitting = [t.batch_size for t in result.trials if t.fits and t.batch_size < failed]
            cap = max((max(fitting, default=0) + failed) // 2, 1)
        chosen = planned(result, cap)
        host = chosen.budget("host")
        inside = [(t, within(t)) for t in result.trials]
        fits = [t for t, ok in inside if ok]
        over = [t for t, ok in inside if t.fits and t.peak_rss_bytes is not None and not ok]
        lo = max(fits, key=lambda t: t.batch_size, default=None)
        hi = min((t for t in over if lo is None or t.batch_size > lo.batch_size), key=lambda t: t.batch_size, default=None)
        if host is None or (chosen.confirmed and (hi is None or lo is None or chosen.batch_size >= lo.batch_size)):
            break
        size = chosen.batch_size
        if lo is not None and hi is None and len(fits) >= 2:
            # Growing past a trial that fits: extrapolate from the two largest that fit (the local slope), when lower.
            local = sorted(fits, key=lambda t: t.batch_size)[-2:]
            size = min(size, max(planned(dataclasses.replace(result, trials=tuple(local)), cap).batch_size, 1))
        if lo is not None and hi is None and size <= CONFIRM_GROWTH * lo.batch_size:
            chosen = planned(result, lo.batch_size)  # the refitted line allows a little more: keep the confirmed size
            break
        if lo is not None and hi is not None:
            # Between a trial that fits and one over the budget, the plan is on their chord.
            if size <= CONFIRM_GROWTH * lo.batch_size:
                chosen = planned(result, lo.batch_size)  # not worth another trial: the size a trial confirmed
                break
            if hi.batch_size <= BRACKET * lo.batch_size:
                break
        extras = sum(v for name, v in host.components if name != "train step")
        # A trial that grows past twice what the plan allows cannot fit: stop it there rather than let it run on.
        allowed = max(host.usable_bytes - extras, 1)
        fresh = size < max((t.batch_size for t in result.trials if t.fits), default=0)
        logger.info("confirming batch %d with a real trial%s", size, " in a fresh child" if fresh else "")
        result = prober.confirm(result, size, rss_limit_bytes=(result.baseline_rss_bytes or 0) + 2 * allowed, fresh=fresh)
    else:
        fitted = [t.batch_size for t in result.trials if within(t)]
        if fitted:
            chosen = planned(result, max(fitted))
    return _trial_capped(chosen, user_cap), result


def _trial_capped(plan: Plan, user_cap: int | None) -> Plan:
    """Name the confirming trials, not ``max_batch_size``, when they (not the user) capped the plan."""
    if plan.limited_by != "max_batch_size" or (user_cap is not None and plan.batch_size >= user_cap):
        return plan
    why = "the confirming trials (the largest batch a real trial fitted, below one that did not or just under the fit)"
    return dataclasses.replace(
        plan,
        limited_by="confirming trials",
        explanation=plan.explanation.replace("limited by max_batch_size", f"limited by {why}", 1),
    )


def plan(
    x: Any,
    y: Any = None,
    *,
    preprocess: Preprocess | str | None = None,
    model: Any = None,
    ram_limit: int | str | None = None,
    gpu_limit: int | str | None = None,
    safety: float | None = None,
    max_batch_size: int | None = None,
    multiple_of: int | None = None,
    target_batch_size: int | None = None,
    queue_batches: int = 2,
    confirm: bool = True,
    cache: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    in_process: bool = True,
    strategy: Any = None,
    **probe_options: Any,
) -> Plan:
    """Probe the data (and model), read the memory budgets and plan the largest safe batch.

    With a model, the chosen batch size is confirmed by one real training trial
    at that size in the child process; if the trial exceeds the budget the
    measurement joins the fit and the plan steps down, so the answer never rests
    on a far extrapolation.

    Args:
        x: the data, as for :func:`autobatch.probe`.
        y: targets or target column name(s).
        preprocess: ``preprocess(batch_x, batch_y) -> (inputs, targets)`` or ``"module:function"``.
        model: a compiled ``keras.Model``, a ``.keras`` file or ``"module:function"``.
        ram_limit: peak host RAM the training process may use (e.g. ``"8GiB"``);
            default: free RAM capped by the cgroup limit.
        gpu_limit: device memory one replica may use; default: free GPU memory.
        safety: margin kept free on top of what training adds: ``safety`` × the step's growth,
            the queue, preprocessing and the shards being read (see :func:`make_plan`); default 0.1.
        max_batch_size: never plan a larger batch.
        multiple_of: round the batch size down to a multiple of this.
        target_batch_size: the batch the optimisation should see; kept by gradient
            accumulation when it does not fit in one step.
        queue_batches: batches the feed may hold waiting.
        confirm: run the confirming trial at the chosen size.
        cache: reuse an identical earlier probe (same data, preprocess, model, device, budget).
        cache_dir: where the cache lives.
        in_process: training will run in this process, so its own resident memory, measured
            after probing, is the plan's fixed part. ``False`` (the CLI) plans for a training
            process autobatch does not run: the probe child's runtime + model stands for it,
            and the plan says so.
        strategy: a ``tf.distribute`` strategy to plan for; default: the one whose
            ``scope()`` is active, if any. Then ``batch_size`` (and ``max_batch_size``) are
            per replica: each replica's own device budget (GPU) and its share of its host's
            RAM bound it, and with several workers they agree on the smallest through the
            strategy's collectives (every worker must call this). ``plan.distribution``
            holds ``num_replicas_in_sync``, the global batch and which worker set the limit.
        **probe_options: passed to :class:`autobatch.probe.Prober`
            (``sample_batch_size``, ``trial_batch_sizes``, ``steps``, ``seed``, ``timeout_s``, and
            ``model_builder`` / ``probe="in_process"`` as :func:`autobatch.fit` documents them).

    Returns:
        The :class:`Plan`, with the :class:`ProbeResult` it rests on as ``plan.probe``.

    Raises:
        AutobatchError: a subclass saying what is wrong with the data, the
            preprocessing, the model or the budget.

    Example:
        >>> p = autobatch.plan(df, "label", preprocess=pad, model=model, ram_limit="4GiB")
        >>> print(p)
    """
    active = _distribute.current_strategy(strategy, model=model)
    layout = _distribute.strategy_layout(active) if active is not None else None
    if layout is not None and target_batch_size is not None:
        raise ConfigError(
            "target_batch_size is not supported under tf.distribute yet; the global batch is the per-replica batch "
            "× num_replicas_in_sync. Use max_batch_size= to cap the per-replica batch."
        )
    budgets = [host_budget(ram_limit)]
    device_budgets: list[Budget | None] = []
    if layout is None:
        gpu = gpu_budget(gpu_limit)
        if gpu is not None:
            budgets.append(gpu)
    else:
        # One budget per replica's device; the process-wide plan below is against the host, which they share.
        device_budgets = _distribute.device_gpu_budgets(layout, gpu_limit)
        gpus = [b for b in device_budgets if b is not None]
        if gpus:
            budgets.append(min(gpus, key=lambda b: b.limit_bytes))
    if layout is not None and max_batch_size is not None:
        max_batch_size *= layout.local_replicas  # per replica; this process holds all its replicas' batches
    plan_budgets = budgets if layout is None else budgets[:1]
    options = dict(
        safety=safety,
        max_batch_size=max_batch_size,
        multiple_of=multiple_of,
        queue_batches=queue_batches,
        target_batch_size=target_batch_size,
    )
    run = dict(confirm=confirm, cache=cache, cache_dir=cache_dir, in_process=in_process, probe_options=probe_options)
    if layout is None:
        return _plan_locally(x, y, preprocess, model, budgets, budgets, options, **run)
    try:
        local = _plan_locally(x, y, preprocess, model, budgets, plan_budgets, options, **run)
        limits = _distribute.replica_limits(local.probe, local, device_budgets, layout, options=options)
        failure: Exception | None = None
    except Exception as exc:  # noqa: BLE001 (re-raised below, after the exchange)
        # Still take part in the exchange (peers would wait for this worker forever), then fail on every worker.
        local, failure = None, exc
        limits = [
            _distribute.ReplicaLimit(
                layout.worker_index, layout.worker_index * layout.local_replicas + i, 0, "failed", 0
            )
            for i in range(layout.local_replicas)
        ]
    limits = _distribute.gather_limits(active, layout, limits)
    if failure is not None:
        raise failure
    failed = sorted({r.worker for r in limits if r.limited_by == "failed"})
    if failed or local is None:
        raise ProbeError(
            f"planning failed on worker(s) {', '.join(map(str, failed))}, so no worker trains: see that worker's own "
            "error (its log or console) for what went wrong and how to fix it."
        )
    if max_batch_size is not None:
        options["max_batch_size"] = max_batch_size // layout.local_replicas
    return _distribute.distribute_plan(local, limits, layout, budgets, options=options)


def _plan_locally(
    x: Any,
    y: Any,
    preprocess: Any,
    model: Any,
    budgets: Sequence[Budget],
    plan_budgets: Sequence[Budget],
    options: dict[str, Any],
    *,
    confirm: bool,
    cache: bool,
    cache_dir: str | os.PathLike[str] | None,
    in_process: bool,
    probe_options: Mapping[str, Any],
) -> Plan:
    """Probe, then plan (and confirm) against ``plan_budgets`` in this process; ``budgets`` key the cache."""
    with Prober(x, y, preprocess=preprocess, model=model, **probe_options) as prober:
        probe_key = prober.cache_key()
        settings = repr((_budget_bucket(budgets), sorted(options.items()))).encode()
        plan_key = f"{probe_key}-plan-{hashlib.sha256(settings).hexdigest()[:12]}"
        result: ProbeResult | None = None
        if cache:
            for key in (plan_key, probe_key):
                result = ProbeResult.load_cached(key, cache_dir)
                if result is not None:
                    break
        if result is None:
            result = prober.measure()
            if cache:
                _cache.store(probe_key, result.to_dict(), cache_dir)
        if in_process:
            # Training runs here: what this process holds now is the fixed part, measured where it is paid,
            # and what a PadColumns feed's tf.data export builds comes on top of it.
            options["process_rss_bytes"] = rss_bytes()
            options["export_bytes"] = _export_bytes(prober, result)
        if confirm and result.has_model:
            chosen, result = confirm_plan(prober, result, plan_budgets, **options)
            if cache:
                _cache.store(plan_key, result.to_dict(), cache_dir)
        else:
            chosen = make_plan(result, plan_budgets, **options)
        return chosen


def _export_bytes(prober: Prober, result: ProbeResult) -> dict[str, int]:
    """Per strategy, what a feed's tf.data export of the prober's data holds besides the data, with a
    :class:`PadColumns` ``preprocess`` (``feeds.native``): in memory, the padded columns' values; streaming, one
    shard's values put in the epoch's order as it is read (the trials read shards as the Python path does).

    For shards the raw bytes stand for the values (an upper bound: the cells' objects, or text, take more)."""
    from autobatch._data import InMemoryData
    from autobatch.padding import PadColumns

    pad, data = prober.preprocess, prober.data
    if not isinstance(pad, PadColumns) or not pad.pads_in_tensorflow:
        return {}
    if isinstance(data, InMemoryData):
        return {"in_memory": pad.export_bytes(data.x, data.y)}
    return {"in_memory": int(result.raw_bytes), "stream": int(result.largest_shard_raw_bytes)}


def _optimizer_with_accumulation(model: Any, steps: int) -> None:
    """Make the model's optimizer accumulate gradients over ``steps`` (Keras 3 ``gradient_accumulation_steps``)."""
    optimizer = model.optimizer
    current = getattr(optimizer, "gradient_accumulation_steps", None) or 1
    if current == steps:
        return
    if getattr(optimizer, "built", False):
        raise ConfigError(
            f"the plan keeps the target batch by accumulating gradients over {steps} steps, but model "
            f"{model.name!r}'s optimizer is already built with gradient_accumulation_steps={current}. "
            f"Compile the model with an optimizer created with gradient_accumulation_steps={steps}, or train first "
            "with autobatch.fit on a freshly compiled model."
        )
    # Not yet built: the accumulators are created when it builds, on the first step.
    optimizer.gradient_accumulation_steps = steps


def _keep_effective_batch(model: Any, feed: Any, base_steps: int) -> Any:
    """A callback that scales gradient accumulation with the pieces an adaptive feed cuts its batches into.

    When the feed serves each batch in ``k`` pieces, each optimizer update must
    accumulate ``base_steps × k`` steps to average as many samples as before. The
    step count is part of the traced train function, so it is retraced once per change.
    """
    import keras

    class KeepEffectiveBatch(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.applied = 1

        def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
            # The element of this step is produced (and logged) ahead of the step by the prefetching pipeline. At an
            # epoch's start the log may still be the previous pass's; pieces never decrease, so that is never larger.
            split = feed.step_pieces(batch)
            if split is None or split <= self.applied:
                return
            steps = base_steps * split
            logger.warning(
                "keeping the effective batch: the optimizer now accumulates gradients over %d steps of at most %d samples",
                steps,
                math.ceil(feed.batch_size / split),
            )
            model.optimizer.gradient_accumulation_steps = steps
            model.make_train_function(force=True)
            self.applied = split

    return KeepEffectiveBatch()


def _feed_failure(*feeds: Any) -> AutobatchError | None:
    """The autobatch error a feed raised inside tf.data (TensorFlow re-raises it as its own error type)."""
    for feed in feeds:
        failure = feed._pop_failure() if hasattr(feed, "_pop_failure") else None
        if failure is not None:
            return failure
    return None


_TARGET_WORDS = ("target", "targets", "label", "labels")
"""What users (and the CLI, ``--target``) call ``y``."""

_FIT_KEYWORD_HINTS: dict[str, str] = {
    "batch": "autobatch.fit chooses the batch size itself; did you mean max_batch_size= (never train on larger "
    "batches) or target_batch_size= (the batch the optimizer sees, kept by gradient accumulation)?",
    **dict.fromkeys(
        ("memory_limit", "max_memory", "ram", "memory"), "did you mean ram_limit= (e.g. ram_limit='8GiB')?"
    ),
    **dict.fromkeys(("gpu_memory", "vram"), "did you mean gpu_limit= (e.g. gpu_limit='16GiB', per replica)?"),
}
"""Other keywords users reach for that autobatch.fit spells otherwise, and what to say instead."""


def _model_fit_parameters(model: Any) -> set[str]:
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


def _check_fit_kwargs(model: Any, fit_kwargs: Mapping[str, Any]) -> None:
    """A :class:`ConfigError` naming every keyword that neither ``autobatch.fit`` nor ``model.fit`` takes.

    ``autobatch.fit`` passes what it does not take itself on to ``model.fit``, so a misspelt or foreign option
    (``target=``, the CLI's ``--target``) would otherwise fail only after probing, inside the first batch.
    """
    import difflib
    import inspect
    import reprlib

    accepted = _model_fit_parameters(model)
    unknown = [key for key in fit_kwargs if key not in accepted]
    if not unknown:
        return
    own = set(inspect.signature(fit).parameters) - {"model", "fit_kwargs"}
    # Not what autobatch.fit decides itself (it warns and ignores those), nor the data it passes.
    candidates = sorted((own | accepted) - {"x", "batch_size", "steps_per_epoch"})
    hints = []
    for key in unknown:
        hint = _FIT_KEYWORD_HINTS.get(key.lower())
        value = fit_kwargs[key]
        if key.lower() in _TARGET_WORDS:
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


def _check_targets(model: Any, x: Any, y: Any, preprocess: Any) -> None:
    """A :class:`ConfigError` when ``model.fit`` would get no targets although the model's loss needs them.

    That is: ``y`` is None, no ``preprocess`` may build targets from the batch (with the default one every
    column is an input), and the model is compiled with a loss. Data from ``"module:function"`` brings its own
    ``y``, and a :class:`~autobatch._data.ShardSource` may name its target.
    """
    import reprlib

    import numpy as np
    import pandas as pd

    from autobatch._data import ShardSource, shard_info
    from autobatch._loading import is_callable_spec

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


def _epochs_to_train(epochs: int, fit_kwargs: Mapping[str, Any]) -> int:
    """The epochs ``model.fit`` trains: from ``initial_epoch`` up to ``epochs`` (at least one, for the export)."""
    return max(int(epochs) - int(fit_kwargs.get("initial_epoch") or 0), 1)


def fit(
    model: Any,
    x: Any,
    y: Any = None,
    *,
    preprocess: Preprocess | str | None = None,
    epochs: int = 1,
    validation_data: Any = None,
    validation_split: float | None = None,
    ram_limit: int | str | None = None,
    gpu_limit: int | str | None = None,
    safety: float | None = None,
    max_batch_size: int | None = None,
    target_batch_size: int | None = None,
    callbacks: Sequence[Any] | None = None,
    shuffle: bool = True,
    seed: int = 0,
    nan_policy: Literal["warn", "error", "ignore"] = "warn",
    adaptive: bool = False,
    monitor: bool = True,
    monitor_options: Mapping[str, Any] | None = None,
    log_path: str | os.PathLike[str] | None = None,
    console: Console | None = None,
    cache: bool = True,
    verbose: int | str = 0,
    strategy: Any = None,
    batching: Literal["fixed", "size-aware"] = "fixed",
    size_aware_options: Mapping[str, Any] | None = None,
    model_builder: Callable[[], Any] | str | None = None,
    probe: Literal["child", "in_process"] = "child",
    **fit_kwargs: Any,
) -> Any:
    """Probe, plan, feed and train in one call: ``model.fit`` at the largest batch that fits.

    Prints the plan first, trains with a :class:`MemoryMonitor` attached, and
    returns Keras's ``History`` with the plan as ``history.autobatch_plan`` and
    the monitor's summary as ``history.autobatch_summary``.

    Args:
        model: a compiled ``keras.Model`` (it is trained in place, as ``model.fit`` would).
        x: in-memory data (DataFrame, arrays, dict of arrays) or shard files (a directory or glob).
        y: targets, or the target column name(s). ``None`` only when ``preprocess`` builds
            the targets itself (it gets ``batch_y=None``) or the model is compiled without a
            loss; with the default ``preprocess`` every column is an input, so a model with a
            loss gets a ``ConfigError`` listing the columns to name, before any probing.
        preprocess: ``preprocess(batch_x, batch_y) -> (inputs, targets)`` applied to every batch,
            once per sample per epoch (and once per validation pass on validation data).
        epochs: passed to ``model.fit``. Exactly the epochs that train are prepared: from
            ``initial_epoch`` (a ``model.fit`` argument) to ``epochs``, no batch past the last.
        validation_data: ``(x_val, y_val)`` raw data (fed through ``preprocess`` at the planned batch),
            or anything ``model.fit`` accepts as validation data (a feed, a ``tf.data.Dataset``).
        validation_split: hold out this fraction (rows in memory, whole shards when streaming).
        ram_limit: peak host RAM the training process may use; default free RAM, cgroup-capped.
        gpu_limit: device memory one replica may use; default free GPU memory.
        safety: margin kept free on top of the predicted growth: ``safety`` × what grows with
            the batch and what is estimated rather than measured (see :func:`make_plan`);
            default 0.1.
        max_batch_size: never train on larger batches.
        target_batch_size: the batch size the optimisation should see; kept by gradient
            accumulation when it does not fit (never silently smaller).
        callbacks: more Keras callbacks.
        shuffle: reshuffle every epoch (the feed does it; Keras's own shuffle is off).
            Also accepted inside ``fit_kwargs`` as ``model.fit`` spells it.
        seed: for shuffling and the validation split.
        nan_policy: what a batch holding NaN or inf after ``preprocess`` does:
            ``"warn"`` (once per array, then counted), ``"error"`` (a ``DataError``
            naming the array and the row) or ``"ignore"``.
        adaptive: when the monitor sees the memory headroom fall below the safety
            margin (another process took memory), cut the following batches into
            smaller pieces instead of risking the OS killing training. With gradient
            accumulation in the plan (``target_batch_size``), the accumulation steps
            grow with it so each update still averages the same number of samples.
            Every sample is still seen exactly once per epoch.
        monitor: attach the live :class:`MemoryMonitor`.
        monitor_options: more keyword arguments for the :class:`MemoryMonitor`
            (``warn_at``, ``min_headroom_bytes``, ``interval_s``, ``reader``, ...).
        log_path: the monitor's JSON-lines log, for ``autobatch report``.
        console: where the plan, the monitor and the summary are drawn.
        cache: reuse an identical earlier probe.
        verbose: Keras's progress bar; 0 by default so it does not fight the monitor.
        strategy: a ``tf.distribute`` strategy; default: the one whose ``scope()`` is active
            (build and compile the model inside it). The plan is per replica and agreed by
            all workers; each worker trains on its own share of the data (every sample once
            per epoch across workers) and monitors its own memory; the chief prints every
            worker's summary, also returned as ``history.autobatch_workers``. Every worker
            runs the same ``autobatch.fit`` call.
        batching: ``"fixed"`` (one batch size) or ``"size-aware"``: samples grouped in length
            buckets, each with its own batch size under the same budget and padded to its
            bucket's boundary (see :func:`plan_size_aware`); needs sequence columns in the data.
        size_aware_options: more keyword arguments for :func:`plan_size_aware` (``buckets``,
            ``sequence_columns``, ``length_fn``, ``grid_batch_sizes`` ...); the feed gets
            ``sequence_columns``/``length_fn`` too.
        model_builder: what the probe's child builds its copy of the model with, instead of receiving
            ``model`` (``"module:function"`` or a zero-argument function that builds and compiles the same
            model). Only needed for a model that cannot travel to the child as it is (the error says so).
        probe: ``"child"`` (default) measures in a child process, so an out-of-memory trial cannot kill this
            one. ``"in_process"`` measures on ``model`` itself in this process (its weights and optimizer
            state are put back): for a model nothing else can probe, and **unsafe**: a trial that runs out
            of memory kills this process.
        **fit_kwargs: passed to ``model.fit`` (``class_weight``, ``initial_epoch``,
            ``validation_freq`` ...). Each is checked against what ``model.fit`` takes
            before any probing: a keyword neither takes is a ``ConfigError`` naming the
            closest valid one (``target=``/``label=`` → ``y=``, ``batch=`` →
            ``max_batch_size=``/``target_batch_size=``).

    Returns:
        The Keras ``History``, with ``autobatch_plan`` and ``autobatch_summary``.

    Raises:
        ConfigError: before any probing, a keyword neither ``autobatch.fit`` nor
            ``model.fit`` takes, or no targets for a model compiled with a loss.
        AutobatchError: a subclass saying what is wrong with the data, the
            preprocessing, the model or the budget, also when a batch fails
            inside ``model.fit`` (TensorFlow's wrapping error is its context).

    Example:
        >>> history = autobatch.fit(model, df, "label", preprocess=pad, epochs=3, ram_limit="8GiB")
        >>> history.autobatch_plan.batch_size
    """
    from rich.console import Console as RichConsole

    from autobatch.feeds import BaseFeed
    from autobatch.monitor import MemoryMonitor

    for ignored in ("batch_size", "steps_per_epoch"):
        if ignored in fit_kwargs:
            warnings.warn(
                f"autobatch.fit chooses `{ignored}` from the plan; ignoring {ignored}={fit_kwargs.pop(ignored)!r}. "
                "Use max_batch_size= or target_batch_size= to steer it.",
                stacklevel=2,
            )
    if "shuffle" in fit_kwargs:
        shuffle = bool(fit_kwargs.pop("shuffle"))
    # Before any probing: a misspelt keyword or missing targets would otherwise fail minutes later, in a batch.
    _check_fit_kwargs(model, fit_kwargs)
    _check_targets(model, x, y, preprocess)
    if validation_data is not None and validation_split is not None:
        raise ConfigError("pass either `validation_data` or `validation_split`, not both.")
    if adaptive and not monitor:
        raise ConfigError("adaptive=True needs the monitor (monitor=True): it is what watches the memory headroom.")
    active = _distribute.current_strategy(strategy, model=model)
    if active is not None:
        _check_distributed(model, active, adaptive=adaptive)
    console = console or RichConsole()
    feed_options: dict[str, Any] = {}
    if batching == "size-aware":
        if active is not None:
            raise ConfigError(
                "batching='size-aware' is not supported under tf.distribute yet: replicas would step through "
                "buckets of different batch sizes out of step. Use batching='fixed' with a strategy."
            )
        sized_options = dict(size_aware_options or {})
        if target_batch_size is not None:
            raise ConfigError("target_batch_size keeps one batch size by gradient accumulation; use batching='fixed'.")
        feed_options = {k: sized_options[k] for k in ("sequence_columns", "length_fn") if k in sized_options}
        chosen = plan_size_aware(
            x, y, preprocess=preprocess, model=model, ram_limit=ram_limit, gpu_limit=gpu_limit, safety=safety,
            max_batch_size=max_batch_size, model_builder=model_builder, probe=probe, **sized_options,
        )
    elif batching == "fixed":
        if size_aware_options:
            warnings.warn("size_aware_options only apply with batching='size-aware'; ignoring them.", stacklevel=2)
        chosen = plan(
            x,
            y,
            preprocess=preprocess,
            model=model,
            ram_limit=ram_limit,
            gpu_limit=gpu_limit,
            safety=safety,
            max_batch_size=max_batch_size,
            target_batch_size=target_batch_size,
            cache=cache,
            strategy=active,
            model_builder=model_builder,
            probe=probe,
        )
    else:
        raise ConfigError(f'`batching` must be "fixed" or "size-aware". Received: batching={batching!r}')
    console.print(chosen)
    feeds = chosen.feed(
        x, y, preprocess=preprocess, shuffle=shuffle, seed=seed, validation_split=validation_split, nan_policy=nan_policy,
        **feed_options,
    )
    train, validation = feeds if isinstance(feeds, tuple) else (feeds, None)
    if fit_kwargs.get("initial_epoch"):
        train.set_epoch(int(fit_kwargs["initial_epoch"]))  # a resumed run sees the orders the whole run would have
    if isinstance(validation_data, tuple) and len(validation_data) == 2:
        validation = chosen.feed(
            *validation_data, preprocess=preprocess, shuffle=False, nan_policy=nan_policy, **feed_options
        )
    elif validation_data is not None:
        validation = validation_data
    if chosen.gradient_accumulation_steps > 1:
        _optimizer_with_accumulation(model, chosen.gradient_accumulation_steps)
    all_callbacks = list(callbacks or [])
    shares: list[Any] = []
    if chosen.distribution is not None:
        from autobatch.feeds.distributed import distribute_feed

        # This worker's share: its files or its cells of the shared order, the same number of steps on every worker.
        shares.append(distribute_feed(train, chosen, active, prefetch=max(chosen.queue_batches, 1)))
        all_callbacks.append(shares[0].callback)
        if isinstance(validation, BaseFeed):
            shares.append(distribute_feed(validation, chosen, active, prefetch=1))
            all_callbacks.append(shares[1].callback)  # its epochs end too, releasing the shards it read
    watcher = None
    if monitor:
        watched = shares[0].feed if shares else train
        options = {"console": console, "log_path": log_path, "feed": watched, "adaptive": adaptive}
        options.update(monitor_options or {})
        watcher = MemoryMonitor(chosen, **options)
        all_callbacks.insert(0, watcher)
    if adaptive and chosen.gradient_accumulation_steps > 1:
        all_callbacks.insert(0, _keep_effective_batch(model, train, chosen.gradient_accumulation_steps))
    # Keras infers a PyDataset's signature from its first two batches and would fix a padded axis that
    # happened to match; the probe's signature marks the axes that vary. Prefetch what the plan budgets.
    signature = chosen.probe.output_signature
    if shares:
        train_data = shares[0].dataset
        validation = shares[1].dataset if len(shares) > 1 else validation
        fed = [share.feed for share in shares]
    else:
        repeat = _repeats(train, validation, chosen, adaptive=adaptive)
        # A repeating pass ends with the last epoch that trains: no batch is prepared (or shard read) past it.
        train_data = train.to_tf_dataset(
            signature,
            prefetch=max(chosen.queue_batches, 1),
            adaptive=adaptive,
            repeat=repeat,
            epochs=_epochs_to_train(epochs, fit_kwargs) if repeat else None,
        )
        if repeat:
            fit_kwargs["steps_per_epoch"] = len(train)
        if isinstance(validation, BaseFeed):
            validation = validation.to_tf_dataset(signature, prefetch=1)
        fed = [feed for feed in (train, validation) if isinstance(feed, BaseFeed)]
    _feed_failure(*fed)  # forget failures of earlier passes
    try:
        with warnings.catch_warnings(), (shares[0].keras_workarounds(model) if shares else contextlib.nullcontext()):
            if adaptive:
                # An adaptive epoch ends when its rows are served, before the upper-bound count Keras was told.
                warnings.filterwarnings("ignore", message="Your input ran out of data", category=UserWarning)
            history = model.fit(
                train_data,
                epochs=epochs,
                validation_data=validation,
                callbacks=all_callbacks,
                verbose=verbose,
                shuffle=False,  # the feed reshuffles every epoch itself
                **fit_kwargs,
            )
    except Exception:
        failure = _feed_failure(*fed)
        if failure is not None:
            raise failure  # the DataError/PreprocessError naming the batch, not TensorFlow's wrapper
        raise
    finally:
        train.close()  # a fit stopped early (a callback, an error) may leave read-ahead shards: release them
    history.autobatch_plan = chosen
    history.autobatch_summary = watcher.summary if watcher is not None else None
    history.autobatch_workers = None
    if chosen.distribution is not None and watcher is not None and watcher.summary is not None:
        layout = _distribute.strategy_layout(active)
        history.autobatch_workers = _distribute.gather_summaries(active, layout, watcher.summary)
        if layout.is_chief:
            console.print(history.autobatch_workers)
    return history


def _repeats(train: Any, validation: Any, chosen: Plan, *, adaptive: bool) -> bool:
    """Whether ``fit`` trains one repeating pass of ``train`` (``to_tf_dataset(repeat=True)``, one iterator).

    Not with ``adaptive`` or a size-aware feed (their batches per epoch vary), nor beside validation while
    streaming: the training feed would then hold its next epoch's first shards while the validation feed reads
    its own, more files than the plan budgets.
    """
    return not adaptive and train._steps_fixed and (validation is None or chosen.strategy == "in_memory")


def _check_distributed(model: Any, strategy: Any, *, adaptive: bool) -> None:
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


MAX_BUCKET_CONFIRMATIONS = 3


def plan_size_aware(
    x: Any,
    y: Any = None,
    *,
    preprocess: Preprocess | str | None = None,
    model: Any = None,
    ram_limit: int | str | None = None,
    gpu_limit: int | str | None = None,
    safety: float | None = None,
    max_batch_size: int | None = None,
    buckets: int | Sequence[int] = 8,
    sequence_columns: Sequence[str] | None = None,
    length_fn: Any = None,
    grid_batch_sizes: Sequence[int] | None = None,
    grid_lengths: Sequence[int] | None = None,
    queue_batches: int = 2,
    confirm: bool = True,
    in_process: bool = True,
    **probe_options: Any,
) -> Any:
    """Plan size-aware batching: one batch size per length bucket, each bucket's predicted peak within the budget.

    Probes as :func:`plan` does, then runs a grid of real training trials over batch
    sizes × padded lengths in the child process, fits memory as
    ``a + p·batch·length (+ c·batch·length²)``, picks length buckets from the
    data's length distribution (or ``buckets=[...]`` boundaries) and the largest
    safe batch per bucket, and confirms the most demanding bucket with one more
    real trial (stepping down when it does not fit). Not cached: the grid runs each time.

    Args:
        x, y, preprocess, model, ram_limit, gpu_limit, safety, max_batch_size, queue_batches,
            in_process: as for :func:`plan`.
        buckets: how many length buckets to choose, or their boundaries (inclusive upper lengths).
        sequence_columns: the columns whose longest sequence is a sample's length; default: the
            columns holding sequences (lists, arrays, or strings of numbers).
        length_fn: ``length_fn(batch_x) -> lengths`` instead of ``sequence_columns``.
        grid_batch_sizes: batch sizes of the grid's trials (default 16 and 64).
        grid_lengths: padded lengths of the grid's trials (default ¼, ½ and all of the longest).
        confirm: run the confirming trial at the most demanding bucket.
        **probe_options: passed to :class:`autobatch.probe.Prober` (``steps``, ``seed``, ``timeout_s`` ...).

    Returns:
        The :class:`~autobatch.plan.BucketPlan`; ``plan.sized`` is the grid and its fitted model.

    Raises:
        AutobatchError: a subclass saying what is wrong with the data, the preprocessing,
            the model or the budget (``ConfigError`` without a model or without a padded axis).

    Example:
        >>> p = autobatch.plan_size_aware(df, "label", preprocess=pad, model=model, ram_limit="4GiB")
        >>> print(p)   # bucket range → padded length → batch size → predicted peak
    """
    from autobatch.plan import make_bucket_plan
    from autobatch.size_probe import SizeAwareProber

    if model is None:
        raise ConfigError("size-aware planning fits memory against real training steps: pass `model=`.")
    budgets = [host_budget(ram_limit)]
    gpu = gpu_budget(gpu_limit)
    if gpu is not None:
        budgets.append(gpu)
    options: dict[str, Any] = dict(
        buckets=buckets, safety=safety, max_batch_size=max_batch_size, queue_batches=queue_batches
    )
    # The grid replaces the fixed-batch trials: one small trial gives the runtime's baseline and the signature.
    probe_options.setdefault("trial_batch_sizes", (4,))
    with Prober(x, y, preprocess=preprocess, model=model, **probe_options) as prober:
        grid = SizeAwareProber(
            prober,
            sequence_columns=sequence_columns,
            length_fn=length_fn,
            grid_batch_sizes=grid_batch_sizes,
            grid_lengths=grid_lengths,
        )
        result = prober.measure()
        if in_process:
            options["process_rss_bytes"] = rss_bytes()
        # A grid trial may not take more than the whole budget: past it, it counts as "does not fit".
        sized = grid.measure(result, rss_limit_bytes=budgets[0].limit_bytes)
        chosen = make_bucket_plan(sized, budgets, **options)
        for _ in range(MAX_BUCKET_CONFIRMATIONS if confirm else 0):
            bucket = _bucket_to_confirm(chosen)
            host = chosen.budget("host")
            if bucket is None or host is None:
                break
            extras = sum(v for name, v in host.components if name != "train step")
            logger.info("confirming bucket %d-%d at batch %d by a real trial", bucket.lo, bucket.hi, bucket.batch_size)
            # The child's RSS holds its own baseline; the plan's extras hold this process's: compare growth to growth.
            limit = (result.baseline_rss_bytes or 0) + max(host.usable_bytes - extras, 1)
            sized = grid.confirm(sized, bucket.batch_size, bucket.hi, rss_limit_bytes=limit)
            chosen = make_bucket_plan(sized, budgets, **options)
        return chosen


def _bucket_to_confirm(chosen: Any) -> Any:
    """The bucket a real trial should check next: the most demanding one, then one extrapolated far in tokens."""
    measured = {(t.batch_size, t.length) for t in chosen.sized.grid if t.peak_rss_bytes is not None}
    if not chosen.confirmed:
        demanding = max(chosen.buckets, key=lambda b: (b.predicted_peak_bytes, b.batch_size * b.hi))
        if (demanding.batch_size, demanding.hi) not in measured:
            return demanding
    fitted = max((t.tokens for t in chosen.sized.grid if t.fits and t.peak_rss_bytes), default=0)
    widest = max(chosen.buckets, key=lambda b: b.batch_size * b.hi)
    if widest.batch_size * widest.hi > 1.5 * fitted and (widest.batch_size, widest.hi) not in measured:
        return widest
    return None
