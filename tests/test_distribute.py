"""tf.distribute: per-replica planning, agreement across workers, sharded feeds, and real runs on CPU.

The pure parts run with fake budgets and layouts (several GPUs cannot be had
here); the real runs are a single-device MirroredStrategy in this process, two
logical CPU replicas in a child process, and two MultiWorkerMirroredStrategy
workers on 127.0.0.1 (child processes, each with its own ram_limit).
"""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import autobatch
from autobatch import ConfigError, ProbeResult
from autobatch._distribute import Layout, agree, distribute_plan, replica_limits, strategy_layout
from autobatch._memory import Budget
from autobatch._replicas import ReplicaLimit
from autobatch.plan import make_plan
from autobatch.probe import StepTrial

MiB = 1024**2
WORKER = Path(__file__).with_name("distributed_worker.py")


def layout(workers=1, index=0, devices=("CPU:0",)):
    return Layout("MultiWorkerMirroredStrategy", workers, index, tuple(devices), is_chief=index == 0)


def gpu_result(n=100_000):
    """Host step peak 600 MiB + 1 MiB/sample; GPU step peak 1000 MiB + 2 MiB/sample."""
    trials = tuple(StepTrial(b, 600 * MiB + b * MiB, 1000 * MiB + 2 * b * MiB) for b in (8, 64))
    return ProbeResult(
        n_samples=n, source="in_memory", raw_bytes=0, raw_bytes_per_sample=0.0, raw_scope="test",
        largest_shard_raw_bytes=0, sample_batch_size=32, preprocessed_bytes_per_sample=1024.0,
        worst_preprocessed_bytes_per_sample=1024.0, worst_scope="test", preprocess_peak_bytes_per_sample=0.0,
        output_signature=(), device="GPU:0", trials=trials,
    )


# ---------------------------------------------------------------- pure: per-replica budgets and agreement

OPTIONS = {"safety": 0.1, "queue_batches": 0}


