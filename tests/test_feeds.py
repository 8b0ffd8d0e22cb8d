"""Feeds: exactly-once epochs, shuffling, validation splits, streaming memory, bad input, tf.data, Keras fit."""

from __future__ import annotations

import ast
import concurrent.futures
import contextlib
import json
import math
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import autobatch
from autobatch._data import ShardSource
from autobatch._memory import Budget
from autobatch._result import ProbeResult, TensorSpec
from autobatch._shard_files import ShardInfo
from autobatch.errors import AutobatchError, ConfigError, DataError, PreprocessError
from autobatch.feeds import InMemoryFeed, ShardFeed, ShardIndex, make_feed
from autobatch.padding import pad_columns
from autobatch.plan import Plan, make_plan

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import canonical  # noqa: E402

SIZES = (13, 1, 40, 7, 39)  # uneven shard sizes, 100 rows


def table(n: int = 100, *, seed: int = 0) -> pd.DataFrame:
    """``id`` (0..n-1), two float features and a binary label."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "id": np.arange(n, dtype=np.int64),
            "a": rng.standard_normal(n).astype(np.float32),
            "b": rng.standard_normal(n).astype(np.float32),
            "label": rng.integers(0, 2, n).astype(np.int64),
        }
    )


def write_shards(frame: pd.DataFrame, folder: Path, sizes: tuple[int, ...], fmt: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    bounds = np.cumsum((0, *sizes))
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        part = frame.iloc[lo:hi]
        if fmt == "csv":
            part.to_csv(folder / f"{i}.csv", index=False)
        else:
            part.to_parquet(folder / f"{i}.parquet", index=False)
    return folder


def epoch_ids(feed) -> list[np.ndarray]:
    """The ids of each batch of one epoch, then advance the epoch as Keras does."""
    batches = [np.asarray(feed[i][0]["id"]) for i in range(len(feed))]
    feed.on_epoch_end()
    return batches


def assert_exactly_once(batches: list[np.ndarray], ids: np.ndarray) -> None:
    seen = np.concatenate(batches)
    assert len(seen) == len(ids), f"{len(seen)} rows served, expected {len(ids)}"
    np.testing.assert_array_equal(np.sort(seen), np.sort(ids))


# --------------------------------------------------------------------------- in memory


@pytest.mark.parametrize("batch_size", [10, 7, 100, 150])
@pytest.mark.parametrize("shuffle", [False, True])
def test_in_memory_serves_every_sample_once_per_epoch(batch_size: int, shuffle: bool) -> None:
    frame = table(100)
    feed = InMemoryFeed(frame, "label", batch_size=batch_size, shuffle=shuffle, seed=3)
    assert len(feed) == math.ceil(100 / batch_size)
    first, second = epoch_ids(feed), epoch_ids(feed)
    for batches in (first, second):
        assert_exactly_once(batches, frame["id"].to_numpy())
        assert all(len(b) == batch_size for b in batches[:-1])
    if shuffle:
        assert not np.array_equal(np.concatenate(first), np.concatenate(second)), "epochs must reshuffle"
        again = InMemoryFeed(frame, "label", batch_size=batch_size, shuffle=True, seed=3)
        np.testing.assert_array_equal(np.concatenate(epoch_ids(again)), np.concatenate(first))  # seeded
    else:
        np.testing.assert_array_equal(np.concatenate(first), np.arange(100))


def test_in_memory_targets_follow_their_rows() -> None:
    frame = table(50)
    feed = InMemoryFeed(frame, "label", batch_size=8, seed=1)
    for i in range(len(feed)):
        x, y = feed[i]
        np.testing.assert_array_equal(y, frame["label"].to_numpy()[x["id"]])
        np.testing.assert_array_equal(x["a"], frame["a"].to_numpy()[x["id"]])
        assert "label" not in x


def test_in_memory_drop_remainder_drops_a_different_tail_each_epoch() -> None:
    feed = InMemoryFeed(table(100), "label", batch_size=30, drop_remainder=True, seed=0)
    assert len(feed) == 3
    first, second = np.concatenate(epoch_ids(feed)), np.concatenate(epoch_ids(feed))
    assert len(first) == len(set(first.tolist())) == 90
    assert set(first.tolist()) != set(second.tolist())
    with pytest.raises(ConfigError, match="drop_remainder=True with batch_size=200"):
        InMemoryFeed(table(100), "label", batch_size=200, drop_remainder=True)


def test_in_memory_dicts_of_arrays_pass_through_untouched() -> None:
    rng = np.random.default_rng(0)
    x = {"in1": rng.standard_normal((20, 4)), "in2": np.arange(20)}
    y = {"out": np.arange(20) * 2.0}
    feed = InMemoryFeed(x, y, batch_size=6, shuffle=False)
    inputs, targets = feed[1]
    assert set(inputs) == {"in1", "in2"} and set(targets) == {"out"}
    np.testing.assert_array_equal(inputs["in1"], x["in1"][6:12])
    np.testing.assert_array_equal(inputs["in2"], np.arange(6, 12))
    np.testing.assert_array_equal(targets["out"], np.arange(6, 12) * 2.0)
    inputs, targets = feed[-1]  # the last, smaller batch
    np.testing.assert_array_equal(inputs["in2"], [18, 19])
    with pytest.raises(IndexError):
        feed[len(feed)]


def test_in_memory_tuple_inputs_and_no_targets() -> None:
    x = (np.arange(10.0), np.arange(10.0) * 3)
    (inputs,) = InMemoryFeed(x, batch_size=4, shuffle=False)[2]
    np.testing.assert_array_equal(inputs[0], [8.0, 9.0])
    np.testing.assert_array_equal(inputs[1], [24.0, 27.0])


def test_in_memory_sample_weights_align_with_rows() -> None:
    frame = table(40).assign(w=lambda f: f["id"] * 0.5)
    for weights in ("w", frame["w"].to_numpy()):
        source = frame if isinstance(weights, str) else frame.drop(columns=["w"])
        feed = InMemoryFeed(source, "label", batch_size=7, sample_weight=weights, seed=2)
        for i in range(len(feed)):
            x, _, w = feed[i]
            assert "w" not in x
            np.testing.assert_allclose(w, x["id"] * 0.5)
    with pytest.raises(DataError, match=r"expected shape \(40,\), received \(39,\)"):
        InMemoryFeed(table(40), "label", batch_size=7, sample_weight=np.ones(39))


def test_in_memory_validation_split_is_disjoint_complete_and_seeded() -> None:
    frame = table(100)
    train, val = InMemoryFeed(frame, "label", batch_size=16, seed=0).split(0.2, seed=5)
    train_ids, val_ids = np.concatenate(epoch_ids(train)), np.concatenate(epoch_ids(val))
    assert len(val_ids) == 20 and len(train_ids) == 80
    assert not set(train_ids.tolist()) & set(val_ids.tolist())
    assert_exactly_once([train_ids, val_ids], frame["id"].to_numpy())
    assert np.all(np.diff(val_ids) > 0), "the validation feed does not shuffle"
    assert len(train) == 5 and len(val) == 2
    _, same = InMemoryFeed(frame, "label", batch_size=16).split(0.2, seed=5)
    _, other = InMemoryFeed(frame, "label", batch_size=16).split(0.2, seed=6)
    assert set(np.concatenate(epoch_ids(same)).tolist()) == set(val_ids.tolist())
    assert set(np.concatenate(epoch_ids(other)).tolist()) != set(val_ids.tolist())
    with pytest.raises(ConfigError, match="validation_split"):
        InMemoryFeed(frame, "label", batch_size=16).split(1.0)
    with pytest.raises(ConfigError, match="both need at least one"):
        InMemoryFeed(table(3), "label", batch_size=2).split(0.1)


# --------------------------------------------------------------------------- shards


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("batch_size", [10, 7, 1000])
def test_shards_serve_every_row_once_per_epoch(tmp_path: Path, fmt: str, shuffle: bool, batch_size: int) -> None:
    frame = table(100)
    folder = write_shards(frame, tmp_path / fmt, SIZES, fmt)
    feed = ShardFeed(folder, "label", batch_size=batch_size, shuffle=shuffle, seed=4)
    assert len(feed) == math.ceil(100 / batch_size)
    first, second = epoch_ids(feed), epoch_ids(feed)
    for batches in (first, second):
        assert_exactly_once(batches, frame["id"].to_numpy())
        assert all(len(b) == batch_size for b in batches[:-1]), "batches run across file boundaries"
    if shuffle and batch_size < 100:
        assert not np.array_equal(np.concatenate(first), np.concatenate(second))
    if not shuffle:
        np.testing.assert_array_equal(np.concatenate(first), np.arange(100))


class _SizesIndex(ShardIndex):
    """Row counts without files: shard ``k.csv`` has ``sizes[k]`` rows and columns ``id``, ``label``."""

    def __init__(self, sizes: list[int]) -> None:
        super().__init__()
        self.sizes = sizes

    def info(self, path: Path) -> ShardInfo:
        return ShardInfo(path, ("id", "label"), self.sizes[int(path.stem)], 0, 0)


class _FilelessShardFeed(ShardFeed):
    """A ShardFeed whose shards are generated: shard ``k`` holds the ids that follow shard ``k - 1``'s."""

    def _read_frame(self, shard: ShardInfo) -> pd.DataFrame:
        k = self.files.index(shard.path)
        first = int(sum(s.n_rows for s in self.shards[:k]))
        ids = np.arange(first, first + shard.n_rows, dtype=np.int64)
        return pd.DataFrame({"id": ids, "label": ids % 2})


