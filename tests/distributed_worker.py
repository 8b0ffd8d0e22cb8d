"""One training process of the tf.distribute tests (tests/test_distribute.py); run as a script, CPU only.

    python distributed_worker.py OUT.json --workers PORT0,PORT1 --index I --ram-limit 1100MiB
        one worker of a MultiWorkerMirroredStrategy cluster on 127.0.0.1 (TF_CONFIG set here)
    python distributed_worker.py OUT.json --logical-cpus 2 --max-batch-size 400
        a MirroredStrategy over two logical CPU devices of this process (two replicas, one worker)

Trains a tiny model with one ``autobatch.fit`` call and writes what it observed
as JSON: the plan it agreed on, and the sample ids the first epoch's training
steps were fed (recorded in ``preprocess`` from the start of training to the end
of the epoch's last step).
"""

from __future__ import annotations

import argparse
import io
import json
import os

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--workers", default=None, help="comma-separated ports of the cluster's workers")
parser.add_argument("--index", type=int, default=0)
parser.add_argument("--logical-cpus", type=int, default=0)
parser.add_argument("--ram-limit", default="2GiB")
parser.add_argument("--max-batch-size", type=int, default=None)
parser.add_argument("--samples", type=int, default=3000)
parser.add_argument("--features", type=int, default=8192)
parser.add_argument("--then-shards", default=None, help="then train on these CSV shards (id, f0…f15, label), fed by file")
args = parser.parse_args()

os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if args.workers:
    os.environ["TF_CONFIG"] = json.dumps(
        {
            "cluster": {"worker": [f"127.0.0.1:{port}" for port in args.workers.split(",")]},
            "task": {"type": "worker", "index": args.index},
        }
    )

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from rich.console import Console  # noqa: E402

import autobatch  # noqa: E402
from autobatch._memory import peak_rss_bytes  # noqa: E402

if args.workers:
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
else:
    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * args.logical_cpus)
    strategy = tf.distribute.MirroredStrategy([f"CPU:{i}" for i in range(args.logical_cpus)])

rng = np.random.default_rng(0)  # the same data on every worker
x = rng.standard_normal((args.samples, args.features)).astype("float32")
data, target = {"x": x, "id": np.arange(args.samples, dtype=np.int64)}, (x[:, 0] > 0).astype("float32")

recording: dict = {"on": False, "calls": []}


def preprocess(batch_x, batch_y):
    if recording["on"]:
        recording["calls"].append(np.asarray(batch_x["id"]).tolist())
    if isinstance(batch_x, dict):
        return {"x": batch_x["x"]}, batch_y
    features = [c for c in batch_x.columns if c.startswith("f")]
    return {"x": batch_x[features].to_numpy(dtype="float32")}, batch_y.to_numpy(dtype="float32")


class Record(keras.callbacks.Callback):
    """Record what preprocess serves from the start of training to the end of the first epoch's last step."""

    def __init__(self) -> None:
        super().__init__()
        self.steps = 0

    def on_train_begin(self, logs=None):
        recording["on"] = True

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1
        if batch + 1 == self.params["steps"]:
            recording["on"] = False


with strategy.scope():
    inputs = keras.Input((args.features,), name="x")
    hidden = keras.layers.Dense(4, activation="relu")(inputs)
    model = keras.Model({"x": inputs}, keras.layers.Dense(1)(hidden))
    model.compile(optimizer="sgd", loss="mse")

record = Record()
console = Console(file=io.StringIO(), width=140, record=True)
history = autobatch.fit(
    model,
    data,
    target,
    preprocess=preprocess,
    epochs=1,
    ram_limit=args.ram_limit,
    max_batch_size=args.max_batch_size,
    callbacks=[record],
    console=console,
    cache=False,
)
plan = history.autobatch_plan
distribution = plan.distribution
result = {
    "per_replica_batch_size": plan.batch_size,
    "global_batch_size": plan.global_batch_size,
    "num_replicas_in_sync": distribution.num_replicas_in_sync,
    "limiting_worker": distribution.limiting_worker,
    "own_limits": {str(r.worker): r.max_batch_size for r in distribution.replica_limits},
    "limited_by": plan.limited_by,
    "explanation": plan.explanation,
    "confirmed": plan.confirmed,
    "trials": [[t.batch_size, t.fits, t.peak_rss_bytes] for t in plan.probe.trials],
    "steps_per_epoch": plan.steps_per_epoch,
    "keras_steps": record.params["steps"],
    "steps_trained": record.steps,
    "consumed": recording["calls"],
    "peak_rss_bytes": peak_rss_bytes(),
    "predicted_peak_bytes": plan.predicted_peak_bytes,
    "workers": [w.__dict__ for w in history.autobatch_workers.workers],
    "output": console.export_text(),
}
if args.then_shards:
    # The lower-level path on shard files: each worker reads only its own files (explicit task-index assignment).
    with strategy.scope():
        inputs = keras.Input((16,), name="x")
        small = keras.Model({"x": inputs}, keras.layers.Dense(1)(inputs))
        small.compile(optimizer="sgd", loss="mse")
    feed = autobatch.ShardFeed(args.then_shards, "label", batch_size=64, preprocess=preprocess, seed=7)
    share = autobatch.distribute_feed(feed, 64, strategy)
    record, recording["calls"] = Record(), []
    with share.keras_workarounds(small):
        small.fit(share.dataset, epochs=2, callbacks=[share.callback, record], verbose=0, shuffle=False)
    result["shards"] = {
        "by": share.shard.by,
        "files": [os.path.basename(f) for f in share.shard.files],
        "steps": share.steps_per_epoch,
        "keras_steps": record.params["steps"],
        "consumed": recording["calls"],
        "epoch": share.feed.epoch,
    }
with open(args.out, "w") as fh:
    json.dump(result, fh)
