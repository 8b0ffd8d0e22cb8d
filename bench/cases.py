"""The seven benchmarks of issue 6 and size-aware batching (issue 9), each a function ``(Context) -> list[Row]``.

Timed comparisons train the same warmed model on the same samples, side by side
(``measure.interleave``); memory comparisons run each configuration in a fresh
child process (``bench/child.py``) and compare peak RSS (``VmHWM``).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import workload
from measure import Ratio, Run, interleave, ratio, run_child, timed

from autobatch._peak_lines import DEFAULT_SAFETY
from autobatch._units import format_bytes

ROOT = Path(__file__).resolve().parents[1]

MiB = 1024**2


@dataclasses.dataclass(frozen=True)
class Target:
    """What a ratio should be: at least ``low`` and/or at most ``high``."""

    low: float | None = None
    high: float | None = None

    def met(self, value: float) -> bool:
        return (self.low is None or value >= self.low) and (self.high is None or value <= self.high)

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            return f"{self.low:g}–{self.high:g}"
        return f"≥ {self.low:g}" if self.low is not None else f"≤ {self.high:g}"


@dataclasses.dataclass(frozen=True)
class Row:
    """One reported number."""

    benchmark: str
    measurement: str
    value: float
    unit: str = "×"
    """``"×"`` for a ratio; otherwise the unit of an absolute number (``"s"``, ``"traces"``)."""
    target: Target | None = None
    detail: str = ""

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.target.met(self.value)

    def formatted_value(self) -> str:
        if self.unit == "×":
            return f"{self.value:.2f}"
        if self.unit == "s":
            return f"{self.value:.1f} s"
        return f"{self.value:g} {self.unit}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "benchmark": self.benchmark,
            "measurement": self.measurement,
            "value": self.value,
            "unit": self.unit,
            "target": str(self.target) if self.target else None,
            "met": self.met,
            "detail": self.detail,
        }


class Context:
    """Sizes, a fresh probe cache, and the child runs that several benchmarks share.

    Child runs are futures: ``prefetch`` starts them early (the quick smoke run
    overlaps them with everything else, as its timings mean nothing anyway);
    otherwise each starts when first needed and runs alone, so it does not
    disturb the timed comparisons.
    """

    def __init__(self, sizes: workload.Sizes, *, log: Callable[[str], None]) -> None:
        self.sizes = sizes
        self.log = log
        self._tmp = tempfile.TemporaryDirectory(prefix="autobatch-bench-")
        self.cache_dir = Path(self._tmp.name) / "cache"
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="bench-child")
        self._runs: dict[str, concurrent.futures.Future[dict[str, Any]]] = {}

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._tmp.cleanup()

    def rows(self, size: str) -> int:
        return self.sizes.small_rows if size == "small" else self.sizes.large_rows

    def _start(self, key: str, job: dict[str, Any], what: str) -> concurrent.futures.Future[dict[str, Any]]:
        if key not in self._runs:
            self.log(what)
            self._runs[key] = self._pool.submit(run_child, job, cache_dir=self.cache_dir)
        return self._runs[key]

    def _fit_job(self, size: str, safety: float, force_batch_size: int | None) -> dict[str, Any]:
        return {
            "job": "fit",
            "rows": self.rows(size),
            "epochs": self.sizes.long_epochs if size == "small" else self.sizes.epochs,
            "ram_limit": self.sizes.ram_limit,
            "safety": safety,
            "force_batch_size": force_batch_size,
        }

    def fit_run(
        self, size: str, *, safety: float = DEFAULT_SAFETY, force_batch_size: int | None = None
    ) -> dict[str, Any]:
        """``autobatch.fit`` in a fresh process (see ``child.fit_job``)."""
        job = self._fit_job(size, safety, force_batch_size)
        return self._start(f"fit {job}", job, f"autobatch.fit at batch {force_batch_size} in a child process").result()

    def _planned_future(self, size: str, safety: float) -> concurrent.futures.Future[dict[str, Any]]:
        job = self._fit_job(size, safety, None)
        what = f"autobatch.fit in a child process ({size}, {self.rows(size)} rows, safety {safety:g})"
        return self._start(f"planned {size} {safety}", job, what)

    def planned(self, size: str, *, safety: float = DEFAULT_SAFETY) -> dict[str, Any]:
        """The planned run of ``size``: the first one probes with an empty cache (what the probe costs)."""
        return self._planned_future(size, safety).result()

    def _stream_future(self, count: int) -> concurrent.futures.Future[dict[str, Any]]:
        s = self.sizes
        files = workload.stream_shards("parquet", rows_per_shard=s.shard_rows, shards=s.shards_10x)
        job = {
            "job": "stream",
            "files": [str(f) for f in files[:count]],
            "batch_size": s.stream_batch_size,
            "epochs": 1,
        }
        return self._start(f"stream {count}", job, f"streaming {count} Parquet shards in a child process")

    def stream_runs(self, counts: list[int]) -> dict[int, dict[str, Any]]:
        """Streaming runs over the first ``count`` Parquet shards, each in its own process, side by side."""
        futures = {count: self._stream_future(count) for count in counts}
        return {count: future.result() for count, future in futures.items()}

    def _sized_future(self, which: str, batching: str) -> concurrent.futures.Future[dict[str, Any]]:
        s = self.sizes
        job = {
            "job": "sized",
            "workload": which,
            "rows": s.sized_rows if which == "real" else s.small_rows,
            "files": s.sized_files,
            "batching": batching,
            "grid": list(s.sized_grid),
            "epochs": 1,
            "ram_limit": s.ram_limit,
        }
        return self._start(f"sized {which} {batching}", job, f"autobatch.fit(batching={batching!r}) on {which} lengths")

    def sized_runs(self) -> dict[str, dict[str, Any]]:
        """``autobatch.fit`` fixed and size-aware on the real lengths, size-aware on the canonical frame, side by side."""
        if not self.sizes.sized_probed:
            return {f"{w} {b}": _unprobed_plan(w, b, self.sizes) for w, b in keys_of_sized_runs()}
        futures = {f"{w} {b}": self._sized_future(w, b) for w, b in keys_of_sized_runs()}
        return {key: future.result() for key, future in futures.items()}

    def prefetch(self, names: list[str]) -> None:
        """Start the child runs ``names`` will need now, to overlap with the rest (for ``--quick``)."""
        if {"feed", "tutorial", "planning", "probe"} & set(names):
            for size in self.sizes.sizes:
                self._planned_future(size, 0.1)
        if "memory" in names:
            for count in (self.sizes.shards_1x, self.sizes.shards_10x):
                self._stream_future(count)


def keys_of_sized_runs() -> list[tuple[str, str]]:
    return [("real", "fixed"), ("real", "size-aware"), ("canonical", "size-aware")]


def _unprobed_plan(which: str, batching: str, sizes: workload.Sizes) -> dict[str, Any]:
    """``--quick``: buckets from the lengths and 8,192 padded positions per batch, no probe and no memory run."""
    from autobatch.bucket_plan import bucket_boundaries

    x, _ = workload.real_length_frame(sizes.sized_rows, files=sizes.sized_files) if which == "real" else workload.frame(sizes.small_rows)
    lengths = x.apply(lambda row: max(len(v) for v in row), axis=1).to_numpy()
    boundaries = list(bucket_boundaries(lengths, 8))
    batch_sizes = [max(8192 // b, 1) for b in boundaries]
    return {
        "batch_size": max(8192 // int(lengths.max()), 1),
        "boundaries": boundaries,
        "batch_sizes": batch_sizes,
        "fixed_batch_size": max(8192 // int(lengths.max()), 1),
        "expected_speedup": 1.0,
        "steps_per_epoch": sum(math.ceil(int((np.searchsorted(boundaries, lengths) == k).sum()) / b)
                               for k, b in enumerate(batch_sizes)),
    }


# --------------------------------------------------------------------------- helpers


def _fit_epoch(model: Any, dataset: Any) -> Any:
    return model.fit(dataset, epochs=1, verbose=0, shuffle=False)


def _materialize(feed: Any, dataset: Any, epochs: int = 1, *, repeat: bool = False) -> tuple[Any, int]:
    """The feed's batches of ``epochs`` epochs from its current one, as numpy arrays in a ``tf.data`` pipeline like
    the feed's.

    This is the compute limit: the same batches, padded beforehand, so training
    on them costs only the steps. ``repeat``: served without end, epoch after
    epoch, as ``to_tf_dataset(repeat=True)`` serves them (a new iterator starts
    again at the first). Returns the dataset and the epoch it starts at.
    """
    import tensorflow as tf

    from autobatch._tfdata import prefetched

    epoch = feed.epoch
    batches = []
    for e in range(epoch, epoch + epochs):
        feed.set_epoch(e)
        batches += [feed[i] for i in range(len(feed))]
    feed.set_epoch(epoch)

    def serve() -> Any:
        while True:
            yield from batches
            if not repeat:
                return

    padded = tf.data.Dataset.from_generator(serve, output_signature=dataset.element_spec)
    cardinality = tf.data.INFINITE_CARDINALITY if repeat else len(batches)
    padded = padded.apply(tf.data.experimental.assert_cardinality(cardinality))
    return prefetched(padded, 2), epoch  # the pipeline of the feed's own to_tf_dataset(prefetch=2)


def _epochs_per_run(seconds_per_epoch: float, min_run_seconds: float) -> int:
    """Epochs each timed run trains, so that a run lasts at least ``min_run_seconds`` (short runs are mostly noise)."""
    return max(1, math.ceil(min_run_seconds / max(seconds_per_epoch, 1e-3)))


def _feed_vs_padded(
    model: Any, feeds: dict[str, Any], sizes: workload.Sizes, reps: int, *, repeat: bool = True
) -> dict[str, tuple[Ratio, float]]:
    """samples/s of ``model.fit`` on each feed ÷ on the same batches padded beforehand, ``reps`` interleaved
    pairs; and each feed's Python seconds per epoch. The feeds serve the same batches (the same rows, order and
    preprocessing result).

    Each timed run trains ``k`` epochs from the same epoch. ``repeat``: as :func:`autobatch.fit` trains, one
    ``model.fit(epochs=k, steps_per_epoch=len(feed))`` over ``to_tf_dataset(repeat=True)``, so Keras keeps one
    iterator, and the baseline is served the same way; else ``k`` one-epoch fits of ``to_tf_dataset()``, a new
    iterator for each (the baseline too), as ``model.fit(feed.to_tf_dataset(), epochs=k)`` makes one per epoch.
    """
    datasets = {name: feed.to_tf_dataset(workload.SIGNATURE, prefetch=2, repeat=repeat) for name, feed in feeds.items()}
    first = next(iter(feeds.values()))
    steps = len(first)
    epoch = first.epoch

    def fit(dataset: Any, epochs: int) -> None:
        if repeat:
            model.fit(dataset, epochs=epochs, steps_per_epoch=steps, verbose=0, shuffle=False)
        else:
            for _ in range(epochs):
                _fit_epoch(model, dataset)

    for feed, dataset in zip(feeds.values(), datasets.values(), strict=True):
        fit(dataset, 1)  # warm-up: tracing, thread pools
        feed.set_epoch(epoch)
    one, _ = _materialize(first, datasets[next(iter(feeds))])
    k = _epochs_per_run(timed(first.n_samples, lambda: _fit_epoch(model, one)).seconds, sizes.min_run_seconds)
    del one
    padded, _ = _materialize(first, datasets[next(iter(feeds))], k if repeat else 1, repeat=repeat)
    n = first.n_samples * k

    def on(feed: Any, dataset: Any) -> Callable[[], Run]:
        def run() -> None:
            if repeat:
                feed.set_epoch(epoch)  # the same k epochs as the padded copy
                fit(dataset, k)
            else:
                for _ in range(k):
                    feed.set_epoch(epoch)  # the same batches as the padded copy
                    fit(dataset, 1)

        return lambda: timed(n, run)

    before = {name: feed.stats.seconds for name, feed in feeds.items()}
    runs = [(name, on(feed, datasets[name])) for name, feed in feeds.items()]
    # The baseline in the middle: each feed's run is next to a baseline run in every repetition (ABBA).
    middle = len(runs) // 2
    baseline = ("padded", lambda: timed(n, lambda: fit(padded, k)))
    results = interleave(dict([*runs[:middle], baseline, *runs[middle:]]), reps)
    return {
        name: (ratio(results, name, "padded"), (feed.stats.seconds - before[name]) / (reps * k))
        for name, feed in feeds.items()
    }


def _feed(x: Any, y: Any, batch_size: int, preprocess: Any = workload.preprocess, **options: Any) -> Any:
    from autobatch.feeds import make_feed

    return make_feed(
        x,
        y,
        batch_size=batch_size,
        preprocess=preprocess,
        output_signature=workload.SIGNATURE,
        max_queue_size=2,
        **options,
    )


# --------------------------------------------------------------------------- 1. feed overhead


def feed_overhead(ctx: Context) -> list[Row]:
    """InMemoryFeed ÷ the same batches pre-padded into numpy arrays, at the planned batch."""
    rows = []
    for size in ctx.sizes.sizes:
        batch = ctx.planned(size)["batch_size"]
        n = ctx.rows(size)
        ctx.log(f"feed overhead: {size}, {n} rows at the planned batch {batch}, PadColumns and a Python function")
        x, y = workload.frame(n)
        model = workload.build_model("canonical")
        feeds = {"PadColumns": _feed(x, y, batch, workload.PAD), "function": _feed(x, y, batch)}
        results = _feed_vs_padded(model, feeds, ctx.sizes, ctx.sizes.target_reps)
        for name, what, target in (
            ("PadColumns", "preprocess=autobatch.PadColumns(...), padded by TensorFlow", Target(0.97)),
            ("function", "preprocess a Python function calling pad_columns", None),
        ):
            result, feed_seconds = results[name]
            rows.append(
                Row(
                    "feed",
                    f"InMemoryFeed ({what}) ÷ same batches pre-padded (numpy), {size} ({n:,} rows), batch {batch}, "
                    "one iterator per fit (as autobatch.fit trains)",
                    result.value,
                    target=target,
                    detail=result.describe("feed", "pre-padded")
                    + f"; the feed spent {feed_seconds:.2f} s/epoch in Python producing batches",
                )
            )
        if size == ctx.sizes.sizes[0]:
            # model.fit(feed.to_tf_dataset(), epochs=k): Keras makes a new iterator every epoch (the baseline too).
            single = {"PadColumns": feeds["PadColumns"]}
            result, _ = _feed_vs_padded(model, single, ctx.sizes, ctx.sizes.reps, repeat=False)["PadColumns"]
            rows.append(
                Row(
                    "feed",
                    f"InMemoryFeed (PadColumns) ÷ same batches pre-padded, {size}, batch {batch}, a new iterator every "
                    "epoch (model.fit(feed.to_tf_dataset(), epochs=k))",
                    result.value,
                    detail=result.describe("feed", "pre-padded"),
                )
            )
    # The literal reading: the whole dataset padded once to its longest sequence, fed by Keras' own array path.
    batch = ctx.planned("small")["batch_size"]
    n = ctx.rows("small")
    x, y = workload.frame(n)
    maxlen = {name: int(x[name].map(len).max()) for name in workload.COLUMNS}
    ctx.log(f"feed overhead: small, everything padded to {maxlen}, batch {batch}")
    model = workload.build_model("canonical")
    feed = _feed(x, y, batch, preprocess=workload.fixed_length(maxlen))
    dataset = feed.to_tf_dataset(workload.SIGNATURE, prefetch=2)
    inputs, targets = workload.fixed_length(maxlen)(x, y)
    _fit_epoch(model, dataset)
    warm = timed(n, lambda: model.fit(inputs, targets, batch_size=batch, epochs=1, verbose=0))
    k = _epochs_per_run(warm.seconds, ctx.sizes.min_run_seconds)
    results = interleave(
        {
            "feed": lambda: timed(n * k, lambda: model.fit(dataset, epochs=k, verbose=0, shuffle=False)),
            "numpy": lambda: timed(n * k, lambda: model.fit(inputs, targets, batch_size=batch, epochs=k, verbose=0)),
        },
        ctx.sizes.reps,
    )
    result = ratio(results, "feed", "numpy")
    rows.append(
        Row(
            "feed",
            f"InMemoryFeed ÷ model.fit(numpy arrays), all padded to the longest sequence, small, batch {batch}",
            result.value,
            target=Target(0.97),
            detail=result.describe("feed", "model.fit(numpy)"),
        )
    )
    rows.append(_pydataset_vs_export(ctx, ctx.sizes.sizes[-1]))
    return rows


def _pydataset_vs_export(ctx: Context, size: str) -> Row:
    """``model.fit(feed)`` (Keras' ``PyDataset`` pipeline, autotuning on) ÷ ``model.fit(feed.to_tf_dataset())``."""
    batch = ctx.planned(size)["batch_size"]
    n = ctx.rows(size)
    epochs = ctx.sizes.fit_epochs
    ctx.log(f"feed overhead: {size}, model.fit(feed) vs model.fit(feed.to_tf_dataset()), {epochs} epochs a fit")
    x, y = workload.frame(n)
    model = workload.build_model("canonical")
    feed = _feed(x, y, batch)
    dataset = feed.to_tf_dataset(workload.SIGNATURE, prefetch=2)
    for data in (feed, dataset):  # warm-up: each pipeline traces its own step
        model.fit(data, epochs=1, verbose=0)

    def fit(data: Any) -> Callable[[], Run]:
        return lambda: timed(n * epochs, lambda: model.fit(data, epochs=epochs, verbose=0))

    results = interleave({"PyDataset": fit(feed), "to_tf_dataset": fit(dataset)}, ctx.sizes.reps)
    result = ratio(results, "PyDataset", "to_tf_dataset")
    return Row(
        "feed",
        f"model.fit(feed), Keras' PyDataset pipeline ÷ model.fit(feed.to_tf_dataset()), {size}, batch {batch}, "
        f"{epochs} epochs a fit",
        result.value,
        detail=result.describe("model.fit(feed)", "to_tf_dataset"),
    )


# --------------------------------------------------------------------------- 2. shard streaming


def shard_streaming(ctx: Context) -> list[Row]:
    """ShardFeed over Parquet and CSV shards ÷ the same batches pre-padded, at a fixed batch.

    Two workloads: the canonical one (issue 6's: the ``large`` frame cut into shards, the canonical
    model), where the target applies; and the long sequences of ``examples/shards.py`` with its pooled
    model, the cheapest step per byte read, where the feed's own work shows the most.
    """
    from autobatch._data import ShardSource

    s = ctx.sizes
    rows = []
    workloads: list[tuple[str, str, Callable[[str], list[Path]], Target | None]] = [
        ("canonical", "canonical",
         lambda fmt: workload.canonical_shards(fmt, rows=ctx.rows("large"), shards=s.canonical_shards), Target(0.90)),
        ("long sequences", "pooled",
         lambda fmt: workload.stream_shards(fmt, rows_per_shard=s.shard_rows, shards=s.stream_shards), None),
    ]
    for name, model_kind, shards_of, parquet_target in workloads:
        for fmt in ("parquet", "csv"):
            files = shards_of(fmt)
            ctx.log(
                f"shard streaming: {name}, {len(files)} {fmt} shards, {model_kind} model, batch {s.stream_batch_size}, "
                "PadColumns and a Python function"
            )
            model = workload.build_model(model_kind)
            feeds = {
                kind: _feed(ShardSource(tuple(files), "label"), None, s.stream_batch_size, pre, strategy="stream")
                for kind, pre in (("PadColumns", workload.PAD), ("function", workload.preprocess))
            }
            results = _feed_vs_padded(model, feeds, s, s.target_reps if parquet_target is not None else s.reps)
            for kind, what in (("PadColumns", "PadColumns, padded by TensorFlow"), ("function", "a Python function")):
                feed = feeds[kind]
                feed.close()
                result, feed_seconds = results[kind]
                rows.append(
                    Row(
                        "shards",
                        f"ShardFeed ({fmt}, {what}; {name}: {len(files)} shards, {feed.n_samples:,} rows, "
                        f"{model_kind} model) ÷ same batches pre-padded, batch {s.stream_batch_size}, one iterator "
                        "per fit",
                        result.value,
                        target=parquet_target if fmt == "parquet" and kind == "PadColumns" else None,
                        detail=result.describe("feed", "pre-padded")
                        + f"; the feed spent {feed_seconds:.2f} s/epoch in Python producing batches",
                    )
                )
    return rows


# --------------------------------------------------------------------------- 3. against the tutorial


def tutorial(ctx: Context) -> list[Row]:
    """The feed at the planned batch ÷ the tutorial's generator at batch 8, and both at the planned batch."""
    planned = ctx.planned("small")["batch_size"]
    small = ctx.sizes.tutorial_batch_size
    n = ctx.rows("small")
    x, y = workload.frame(n)
    model = workload.build_model("canonical")
    ctx.log(f"tutorial: generator and feed at batch {small} and at the planned batch {planned}")

    def generator_run(batch: int) -> Callable[[], Run]:
        steps = n // batch  # the tutorial's steps_per_epoch: drops the tail of every epoch

        def run() -> Run:
            gen = workload.tutorial_generator(x, y, batch)
            return timed(
                steps * batch, lambda: model.fit(gen, steps_per_epoch=steps, epochs=1, verbose=0, shuffle=False)
            )

        return run

    def feed_run(batch: int) -> Callable[[], Run]:
        feed = _feed(x, y, batch)
        dataset = feed.to_tf_dataset(workload.SIGNATURE, prefetch=2)
        return lambda: timed(n, lambda: _fit_epoch(model, dataset))

    runs = {
        "generator@small": generator_run(small),
        "feed@planned": feed_run(planned),
        "generator@planned": generator_run(planned),
        "feed@small": feed_run(small),
    }
    for run in runs.values():  # warm-up: the generator path traces its own signature
        run()
    results = interleave(runs, ctx.sizes.reps)
    pairs = [
        ("feed@planned", "generator@small", f"feed at planned batch {planned} ÷ tutorial generator at batch {small}",
         Target(3.0)),
        ("feed@planned", "generator@planned", f"feed ÷ tutorial generator, both at planned batch {planned}", None),
        ("feed@small", "generator@small", f"feed ÷ tutorial generator, both at batch {small}", None),
    ]
    lengths = x[list(workload.COLUMNS)].map(len).to_numpy()
    padded = {batch: _mean_padded_length(lengths, batch) for batch in (small, planned)}
    why = (
        f"; per-batch padding: mean padded length {padded[small]:.0f} at batch {small}, {padded[planned]:.0f} at "
        f"batch {planned} (mean sequence {lengths.mean():.0f})"
    )
    rows = []
    for a, b, what, target in pairs:
        result = ratio(results, a, b)
        detail = result.describe(a, b) + (why if target is not None else "")
        rows.append(Row("tutorial", what, result.value, target=target, detail=detail))
    return rows


def _mean_padded_length(lengths: np.ndarray, batch: int) -> float:
    """Mean length each sample is padded to when consecutive rows form batches padded to their longest sequence."""
    padded = [
        np.repeat(lengths[lo : lo + batch].max(axis=0, keepdims=True), len(lengths[lo : lo + batch]), axis=0)
        for lo in range(0, len(lengths), batch)
    ]
    return float(np.concatenate(padded).mean())


# --------------------------------------------------------------------------- 4. planning quality


def planning(ctx: Context) -> list[Row]:
    """Planned ÷ true largest batch under ``ram_limit`` (bisection over real runs); predicted ÷ measured peak."""
    from autobatch._units import parse_bytes

    s = ctx.sizes
    limit = parse_bytes(s.ram_limit)
    n = ctx.rows("small")
    runs: dict[int, int] = {}  # batch -> measured peak of a real autobatch.fit run

    plans = {safety: ctx.planned("small", safety=safety) for safety in s.safeties}
    for planned in plans.values():
        runs.setdefault(planned["batch_size"], planned["peak_rss_bytes"])

    def measure(batch: int) -> bool:
        if batch not in runs:
            runs[batch] = ctx.fit_run("small", force_batch_size=batch)["peak_rss_bytes"]
            ctx.log(f"planning: batch {batch} peaked at {format_bytes(runs[batch])} (limit {format_bytes(limit)})")
        return runs[batch] <= limit

    fitting = [b for b, peak in runs.items() if peak <= limit]
    failing = [b for b, peak in runs.items() if peak > limit]
    lo = max(fitting, default=0)
    hi = min(failing, default=None)
    budget = s.max_bisect_runs
    while hi is None and lo < n and budget > 0:  # grow until a run does not fit (or the whole dataset does)
        budget -= 1
        batch = min(2 * max(lo, 1), n)
        if measure(batch):
            lo = batch
        else:
            hi = batch
    while lo == 0 and hi is not None and hi > 1 and budget > 0:  # even the plan failed: shrink
        budget -= 1
        batch = hi // 2
        if measure(batch):
            lo = batch
        else:
            hi = batch
    while hi is not None and hi - lo > max(1, s.bisect_tolerance * lo) and budget > 0:
        budget -= 1
        batch = (lo + hi) // 2
        if measure(batch):
            lo = batch
        else:
            hi = batch
    true = lo
    bracket = f"true largest batch {true:,} (fits), smallest failing {hi:,}" if hi else f"{true:,} fits (= all rows)"
    tried = ", ".join(f"{b:,}: {format_bytes(p)}" for b, p in sorted(runs.items()))
    rows = []
    for safety, planned in plans.items():
        batch = planned["batch_size"]
        label = f"safety {safety:g}" + (" (the default)" if safety == DEFAULT_SAFETY else "")
        rows.append(
            Row(
                "planning",
                f"planned ÷ true largest batch under ram_limit={s.ram_limit} over {s.long_epochs} epochs, {label}",
                batch / true if true else math.inf,
                target=Target(0.95, 1.0),
                detail=f"planned {batch:,} ({planned['limited_by']}); {bracket}; peaks of real {s.long_epochs}-epoch "
                f"runs: {tried}",
            )
        )
        rows.append(
            Row(
                "planning",
                f"predicted ÷ measured peak RSS of the autobatch.fit process over {s.long_epochs} epochs, {label}",
                planned["predicted_peak_bytes"] / planned["peak_rss_bytes"],
                target=Target(0.95, 1.05),
                detail=f"predicted {format_bytes(planned['predicted_peak_bytes'])}, measured (VmHWM) "
                f"{format_bytes(planned['peak_rss_bytes'])} at batch {batch:,}",
            )
        )
    return rows


# --------------------------------------------------------------------------- 5. flat memory


def flat_memory(ctx: Context) -> list[Row]:
    """Peak RSS of streaming 10× more shards ÷ 1×, each in a fresh process (the two run side by side)."""
    s = ctx.sizes
    answers = ctx.stream_runs([s.shards_1x, s.shards_10x])
    one, ten = answers[s.shards_1x], answers[s.shards_10x]

    def added(answer: dict[str, Any]) -> int:
        return answer["peak_rss_bytes"] - answer["before_training"]["rss_bytes"]

    return [
        Row(
            "memory",
            f"peak RSS streaming {s.shards_10x} Parquet shards ÷ {s.shards_1x} ({s.shard_rows:,} rows each)",
            ten["peak_rss_bytes"] / one["peak_rss_bytes"],
            target=Target(high=1.10),
            detail=f"{format_bytes(ten['peak_rss_bytes'])} vs {format_bytes(one['peak_rss_bytes'])}; training added "
            f"{format_bytes(added(ten))} vs {format_bytes(added(one))} over the process before training; "
            f"{format_bytes(ten['file_bytes'])} vs {format_bytes(one['file_bytes'])} of Parquet files",
        )
    ]


# --------------------------------------------------------------------------- 6. probe cost


def probe_cost(ctx: Context) -> list[Row]:
    """The probe's (and the whole plan's) wall time ÷ one warmed epoch, at the planned batch."""
    rows = []
    for size in ctx.sizes.sizes:
        planned = ctx.planned(size)
        epoch = planned["epoch_seconds"][-1]  # the first epoch includes tracing
        n = ctx.rows(size)
        cached = " (from cache!)" if planned["probe_from_cache"] else ""
        rows.append(
            Row(
                "probe",
                f"plan (probe + confirming trials) ÷ one epoch, {size} ({n:,} rows), batch {planned['batch_size']}",
                planned["plan_seconds"] / epoch,
                detail=f"plan {planned['plan_seconds']:.1f} s{cached}, of which probe and trials "
                f"{planned['probe_seconds']:.1f} s; one warmed epoch {epoch:.1f} s",
            )
        )
        rows.append(Row("probe", f"plan wall time, {size}", planned["plan_seconds"], unit="s"))
    return rows


# --------------------------------------------------------------------------- 7. padding


def _shapes(feed: Any, epochs: range) -> list[tuple[tuple[int, ...], ...]]:
    """The padded input shapes of every batch the feed serves over ``epochs``."""
    keep = feed.epoch
    seen = []
    for epoch in epochs:
        feed.set_epoch(epoch)
        seen += [tuple(a.shape for a in feed[i][0].values()) for i in range(len(feed))]
    feed.set_epoch(keep)
    return seen


def padding(ctx: Context) -> list[Row]:
    """Per-batch padding vs length buckets: traces of the train step, distinct shapes, samples/s."""
    s = ctx.sizes
    n = ctx.rows("small")
    batch = s.padding_batch_size
    x, y = workload.frame(n)
    buckets: list[Any] = [None, 64, "pow2"]
    name = {None: "per-batch", 64: "bucket=64", "pow2": 'bucket="pow2"'}
    ctx.log(f"padding: per-batch vs buckets, {n} rows at batch {batch}")
    models, feeds, datasets, counters = {}, {}, {}, {}
    for bucket in buckets:
        models[bucket] = workload.build_model("canonical")
        counters[bucket] = workload.TraceCounter(models[bucket])
        feeds[bucket] = _feed(x, y, batch, preprocess=workload.bucketed(bucket))
        datasets[bucket] = feeds[bucket].to_tf_dataset(workload.SIGNATURE, prefetch=2)
        _fit_epoch(models[bucket], datasets[bucket])  # warm-up, epoch 0
    epoch = feeds[None].epoch

    def run(bucket: Any) -> Callable[[], Run]:
        def go() -> Run:
            feeds[bucket].set_epoch(epoch)  # the same rows per batch, padded differently
            return timed(n, lambda: _fit_epoch(models[bucket], datasets[bucket]))

        return go

    results = interleave({bucket: run(bucket) for bucket in buckets}, s.reps)
    rows = []
    for bucket in buckets:
        shapes = _shapes(feeds[bucket], range(epoch + 1))
        length = np.mean([shape[1] for batch_shapes in shapes for shape in batch_shapes])
        rows.append(
            Row(
                "padding",
                f"train_step traces, {name[bucket]} (tf.data with the probe's signature, {1 + s.reps} epochs)",
                counters[bucket].count,
                unit="traces",
                detail=f"{len(set(shapes))} distinct padded shapes in {len(shapes)} batches; "
                f"mean padded length {length:.0f}",
            )
        )
    for bucket in buckets[1:]:
        result = ratio(results, bucket, None)
        rows.append(
            Row(
                "padding",
                f"{name[bucket]} ÷ per-batch padding, samples/s, batch {batch} (CPU, jit_compile off)",
                result.value,
                detail=result.describe(name[bucket], "per-batch"),
            )
        )
    if s.xla_rows:
        rows += _padding_xla(ctx, buckets, name)
    return rows


def _padding_xla(ctx: Context, buckets: list[Any], name: dict[Any, str]) -> list[Row]:
    """With ``jit_compile=True`` (Keras' default on a GPU) every new input shape is one more XLA compilation."""
    s = ctx.sizes
    batch = s.padding_batch_size
    x, y = workload.frame(s.xla_rows)
    rates = {}
    rows = []
    for bucket in buckets:
        ctx.log(f"padding: XLA, {name[bucket]}, {s.xla_rows} rows at batch {batch}, 2 epochs")
        model = workload.build_model("canonical", jit_compile=True)
        counter = workload.TraceCounter(model)
        feed = _feed(x, y, batch, preprocess=workload.bucketed(bucket))
        dataset = feed.to_tf_dataset(workload.SIGNATURE, prefetch=2)
        shapes = set(_shapes(feed, range(2)))
        run = timed(2 * s.xla_rows, lambda: model.fit(dataset, epochs=2, verbose=0, shuffle=False))
        rates[bucket] = run
        rows.append(
            Row(
                "padding",
                f"XLA compilations (distinct padded shapes), {name[bucket]}, jit_compile=True, 2 epochs",
                len(shapes),
                unit="shapes",
                detail=f"{counter.count} train_step trace(s); {run.seconds:.1f} s for 2 epochs of {s.xla_rows} rows",
            )
        )
    for bucket in buckets[1:]:
        rows.append(
            Row(
                "padding",
                f"{name[bucket]} ÷ per-batch padding, samples/s over 2 epochs with jit_compile=True",
                rates[bucket].rate / rates[None].rate,
                detail=f"{rates[bucket].rate:,.0f} vs {rates[None].rate:,.0f} samples/s, one run each "
                "(compilation is stateful, so not interleaved)",
            )
        )
    return rows


# --------------------------------------------------------------------------- 8. size-aware batching (issue 9)


def size_aware(ctx: Context) -> list[Row]:
    """Size-aware batching ÷ the largest safe fixed batch, samples/s on real lengths, and both peaks vs ``ram_limit``.

    Both plans come from ``autobatch.fit`` runs in fresh processes under the same
    ``ram_limit`` (their peak RSS is the memory result); the timed comparison trains
    the same architecture on the two plans' feeds side by side, interleaved.
    """
    from autobatch._units import parse_bytes
    from autobatch.feeds import make_feed
    from autobatch.feeds.size_aware import SizeAwareFeed

    s = ctx.sizes
    limit = parse_bytes(s.ram_limit)
    runs = ctx.sized_runs()
    sized, fixed = runs["real size-aware"], runs["real fixed"]
    x, y = workload.real_length_frame(s.sized_rows, files=s.sized_files)
    n = len(x)
    ctx.log(
        f"size-aware: {n} real lengths, fixed batch {fixed['batch_size']} vs buckets {sized['boundaries']} at "
        f"batches {sized['batch_sizes']}"
    )
    common = dict(preprocess=workload.preprocess_seq, output_signature=workload.SEQ_SIGNATURE, max_queue_size=2)
    feeds = {
        "fixed": make_feed(x, y, batch_size=fixed["batch_size"], **common),
        "size-aware": SizeAwareFeed(x, y, boundaries=sized["boundaries"], batch_sizes=sized["batch_sizes"], **common),
    }
    models = {name: workload.build_model("wide") for name in feeds}
    datasets = {name: feed.to_tf_dataset(workload.SEQ_SIGNATURE, prefetch=2) for name, feed in feeds.items()}
    for name in feeds:  # warm-up: tracing (one trace per bucket shape for size-aware)
        _fit_epoch(models[name], datasets[name])

    def run(name: str) -> Callable[[], Run]:
        return lambda: timed(n, lambda: _fit_epoch(models[name], datasets[name]))

    results = interleave({name: run(name) for name in feeds}, s.reps)
    result = ratio(results, "size-aware", "fixed")
    lengths = x["seq"].map(len).to_numpy()
    fixed_padded = _mean_padded_length(lengths[np.random.default_rng(0).permutation(n)][:, None], fixed["batch_size"])
    bounds = np.asarray(sized["boundaries"])
    sized_padded = float(bounds[np.minimum(np.searchsorted(bounds, lengths), len(bounds) - 1)].mean())
    rows = [
        Row(
            "sizeaware",
            f"size-aware ÷ largest safe fixed batch ({fixed['batch_size']}), samples/s, {n:,} real lengths "
            f"(stdlib function tokens), ram_limit={s.ram_limit}",
            result.value,
            target=Target(2.0),
            detail=result.describe("size-aware", "fixed")
            + f"; {len(bounds)} buckets {sized['boundaries']} at batches {sized['batch_sizes']} "
            f"({sized['steps_per_epoch']} vs {math.ceil(n / fixed['batch_size'])} steps/epoch); mean padded length "
            f"{sized_padded:.0f} vs {fixed_padded:.0f} (mean length {lengths.mean():.0f}, longest {lengths.max()})",
        ),
        Row(
            "sizeaware",
            "the plan's expected speedup ÷ the measured one",
            sized["expected_speedup"] / result.value,
            detail=f"expected {sized['expected_speedup']:.2f}× (from the grid's step times, against its own predicted "
            f"fixed batch {sized['fixed_batch_size']}), measured {result.value:.2f}×",
        ),
    ]
    for name, answer in (("size-aware", sized), ("fixed", fixed)):
        if "peak_rss_bytes" not in answer:
            continue
        rows.append(
            Row(
                "sizeaware",
                f"peak RSS ÷ ram_limit, autobatch.fit(batching={name!r}), one epoch",
                answer["peak_rss_bytes"] / limit,
                target=Target(high=1.0),
                detail=f"VmHWM {format_bytes(answer['peak_rss_bytes'])} of {format_bytes(limit)}; predicted "
                f"{format_bytes(answer['predicted_peak_bytes'])}; the whole process (probe child excluded), every "
                "batch of the epoch included",
            )
        )
    held = sized.get("held_out")
    if held:
        rows.append(
            Row(
                "sizeaware",
                f"memory model ({sized['model_kind']}): predicted ÷ measured peak of the held-out trial",
                1 + sized["held_out_error"],
                target=Target(0.95, 1.10),
                detail=f"{sized['model']}; held-out trial batch {held['batch_size']} × length {held['length']}: "
                f"{(sized['held_out_error_above_baseline'] or 0):+.1%} of what it added above the runtime",
            )
        )
    rows += _size_aware_vs_tutorial(ctx, runs["canonical size-aware"])
    return rows


def _size_aware_vs_tutorial(ctx: Context, sized: dict[str, Any]) -> list[Row]:
    """The size-aware feed on the canonical frame ÷ the tutorial's generator at batch 8 (issue 6's open target)."""
    from autobatch.feeds.size_aware import SizeAwareFeed

    small = ctx.sizes.tutorial_batch_size
    n = ctx.rows("small")
    x, y = workload.frame(n)
    model = workload.build_model("canonical")
    feed = SizeAwareFeed(
        x, y, boundaries=sized["boundaries"], batch_sizes=sized["batch_sizes"], preprocess=workload.preprocess,
        output_signature=workload.SIGNATURE, max_queue_size=2,
    )
    dataset = feed.to_tf_dataset(workload.SIGNATURE, prefetch=2)
    steps = n // small

    def generator() -> Run:
        gen = workload.tutorial_generator(x, y, small)
        return timed(steps * small, lambda: model.fit(gen, steps_per_epoch=steps, epochs=1, verbose=0, shuffle=False))

    runs = {"size-aware": lambda: timed(n, lambda: _fit_epoch(model, dataset)), "generator": generator}
    for go in runs.values():
        go()  # warm-up
    ctx.log(f"size-aware vs the tutorial: buckets {sized['boundaries']} at {sized['batch_sizes']} vs batch {small}")
    results = interleave(runs, ctx.sizes.reps)
    result = ratio(results, "size-aware", "generator")
    return [
        Row(
            "sizeaware",
            f"size-aware feed ÷ tutorial generator at batch {small}, canonical frame ({n:,} rows), ram_limit="
            f"{ctx.sizes.ram_limit}",
            result.value,
            target=Target(3.0),
            detail=result.describe("size-aware", "generator")
            + f"; buckets {sized['boundaries']} at batches {sized['batch_sizes']}",
        )
    ]


# --------------------------------------------------------------------------- 9. stability (issue 18)


def stability(ctx: Context) -> list[Row]:
    """The planned batch over fresh processes (max ÷ min), CLI ÷ fit, and the plan's wall time, per limit."""
    import stability as bench_stability

    quick = ctx.sizes is workload.QUICK
    limits = ["1GiB"] if quick else ["1GiB", "2GiB"]
    runs = bench_stability.run(limits, 1 if quick else 5, log=ctx.log)
    rows = []
    for s in bench_stability.summarize(runs):
        limit = s["limit"]
        for kind in ("cli", "fit"):
            rows.append(Row("stability", f"max ÷ min planned batch, {kind}, {limit}", s[f"{kind}_spread"],
                            target=Target(high=1.10), detail=f"batches {s[f'{kind}_batches']}"))
        rows.append(Row("stability", f"CLI ÷ fit planned batch (medians), {limit}", s["cli_over_fit"],
                        target=Target(0.9, 1.1)))
        for kind in ("cli", "fit"):
            rows.append(Row("stability", f"plan wall time, {kind}, {limit} (median)", s[f"{kind}_seconds"], unit="s",
                            detail="probe and confirming trials, no cache"))
    return rows


# --------------------------------------------------------------------------- 10. any Keras model (issue 20)


def models(ctx: Context) -> list[Row]:
    """``examples/transformer.py`` (custom layers in ``__main__``, attention, a custom loss and train_step) in a
    fresh process: the plan's predicted peak ÷ the run's measured ``VmHWM``."""
    quick = ctx.sizes is workload.QUICK
    args = ["--rows", "300", "--epochs", "1"] if quick else ["--rows", "2000", "--epochs", "30"]
    with tempfile.TemporaryDirectory() as cache:  # measured afresh, never from an earlier run's cache
        out = subprocess.run([sys.executable, "examples/transformer.py", *args, "--ram-limit", "2GiB"], cwd=ROOT,
                             capture_output=True, text=True, timeout=3600,
                             env={**os.environ, "AUTOBATCH_CACHE_DIR": cache})
    if out.returncode != 0:
        raise RuntimeError(f"examples/transformer.py failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    ctx.log(f"models: transformer batch {result['batch_size']}, trials {result['trials']}")
    ratio = result["predicted_peak_bytes"] / result["measured_peak_bytes"]
    detail = (f"batch {result['batch_size']}; predicted {result['predicted_peak_bytes'] / 2**20:,.1f} MiB, VmHWM "
              f"{result['measured_peak_bytes'] / 2**20:,.1f} MiB over {args[3]} epoch(s) of 2 GiB; plan "
              f"{result['plan_seconds']:.1f} s")
    return [Row("models", "predicted ÷ measured peak, Transformer example (custom classes in __main__)", ratio,
                target=Target(0.95, 1.05), detail=detail)]


BENCHMARKS: dict[str, Callable[[Context], list[Row]]] = {
    "feed": feed_overhead,
    "shards": shard_streaming,
    "tutorial": tutorial,
    "planning": planning,
    "memory": flat_memory,
    "probe": probe_cost,
    "padding": padding,
    "sizeaware": size_aware,
    "stability": stability,
    "models": models,
}
"""Every benchmark by the name ``./dev bench NAME`` selects it with, in the issue's order."""