def _fileless(sizes: list[int], **options) -> ShardFeed:
    source = ShardSource(tuple(Path(f"{k}.csv") for k in range(len(sizes))), "label")
    return _FilelessShardFeed(source, index=_SizesIndex(sizes), **options)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=10),
    batch_size=st.integers(1, 120),
    shuffle=st.booleans(),
    seed=st.integers(0, 2**16),
    drop_remainder=st.booleans(),
    read_ahead=st.integers(0, 2),
    shrink=st.one_of(st.none(), st.tuples(st.integers(0, 30), st.sampled_from([2, 3, 4]))),
)
def test_fuzz_shard_batch_cutting_serves_every_row_exactly_once(
    sizes: list[int], batch_size: int, shuffle: bool, seed: int, drop_remainder: bool, read_ahead: int, shrink
) -> None:
    import warnings

    n = sum(sizes)
    assume(not drop_remainder or batch_size <= n)
    feed = _fileless(
        sizes, batch_size=batch_size, shuffle=shuffle, seed=seed, drop_remainder=drop_remainder, read_ahead=read_ahead
    )
    try:
        expected_len = n // batch_size if drop_remainder else math.ceil(n / batch_size)
        assert len(feed) == expected_len and feed.n_samples == n
        for _ in range(2):  # two epochs, each exactly once (drop_remainder: distinct rows, a full batch each)
            epoch = feed.epoch
            batches = [np.asarray(feed[i][0]["id"]) for i in range(len(feed))]
            assert all(len(b) == batch_size for b in batches[:-1])
            seen = np.concatenate(batches)
            if drop_remainder:
                assert len(seen) == len(feed) * batch_size and len(set(seen.tolist())) == len(seen)
            else:
                np.testing.assert_array_equal(np.sort(seen), np.arange(n))
            # The same epoch by random access (as Keras' shuffled batch order reads it) gives the same batches.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for i in np.random.default_rng(seed).permutation(len(feed)):
                    np.testing.assert_array_equal(feed[int(i)][0]["id"], batches[int(i)])
            # Served in pieces (adaptive), with the split changing mid-epoch: the same rows, in the same order.
            rows: list[int] = []
            pieces = []
            for k, element in enumerate(feed._pass_elements(feed._serve, rows, True)):
                pieces.append(np.asarray(element[0]["id"]))
                if shrink is not None and k == shrink[0]:
                    feed.shrink(shrink[1])
            np.testing.assert_array_equal(np.concatenate(pieces), seen)
            assert [r for r, _ in rows] == [len(p) for p in pieces] and min(len(p) for p in pieces) >= 1
            assert feed.epoch == epoch + 1, "a complete pass advances the epoch"
            feed._pieces = 1
    finally:
        feed.close()


def test_shard_batches_are_cut_across_files_in_numeric_order(tmp_path: Path) -> None:
    frame = table(120)
    folder = write_shards(frame, tmp_path / "csv", (10,) * 12, "csv")  # 0.csv … 11.csv: 10 sorts after 9
    feed = ShardFeed(folder, "label", batch_size=25, shuffle=False)
    assert [p.name for p in feed.epoch_files()] == [f"{i}.csv" for i in range(12)]
    x, y = feed[0]
    np.testing.assert_array_equal(x["id"], np.arange(25))  # rows of 0.csv, 1.csv and half of 2.csv
    np.testing.assert_array_equal(y, frame["label"].to_numpy()[:25])
    assert feed.n_samples == 120 and len(feed) == 5


def test_shard_shuffle_changes_file_order_and_rows_within_files(tmp_path: Path) -> None:
    folder = write_shards(table(100), tmp_path / "pq", (20,) * 5, "parquet")
    feed = ShardFeed(folder, "label", batch_size=20, seed=0)
    orders, batches = [], []
    for _ in range(4):
        orders.append([p.name for p in feed.epoch_files()])
        batches.append(epoch_ids(feed))
    assert len({tuple(o) for o in orders}) > 1, "file order changes between epochs"
    # With batches of one file's size the first batch holds exactly the rows of the epoch's first file, shuffled.
    first_file = int(orders[0][0].split(".")[0])
    assert set(batches[0][0].tolist()) == set(range(first_file * 20, first_file * 20 + 20))
    assert not np.array_equal(batches[0][0], np.sort(batches[0][0]))


def test_shard_random_access_matches_sequential_and_warns_about_rereads(tmp_path: Path) -> None:
    folder = write_shards(table(100), tmp_path / "pq", SIZES, "parquet")
    sequential = ShardFeed(folder, "label", batch_size=6, seed=9)
    expected = [sequential[i][0]["id"] for i in range(len(sequential))]
    scattered = ShardFeed(folder, "label", batch_size=6, seed=9)
    order = np.random.default_rng(0).permutation(len(scattered))
    with pytest.warns(UserWarning, match="shuffle=False"):
        got = {int(i): scattered[int(i)][0]["id"] for i in order}
    for i, ids in enumerate(expected):
        np.testing.assert_array_equal(got[i], ids)


def test_shard_feed_is_safe_to_read_from_several_threads(tmp_path: Path) -> None:
    # Keras' enqueuer (workers > 1) fetches neighbouring batches from a thread pool.
    folder = write_shards(table(100), tmp_path / "pq", SIZES, "parquet")
    expected = [ShardFeed(folder, "label", batch_size=3, seed=1)[i][0]["id"] for i in range(34)]
    feed = ShardFeed(folder, "label", batch_size=3, seed=1, workers=4)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda i: feed[i][0]["id"], range(len(feed))))
    for ids, want in zip(got, expected, strict=True):
        np.testing.assert_array_equal(ids, want)
    assert_exactly_once(got, np.arange(100))


def preprocess_as_float(batch_x: pd.DataFrame, batch_y: pd.Series):
    return {"id": batch_x["id"].to_numpy(), "a": batch_x["a"].to_numpy("float64")}, batch_y.to_numpy("float32")


def test_feeds_pickle_for_multiprocessing_workers(tmp_path: Path) -> None:
    folder = write_shards(table(100), tmp_path / "csv", SIZES, "csv")
    for feed in (
        ShardFeed(folder, "label", batch_size=9, preprocess=preprocess_as_float, seed=2),
        InMemoryFeed(table(100), "label", batch_size=9, preprocess=preprocess_as_float, seed=2),
    ):
        feed[0]  # start the reader thread and fill the caches first
        feed.on_epoch_end()
        copy = pickle.loads(pickle.dumps(feed))
        assert copy.epoch == 1
        for i in range(len(feed)):
            np.testing.assert_array_equal(copy[i][0]["id"], feed[i][0]["id"])


def test_shard_feed_keeps_current_file_plus_read_ahead_resident(tmp_path: Path) -> None:
    folder = write_shards(table(100), tmp_path / "pq", (20,) * 5, "parquet")
    feed = ShardFeed(folder, "label", batch_size=10, shuffle=False, read_ahead=1)
    names = lambda: [p.name for p in feed.resident_files]  # noqa: E731
    feed[0]
    assert names() == ["0.parquet", "1.parquet"], "the next file is read ahead"
    peak = 0
    for i in range(1, len(feed)):
        feed[i]
        peak = max(peak, len(feed.resident_files))
        assert f"{i * 10 // 20}.parquet" in names()
    assert peak <= 2
    assert names() == ["4.parquet"]
    feed.on_epoch_end()
    assert names() == [], "nothing stays loaded between epochs"
    feed.close()


def test_shards_without_a_target_column_let_preprocess_build_targets(tmp_path: Path) -> None:
    folder = write_shards(table(100), tmp_path / "csv", SIZES, "csv")

    def preprocess(batch_x: pd.DataFrame, batch_y: None):
        assert batch_y is None
        return {"id": batch_x["id"].to_numpy()}, (batch_x["a"] > 0).to_numpy("float32")

    feed = ShardFeed(folder, batch_size=16, preprocess=preprocess, seed=0)
    x, y = feed[2]
    frame = table(100)
    np.testing.assert_array_equal(y, (frame["a"].to_numpy()[x["id"]] > 0).astype(np.float32))
    (inputs,) = ShardFeed(folder, batch_size=16, shuffle=False)[0]  # no targets at all: (inputs,)
    assert set(inputs) == {"id", "a", "b", "label"}


def test_csv_row_counts_are_cached_by_path_size_and_mtime(tmp_path: Path) -> None:
    folder = write_shards(table(30), tmp_path / "csv", (10, 20), "csv")
    index = ShardIndex()
    first = index.info(folder / "1.csv")
    assert first.n_rows == 20 and first.columns == ("id", "a", "b", "label")
    assert index.info(folder / "1.csv") is first, "a second lookup reuses the count"
    with open(folder / "1.csv", "a") as fh:
        fh.write("999,0.5,0.5,1\n")
    os.utime(folder / "1.csv", ns=(time.time_ns(), first.mtime_ns + 1_000_000))
    assert index.info(folder / "1.csv").n_rows == 21, "a changed file is counted again"
    train, val = ShardFeed(folder, "label", batch_size=4, index=index).split(0.3)
    assert train.n_samples + val.n_samples == 31


def test_shard_validation_split_holds_out_whole_shards(tmp_path: Path) -> None:
    frame = table(120)
    folder = write_shards(frame, tmp_path / "csv", (10,) * 12, "csv")
    train, val = ShardFeed(folder, "label", batch_size=7, seed=0).split(0.25, seed=2)
    assert not set(train.files) & set(val.files)
    assert set(train.files) | set(val.files) == set(ShardFeed(folder, "label", batch_size=7).files)
    assert len(val.files) == 3 and val.n_samples == 30
    train_ids, val_ids = np.concatenate(epoch_ids(train)), np.concatenate(epoch_ids(val))
    assert_exactly_once([train_ids, val_ids], frame["id"].to_numpy())
    assert np.all(np.diff(val_ids) > 0), "the validation feed reads in order"
    _, again = ShardFeed(folder, "label", batch_size=7).split(0.25, seed=2)
    assert again.files == val.files
    with pytest.raises(ConfigError, match="at least 2"):
        ShardFeed(folder / "0.csv", "label", batch_size=7).split(0.2)


def test_canonical_csv_and_parquet_shards_give_the_same_rows(tmp_path: Path) -> None:
    frame = canonical.make_frame(120, seed=3, max_len=64).assign(id=np.arange(120))
    canonical.write_shards(frame, tmp_path, shards=4)

    def preprocess(batch_x: pd.DataFrame, batch_y: pd.Series):
        inputs = pad_columns(batch_x, ["in1", "in2"], add_feature_axis=True)
        inputs["id"] = batch_x["id"].to_numpy()
        return inputs, batch_y.to_numpy("float32")

    from_csv = ShardFeed(tmp_path / "csv", "label", batch_size=32, preprocess=preprocess, shuffle=False)
    from_parquet = ShardFeed(tmp_path / "parquet", "label", batch_size=32, preprocess=preprocess, shuffle=False)
    for i in range(len(from_csv)):
        (a, ya), (b, yb) = from_csv[i], from_parquet[i]
        np.testing.assert_array_equal(a["id"], b["id"])
        np.testing.assert_allclose(a["in1"], b["in1"], rtol=1e-4, atol=1e-5)  # CSV keeps 5 significant digits
        np.testing.assert_array_equal(ya, yb)


# --------------------------------------------------------------------------- streaming memory

_MEMORY_CHILD = """
import json, sys
from autobatch.feeds import ShardFeed

feed = ShardFeed(sys.argv[1], "label", batch_size=4096, shuffle=True, seed=0)
rows = 0
for i in range(len(feed)):
    rows += len(feed[i][1])
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"rows": rows, "peak_rss_bytes": peak}))
"""


