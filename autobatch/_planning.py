"""The planning entry points: probe, read the budgets, plan, and confirm the plan with real trials.

:func:`plan` (one batch size, also under ``tf.distribute``) and
:func:`plan_size_aware` (one batch size per length bucket) are what
:func:`autobatch.fit` calls before it builds the feed; both are re-exported by
:mod:`autobatch.api` and the package root.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from autobatch import _cache, _distribute
from autobatch._memory import Budget, gpu_budget, host_budget, rss_bytes
from autobatch._preprocess import Preprocess
from autobatch._result import ProbeResult, StepTrial
from autobatch.bucket_plan import Bucket, BucketPlan, make_bucket_plan
from autobatch.errors import ConfigError, ProbeError
from autobatch.plan import Plan, make_plan
from autobatch.probe import Prober

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
) -> BucketPlan:
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
        The :class:`~autobatch.bucket_plan.BucketPlan`; ``plan.sized`` is the grid and its fitted model.

    Raises:
        AutobatchError: a subclass saying what is wrong with the data, the preprocessing,
            the model or the budget (``ConfigError`` without a model or without a padded axis).

    Example:
        >>> p = autobatch.plan_size_aware(df, "label", preprocess=pad, model=model, ram_limit="4GiB")
        >>> print(p)   # bucket range → padded length → batch size → predicted peak
    """
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


def _bucket_to_confirm(chosen: BucketPlan) -> Bucket | None:
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