def test_each_gpu_replica_is_bounded_by_its_own_device():
    result = gpu_result()
    host_plan = make_plan(result, [Budget("host", 64 * 1024 * MiB, "test")], **OPTIONS)
    gpus = [Budget("gpu", 16 * 1024 * MiB, "gpu0"), Budget("gpu", 8 * 1024 * MiB, "gpu1")]
    limits = replica_limits(result, host_plan, gpus, layout(devices=("GPU:0", "GPU:1")), options=OPTIONS)
    # Each device's own line, 1000 MiB + 2 MiB/sample, with the 10% margin on the growth: 2.2 MiB/sample.
    expected = [int((g.limit_bytes - 1000 * MiB) // (2.2 * MiB)) for g in gpus]
    assert [r.max_batch_size for r in limits] == expected
    assert [r.limited_by for r in limits] == ["gpu", "gpu"] and [r.replica for r in limits] == [0, 1]
    batch, limiting = agree(limits, n_samples=result.n_samples)
    assert batch == expected[1] and limiting.replica == 1 and limiting.budget_bytes == 8 * 1024 * MiB


def test_replicas_of_one_worker_share_its_host():
    result = gpu_result()
    host_plan = make_plan(result, [Budget("host", 2048 * MiB, "test")], **OPTIONS)
    big = [Budget("gpu", 80 * 1024 * MiB, "gpu")] * 4
    limits = replica_limits(result, host_plan, big, layout(devices=[f"GPU:{i}" for i in range(4)]), options=OPTIONS)
    assert {r.max_batch_size for r in limits} == {host_plan.batch_size // 4}
    assert {r.limited_by for r in limits} == {"host"}


def test_the_worker_with_less_memory_sets_the_shared_batch_and_is_named():
    result = gpu_result()
    plans = [make_plan(result, [Budget("host", limit * MiB, f"ram_limit={limit}MiB")], **OPTIONS) for limit in (4096, 1500)]
    limits = [r for i, p in enumerate(plans) for r in replica_limits(result, p, [None], layout(2, i), options=OPTIONS)]
    assert limits[0].max_batch_size > limits[1].max_batch_size
    agreed = []
    for index in (0, 1):
        budgets = [Budget("host", (4096, 1500)[index] * MiB, "test")]
        plan = distribute_plan(plans[index], limits, layout(2, index), budgets, options=OPTIONS)
        assert plan.batch_size == limits[1].max_batch_size
        assert plan.global_batch_size == 2 * plan.batch_size
        assert plan.distribution.limiting_worker == 1
        assert plan.steps_per_epoch == -(-result.n_samples // plan.global_batch_size)
        assert "the limit is set by worker 1 (replica 1, host memory 1.5 GiB): at most" in plan.explanation
        agreed.append(plan)
    assert agreed[0].limited_by == "worker 1's host memory"
    assert agreed[0].explanation.startswith(f"batch {agreed[0].batch_size:,} per replica is limited by worker 1's host memory")
    assert agreed[1].limited_by in ("host memory", "max_batch_size") and "limited by max_batch_size" not in agreed[1].explanation
    # The limiting worker keeps its own plan: what confirmed it, or the trials it is interpolated between.
    assert agreed[1].explanation.startswith(plans[1].explanation) and agreed[1].confirmed == plans[1].confirmed
    assert dataclasses.replace(agreed[1], distribution=None, explanation="", steps_per_epoch=0) == dataclasses.replace(
        plans[1], explanation="", steps_per_epoch=0
    )


def test_gpu_limit_is_each_gpu_replicas_budget_and_a_preallocating_tensorflow_is_refused():
    from autobatch._distribute import device_gpu_budgets

    mixed = layout(devices=("/job:worker/replica:0/task:0/device:GPU:0", "/job:worker/replica:0/task:0/device:GPU:1"))
    budgets = device_gpu_budgets(mixed, "10GiB", preallocated=lambda: True)  # an explicit limit needs no free memory
    assert [(b.kind, b.limit_bytes) for b in budgets] == [("gpu", 10 * 1024 * MiB)] * 2
    assert device_gpu_budgets(layout(), None, preallocated=lambda: True) == [None]  # CPU replicas: no GPU budget
    with pytest.raises(ConfigError) as excinfo:
        device_gpu_budgets(mixed, None, preallocated=lambda: True)
    assert "set_memory_growth" in str(excinfo.value) and "gpu_limit=" in str(excinfo.value)


def test_agreement_caps_a_step_at_the_dataset_and_rejects_a_replica_without_room():
    limits = [ReplicaLimit(0, 0, 500, "host", 1), ReplicaLimit(1, 1, 700, "host", 1)]
    assert agree(limits, n_samples=300) == (150, ReplicaLimit(0, 0, 150, "dataset", 0))
    with pytest.raises(ConfigError) as excinfo:
        agree([*limits, ReplicaLimit(2, 2, 0, "host", 1)], n_samples=10_000)
    assert "worker 2" in str(excinfo.value)


def test_layout_is_read_from_the_strategy_and_a_wrong_object_says_what_to_pass():
    import tensorflow as tf

    one = strategy_layout(tf.distribute.MirroredStrategy(["CPU:0"]))
    assert (one.num_workers, one.worker_index, one.local_replicas, one.num_replicas_in_sync) == (1, 0, 1, 1)
    with pytest.raises(ConfigError) as excinfo:
        strategy_layout(object())
    assert "tf.distribute.Strategy" in str(excinfo.value)


# ---------------------------------------------------------------- pure: cells and sharding, exactly once


@pytest.mark.parametrize("n, steps, cells", [(10, 1, 2), (601, 4, 2), (3000, 2, 2), (1001, 7, 3), (8, 2, 4)])
def test_cells_cover_the_rows_once_nearly_equal_and_equal_within_the_first_step(n, steps, cells):
    from autobatch.feeds.distributed import cell_bounds

    bounds = cell_bounds(n, steps, cells)
    flat = bounds.reshape(-1, 2)
    assert flat[0, 0] == 0 and flat[-1, 1] == n and (flat[1:, 0] == flat[:-1, 1]).all()
    sizes = flat[:, 1] - flat[:, 0]
    assert sizes.min() >= 1 and sizes.max() - sizes.min() <= 1
    if steps > 1:
        assert len(set((bounds[0, :, 1] - bounds[0, :, 0]).tolist())) == 1


def test_too_few_rows_for_every_replica_is_a_config_error():
    from autobatch.feeds.distributed import cell_bounds

    with pytest.raises(ConfigError) as excinfo:
        cell_bounds(3, 2, 2)
    assert "at least one row" in str(excinfo.value)


def _served_ids(local, shard):
    """The ids a worker's share serves in one epoch, step by step (what its pipeline yields)."""
    out = []
    for step in shard.cells:
        for lo, hi in step:
            out.append(local._serve(int(lo), int(hi), 0, record=False)[0]["id"])
    return out


def _identity(batch_x, batch_y):
    return {"id": np.asarray(batch_x["id"])}, np.asarray(batch_y, dtype="float32")


@pytest.mark.parametrize("workers, replicas, batch", [(2, 1, 64), (3, 2, 50), (2, 1, 1000)])
def test_in_memory_feed_is_sharded_by_data_every_sample_once_across_workers(workers, replicas, batch):
    from autobatch.feeds import InMemoryFeed
    from autobatch.feeds.distributed import shard_for_worker

    n = 997
    frame = pd.DataFrame({"id": np.arange(n), "label": np.zeros(n)})
    served, steps = [], set()
    for index in range(workers):
        feed = InMemoryFeed(frame, "label", batch_size=batch, preprocess=_identity, seed=4)  # each worker its own feed
        feed.set_epoch(3)
        local, shard = shard_for_worker(feed, layout(workers, index, [f"CPU:{i}" for i in range(replicas)]), batch)
        assert shard.by == "data" and shard.cells.shape[1] == replicas
        ids = _served_ids(local, shard)
        assert max(len(a) for a in ids) <= batch
        served.extend(ids)
        steps.add(shard.steps_per_epoch)
    assert len(steps) == 1  # every worker takes the same number of steps
    everything = np.concatenate(served)
    assert sorted(everything.tolist()) == list(range(n))


@pytest.fixture
def id_shards(tmp_path):
    sizes = [120, 75, 210, 33, 90, 160]
    start = 0
    for i, size in enumerate(sizes):
        pd.DataFrame({"id": np.arange(start, start + size), "label": np.ones(size)}).to_csv(tmp_path / f"{i}.csv", index=False)
        start += size
    return tmp_path, start


def test_shard_feed_is_sharded_by_file_every_sample_once_across_workers(id_shards):
    from autobatch.feeds import ShardFeed
    from autobatch.feeds.distributed import shard_for_worker

    directory, n = id_shards
    served, files, steps = [], [], set()
    for index in range(2):
        feed = ShardFeed(directory, "label", batch_size=40, preprocess=_identity, seed=1)
        local, shard = shard_for_worker(feed, layout(2, index), 40)
        assert shard.by == "file" and local.n_samples == shard.rows < n  # each worker reads only its files
        files.append(set(shard.files))
        served.extend(_served_ids(local, shard))
        steps.add(shard.steps_per_epoch)
    assert not files[0] & files[1] and len(files[0] | files[1]) == 6
    assert len(steps) == 1
    assert sorted(np.concatenate(served).tolist()) == list(range(n))


def test_shard_feed_falls_back_to_data_when_files_cannot_be_balanced(id_shards):
    from autobatch.feeds import ShardFeed
    from autobatch.feeds.distributed import shard_for_worker

    directory, n = id_shards
    served = []
    for index in range(7):
        feed = ShardFeed(directory, "label", batch_size=8, preprocess=_identity, seed=1)
        local, shard = shard_for_worker(feed, layout(7, index), 8)  # 6 files cannot go to 7 workers
        assert shard.by == "data" and local is feed
        served.extend(_served_ids(local, shard))
    assert sorted(np.concatenate(served).tolist()) == list(range(n))
    with pytest.raises(ConfigError) as excinfo:
        shard_for_worker(ShardFeed(directory, "label", batch_size=8), layout(7, 0), 8, by="file")
    assert "by='data'" in str(excinfo.value)


# ---------------------------------------------------------------- real: MirroredStrategy in this process


def test_fit_under_a_single_device_mirrored_strategy_plans_per_replica_and_feeds_every_sample_once():
    import keras
    import tensorflow as tf

    strategy = tf.distribute.MirroredStrategy(["CPU:0"])
    n = 301
    rng = np.random.default_rng(0)
    x = {"x": rng.standard_normal((n, 16)).astype("float32"), "id": np.arange(n)}
    y = rng.standard_normal(n).astype("float32")
    seen: list[np.ndarray] = []
    recording = {"on": False}

    def preprocess(batch_x, batch_y):
        if recording["on"]:
            seen.append(np.asarray(batch_x["id"]))
        return {"x": batch_x["x"]}, batch_y

    class Record(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            recording["on"] = True

        def on_train_batch_end(self, batch, logs=None):
            if batch + 1 == self.params["steps"]:
                recording["on"] = False

    with strategy.scope():
        inputs = keras.Input((16,), name="x")
        model = keras.Model({"x": inputs}, keras.layers.Dense(1)(inputs))
        model.compile(optimizer="sgd", loss="mse")
    history = autobatch.fit(
        model, x, y, preprocess=preprocess, epochs=2, ram_limit="4GiB", max_batch_size=64, cache=False,
        callbacks=[Record()], monitor_options={"disable": True}, validation_split=0.2,
    )
    plan = history.autobatch_plan
    assert plan.distribution is not None and plan.distribution.num_replicas_in_sync == 1
    assert plan.batch_size == plan.global_batch_size == 64
    assert len(history.history["loss"]) == len(history.history["val_loss"]) == 2
    trained = np.concatenate(seen).tolist()
    assert len(seen) == 4 and len(trained) == len(set(trained)) == n - round(0.2 * n)  # the training split, once each


def test_plan_refuses_a_target_batch_under_a_strategy(frame):
    import tensorflow as tf

    with pytest.raises(ConfigError) as excinfo:
        autobatch.plan(frame, "label", strategy=tf.distribute.MirroredStrategy(["CPU:0"]), target_batch_size=512)
    assert "target_batch_size is not supported under tf.distribute" in str(excinfo.value)


def test_fit_refuses_a_model_built_outside_the_strategy_it_trains_with():
    import keras
    import tensorflow as tf

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    strategy = tf.distribute.MirroredStrategy(["CPU:0"])
    with pytest.raises(ConfigError) as excinfo:
        autobatch.fit(model, np.zeros((10, 2), "float32"), np.zeros(10, "float32"), strategy=strategy)
    assert "inside `with strategy.scope():`" in str(excinfo.value)


def test_fit_rejects_adaptive_under_a_strategy():
    import keras
    import tensorflow as tf

    strategy = tf.distribute.MirroredStrategy(["CPU:0"])
    with strategy.scope():
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ConfigError) as excinfo:
        autobatch.fit(model, np.zeros((10, 2), "float32"), np.zeros(10, "float32"), adaptive=True)
    assert "adaptive=True is not supported under tf.distribute" in str(excinfo.value)


# ---------------------------------------------------------------- real: child processes


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(commands: list[list[str]], outs: list[Path], timeout_s: float = 240) -> list[dict]:
    """Start the processes together, wait for all (killing them past the timeout), return their JSON."""
    # stderr to files, not pipes: a worker blocked on a full pipe would stall its peer in the next collective.
    logs = [out.with_suffix(".stderr") for out in outs]
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("w")) for cmd, log in zip(commands, logs, strict=True)
    ]
    try:
        for proc in procs:
            proc.wait(timeout=timeout_s)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, log in zip(procs, logs, strict=True):
        assert proc.returncode == 0, log.read_text()[-3000:]
    return [json.loads(out.read_text()) for out in outs]


@pytest.mark.distributed
def test_two_replicas_on_one_worker_split_each_step_and_see_every_sample_once(tmp_path):
    out = tmp_path / "mirrored.json"
    cmd = [sys.executable, str(WORKER), str(out), "--logical-cpus", "2", "--max-batch-size", "400", "--samples", "3001",
           "--features", "256"]
    (result,) = _run([cmd], [out])
    assert result["num_replicas_in_sync"] == 2 and result["per_replica_batch_size"] == 400
    assert result["global_batch_size"] == 800 and result["steps_per_epoch"] == 4
    assert result["keras_steps"] == result["steps_trained"] == 4  # Keras counts steps, not per-replica batches
    assert len(result["consumed"]) == 8 and max(len(c) for c in result["consumed"]) <= 400
    assert sorted(i for call in result["consumed"] for i in call) == list(range(3001))


@pytest.mark.distributed
def test_two_workers_agree_on_the_batch_the_smaller_ram_limit_allows_and_share_every_sample_once(tmp_path):
    ports = f"{_free_port()},{_free_port()}"
    limits = ["1400MiB", "1000MiB"]  # worker 1 has less memory: it must set the batch both train with
    outs = [tmp_path / f"worker{i}.json" for i in range(2)]
    shards = tmp_path / "shards"
    shards.mkdir()
    sizes, rng = [300, 120, 260, 90, 200, 140, 180], np.random.default_rng(0)
    for i, size in enumerate(sizes):
        frame = pd.DataFrame(rng.standard_normal((size, 16)), columns=[f"f{j}" for j in range(16)])
        frame.insert(0, "id", np.arange(sum(sizes[:i]), sum(sizes[: i + 1])))
        frame.assign(label=(frame["f0"] > 0).astype(float)).to_csv(shards / f"{i}.csv", index=False)
    commands = [
        [sys.executable, str(WORKER), str(outs[i]), "--workers", ports, "--index", str(i), "--ram-limit", limits[i],
         "--then-shards", str(shards)]
        for i in range(2)
    ]
    results = _run(commands, outs)
    first, second = results
    # Both agree on the per-replica and the global batch, through the strategy's collectives.
    assert first["per_replica_batch_size"] == second["per_replica_batch_size"]
    assert first["global_batch_size"] == second["global_batch_size"] == 2 * first["per_replica_batch_size"]
    # Alone, worker 0 would train on more; the shared batch is worker 1's, and the plan says so.
    own = first["own_limits"]
    assert own == second["own_limits"] and own["0"] > own["1"] == first["per_replica_batch_size"]
    assert first["limiting_worker"] == second["limiting_worker"] == 1
    assert "worker 1" in first["limited_by"] and "worker 1" in first["explanation"].split(".")[0]
    # Its own memory: confirmed by a trial at or above the batch, or interpolated between two real trials around it.
    assert second["confirmed"] or "interpolated between real trials" in second["explanation"]
    assert "limited by max_batch_size" not in second["explanation"]
    # The same number of steps on both, and across the workers every sample exactly once in the epoch.
    assert first["keras_steps"] == second["keras_steps"] == first["steps_per_epoch"] == first["steps_trained"]
    consumed = [i for result in results for call in result["consumed"] for i in call]
    assert sorted(consumed) == list(range(3000))
    assert not set(sum(first["consumed"], [])) & set(sum(second["consumed"], []))
    # Each worker monitored its own memory; both hold every worker's summary and the chief printed them.
    assert [w["worker"] for w in first["workers"]] == [0, 1] and first["workers"] == second["workers"]
    assert first["workers"][1]["host_budget_bytes"] == 1000 * MiB and first["workers"][0]["samples"] == 1500
    assert "autobatch workers" in first["output"] and "autobatch workers" not in second["output"]
    for index, result in enumerate(results):  # the exchanged summaries carry each worker's own measurement
        assert 300 * MiB < first["workers"][index]["peak_rss_bytes"] <= result["peak_rss_bytes"]
    # Shard files: each worker read only its own files, both took the same steps, every row once per epoch.
    by_file = [result["shards"] for result in results]
    assert [s["by"] for s in by_file] == ["file", "file"] and not set(by_file[0]["files"]) & set(by_file[1]["files"])
    assert len(by_file[0]["files"]) + len(by_file[1]["files"]) == len(sizes)
    assert by_file[0]["steps"] == by_file[1]["steps"] == by_file[0]["keras_steps"] == by_file[1]["keras_steps"]
    rows = [i for s in by_file for call in s["consumed"] for i in call]
    assert sorted(rows) == list(range(sum(sizes)))
    assert by_file[0]["epoch"] == by_file[1]["epoch"] == 2  # both advanced with Keras's epochs


def test_the_workers_summary_is_one_unwrapped_row_per_worker_in_80_columns():
    import io

    from rich.console import Console

    from autobatch._distribute import ClusterSummary, WorkerMemory

    workers = (
        WorkerMemory(0, 916 * MiB, 1400 * MiB, 982 * MiB, None, 1_500, 0.5),
        WorkerMemory(1, 1010 * MiB, 1024 * MiB, 990 * MiB, 7 * 1024 * MiB, 1_500, 0.6),
    )
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(ClusterSummary(workers))
    lines = console.export_text().splitlines()
    assert max(map(len, lines)) <= 80
    rows = [line.split() for line in lines if line.split()[:1] in (["0"], ["1"])]
    assert [row[:4] for row in rows] == [["0", "916.0", "MiB", "(65%)"], ["1", "1010.0", "MiB", "(99%)"]], lines
    assert rows[0][-3:] == ["-", "1,500", "3,000.0"] and rows[1][-4:] == ["7.0", "GiB", "1,500", "2,500.0"], lines
    assert "3,000 samples trained over 2 worker(s)" in "\n".join(lines)
