"""The public entry points that wire probe → plan → feed → fit.

:func:`fit` trains at the largest batch that fits; the planning entry points it
calls, :func:`plan` and :func:`plan_size_aware`, live in :mod:`autobatch._planning`
and are re-exported here.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from autobatch import _distribute
from autobatch._fit_checks import check_distributed, check_fit_kwargs, check_targets
from autobatch._planning import plan, plan_size_aware
from autobatch._preprocess import Preprocess
from autobatch.errors import AutobatchError, ConfigError
from autobatch.plan import Plan

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["fit", "plan", "plan_size_aware"]

logger = logging.getLogger(__name__)


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

    from autobatch.feeds import BaseFeed, make_feed
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
    check_fit_kwargs(model, fit_kwargs, own=set(inspect.signature(fit).parameters) - {"model", "fit_kwargs"})
    check_targets(model, x, y, preprocess)
    if validation_data is not None and validation_split is not None:
        raise ConfigError("pass either `validation_data` or `validation_split`, not both.")
    if adaptive and not monitor:
        raise ConfigError("adaptive=True needs the monitor (monitor=True): it is what watches the memory headroom.")
    active = _distribute.current_strategy(strategy, model=model)
    if active is not None:
        check_distributed(model, active, adaptive=adaptive)
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
    feeds = make_feed(
        x, y, plan=chosen, preprocess=preprocess, shuffle=shuffle, seed=seed, validation_split=validation_split,
        nan_policy=nan_policy, **feed_options,
    )
    train, validation = feeds if isinstance(feeds, tuple) else (feeds, None)
    if fit_kwargs.get("initial_epoch"):
        train.set_epoch(int(fit_kwargs["initial_epoch"]))  # a resumed run sees the orders the whole run would have
    if isinstance(validation_data, tuple) and len(validation_data) == 2:
        validation = make_feed(
            *validation_data, plan=chosen, preprocess=preprocess, shuffle=False, nan_policy=nan_policy, **feed_options
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
