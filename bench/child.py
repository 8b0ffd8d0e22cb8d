"""One training run in a fresh process, for the benchmarks that measure peak RSS (``VmHWM``).

Run as ``python bench/child.py '{"job": ..., ...}'``; the answer is one line
``@@bench {json}`` on stdout. Jobs:

- ``fit``: ``autobatch.fit`` end to end on the canonical frame (probe, plan, feed, train
  with the monitor), optionally training at a forced batch size instead of the plan's.
- ``stream``: ``model.fit`` on a ``ShardFeed`` over the given shard files at a fixed batch
  size, exported to ``tf.data`` as ``autobatch.fit`` does.
- ``sized``: ``autobatch.fit`` with ``batching="fixed"`` or ``"size-aware"`` on the real-length
  workload (or the canonical frame), reporting the plan and the process's peak RSS.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import workload
from measure import REPLY_PREFIX

from autobatch._memory import peak_rss_bytes, rss_bytes


def _epoch_timer(times: list[float]) -> Any:
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            times.append(time.perf_counter() - self._start)

    return EpochTimer()


def fit_job(job: dict[str, Any]) -> dict[str, Any]:
    """``autobatch.fit`` on the canonical frame; ``force_batch_size`` trains at that size instead of the plan's."""
    from rich.console import Console

    import autobatch.api

    x, y = workload.frame(job["rows"])
    model = workload.build_model("canonical")
    planned: dict[str, Any] = {}
    real_plan = autobatch.api.plan

    def plan(*args: Any, **kwargs: Any) -> autobatch.Plan:
        start = time.perf_counter()
        chosen = real_plan(*args, **kwargs)
        planned["seconds"] = time.perf_counter() - start
        planned["plan"] = chosen
        forced = job.get("force_batch_size")
        if forced:
            # Train exactly as autobatch.fit would at the plan's batch size, only at another one.
            steps = math.ceil(chosen.n_samples / forced)
            chosen = dataclasses.replace(chosen, batch_size=forced, steps_per_epoch=steps)
        return chosen

    autobatch.api.plan = plan
    times: list[float] = []
    history = autobatch.fit(
        model,
        x,
        y,
        preprocess=workload.preprocess,
        epochs=job["epochs"],
        ram_limit=job["ram_limit"],
        safety=job["safety"],
        callbacks=[_epoch_timer(times)],
        console=Console(file=io.StringIO(), width=120),
    )
    chosen: autobatch.Plan = planned["plan"]
    return {
        "planned_batch_size": chosen.batch_size,
        "batch_size": history.autobatch_plan.batch_size,
        "predicted_peak_bytes": chosen.predicted_peak_bytes,
        "peak_rss_bytes": peak_rss_bytes(),
        "limited_by": chosen.limited_by,
        "plan_seconds": planned["seconds"],
        "probe_seconds": chosen.probe.wall_seconds,
        "probe_from_cache": chosen.probe.from_cache,
        "epoch_seconds": times,
        "samples_per_epoch": len(x),
        "plan_text": str(chosen),
    }


def stream_job(job: dict[str, Any]) -> dict[str, Any]:
    """``model.fit`` on a ``ShardFeed`` over ``files`` at ``batch_size``, prefetching 2 batches."""
    from autobatch._data import ShardSource
    from autobatch.feeds import make_feed

    model = workload.build_model("pooled")
    source = ShardSource(tuple(Path(f) for f in job["files"]), "label")
    feed = make_feed(
        source,
        batch_size=job["batch_size"],
        strategy="stream",
        preprocess=workload.preprocess,
        output_signature=workload.SIGNATURE,
        max_queue_size=2,
    )
    dataset = feed.to_tf_dataset(workload.SIGNATURE, prefetch=2)
    before = {"rss_bytes": rss_bytes(), "peak_rss_bytes": peak_rss_bytes()}
    times: list[float] = []
    model.fit(dataset, epochs=job["epochs"], verbose=0, shuffle=False, callbacks=[_epoch_timer(times)])
    return {
        "before_training": before,
        "peak_rss_bytes": peak_rss_bytes(),
        "samples_per_epoch": feed.n_samples,
        "file_bytes": sum(Path(f).stat().st_size for f in job["files"]),
        "epoch_seconds": times,
    }


def sized_job(job: dict[str, Any]) -> dict[str, Any]:
    """``autobatch.fit(batching=job["batching"])`` on ``job["workload"]``: the plan and the peak RSS of the whole run."""
    from rich.console import Console

    import autobatch

    if job["workload"] == "real":
        x, y = workload.real_length_frame(job.get("rows"), files=job.get("files"))
        model, preprocess = workload.build_model("wide"), workload.preprocess_seq
    else:
        x, y = workload.frame(job["rows"])
        model, preprocess = workload.build_model("canonical"), workload.preprocess
    options: dict[str, Any] = {}
    if job["batching"] == "size-aware":
        options["size_aware_options"] = {"grid_batch_sizes": tuple(job["grid"])}
    times: list[float] = []
    start = time.perf_counter()
    history = autobatch.fit(
        model,
        x,
        y,
        preprocess=preprocess,
        epochs=job["epochs"],
        ram_limit=job["ram_limit"],
        batching=job["batching"],
        callbacks=[_epoch_timer(times)],
        console=Console(file=io.StringIO(), width=140),
        cache=False,
        **options,
    )
    chosen = history.autobatch_plan
    answer: dict[str, Any] = {
        "batching": job["batching"],
        "peak_rss_bytes": peak_rss_bytes(),
        "predicted_peak_bytes": chosen.predicted_peak_bytes,
        "batch_size": chosen.batch_size,
        "steps_per_epoch": chosen.steps_per_epoch,
        "samples_per_epoch": len(x),
        "epoch_seconds": times,
        "total_seconds": time.perf_counter() - start,
        "plan_text": str(chosen),
    }
    if job["batching"] == "size-aware":
        sized = chosen.sized
        answer.update(
            boundaries=list(chosen.boundaries),
            batch_sizes=list(chosen.batch_sizes),
            fixed_batch_size=chosen.fixed_batch_size,
            expected_speedup=chosen.expected_speedup,
            confirmed=chosen.confirmed,
            model=sized.host_model.describe(),
            model_kind=sized.host_model.kind,
            held_out_error=sized.held_out_error,
            held_out_error_above_baseline=sized.held_out_error_above_baseline,
            held_out=dataclasses.asdict(sized.held_out) if sized.held_out is not None else None,
            probe_text=str(sized),
            plan_seconds=sized.wall_seconds + chosen.probe.wall_seconds,
        )
    else:
        answer.update(limited_by=chosen.limited_by, confirmed=chosen.confirmed)
    return answer


JOBS = {"fit": fit_job, "stream": stream_job, "sized": sized_job}


def main() -> None:
    job = json.loads(sys.argv[1])
    answer = JOBS[job["job"]](job)
    sys.stdout.write(REPLY_PREFIX + json.dumps(answer) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