def _peak_rss_of_one_epoch(*specs: str | tuple[str, ...], script: str = _MEMORY_CHILD) -> list[dict[str, int]]:
    """Each spec (``script``'s arguments) streamed for one epoch in its own fresh process (run side by side), with
    that process's VmHWM."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    children = [
        subprocess.Popen(
            [sys.executable, "-c", script, *((spec,) if isinstance(spec, str) else spec)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for spec in specs
    ]
    results = []
    for child in children:
        stdout, stderr = child.communicate(timeout=300)
        assert child.returncode == 0, stderr[-3000:]
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    return results


def test_streaming_peak_memory_does_not_grow_with_the_number_of_shards(tmp_path: Path) -> None:
    rows_per_shard, columns = 20_000, 40
    rng = np.random.default_rng(0)
    shard_bytes = 0
    for i in range(40):
        frame = pd.DataFrame(rng.standard_normal((rows_per_shard, columns)), columns=[f"f{j}" for j in range(columns)])
        frame["label"] = rng.integers(0, 2, rows_per_shard)
        shard_bytes = int(frame.memory_usage(index=True).sum())
        frame.to_parquet(tmp_path / f"{i}.parquet", index=False)
    one, ten = _peak_rss_of_one_epoch(str(tmp_path / "[0-3].parquet"), str(tmp_path))  # 4 and 40 shards
    assert one["rows"] == 4 * rows_per_shard and ten["rows"] == 40 * rows_per_shard
    allowed = one["peak_rss_bytes"] * 1.10 + 16 * 2**20
    # The bound must be able to fail: holding all 40 shards would exceed it several times over.
    assert 40 * shard_bytes > 2 * (allowed - one["peak_rss_bytes"])
    mib = {name: r["peak_rss_bytes"] / 2**20 for name, r in (("one", one), ("ten", ten))}
    print(f"peak RSS: 4 shards {mib['one']:.0f} MiB, 40 shards {mib['ten']:.0f} MiB")
    assert ten["peak_rss_bytes"] <= allowed, (one, ten)


_NATIVE_MEMORY_CHILD = """
import json, sys
import autobatch
from autobatch.feeds import ShardFeed
from autobatch.probe import TensorSpec

