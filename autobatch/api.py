"""The public entry points that wire probe → plan (→ feed → fit, in later stages)."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
from collections.abc import Sequence
from typing import Any, Protocol

from autobatch import _cache
from autobatch._memory import Budget, gpu_budget, host_budget
from autobatch.plan import Plan, make_plan
from autobatch.probe import Preprocess, Prober, ProbeResult

logger = logging.getLogger(__name__)

MAX_CONFIRMATIONS = 6


def _budget_bucket(budgets: Sequence[Budget]) -> str:
    # Quarter-octave buckets: free memory drifts a little between runs without invalidating the cache.
    return ",".join(f"{b.kind}:{round(math.log2(max(b.limit_bytes, 1)) * 4)}" for b in budgets)


class _Confirmer(Protocol):
    def confirm(self, result: ProbeResult, batch_size: int, *, rss_limit_bytes: int | None) -> ProbeResult: ...


def confirm_plan(
    prober: _Confirmer, result: ProbeResult, budgets: Sequence[Budget], **options: Any
) -> tuple[Plan, ProbeResult]:
    """Plan, then confirm the batch size with real trials, stepping down until one fits.

    Each trial's measurement joins the fit (whose line lies above every measured
    point), so a trial that measures more than predicted pulls the next plan
    down; a trial that runs out of memory caps the batch below it. If no plan is
    confirmed within ``MAX_CONFIRMATIONS`` trials, the largest trial that fitted wins.

    Returns:
        The confirmed plan and the probe result including the new trials.
    """
    user_cap = options.pop("max_batch_size", None)

    def cap_for(result: ProbeResult) -> int | None:
        # Bisect between the largest fitting trial and the smallest failed one.
        failed = result.failed_batch_size()
        if failed is None:
            return user_cap
        fitting = [t.batch_size for t in result.trials if t.fits and t.batch_size < failed]
        bisect = max((max(fitting, default=0) + failed) // 2, 1)
        return bisect if user_cap is None else min(bisect, user_cap)

    chosen = make_plan(result, budgets, max_batch_size=cap_for(result), **options)
    for _ in range(MAX_CONFIRMATIONS):
        if chosen.confirmed:
            return chosen, result
        host = chosen.budget("host")
        if host is None:
            break
        extras = sum(v for name, v in host.components if name != "train step")
        logger.info("confirming batch %d with a real trial", chosen.batch_size)
        result = prober.confirm(result, chosen.batch_size, rss_limit_bytes=max(host.usable_bytes - extras, 1))
        chosen = make_plan(result, budgets, max_batch_size=cap_for(result), **options)
    if not chosen.confirmed:
        fitting = [t.batch_size for t in result.trials if t.fits and t.batch_size <= chosen.batch_size]
        if fitting:
            cap = max(fitting) if user_cap is None else min(max(fitting), user_cap)
            chosen = make_plan(result, budgets, max_batch_size=cap, **options)
    return chosen, result


def plan(
    x: Any,
    y: Any = None,
    *,
    preprocess: Preprocess | str | None = None,
    model: Any = None,
    ram_limit: int | str | None = None,
    gpu_limit: int | str | None = None,
    safety: float = 0.1,
    max_batch_size: int | None = None,
    multiple_of: int | None = None,
    queue_batches: int = 2,
    confirm: bool = True,
    cache: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
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
        safety: fraction of each budget kept free.
        max_batch_size: never plan a larger batch.
        multiple_of: round the batch size down to a multiple of this.
        queue_batches: batches the feed may hold waiting.
        confirm: run the confirming trial at the chosen size.
        cache: reuse an identical earlier probe (same data, preprocess, model, device, budget).
        cache_dir: where the cache lives.
        **probe_options: passed to :class:`autobatch.probe.Prober`
            (``sample_batch_size``, ``trial_batch_sizes``, ``steps``, ``seed``, ``timeout_s``).

    Returns:
        The :class:`Plan`, with the :class:`ProbeResult` it rests on as ``plan.probe``.

    Raises:
        AutobatchError: a subclass saying what is wrong with the data, the
            preprocessing, the model or the budget.

    Example:
        >>> p = autobatch.plan(df, "label", preprocess=pad, model=model, ram_limit="4GiB")
        >>> print(p)
    """
    budgets = [host_budget(ram_limit)]
    gpu = gpu_budget(gpu_limit)
    if gpu is not None:
        budgets.append(gpu)
    options = dict(safety=safety, max_batch_size=max_batch_size, multiple_of=multiple_of, queue_batches=queue_batches)
    with Prober(x, y, preprocess=preprocess, model=model, **probe_options) as prober:
        probe_key = prober.cache_key()
        settings = repr((_budget_bucket(budgets), sorted(options.items()))).encode()
        plan_key = f"{probe_key}-plan-{hashlib.sha256(settings).hexdigest()[:12]}"
        result: ProbeResult | None = None
        if cache:
            for key in (plan_key, probe_key):
                cached = _cache.load(key, cache_dir)
                if cached is not None:
                    result = dataclasses.replace(ProbeResult.from_dict(cached), from_cache=True)
                    break
        if result is None:
            result = prober.measure()
            if cache:
                _cache.store(probe_key, result.to_dict(), cache_dir)
        if confirm and result.has_model:
            chosen, result = confirm_plan(prober, result, budgets, **options)
            if cache:
                _cache.store(plan_key, result.to_dict(), cache_dir)
        else:
            chosen = make_plan(result, budgets, **options)
        return chosen