pad = autobatch.PadColumns(["s"], target_axis=True)
preprocess = pad if sys.argv[2] == "native" else (lambda bx, by: pad(bx, by))
feed = ShardFeed(sys.argv[1], "label", batch_size=512, preprocess=preprocess, shuffle=True, seed=0)
signature = (TensorSpec("x/s", "float32", (None, None)), TensorSpec("y", "float32", (None, 1)))
rows = sum(len(y) for _, y in feed.to_tf_dataset(signature))
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"rows": rows, "peak_rss_bytes": peak, "native": sys.argv[2]}))
"""


def test_pad_columns_streaming_peak_is_flat_in_the_shards_and_within_the_python_paths(tmp_path: Path) -> None:
    rows_per_shard = 10_000
    rng = np.random.default_rng(0)
    for i in range(40):
        lengths = rng.integers(50, 350, rows_per_shard)
        values = rng.standard_normal(int(lengths.sum())).astype(np.float32)
        cells = np.split(values, np.cumsum(lengths)[:-1])
        pd.DataFrame({"s": cells, "label": rng.integers(0, 2, rows_per_shard)}).to_parquet(tmp_path / f"{i}.parquet")
    shard_bytes = (tmp_path / "0.parquet").stat().st_size
    few_shards = str(tmp_path / "[0-3].parquet")
    few, many = _peak_rss_of_one_epoch(
        (few_shards, "native"), (str(tmp_path), "native"), script=_NATIVE_MEMORY_CHILD
    )
    (python,) = _peak_rss_of_one_epoch((few_shards, "python"), script=_NATIVE_MEMORY_CHILD)
    assert few["rows"] == python["rows"] == 4 * rows_per_shard and many["rows"] == 40 * rows_per_shard
    mib = {name: r["peak_rss_bytes"] / 2**20 for name, r in (("few", few), ("many", many), ("python", python))}
    print(f"peak RSS: native 4 shards {mib['few']:.0f} MiB, 40 shards {mib['many']:.0f} MiB; Python 4 shards "
          f"{mib['python']:.0f} MiB; {shard_bytes / 2**20:.1f} MiB a shard")
    allowed = few["peak_rss_bytes"] * 1.10 + 16 * 2**20
    assert 40 * shard_bytes > 2 * (allowed - few["peak_rss_bytes"]), "holding every shard would break the bound"
    assert many["peak_rss_bytes"] <= allowed, (few, many)
    # The trials measure reading shards as the Python path reads them; the plan adds one shard for the copy the
    # native path makes (the rows in the epoch's order), so its peak must stay within that (and some slack).
    assert few["peak_rss_bytes"] <= python["peak_rss_bytes"] + 2 * shard_bytes, (few, python)


# --------------------------------------------------------------------------- bad input


def test_missing_directory_and_no_matching_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist") as missing:
        ShardFeed(tmp_path / "nope", "label", batch_size=4)
    assert str(tmp_path / "nope") in str(missing.value)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not a shard")
    with pytest.raises(DataError, match="holds no shard files"):
        ShardFeed(tmp_path / "empty", "label", batch_size=4)
    with pytest.raises(DataError, match="matches no files"):
        ShardFeed(str(tmp_path / "*.parquet"), "label", batch_size=4)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "empty \\(zero-byte\\) file"),
        (b"id,a,b,label\n", "has a header but no rows"),
        (b"id,a,b,label\n1,0.5,0.5,1\n2,0.5,0.5,1,7\n", "line 3"),
    ],
    ids=["zero-byte", "header-only", "ragged-row"],
)
def test_bad_csv_shard_is_named(tmp_path: Path, content: bytes, expected: str) -> None:
    folder = write_shards(table(20), tmp_path / "csv", (10, 10), "csv")
    (folder / "2.csv").write_bytes(content)
    with pytest.raises(DataError, match=expected) as excinfo:
        ShardFeed(folder, "label", batch_size=4)
    assert "2.csv" in str(excinfo.value)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_parquet_shard_is_named(tmp_path: Path, damage: str) -> None:
    folder = write_shards(table(20), tmp_path / "pq", (10, 10), "parquet")
    content = (folder / "1.parquet").read_bytes()
    # A file cut short (an interrupted copy) has lost its footer, as surely as garbage has none.
    (folder / "1.parquet").write_bytes(b"PAR1 this is not really parquet" if damage == "garbage" else content[: len(content) // 2])
    with pytest.raises(DataError, match="cannot read shard") as excinfo:
        ShardFeed(folder, "label", batch_size=4)
    assert "1.parquet" in str(excinfo.value)


def test_shard_with_other_columns_is_named(tmp_path: Path) -> None:
    folder = write_shards(table(30), tmp_path / "csv", (10, 10, 10), "csv")
    table(10).rename(columns={"b": "c"}).to_csv(folder / "2.csv", index=False)
    with pytest.raises(DataError, match=r"missing: \['b'\], unexpected: \['c'\]") as excinfo:
        ShardFeed(folder, "label", batch_size=4)
    assert "2.csv" in str(excinfo.value)


def test_missing_target_column(tmp_path: Path) -> None:
    folder = write_shards(table(20), tmp_path / "csv", (10, 10), "csv")
    with pytest.raises(DataError, match=r"\['target'\] not found in shard") as excinfo:
        ShardFeed(folder, "target", batch_size=4)
    assert "0.csv" in str(excinfo.value)
    with pytest.raises(DataError, match="not found"):
        InMemoryFeed(table(20), "target", batch_size=4)


def test_shard_changed_after_counting_is_reported_not_skipped(tmp_path: Path) -> None:
    folder = write_shards(table(20), tmp_path / "csv", (10, 10), "csv")
    feed = ShardFeed(folder, "label", batch_size=5, shuffle=False)
    table(4).to_csv(folder / "1.csv", index=False)
    assert len(feed[0][0]["id"]) == 5
    with pytest.raises(DataError, match="4 rows now, but 10 were counted") as excinfo:
        for i in range(len(feed)):
            feed[i]
    assert "1.csv" in str(excinfo.value)


def _drifting(kind: str):
    def preprocess(batch_x: pd.DataFrame, batch_y: pd.Series):
        inputs = {"a": batch_x["a"].to_numpy(np.float32)}
        if batch_x["id"].max() >= 50:  # the later batches drift
            if kind == "keys":
                inputs["extra"] = batch_x["b"].to_numpy(np.float32)
            elif kind == "rank":
                inputs["a"] = inputs["a"][:, None]
            elif kind == "none":
                return None
            else:
                inputs["a"] = inputs["a"].astype(np.float64)
        return inputs, batch_y.to_numpy()

    return preprocess


_DRIFT_MESSAGES = {
    "keys": "extra",
    "dtype": r"received float64 \(1-D\)",
    "rank": r"received float32 \(2-D\)",
    "none": r"must return a pair \(inputs, targets\); on batch 5 \(rows 50-59 .*it returned NoneType",
}


@pytest.mark.parametrize("kind", ["keys", "dtype", "rank", "none"])
def test_preprocess_drift_names_the_batch(tmp_path: Path, kind: str) -> None:
    folder = write_shards(table(100), tmp_path / "csv", SIZES, "csv")
    in_memory = InMemoryFeed(table(100), "label", batch_size=10, shuffle=False, preprocess=_drifting(kind))
    streamed = ShardFeed(folder, "label", batch_size=10, shuffle=False, preprocess=_drifting(kind))
    for feed in (in_memory, streamed):
        for i in range(5):
            feed[i]
        with pytest.raises(PreprocessError, match=_DRIFT_MESSAGES[kind]) as excinfo:
            feed[5]
        assert "batch 5 (rows 50-59" in str(excinfo.value)
        if kind != "none":
            assert "as on batch 0" in str(excinfo.value)
    message = str(excinfo.value)  # rows 50-59 span 2.csv (rows 14-53) and 3.csv (rows 54-60)
    assert "from shards" in message and "2.csv" in message and "3.csv" in message


def test_preprocess_that_raises_or_drops_rows_names_the_batch(tmp_path: Path) -> None:
    def broken(batch_x, batch_y):
        raise KeyError("in3")

    with pytest.raises(PreprocessError, match=r"KeyError.*batch 0 \(rows 0-9") as excinfo:
        InMemoryFeed(table(20), "label", batch_size=10, preprocess=broken)[0]
    assert isinstance(excinfo.value.__cause__, KeyError)
    with pytest.raises(PreprocessError, match="expected 10 rows for x/a"):
        InMemoryFeed(table(20), "label", batch_size=10, preprocess=lambda x, y: ({"a": x["a"][:3]}, y))[0]


def test_make_feed_rejects_unknown_data() -> None:
    with pytest.raises(DataError, match=r"Unrecognized data type: x=42 \(of type <class 'int'>\)"):
        make_feed(42, batch_size=4)
    with pytest.raises(ValueError, match="Unrecognized data type"):
        make_feed({1, 2, 3}, batch_size=4)
    assert issubclass(DataError, AutobatchError)


def test_make_feed_dispatches_on_data_and_strategy(tmp_path: Path) -> None:
    frame = table(100)
    folder = write_shards(frame, tmp_path / "pq", SIZES, "parquet")
    assert isinstance(make_feed(frame, "label", batch_size=8), InMemoryFeed)
    assert isinstance(make_feed(folder, "label", batch_size=8), ShardFeed)
    assert isinstance(make_feed(str(folder / "*.parquet"), "label", batch_size=8, strategy="stream"), ShardFeed)
    loaded = make_feed(folder, "label", batch_size=8, strategy="in_memory", shuffle=False)
    assert isinstance(loaded, InMemoryFeed)
    np.testing.assert_array_equal(np.concatenate(epoch_ids(loaded)), np.arange(100))
    train, val = make_feed(folder, "label", batch_size=8, validation_split=0.2)
    assert isinstance(train, ShardFeed) and train.n_samples + val.n_samples == 100
    with pytest.warns(UserWarning, match="read_ahead"):
        make_feed(frame, "label", batch_size=8, read_ahead=2)
    with pytest.raises(ConfigError, match="strategy"):
        make_feed(frame, "label", batch_size=8, strategy="fast")


# --------------------------------------------------------------------------- tf.data


def _sequence_preprocess(batch_x: pd.DataFrame, batch_y: pd.Series):
    inputs = pad_columns(batch_x, ["in1", "in2"], add_feature_axis=True)
    return inputs, batch_y.to_numpy("float32").reshape(-1, 1)


def test_to_tf_dataset_yields_the_same_batches(tmp_path: Path) -> None:
    frame = canonical.make_frame(90, seed=1, max_len=64)
    canonical.write_shards(frame, tmp_path, shards=3)
    signature = (
        TensorSpec("x/in1", "float32", (None, None, 1)),
        TensorSpec("x/in2", "float32", (None, None, 1)),
        TensorSpec("y", "float32", (None, 1)),
    )
    feeds = [
        InMemoryFeed(frame, "label", batch_size=16, preprocess=_sequence_preprocess, seed=2),
        ShardFeed(tmp_path / "parquet", "label", batch_size=16, preprocess=_sequence_preprocess, seed=2),
    ]
    for feed in feeds:
        expected = [feed[i] for i in range(len(feed))]
        dataset = feed.to_tf_dataset(signature)
        assert dataset.element_spec[0]["in1"].shape.as_list() == [None, None, 1]
        assert int(dataset.cardinality()) == len(feed)
        got = list(dataset.as_numpy_iterator())
        assert len(got) == len(expected)
        for (x, y), (ex, ey) in zip(got, expected, strict=True):
            assert set(x) == set(ex)
            for name in ex:
                np.testing.assert_array_equal(x[name], ex[name])
            np.testing.assert_array_equal(y, ey)
        assert feed.epoch == 1, "a full pass is an epoch"


@pytest.mark.parametrize("padding", ["function", "PadColumns"])
def test_a_repeating_export_serves_every_epoch_from_one_iterator(tmp_path: Path, padding: str) -> None:
    frame = canonical.make_frame(90, seed=1, max_len=64)
    canonical.write_shards(frame, tmp_path, shards=3)
    pad = autobatch.PadColumns(["in1", "in2"], add_feature_axis=True, target_axis=True)
    preprocess = pad if padding == "PadColumns" else (lambda bx, by: pad(bx, by))
    signature = (
        TensorSpec("x/in1", "float32", (None, None, 1)),
        TensorSpec("x/in2", "float32", (None, None, 1)),
        TensorSpec("y", "float32", (None, 1)),
    )
    for make in (
        lambda: InMemoryFeed(frame, "label", batch_size=16, preprocess=preprocess, seed=2),
        lambda: ShardFeed(tmp_path / "parquet", "label", batch_size=16, preprocess=preprocess, seed=2),
    ):
        feed, reference = make(), make()
        feed.set_epoch(3)
        reference.set_epoch(3)
        dataset = feed.to_tf_dataset(signature, repeat=True)
        assert int(dataset.cardinality()) == -1, "infinite: fit it with steps_per_epoch=len(feed)"
        iterator = dataset.as_numpy_iterator()
        for epoch in (3, 4, 5):
            got = [next(iterator) for _ in range(len(feed))]
            want = [reference[i] for i in range(len(reference))]
            assert [len(y) for _, y in got] == [len(y) for _, y in want], f"epoch {epoch}: the last batch is short"
            for (x, y), (ex, ey) in zip(got, want, strict=True):
                for name in ex:
                    np.testing.assert_array_equal(x[name], ex[name])
                np.testing.assert_array_equal(y, ey)
            reference.on_epoch_end()
        assert feed.epoch == 6, "each epoch's last batch advanced the feed"
        assert feed.step_rows(0) is None, "the monitor counts a repeating pass's steps by batch_bounds"
        feed.close()


@pytest.mark.parametrize("batch_size", [90, 16], ids=["one-batch-an-epoch", "several"])
@pytest.mark.parametrize("padding", ["function", "PadColumns"])
@pytest.mark.parametrize("source", ["memory", "parquet", "csv"])
def test_a_bounded_repeating_export_prepares_exactly_its_epochs_and_reads_no_shard_past_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, padding: str, batch_size: int
) -> None:
    from autobatch.feeds.base import BaseFeed

    n = 90
    frame = canonical.make_frame(n, seed=1, max_len=64).assign(id=np.arange(n))
    canonical.write_shards(frame, tmp_path, shards=3)
    pad = autobatch.PadColumns(["in1", "in2"], add_feature_axis=True, target_axis=True)
    counting = [False]  # from the first element on: the signature's look at batch 0 is not a training batch
    ids: list[int] = []
    made: list[tuple[int, int]] = []  # (feed epoch, rows) of every element made, in Python or padded natively
    loads: list[tuple[int, str]] = []  # (epoch, shard file) of every shard read, either way

    def function(batch_x: pd.DataFrame, batch_y: pd.Series) -> Any:
        if counting[0]:
            ids.extend(batch_x["id"].tolist())
        return pad(batch_x, batch_y)

    original = BaseFeed._pass_elements

    def elements(self: BaseFeed, make: Any, rows_log: Any, adaptive: bool) -> Any:
        def counted(lo: int, hi: int, index: int) -> Any:
            made.append((self.epoch, hi - lo))
            return make(lo, hi, index)

        return original(self, counted, rows_log, adaptive)

    monkeypatch.setattr(BaseFeed, "_pass_elements", elements)
    for name in ("_load", "_load_native"):
        read = getattr(ShardFeed, name)

        def loaded(self: ShardFeed, file_index: int, epoch: int, read: Any = read) -> Any:
            if counting[0]:
                loads.append((epoch, self.shards[file_index].path.name))
            return read(self, file_index, epoch)

        monkeypatch.setattr(ShardFeed, name, loaded)
    preprocess = pad if padding == "PadColumns" else function
    options = {"batch_size": batch_size, "preprocess": preprocess, "seed": 2}
    if source == "memory":
        feed: BaseFeed = InMemoryFeed(frame, "label", **options)
    else:
        feed = ShardFeed(tmp_path / source, "label", **options)
    signature = (
        TensorSpec("x/in1", "float32", (None, None, 1)),
        TensorSpec("x/in2", "float32", (None, None, 1)),
        TensorSpec("y", "float32", (None, 1)),
    )
    feed.set_epoch(1)  # as autobatch.fit resumes at initial_epoch=1 of epochs=3: two epochs train
    dataset = feed.to_tf_dataset(signature, repeat=True, epochs=2)
    assert int(dataset.cardinality()) == 2 * len(feed)
    counting[0] = True
    iterator = iter(dataset)
    got = [next(iterator) for _ in range(2 * len(feed))]  # what model.fit(epochs=2, steps_per_epoch=len) takes
    time.sleep(0.3)  # room for the prefetch to run ahead, if the pass went on past its last epoch
    assert [rows for _, rows in made] == [len(y) for _, y in got]
    per_epoch = {epoch: sum(rows for e, rows in made if e == epoch) for epoch, _ in made}
    assert per_epoch == {1: n, 2: n}, "every row once in each epoch that trains, nothing of epoch 3"
    if padding == "function":
        assert sorted(ids) == sorted(2 * list(range(n))), "preprocess saw every sample once per epoch"
    else:
        assert ids == []
    if source != "memory":
        files = [path.name for path in feed.files]
        assert sorted(loads) == sorted((epoch, name) for epoch in (1, 2) for name in files), "no read for epoch 3"
    with pytest.raises(StopIteration):
        next(iterator)
    assert feed.epoch == 3 and len(made) == 2 * len(feed)
    assert getattr(feed, "resident_files", []) == [], "nothing stays loaded after the last epoch"


def test_a_repeating_export_takes_a_positive_number_of_epochs_only_with_repeat() -> None:
    feed = InMemoryFeed(table(20), "label", batch_size=8)
    with pytest.raises(ConfigError) as excinfo:
        feed.to_tf_dataset(epochs=2)
    assert "pass repeat=True with it" in str(excinfo.value) and "epochs=2, repeat=False" in str(excinfo.value)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError) as excinfo:
            feed.to_tf_dataset(repeat=True, epochs=bad)
        assert f"Received: epochs={bad!r}" in str(excinfo.value)
    assert int(feed.to_tf_dataset(repeat=True).cardinality()) == -1, "without epochs: without end"


def test_repeat_needs_the_same_batches_every_epoch() -> None:
    from autobatch.feeds.size_aware import SizeAwareFeed

    frame = canonical.make_frame(60, seed=1, max_len=64)
    feed = InMemoryFeed(frame, "label", batch_size=16, preprocess=_sequence_preprocess)
    with pytest.raises(ConfigError, match="repeat=True needs the same batches every epoch.*adaptive=True"):
        feed.to_tf_dataset(repeat=True, adaptive=True)
    sized = SizeAwareFeed(
        frame, "label", boundaries=[32, 64], batch_sizes=[16, 8], preprocess=_sequence_preprocess
    )
    with pytest.raises(ConfigError, match="a SizeAwareFeed, whose batches per epoch vary"):
        sized.to_tf_dataset(repeat=True)


def test_to_tf_dataset_infers_varying_axes_and_carries_sample_weights() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 30, size=40)
    frame = pd.DataFrame({"in1": [np.ones(k, np.float32) for k in lengths], "in2": [np.ones(3, np.float32)] * 40})
    frame["label"] = rng.integers(0, 2, 40)
    feed = InMemoryFeed(frame, "label", batch_size=8, preprocess=_sequence_preprocess, sample_weight=np.ones(40))
    dataset = feed.to_tf_dataset()
    x_spec, y_spec, w_spec = dataset.element_spec
    assert x_spec["in1"].shape.as_list() == [None, None, 1]  # differs between the first two batches
    assert x_spec["in2"].shape.as_list() == [None, 3, 1]
    assert w_spec.shape.as_list() == [None]
    assert sum(len(w) for _, _, w in dataset.as_numpy_iterator()) == 40


def test_to_tf_dataset_reports_a_batch_that_breaks_an_inferred_signature() -> None:
    import tensorflow as tf

    lengths = [3] * 8 + [9] * 8  # the first batch alone suggests a fixed length of 3
    frame = pd.DataFrame({"in1": [np.ones(k, np.float32) for k in lengths], "label": np.zeros(16)})
    feed = InMemoryFeed(
        frame, "label", batch_size=8, shuffle=False, preprocess=lambda x, y: (pad_columns(x, ["in1"]), y.to_numpy())
    )
    dataset = feed.to_tf_dataset(infer_batches=1)
    assert dataset.element_spec[0]["in1"].shape.as_list() == [None, 3]
    expected = r"PreprocessError: batch 1 of epoch 0 gives x/in1 the shape \(8, 9\)"
    with pytest.raises(tf.errors.UnknownError, match=expected):
        list(dataset.as_numpy_iterator())
    relaxed = feed.to_tf_dataset(infer_batches=2)  # both batches seen: that axis varies
    assert relaxed.element_spec[0]["in1"].shape.as_list() == [None, None]
    assert [x["in1"].shape[1] for x, _ in relaxed.as_numpy_iterator()] == [3, 9]


def test_batch_larger_than_the_probed_worst_case_logs_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    # The default preprocess gives 24 bytes per sample here (id int64, a and b float32, label int64).
    with caplog.at_level("WARNING", logger="autobatch.feeds.checks"):
        InMemoryFeed(table(40), "label", batch_size=10, max_batch_bytes=240)[0]
        assert not caplog.records
        feed = InMemoryFeed(table(40), "label", batch_size=10, max_batch_bytes=200)
        feed[0]
        feed[1]
    assert len(caplog.records) == 1, "warned once per feed"
    assert "more than the 200 B of the probe's worst-case batch" in caplog.records[0].getMessage()


# --------------------------------------------------------------------------- Keras fit


def _two_input_model(width_1: int, width_2: int) -> keras.Model:
    in1 = keras.Input((width_1,), name="in1")
    in2 = keras.Input((width_2,), name="in2")
    hidden = keras.layers.Dense(16, activation="relu")(keras.layers.Concatenate()([in1, in2]))
    model = keras.Model({"in1": in1, "in2": in2}, keras.layers.Dense(1, activation="sigmoid")(hidden))
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="binary_crossentropy")
    return model


def test_two_input_model_learns_from_an_in_memory_feed() -> None:
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    in1 = rng.standard_normal((600, 8)).astype(np.float32)
    in2 = rng.standard_normal((600, 4)).astype(np.float32)
    y = (in1.sum(axis=1) - 2 * in2.sum(axis=1) > 0).astype(np.float32)
    train, val = InMemoryFeed({"in1": in1, "in2": in2}, y, batch_size=32, seed=0).split(0.2)
    history = model_history = _two_input_model(8, 4).fit(train, validation_data=val, epochs=2, verbose=0)
    losses = model_history.history["loss"]
    assert losses[1] < losses[0] * 0.9, losses
    assert history.history["val_loss"][1] < history.history["val_loss"][0]


def test_canonical_sequence_model_trains_from_csv_shards(tmp_path: Path) -> None:
    keras.utils.set_random_seed(0)
    frame = canonical.make_frame(240, seed=5, max_len=64)
    canonical.write_shards(frame, tmp_path, shards=5)
    feed = ShardFeed(tmp_path / "csv", "label", batch_size=24, preprocess=_sequence_preprocess, seed=0)
    model = canonical.build_model()
    history = model.fit(feed, epochs=2, shuffle=False, verbose=0)  # the feed shuffles; Keras reads in order
    losses = history.history["loss"]
    assert losses[1] < losses[0], losses
    assert feed.epoch >= 2, "Keras advanced the feed's epoch (it also calls on_epoch_end once as fit starts)"


# --------------------------------------------------------------------------- make_feed(plan=...)


def _probe_result(source: str, *, raw_bytes: int, signature: tuple[TensorSpec, ...]) -> ProbeResult:
    return ProbeResult(
        n_samples=100,
        source=source,  # type: ignore[arg-type]
        raw_bytes=raw_bytes,
        raw_bytes_per_sample=raw_bytes / 100,
        raw_scope="test",
        largest_shard_raw_bytes=4096 if source == "shards" else 0,
        sample_batch_size=32,
        preprocessed_bytes_per_sample=24.0,
        worst_preprocessed_bytes_per_sample=24.0,
        worst_scope="test",
        preprocess_peak_bytes_per_sample=48.0,
        output_signature=signature,
        device="none",
    )


DEFAULT_SIGNATURE = (
    TensorSpec("x/id", "int64", (None,)),
    TensorSpec("x/a", "float32", (None,)),
    TensorSpec("x/b", "float32", (None,)),
    TensorSpec("y", "int64", (None,)),
)


def test_make_feed_with_a_plan_builds_the_feed_for_its_strategy(tmp_path: Path) -> None:
    frame = table(100)
    folder = write_shards(frame, tmp_path / "pq", SIZES, "parquet")
    host = [Budget("host", 2**30, "test")]
    probed = _probe_result("in_memory", raw_bytes=8000, signature=DEFAULT_SIGNATURE)
    in_memory = make_plan(probed, host, max_batch_size=16)
    assert in_memory.strategy == "in_memory"
    feed = make_feed(frame, "label", plan=in_memory)
    assert isinstance(feed, InMemoryFeed) and feed.batch_size == 16 and len(feed) == in_memory.steps_per_epoch
    assert feed.max_queue_size == in_memory.queue_batches
    streaming = make_plan(
        _probe_result("shards", raw_bytes=2 * 2**30, signature=DEFAULT_SIGNATURE), host, max_batch_size=16
    )
    assert streaming.strategy == "stream"
    train, val = make_feed(folder, "label", plan=streaming, validation_split=0.2, seed=1)
    assert isinstance(train, ShardFeed) and train.batch_size == 16
    assert_exactly_once(epoch_ids(train) + epoch_ids(val), frame["id"].to_numpy())
    with pytest.warns(UserWarning, match="budgets 2 waiting"):
        make_feed(frame, "label", plan=in_memory, workers=2, max_queue_size=4)


def test_make_feed_with_a_plan_checks_batches_against_the_probed_signature() -> None:
    probed = (TensorSpec("x/a", "float32", (None,)), TensorSpec("y", "float32", (None,)))
    plan: Plan = make_plan(
        _probe_result("in_memory", raw_bytes=8000, signature=probed), [Budget("host", 2**30, "t")], max_batch_size=8
    )
    feed = make_feed(table(100), "label", plan=plan)  # the default preprocess gives x/id, x/a, x/b and an int64 y
    with pytest.raises(PreprocessError, match="the batch the probe measured"):
        feed[0]


def test_make_feed_with_a_plan_sets_its_defaults_and_the_caller_may_override_them(tmp_path: Path) -> None:
    folder = write_shards(table(100), tmp_path / "pq", SIZES, "parquet")
    host = [Budget("host", 2**30, "test")]
    streaming = make_plan(
        _probe_result("shards", raw_bytes=2 * 2**30, signature=DEFAULT_SIGNATURE), host, max_batch_size=16
    )
    feed = make_feed(folder, "label", plan=streaming)
    assert isinstance(feed, ShardFeed) and feed.output_signature == DEFAULT_SIGNATURE
    assert feed.max_batch_bytes == math.ceil(streaming.probe.worst_preprocessed_bytes_per_sample * 16)
    loaded = make_feed(folder, "label", plan=streaming, strategy="in_memory", max_queue_size=1)
    assert isinstance(loaded, InMemoryFeed) and loaded.batch_size == 16 and loaded.max_queue_size == 1
    with pytest.warns(UserWarning, match="budgets 2 waiting") as record:
        make_feed(folder, "label", plan=streaming, workers=3)
    assert record[0].filename == __file__, "the warning points at the caller's make_feed"


def test_make_feed_needs_exactly_one_of_plan_and_batch_size() -> None:
    plan = make_plan(
        _probe_result("in_memory", raw_bytes=8000, signature=DEFAULT_SIGNATURE), [Budget("host", 2**30, "t")]
    )
    with pytest.raises(ConfigError) as both:
        make_feed(table(10), "label", plan=plan, batch_size=4)
    assert "not both" in str(both.value) and "batch_size=4" in str(both.value)
    with pytest.raises(ConfigError) as neither:
        make_feed(table(10), "label")
    assert "needs `plan`" in str(neither.value) and "Received: neither" in str(neither.value)


def test_size_aware_functions_need_a_bucket_plan_or_the_buckets() -> None:
    from autobatch.feeds.size_aware import bucket_by_sequence_length, make_size_aware_feed

    plan = make_plan(
        _probe_result("in_memory", raw_bytes=8000, signature=DEFAULT_SIGNATURE), [Budget("host", 2**30, "t")]
    )
    frame = canonical.make_frame(20, seed=1, max_len=16)
    with pytest.raises(ConfigError) as fixed:
        make_size_aware_feed(frame, "label", plan=plan)
    assert "needs a size-aware plan" in str(fixed.value) and "make_feed(x, y, plan=plan)" in str(fixed.value)
    with pytest.raises(ConfigError) as both:
        make_size_aware_feed(frame, "label", plan=plan, boundaries=[8, 16], batch_sizes=[4, 2])
    assert "not both" in str(both.value)
    with pytest.raises(ConfigError) as partly:
        make_size_aware_feed(frame, "label", boundaries=[8, 16])
    assert "Received: neither plan nor batch_sizes" in str(partly.value)
    with pytest.raises(ConfigError) as neither:
        bucket_by_sequence_length(None, len)
    assert "bucket_by_sequence_length needs `plan`" in str(neither.value)
    assert "neither plan nor boundaries and batch_sizes" in str(neither.value)


def test_plan_module_does_not_import_feeds() -> None:
    tree = ast.parse((ROOT / "autobatch" / "plan.py").read_text())
    top_level = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    modules = [getattr(node, "module", None) or node.names[0].name for node in top_level]
    assert not [m for m in modules if m and m.startswith("autobatch.feeds")], modules


# --------------------------------------------------------------------------- bad values: named by file, column and row


def _pad_in1(batch_x: pd.DataFrame, batch_y: pd.Series):
    return pad_columns(batch_x, ["in1"], maxlen=None), batch_y.to_numpy("float32")


def _sequence_shards(tmp_path: Path, bad_cell: str) -> tuple[Path, int]:
    """Three CSV shards of 10 rows with "in1" as space-separated numbers; one cell of 1.csv replaced."""
    frame = table(30).assign(in1=[" ".join(str(v) for v in range(1 + i % 4)) for i in range(30)])
    folder = write_shards(frame.drop(columns=["a", "b"]), tmp_path / "csv", (10, 10, 10), "csv")
    shard = pd.read_csv(folder / "1.csv")
    shard.loc[7, "in1"] = bad_cell
    shard.to_csv(folder / "1.csv", index=False)
    return folder, 7


def test_a_cell_that_is_not_a_number_names_shard_column_and_row(tmp_path: Path) -> None:
    folder, row = _sequence_shards(tmp_path, "1.0 abc 2")
    feed = ShardFeed(folder, "label", batch_size=4, preprocess=_pad_in1, seed=1)  # shuffled files and rows
    with pytest.raises(DataError) as excinfo:
        for i in range(len(feed)):
            feed[i]
    message = str(excinfo.value)
    assert "column 'in1'" in message and "holds 'abc', which is not a float32 number" in message, message
    assert f"row {row} of shard {str(folder / '1.csv')!r}" in message, message


def test_a_missing_sequence_cell_names_the_data_row(tmp_path: Path) -> None:
    frame = table(20).assign(in1=[[1.0] * (1 + i % 3) for i in range(20)])
    frame.loc[13, "in1"] = np.nan
    frame.index = [f"r{i}" for i in range(20)]
    feed = InMemoryFeed(frame.drop(columns=["a", "b"]), "label", batch_size=6, preprocess=_pad_in1, seed=0)
    with pytest.raises(DataError) as excinfo:
        for i in range(len(feed)):
            feed[i]
    message = str(excinfo.value)
    assert "is missing (NaN" in message and "row 13 of the data (index label 'r13')" in message, message


def test_text_in_a_numeric_csv_column_names_file_column_and_row(tmp_path: Path) -> None:
    folder = write_shards(table(20), tmp_path / "csv", (10, 10), "csv")
    shard = pd.read_csv(folder / "1.csv")
    shard["a"] = shard["a"].astype(object)
    shard.loc[4, "a"] = "n/a?"
    shard.to_csv(folder / "1.csv", index=False)
    feed = ShardFeed(folder, "label", batch_size=5, shuffle=False)  # the default preprocess: columns to arrays
    for i in range(2):
        feed[i]
    with pytest.raises(DataError) as excinfo:
        for i in range(2, len(feed)):
            feed[i]
    message = str(excinfo.value)
    assert "column 'a' of x holds 'n/a?'" in message and "not a number" in message, message
    assert f"row 4 of shard {str(folder / '1.csv')!r}" in message, message


def _nan_table(where: str, value: float) -> pd.DataFrame:
    frame = table(30)
    column = "a" if where == "x" else "label"
    frame[column] = frame[column].astype(np.float32)
    frame.loc[17, column] = value
    return frame


@pytest.mark.parametrize(("where", "value", "name"), [("x", np.nan, "x/a"), ("y", np.inf, "y")])
def test_nan_policy_error_names_array_and_row(where: str, value: float, name: str) -> None:
    feed = InMemoryFeed(_nan_table(where, value), "label", batch_size=8, nan_policy="error", shuffle=False)
    feed[0]
    with pytest.raises(DataError) as excinfo:
        feed[2]
    message = str(excinfo.value)
    assert f"{name} holds 1 NaN/inf value(s) in 1 row(s) on batch 2 (rows 16-23" in message, message
    assert "the first is row 1 of the batch (row 17 of the data (index label 17))" in message, message


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_nonfinite_rows_finds_nan_and_inf_but_not_a_sum_that_overflows(dtype) -> None:
    from autobatch.feeds.checks import _nonfinite_rows

    big = np.finfo(dtype).max / 2
    array = np.full((4, 3), big, dtype=dtype)  # finite, but the sum overflows the dtype
    assert _nonfinite_rows(array) is None
    array[2, 1] = np.nan
    array[3, 0] = -np.inf
    np.testing.assert_array_equal(_nonfinite_rows(array), [False, False, True, True])
    assert _nonfinite_rows(np.arange(6, dtype=np.int32).reshape(2, 3)) is None


def test_nan_policy_warn_warns_once_and_counts_every_batch() -> None:
    frame = _nan_table("x", np.nan)
    frame.loc[3, "b"] = -np.inf
    feed = InMemoryFeed(frame, "label", batch_size=8, shuffle=False)  # "warn" is the default
    with pytest.warns(RuntimeWarning) as record:
        batches = [feed[i] for i in range(len(feed))]
    messages = [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 2, messages  # once per array: x/b in batch 0, x/a in batch 2
    assert "x/b holds 1 NaN/inf value(s)" in messages[0] and "x/a holds 1" in messages[1]
    assert feed.stats.nonfinite_batches == 2
    assert np.isnan(batches[2][0]["a"][1]), "warn passes the batch through unchanged"


def test_nan_policy_ignore_and_bad_values() -> None:
    import warnings

    feed = InMemoryFeed(_nan_table("x", np.nan), "label", batch_size=8, nan_policy="ignore")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i in range(len(feed)):
            feed[i]
    assert feed.stats.nonfinite_batches == 0
    with pytest.raises(ConfigError) as excinfo:
        InMemoryFeed(table(10), "label", batch_size=4, nan_policy="raise")  # type: ignore[arg-type]
    assert "nan_policy" in str(excinfo.value)


def test_an_empty_csv_cell_is_a_nan_named_by_shard_row(tmp_path: Path) -> None:
    folder = write_shards(table(20), tmp_path / "csv", (10, 10), "csv")
    text = (folder / "1.csv").read_text().splitlines()
    cells = text[6].split(",")
    cells[1] = ""  # column "a" of the shard's data row 5
    text[6] = ",".join(cells)
    (folder / "1.csv").write_text("\n".join(text) + "\n")
    feed = ShardFeed(folder, "label", batch_size=4, nan_policy="error", seed=3)
    with pytest.raises(DataError) as excinfo:
        for i in range(len(feed)):
            feed[i]
    assert f"(row 5 of shard {str(folder / '1.csv')!r}" in str(excinfo.value), str(excinfo.value)


def test_truncation_to_maxlen_is_reported_and_counted_over_the_epoch() -> None:
    lengths = np.array([3, 9, 12, 5, 8, 20, 1, 9])
    frame = pd.DataFrame(
        {"in1": [np.ones(k, np.float32) for k in lengths], "in2": [np.ones(2, np.float32)] * 8, "label": np.zeros(8)}
    )

    def preprocess(batch_x, batch_y):
        return pad_columns(batch_x, ["in1", "in2"], maxlen=8), batch_y.to_numpy()

    feed = InMemoryFeed(frame, "label", batch_size=3, preprocess=preprocess, shuffle=False)
    with pytest.warns(UserWarning, match=r"truncated 2 sequence\(s\) longer than maxlen on batch 0") as record:
        for i in range(len(feed)):
            feed[i]
    assert len([w for w in record if "truncated" in str(w.message)]) == 1, "warned once"
    assert "'in1' cut to 8: 2" in str(record[0].message)
    assert feed.stats.truncated_sequences == int((lengths > 8).sum()) == 4
    assert feed.stats.truncated_by_column == {"in1": 4}


# --------------------------------------------------------------------------- no data loss: interrupted epochs


def _fail_once_at(error: BaseException):
    """A preprocess that raises `error` the first time it meets one of the ids in `state["ids"]` while armed."""
    state = {"armed": True}

    def preprocess(batch_x: pd.DataFrame, batch_y: pd.Series):
        if state["armed"] and batch_x["id"].isin(state["ids"]).any():
            state["armed"] = False
            raise error
        return {"id": batch_x["id"].to_numpy()}, batch_y.to_numpy()

    return preprocess, state


@pytest.mark.parametrize("error", [KeyboardInterrupt(), RuntimeError("disk hiccup")], ids=["ctrl-c", "exception"])
@pytest.mark.parametrize("kind", ["in_memory", "shards"])
def test_an_interrupted_epoch_is_served_again_whole(tmp_path: Path, kind: str, error: BaseException) -> None:
    frame = table(100)
    preprocess, state = _fail_once_at(error)
    if kind == "shards":
        feed = ShardFeed(write_shards(frame, tmp_path / "pq", SIZES, "parquet"), "label", batch_size=10,
                         preprocess=preprocess, seed=5)
    else:
        feed = InMemoryFeed(frame, "label", batch_size=10, preprocess=preprocess, seed=5)
    state["armed"] = False
    planned = [np.asarray(feed[i][0]["id"]) for i in range(len(feed))]  # the epoch's batches, as they will be served
    state["armed"], state["ids"] = True, planned[4]
    expected = (PreprocessError,) if isinstance(error, Exception) else (KeyboardInterrupt,)
    with pytest.raises(expected):
        for i in range(len(feed)):
            feed[i]
    assert feed.epoch == 0, "an interrupted epoch does not count"
    again = epoch_ids(feed)  # the same epoch from its first batch, then on to the next
    for got, want in zip(again, planned, strict=True):
        np.testing.assert_array_equal(got, want)
    assert_exactly_once(again, frame["id"].to_numpy())
    assert_exactly_once(epoch_ids(feed), frame["id"].to_numpy())
    if kind == "shards":
        feed.close()


def test_an_interrupted_tf_data_pass_leaves_the_epoch_to_be_served_again(tmp_path: Path) -> None:
    import tensorflow as tf

    frame = table(100)
    preprocess, state = _fail_once_at(ValueError("bad batch"))
    feed = ShardFeed(write_shards(frame, tmp_path / "pq", SIZES, "parquet"), "label", batch_size=10,
                     preprocess=preprocess, seed=2)
    state["armed"] = False
    state["ids"] = np.asarray(feed[6][0]["id"])
    dataset = feed.to_tf_dataset(infer_batches=1, prefetch=2)
    state["armed"] = True
    with pytest.raises(tf.errors.UnknownError, match="preprocess raised ValueError: bad batch on batch 6"):
        list(dataset.as_numpy_iterator())
    assert feed.epoch == 0 and isinstance(feed._pop_failure(), PreprocessError)
    first = [x["id"] for x, _ in dataset.as_numpy_iterator()]
    assert feed.epoch == 1, "a complete pass is an epoch"
    assert_exactly_once(first, frame["id"].to_numpy())
    second = [x["id"] for x, _ in dataset.as_numpy_iterator()]
    assert_exactly_once(second, frame["id"].to_numpy())
    assert not np.array_equal(np.concatenate(first), np.concatenate(second))
    feed.close()


def test_keras_fit_interrupted_by_ctrl_c_resumes_with_a_whole_epoch() -> None:
    keras.utils.set_random_seed(0)
    frame = table(200)
    served, recording = [], [True]

    def preprocess(batch_x: pd.DataFrame, batch_y: pd.Series):
        if recording[0]:
            served.extend(batch_x["id"].tolist())
        return {"a": batch_x["a"].to_numpy(), "b": batch_x["b"].to_numpy()}, batch_y.to_numpy("float32")

    feed = InMemoryFeed(frame, "label", batch_size=16, preprocess=preprocess, seed=1)
    dataset = feed.to_tf_dataset(prefetch=2)
    a, b = keras.Input((), name="a"), keras.Input((), name="b")
    joined = keras.layers.Concatenate()([keras.layers.Reshape((1,))(a), keras.layers.Reshape((1,))(b)])
    model = keras.Model({"a": a, "b": b}, keras.layers.Dense(1, activation="sigmoid")(joined))
    model.compile("sgd", "binary_crossentropy")

    class CtrlC(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 5:
                raise KeyboardInterrupt  # what Ctrl-C raises in the main thread, between two steps

    with pytest.raises(KeyboardInterrupt):
        model.fit(dataset, epochs=3, verbose=0, callbacks=[CtrlC()])
    assert feed.epoch == 0, "the interrupted epoch 0 is not over"
    import gc

    gc.collect()
    del served[:]
    history = model.fit(dataset, epochs=2, verbose=0)
    assert len(history.history["loss"]) == 2 and feed.epoch == 2
    assert len(served) == 2 * 200
    for epoch in range(2):
        assert sorted(served[epoch * 200 : (epoch + 1) * 200]) == list(range(200))


@pytest.mark.parametrize("prefetch", [2, 0])
def test_tf_dataset_prefetches_the_fixed_number_of_batches_with_autotuning_off(prefetch: int) -> None:
    frame = table(200)
    made: list[int] = []

    def preprocess(batch_x: pd.DataFrame, batch_y: pd.Series):
        made.append(len(batch_x))
        return {"a": batch_x["a"].to_numpy()}, batch_y.to_numpy("float32")

    feed = InMemoryFeed(frame, "label", batch_size=10, preprocess=preprocess, seed=1)
    dataset = feed.to_tf_dataset(prefetch=prefetch)
    assert dataset.options().autotune.enabled is False
    made.clear()  # the signature look
    iterator = iter(dataset)
    next(iterator)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(made) < 1 + prefetch:
        time.sleep(0.01)
    time.sleep(0.3)  # room to run further ahead than the buffer, if it could
    # The element handed out, the buffer, and at most one batch the producer is making for a full buffer.
    assert 1 + prefetch <= len(made) <= 2 + prefetch
    assert sum(len(x["a"]) for x, _ in iterator) == 200 - 10


def test_tf_dataset_with_autotune_prefetch_keeps_tf_data_autotuning() -> None:
    feed = InMemoryFeed(table(50), "label", batch_size=10, seed=1)
    dataset = feed.to_tf_dataset(prefetch="autotune")
    assert dataset.options().autotune.enabled is not False
    assert sum(int(y.shape[0]) for _, y in dataset) == 50
    assert feed.to_tf_dataset().options().autotune.enabled is False, "the default is a fixed prefetch of 2"


# --------------------------------------------------------------------------- PadColumns: padded by TensorFlow


def sequences(n: int = 150, *, seed: int = 0, features: int | None = None) -> pd.DataFrame:
    """``s1`` (float32 arrays, some empty) and ``s2`` (lists of floats) of lengths 0-60, ``id`` and a label,
    indexed by labels that are not positions."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 61, size=(n, 2))
    lengths[::17, 0] = 0
    shape = (lambda k: (k,)) if features is None else (lambda k: (k, features))
    return pd.DataFrame(
        {
            "id": np.arange(n),
            "s1": [rng.standard_normal(shape(k)).astype(np.float32) for k in lengths[:, 0]],
            "s2": [rng.standard_normal(k).round(3).tolist() for k in lengths[:, 1]],
            "label": rng.integers(0, 2, n).astype(np.float64),
        },
        index=pd.RangeIndex(1000, 1000 + n),
    )


SEQUENCES_SIGNATURE = (
    TensorSpec("x/s1", "float32", (None, None)),
    TensorSpec("x/s2", "float32", (None, None)),
    TensorSpec("y", "float32", (None,)),
)


def _epochs_of(dataset: Any, epochs: int) -> list[list[np.ndarray]]:
    import tensorflow as tf

    return [[np.asarray(a) for a in tf.nest.flatten(element)] for _ in range(epochs) for element in dataset]


def _assert_same_batches(got: list[list[np.ndarray]], want: list[list[np.ndarray]]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        for x, y in zip(a, b, strict=True):
            assert x.dtype == y.dtype and x.shape == y.shape
            np.testing.assert_array_equal(x, y)


def _assert_same_accounts(native: Any, python: Any, epochs: int) -> None:
    """The two feeds served ``epochs`` epochs and counted the same batches and truncations."""
    assert native.epoch == python.epoch == epochs
    assert native.stats.batches == python.stats.batches == epochs * len(native)
    assert native.stats.truncated_sequences == python.stats.truncated_sequences
    assert native.stats.truncated_by_column == python.stats.truncated_by_column


def _native_and_python(frame: pd.DataFrame, pad: autobatch.PadColumns, **options: Any) -> tuple[InMemoryFeed, ...]:
    """The same feed twice: ``pad`` itself (TensorFlow pads) and ``pad`` wrapped in a function (Python pads)."""
    return tuple(
        InMemoryFeed(frame, "label", batch_size=32, preprocess=p, seed=5, **options)
        for p in (pad, lambda bx, by: pad(bx, by))
    )


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"maxlen": 25},
        {"maxlen": 25, "truncating": "post", "bucket": 8},
        {"bucket": "pow2", "value": -1.0, "dtype": "float64", "target_axis": True},
        {"maxlen": 70, "target_dtype": None},
    ],
)
def test_pad_columns_feed_pads_in_tensorflow_the_batches_python_pads(options: dict[str, Any]) -> None:
    pad = autobatch.PadColumns(["s1", "s2"], add_feature_axis=True, **options)
    native, python = _native_and_python(sequences(), pad)
    with pytest.warns(UserWarning, match="truncated") if options.get("maxlen") == 25 else contextlib.nullcontext():
        got = _epochs_of(native.to_tf_dataset(infer_batches=10), 2)
    assert native.native_bytes > 0, "TensorFlow padded these batches"
    with pytest.warns(UserWarning, match="truncated") if options.get("maxlen") == 25 else contextlib.nullcontext():
        want = _epochs_of(python.to_tf_dataset(infer_batches=10), 2)
    assert len(got) == 2 * len(native)
    _assert_same_batches(got, want)
    _assert_same_accounts(native, python, 2)
    if options.get("maxlen") == 25:
        assert native.stats.truncated_sequences > 0
    assert native.native_bytes == pad.export_bytes(sequences().drop(columns="label"), sequences()["label"])


def test_pad_columns_feed_pads_feature_cells_weights_and_split_rows_as_python_does() -> None:
    frame = sequences(features=3)
    frame["s2"] = frame["s2"].map(lambda v: " ".join(map(str, v)))  # CSV-style text cells
    weights = np.linspace(0.5, 1.5, len(frame)).astype(np.float32)
    pad = autobatch.PadColumns(["s1", "s2"], target_axis=True)
    native, python = _native_and_python(frame, pad, sample_weight=weights)
    for whole, part in zip(native.split(0.3), python.split(0.3), strict=True):
        got = _epochs_of(whole.to_tf_dataset(infer_batches=10), 2)
        want = _epochs_of(part.to_tf_dataset(infer_batches=10), 2)
        assert whole.native_bytes > 0
        for a, b in zip(got, want, strict=True):
            assert len(a) == 4  # s1, s2, targets, weights
            for x, y in zip(a, b, strict=True):
                np.testing.assert_array_equal(x, y)


def test_pad_columns_with_pre_padding_pads_in_python() -> None:
    pad = autobatch.PadColumns(["s1", "s2"], padding="pre", add_feature_axis=True)
    native, python = _native_and_python(sequences(), pad)
    got = _epochs_of(native.to_tf_dataset(infer_batches=10), 1)
    want = _epochs_of(python.to_tf_dataset(infer_batches=10), 1)
    assert native.native_bytes == 0 and not pad.pads_in_tensorflow and pad.export_bytes(sequences(), None) == 0
    for a, b in zip(got, want, strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)


def test_pad_columns_feed_names_the_data_row_of_nan_values() -> None:
    import tensorflow as tf

    frame = sequences()
    frame.at[1018, "s1"] = np.where(np.arange(len(frame.at[1018, "s1"])) == 2, np.nan, frame.at[1018, "s1"]).astype(
        np.float32
    )
    pad = autobatch.PadColumns(["s1", "s2"])
    feed = InMemoryFeed(frame, "label", batch_size=32, preprocess=pad, nan_policy="error", seed=5)
    dataset = feed.to_tf_dataset(SEQUENCES_SIGNATURE)
    with pytest.raises(tf.errors.OpError, match=r"x/s1 holds 1 NaN/inf value\(s\) in 1 row\(s\).*row 18 of the "
                       r"data \(index label 1018\)"):
        list(dataset)
    assert isinstance(feed._pop_failure(), DataError) and feed.epoch == 0
    warned = InMemoryFeed(frame, "label", batch_size=32, preprocess=pad, seed=5)
    with pytest.warns(RuntimeWarning, match="x/s1 holds 1 NaN/inf"):
        list(warned.to_tf_dataset(SEQUENCES_SIGNATURE))
    assert warned.stats.nonfinite_batches == 1 and warned.native_bytes > 0


def test_pad_columns_feed_names_the_column_and_row_of_a_cell_that_is_not_numbers() -> None:
    frame = sequences()
    frame["s2"] = frame["s2"].map(lambda v: " ".join(map(str, v)))
    frame.at[1040, "s2"] = "1.0 abc 2"
    feed = InMemoryFeed(frame, "label", batch_size=32, preprocess=autobatch.PadColumns(["s1", "s2"]), shuffle=False)
    with pytest.raises(DataError, match=r"column 's2', row 40 of the data \(index label 1040\)"):
        feed.to_tf_dataset(SEQUENCES_SIGNATURE)


def test_pad_columns_is_the_preprocess_it_describes_and_checks_its_options() -> None:
    frame = sequences(20)
    inputs, targets = autobatch.PadColumns("s1", maxlen=10, target_axis=True)(frame, frame["label"])
    np.testing.assert_array_equal(inputs["s1"], pad_columns(frame, ["s1"], maxlen=10)["s1"])
    assert targets.shape == (20, 1) and targets.dtype == np.float32
    with pytest.raises(ConfigError, match="truncating"):
        autobatch.PadColumns(["s1"], truncating="middle")
    with pytest.raises(ConfigError, match="at least one column"):
        autobatch.PadColumns([])


def test_pad_columns_with_dict_targets_pads_in_python_and_decides_once() -> None:
    frame = sequences(64)
    targets = {"label": frame["label"].to_numpy(), "id": frame["id"].to_numpy()}
    feed = InMemoryFeed(frame[["s1", "s2"]], targets, batch_size=16, preprocess=autobatch.PadColumns(["s1"]), seed=1)
    for _ in range(2):
        elements = list(feed.to_tf_dataset(infer_batches=4))
        assert feed._native is False and feed.native_bytes == 0
    assert sum(len(y["id"]) for _, y in elements) == 64


# --------------------------------------------------------------------------- PadColumns on shards: padded by TensorFlow


def sequence_shards(folder: Path, fmt: str, frame: pd.DataFrame | None = None) -> Path:
    """:func:`sequences` as uneven numbered shards (CSV cells as space-separated text, as CSV shards hold them)."""
    frame = (sequences() if frame is None else frame).reset_index(drop=True)
    if fmt == "csv":  # an empty cell reads as NaN, which is an error: give those rows one step
        frame = frame.copy()
        for name in ("s1", "s2"):
            frame[name] = frame[name].map(lambda v: " ".join(map(str, np.asarray(v).ravel().tolist())) or "0.5")
    return write_shards(frame, folder, (37, 1, 60, 25, 27), fmt)


def _native_and_python_shards(folder: Path, pad: autobatch.PadColumns, **options: Any) -> tuple[ShardFeed, ...]:
    """The same shard feed twice: ``pad`` itself (TensorFlow pads) and ``pad`` wrapped in a function (Python pads)."""
    options = {"batch_size": 32, "seed": 5, "target": "label", **options}
    return tuple(ShardFeed(folder, preprocess=p, **options) for p in (pad, lambda bx, by: pad(bx, by)))


def _count_native_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    loads: list[str] = []
    original = ShardFeed._load_native

    def counted(self: ShardFeed, file_index: int, epoch: int) -> Any:
        loads.append(self.shards[file_index].path.name)
        return original(self, file_index, epoch)

    monkeypatch.setattr(ShardFeed, "_load_native", counted)
    return loads


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"maxlen": 25, "shuffle": False},
        {"maxlen": 25, "truncating": "post", "bucket": 8},
        {"bucket": "pow2", "value": -1.0, "dtype": "float64", "target_axis": True, "read_ahead": 2},
        {"read_ahead": 0, "drop_remainder": True, "target": ["label", "id"]},  # a 2-D targets array
    ],
)
def test_pad_columns_shard_feed_pads_in_tensorflow_the_batches_python_pads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str, options: dict[str, Any]
) -> None:
    feed_options = {k: options.pop(k) for k in ("shuffle", "read_ahead", "drop_remainder", "target") if k in options}
    folder = sequence_shards(tmp_path / fmt, fmt)
    pad = autobatch.PadColumns(["s1", "s2"], add_feature_axis=True, **options)
    native, python = _native_and_python_shards(folder, pad, **feed_options)
    loads = _count_native_loads(monkeypatch)
    truncates = pytest.warns(UserWarning, match="truncated") if options.get("maxlen") else contextlib.nullcontext()
    with truncates:
        got = _epochs_of(native.to_tf_dataset(infer_batches=10), 2)
    names = [p.name for p in native.files]
    if native.drop_remainder:  # the rows dropped at the end of an epoch may leave a shard unread
        assert set(loads) <= set(names) and max(map(loads.count, loads)) <= 2
    else:
        assert sorted(loads) == sorted(2 * names), "every shard read natively once per epoch"
    native_loads = len(loads)
    with truncates:
        want = _epochs_of(python.to_tf_dataset(infer_batches=10), 2)
    assert len(loads) == native_loads, "the Python path reads no shard natively"
    assert len(got) == 2 * len(native) == 2 * (150 // 32 if native.drop_remainder else math.ceil(150 / 32))
    _assert_same_batches(got, want)
    _assert_same_accounts(native, python, 2)
    if options.get("maxlen"):
        assert native.stats.truncated_sequences > 0
    assert native.resident_files == [], "nothing stays loaded between epochs"


def test_pad_columns_shard_feed_pads_weights_feature_cells_and_validation_shards_as_python_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    frame = sequences(features=3).reset_index(drop=True)
    frame["s1"] = frame["s1"].map(lambda cell: cell.tolist())  # Parquet stores 2-D cells as lists of lists
    frame["w"] = np.linspace(0.5, 1.5, len(frame)).astype(np.float32)
    folder = sequence_shards(tmp_path / "pq", "parquet", frame)
    pad = autobatch.PadColumns(["s1", "s2"], target_axis=True)
    native, python = _native_and_python_shards(folder, pad, sample_weight="w")
    loads = _count_native_loads(monkeypatch)
    for whole, part in zip(native.split(0.3, seed=1), python.split(0.3, seed=1), strict=True):
        got = _epochs_of(whole.to_tf_dataset(infer_batches=10), 2)
        want = _epochs_of(part.to_tf_dataset(infer_batches=10), 2)
        assert len(got) == 2 * len(whole)
        assert all(len(a) == 4 and a[0].shape[2:] == (3,) for a in got)  # s1 (rows, steps, 3), s2, targets, weights
        _assert_same_batches(got, want)
    assert len(loads) == 2 * len(native.files)


def test_pad_columns_shard_feed_keeps_current_file_plus_read_ahead_resident(tmp_path: Path) -> None:
    frame = sequences(100).reset_index(drop=True)
    folder = write_shards(frame, tmp_path / "pq", (20,) * 5, "parquet")
    feed = ShardFeed(folder, "label", batch_size=10, shuffle=False, preprocess=autobatch.PadColumns(["s1", "s2"]))
    dataset = feed.to_tf_dataset(infer_batches=2)
    assert feed.resident_files == [], "the batches looked at are released"
    resident = [len(feed.resident_files) for _ in dataset]
    assert max(resident) == 2, "the current file and the one read ahead"
    assert feed.resident_files == [] and feed.epoch == 1


def test_pad_columns_shard_feed_names_the_shard_row_of_nan_values(tmp_path: Path) -> None:
    import tensorflow as tf

    frame = sequences().reset_index(drop=True)
    frame.at[70, "s2"] = [1.0, float("nan"), 2.0]  # row 70: shard 2 (rows 38-97), its row 32
    folder = sequence_shards(tmp_path / "pq", "parquet", frame)
    pad = autobatch.PadColumns(["s1", "s2"])
    feed = ShardFeed(folder, "label", batch_size=32, preprocess=pad, nan_policy="error", shuffle=False)
    with pytest.raises(tf.errors.OpError, match=r"x/s2 holds 1 NaN/inf value\(s\) in 1 row\(s\) on batch 2 .*"
                       r"row 32 of shard '.*2\.parquet'"):
        list(feed.to_tf_dataset(SEQUENCES_SIGNATURE))
    assert isinstance(feed._pop_failure(), DataError) and feed.epoch == 0
    native, python = _native_and_python_shards(folder, pad)
    for warned in (native, python):
        with pytest.warns(RuntimeWarning, match="x/s2 holds 1 NaN/inf"):
            list(warned.to_tf_dataset(SEQUENCES_SIGNATURE))
    assert native.stats.nonfinite_batches == python.stats.nonfinite_batches == 1


def test_pad_columns_shard_feed_names_the_column_shard_and_row_of_a_cell_that_is_not_numbers(tmp_path: Path) -> None:
    import tensorflow as tf

    folder = sequence_shards(tmp_path / "csv", "csv")
    text = (folder / "3.csv").read_text().splitlines()
    cells = text[5].split(",")  # data row 4 of shard 3: id, s1, s2, label
    text[5] = ",".join([cells[0], cells[1], "1.0 abc 2", cells[3]])
    (folder / "3.csv").write_text("\n".join(text) + "\n")
    feed = ShardFeed(folder, "label", batch_size=32, preprocess=autobatch.PadColumns(["s1", "s2"]), shuffle=False)
    dataset = feed.to_tf_dataset(SEQUENCES_SIGNATURE)
    with pytest.raises(tf.errors.OpError, match=r"column 's2', row 4 of shard '.*3\.csv'"):
        list(dataset)
    assert isinstance(feed._pop_failure(), DataError)


def test_pad_columns_shard_feed_stops_on_targets_whose_dtype_differs_between_shards(tmp_path: Path) -> None:
    import tensorflow as tf

    frame = sequences(60).reset_index(drop=True)
    folder = tmp_path / "pq"
    folder.mkdir()
    frame.iloc[:30].assign(label=frame["label"].iloc[:30].astype(np.int64)).to_parquet(folder / "0.parquet")
    frame.iloc[30:].to_parquet(folder / "1.parquet")  # float64 labels
    pad = autobatch.PadColumns(["s1"], target_dtype=None)
    for p in (pad, lambda bx, by: pad(bx, by)):
        feed = ShardFeed(folder, "label", batch_size=16, preprocess=p, shuffle=False)
        with pytest.raises(tf.errors.OpError, match=r"same dtype.*float64"):
            list(feed.to_tf_dataset(infer_batches=1))
        assert isinstance(feed._pop_failure(), PreprocessError)


def test_pad_columns_shard_feed_with_pre_padding_pads_in_python(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = sequence_shards(tmp_path / "pq", "parquet")
    pad = autobatch.PadColumns(["s1", "s2"], padding="pre")
    native, python = _native_and_python_shards(folder, pad)
    loads = _count_native_loads(monkeypatch)
    got = _epochs_of(native.to_tf_dataset(SEQUENCES_SIGNATURE), 1)
    want = _epochs_of(python.to_tf_dataset(SEQUENCES_SIGNATURE), 1)
    assert loads == []
    _assert_same_batches(got, want)


@pytest.mark.parametrize("streamed", [False, True])
def test_pad_columns_feeds_check_batch_bytes_against_the_probe_as_python_does(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, streamed: bool
) -> None:
    pad = autobatch.PadColumns(["s1", "s2"])
    folder = sequence_shards(tmp_path / "pq", "parquet") if streamed else None

    def feeds(limit: int | None) -> tuple[Any, ...]:
        if streamed:
            return _native_and_python_shards(folder, pad, max_batch_bytes=limit)
        return _native_and_python(sequences(), pad, max_batch_bytes=limit)

    sizes = [sum(int(a.nbytes) for a in b) for b in _epochs_of(feeds(None)[1].to_tf_dataset(SEQUENCES_SIGNATURE), 1)]
    # The signature's look at batch 0 runs in Python: a limit it passes leaves the later batches to the export.
    assert sizes[0] < max(sizes[1:])
    for limit, warned in ((max(sizes), 0), (max(sizes) - 1, 1)):
        for feed in feeds(limit):
            caplog.clear()
            with caplog.at_level("WARNING", logger="autobatch.feeds.checks"):
                _epochs_of(feed.to_tf_dataset(SEQUENCES_SIGNATURE), 1)
            assert sum("probe's worst-case batch" in r.getMessage() for r in caplog.records) == warned, (limit, feed)
