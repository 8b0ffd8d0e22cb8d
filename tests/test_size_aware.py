"""Size-aware batching: lengths, the batch × length memory model, the bucket plan, the feeds, fit and the CLI."""

import dataclasses
import io
import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

import autobatch
from autobatch import ProbeResult
from autobatch._lengths import detect_sequence_columns, sample_lengths
from autobatch._memory import Budget
from autobatch._peak_lines import DEFAULT_SAFETY
from autobatch._size_result import GridTrial, LengthMemoryModel, SizeAwareProbe, fit_length_model
from autobatch.bucket_plan import bucket_boundaries, expected_batch_max, make_bucket_plan
from autobatch.cli import main
from autobatch.errors import BudgetError, ConfigError, DataError, PreprocessError
from autobatch.probe import TensorSpec

import canonical

MiB = 1024**2


def heavy_lengths(n: int, seed: int = 0) -> np.ndarray:
    """Median ~36, and 2% of samples 1000–2048 long: a few sequences 50× the median."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(3.6, 0.6, size=n).astype(int), 4, None)
    tail = rng.random(n) < 0.02
    lengths[tail] = rng.integers(1000, 2049, size=int(tail.sum()))
    return lengths


def heavy_frame(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed + 1)
    seqs = [rng.standard_normal(k).astype(np.float32) for k in heavy_lengths(n, seed)]
    label = (np.array([s.mean() for s in seqs]) > 0).astype(np.float32)
    return pd.DataFrame({"seq": seqs, "id": np.arange(n, dtype=np.float32), "label": label})


def pad_seq(batch_x, batch_y):
    inputs = autobatch.pad_columns(batch_x, ["seq"], add_feature_axis=True)
    inputs["id"] = batch_x["id"].to_numpy(np.float32)
    return inputs, np.asarray(batch_y, dtype=np.float32).reshape(-1, 1)


SIGNATURE = (
    TensorSpec("x/seq", "float32", (None, None, 1)),
    TensorSpec("x/id", "float32", (None,)),
    TensorSpec("y", "float32", (None, 1)),
)


# ---------------------------------------------------------------- lengths


def test_sequence_columns_are_detected_in_lists_arrays_and_csv_text():
    frame = pd.DataFrame(
        {
            "a": [[1.0, 2.0], [3.0]],
            "b": [np.zeros(4), np.zeros(1)],
            "text": ["0.1 0.2 0.3", "1 2"],
            "n": [1.0, 2.0],
            "word": ["cat", "dog"],
        }
    )
    assert detect_sequence_columns(frame) == ("a", "b", "text")
    assert sample_lengths(frame).tolist() == [4, 2]  # the longest of a sample's sequences
    assert sample_lengths(frame, sequence_columns=["text"]).tolist() == [3, 2]
    assert sample_lengths(frame, length_fn=lambda x: x["n"].to_numpy() * 10).tolist() == [10, 20]


def test_lengths_without_sequences_or_with_two_sources_are_refused():
    with pytest.raises(DataError) as excinfo:
        sample_lengths(pd.DataFrame({"n": [1.0, 2.0]}))
    assert "sequence_columns" in str(excinfo.value) and "length_fn" in str(excinfo.value)
    with pytest.raises(ConfigError):
        sample_lengths(pd.DataFrame({"a": [[1.0]]}), sequence_columns=["a"], length_fn=len)
    with pytest.raises(DataError) as excinfo:
        sample_lengths(pd.DataFrame({"a": [[1.0]]}), sequence_columns=["missing"])
    assert "'missing'" in str(excinfo.value)


# ---------------------------------------------------------------- the memory model


def _grid(peak, lengths=(512, 1024, 2048), sizes=(16, 64)):
    return [GridTrial(b, n, int(peak(b, n))) for n in lengths for b in sizes]


def test_linear_growth_fits_a_linear_model_above_every_point():
    rng = np.random.default_rng(0)
    trials = [dataclasses.replace(t, peak_rss_bytes=t.peak_rss_bytes + int(rng.integers(0, MiB)))
              for t in _grid(lambda b, n: 700 * MiB + 1000 * b * n)]
    model = fit_length_model(trials)
    assert model.kind == "linear" and model.per_token_length_bytes == 0
    assert abs(model.per_token_bytes - 1000) < 50
    assert all(model(t.batch_size, t.length) >= t.peak_rss_bytes for t in trials)


def test_attention_like_growth_is_detected_and_predicts_an_unseen_mix():
    def peak(b, n):
        return 700 * MiB + 200 * b * n + 2.0 * b * n * n

    trials = _grid(peak)
    model = fit_length_model(trials)
    assert model.kind == "quadratic" and model.per_token_length_bytes > 0
    assert all(model(t.batch_size, t.length) >= t.peak_rss_bytes for t in trials)
    # A short bucket's large batch: a mix the grid did not have.
    assert abs(model(512, 128) - peak(512, 128)) / peak(512, 128) < 0.02


# ---------------------------------------------------------------- the bucket plan (pure)


def _sized(lengths, model, *, grid=(), step_seconds=(0.005, 2e-7), baseline=700 * MiB):
    values, counts = np.unique(lengths, return_counts=True)
    probe = ProbeResult(
        n_samples=int(len(lengths)), source="in_memory", raw_bytes=10 * MiB, raw_bytes_per_sample=0.0, raw_scope="test",
        largest_shard_raw_bytes=0, sample_batch_size=32, preprocessed_bytes_per_sample=0.0,
        worst_preprocessed_bytes_per_sample=0.0, worst_scope="test", preprocess_peak_bytes_per_sample=0.0,
        output_signature=SIGNATURE, device="CPU", baseline_rss_bytes=baseline, trial_prefetch_batches=2,
    )
    return SizeAwareProbe(
        probe=probe, sequence_columns=("seq",), variable_leaves=("x/seq",), length_values=tuple(values.tolist()),
        length_counts=tuple(counts.tolist()), grid=tuple(grid), host_model=model, bytes_per_token=4.0,
        preprocess_peak_per_token=8.0, step_seconds=step_seconds,
    )


LINEAR = LengthMemoryModel(700 * MiB, 2000.0)
HOST_1GIB = Budget("host", 1024 * MiB, "ram_limit=1GiB")


def with_margin(peak, safety=DEFAULT_SAFETY):
    """A predicted peak plus the safety margin on its growth over the measured runtime (700 MiB) and dataset (10 MiB)."""
    return peak + safety * (peak - 710 * MiB)


def test_every_bucket_fits_and_the_safe_fixed_batch_is_several_times_smaller():
    lengths = heavy_lengths(20_000)
    plan = make_bucket_plan(_sized(lengths, LINEAR), [HOST_1GIB])
    limit = HOST_1GIB.limit_bytes
    assert all(with_margin(b.predicted_peak_bytes) <= limit for b in plan.buckets)
    assert plan.boundaries == tuple(sorted(plan.boundaries)) and plan.boundaries[-1] == lengths.max()
    assert sum(b.n_samples for b in plan.buckets) == len(lengths)
    assert len(plan.buckets) <= 8
    # The fixed batch must hold a batch of the longest sequences; with it, a step of the longest would pass the budget.
    fixed = plan.fixed_batch_size
    longest = lengths.max()
    assert with_margin(LINEAR(fixed, longest) + 10 * MiB) <= limit < with_margin(LINEAR(fixed + 2, longest) + 18 * MiB)
    assert plan.mean_batch_size >= 3 * fixed
    assert plan.mean_padded_length < plan.fixed_mean_padded_length / 3
    assert plan.expected_speedup > 2
    text = str(plan)
    assert "padded to" in text and f"{fixed:,}" in text and "expected" in text


def test_given_boundaries_are_kept_and_extended_to_the_longest():
    lengths = heavy_lengths(5000)
    plan = make_bucket_plan(_sized(lengths, LINEAR), [HOST_1GIB], buckets=[64, 256])
    assert plan.boundaries == (64, 256, int(lengths.max()))
    batches = plan.batch_sizes
    assert batches[0] >= batches[1] >= batches[2]


def test_a_failed_trial_caps_buckets_at_or_above_its_length():
    lengths = heavy_lengths(20_000)
    failed = GridTrial(40, 512, None, fits=False, note="out of memory")
    plan = make_bucket_plan(_sized(lengths, LINEAR, grid=[failed]), [HOST_1GIB])
    for bucket in plan.buckets:
        if bucket.hi >= 512:
            assert bucket.batch_size <= 39
        else:
            assert bucket.batch_size > 39 or bucket.limited_by == "the bucket's samples"


def test_a_budget_that_cannot_hold_one_longest_sample_says_so():
    lengths = heavy_lengths(2000)
    huge = LengthMemoryModel(700 * MiB, 200_000.0)
    with pytest.raises(BudgetError) as excinfo:
        make_bucket_plan(_sized(lengths, huge), [HOST_1GIB])
    assert f"length {lengths.max()}" in str(excinfo.value) and "ram_limit=1GiB" in str(excinfo.value)


def test_quadratic_memory_gives_long_buckets_smaller_batches_than_linear():
    lengths = heavy_lengths(50_000)
    quad = LengthMemoryModel(700 * MiB, 1000.0, 1.0, "quadratic")
    linear = LengthMemoryModel(700 * MiB, 1000.0)
    a = make_bucket_plan(_sized(lengths, quad), [HOST_1GIB], buckets=[64, 512])
    b = make_bucket_plan(_sized(lengths, linear), [HOST_1GIB], buckets=[64, 512])
    assert a.batch_sizes[-1] < b.batch_sizes[-1]
    assert all(with_margin(bucket.predicted_peak_bytes) <= HOST_1GIB.limit_bytes for bucket in a.buckets)


def test_automatic_boundaries_minimise_padding_like_a_brute_force_search():
    import itertools

    lengths = np.random.default_rng(3).integers(1, 200, size=400)
    chosen = bucket_boundaries(lengths, 3, multiple=1)

    def padded(bounds):
        bounds = np.asarray(bounds)
        return int(bounds[np.searchsorted(bounds, lengths)].sum())

    candidates = sorted(set(np.percentile(lengths, np.linspace(0, 100, 101)).astype(int).tolist()) - {0})
    longest = int(lengths.max())
    best = min(padded([*c, longest]) for k in range(3) for c in itertools.combinations(
        [c for c in candidates if c < longest], k))
    assert chosen[-1] == longest and padded(chosen) <= best


def test_expected_batch_max_matches_sampling():
    lengths = heavy_lengths(3000)
    values, counts = np.unique(lengths, return_counts=True)
    rng = np.random.default_rng(1)
    sampled = np.mean([lengths[rng.integers(0, len(lengths), 32)].max() for _ in range(4000)])
    assert abs(expected_batch_max(values, counts, 32) - sampled) / sampled < 0.05


# ---------------------------------------------------------------- feeds


def _feed(frame, **options):
    from autobatch.feeds.size_aware import SizeAwareFeed

    kwargs = dict(boundaries=[32, 64, 256, 2048], batch_sizes=[128, 64, 16, 4], preprocess=pad_seq,
                  output_signature=SIGNATURE, sequence_columns=["seq"])
    kwargs.update(options)
    return SizeAwareFeed(frame, "label", **kwargs)


@pytest.fixture(scope="module")
def skewed():
    return heavy_frame(1500)


def test_in_memory_feed_serves_every_sample_once_with_at_most_one_shape_per_bucket(skewed):
    feed = _feed(skewed)
    lengths = skewed["seq"].map(len).to_numpy()
    bounds, sizes = np.array([32, 64, 256, 2048]), np.array([128, 64, 16, 4])
    per_bucket = np.bincount(np.searchsorted(bounds, lengths), minlength=4)
    assert len(feed) == sum(math.ceil(n / b) for n, b in zip(per_bucket, sizes))
    orders = []
    for _ in range(2):
        ids, shapes = [], set()
        for i in range(len(feed)):
            x, _ = feed[i]
            batch_ids = x["id"].astype(int)
            length = x["seq"].shape[1]
            k = int(np.searchsorted(bounds, length))
            assert bounds[k] == length and len(batch_ids) <= sizes[k]
            assert lengths[batch_ids].max() <= length and (lengths[batch_ids] > (bounds[k - 1] if k else 0)).all()
            ids += batch_ids.tolist()
            shapes.add(x["seq"].shape[1:])
        feed.on_epoch_end()
        assert sorted(ids) == list(range(len(skewed)))
        assert len(shapes) <= len(bounds)
        orders.append(ids)
    assert orders[0] != orders[1], "reshuffled within and across buckets every epoch"


def test_preprocess_taking_maxlen_pads_to_the_boundary_itself(skewed):
    seen = []

    def pad_exactly(batch_x, batch_y, maxlen=None):
        seen.append(maxlen)
        inputs = autobatch.pad_columns(batch_x, ["seq"], maxlen=maxlen, add_feature_axis=True)
        inputs["id"] = batch_x["id"].to_numpy(np.float32)
        return inputs, np.asarray(batch_y, dtype=np.float32).reshape(-1, 1)

    feed = _feed(skewed, preprocess=pad_exactly)
    x, _ = feed[0]
    assert seen == [x["seq"].shape[1]] and seen[0] in (32, 64, 256, 2048)


def test_pad_columns_in_a_size_aware_feed_pads_to_the_bucket_in_its_tf_data_export(skewed):
    pad = autobatch.PadColumns(["seq"], add_feature_axis=True, target_axis=True)
    feed = _feed(skewed[["seq", "label"]], preprocess=pad, output_signature=None)
    bounds = {32, 64, 256, 2048}
    lengths = {int(x["seq"].shape[1]) for x, _ in feed.to_tf_dataset(infer_batches=4)}
    assert lengths <= bounds and len(lengths) > 1, "each batch padded to its bucket's boundary, not its longest"


def test_validation_data_longer_than_the_plan_gets_its_own_bucket(skewed):
    feed = _feed(skewed.iloc[:200], boundaries=[32, 64], batch_sizes=[50, 20], shuffle=False)
    longest = int(skewed["seq"].iloc[:200].map(len).max())
    assert feed.boundaries.tolist() == [32, 64, longest]
    assert feed.batch_sizes[-1] == max(20 * 64 // longest, 1)
    ids = np.concatenate([feed[i][0]["id"] for i in range(len(feed))])
    assert sorted(ids.astype(int).tolist()) == list(range(200))


def test_split_and_drop_remainder(skewed):
    from autobatch.feeds.size_aware import SizeAwareFeed

    train, val = _feed(skewed).split(0.2)
    ids = [np.concatenate([f[i][0]["id"] for i in range(len(f))]).astype(int) for f in (train, val)]
    assert not set(ids[0]) & set(ids[1]) and len(ids[0]) + len(ids[1]) == len(skewed)
    # Both halves keep the buckets: each batch at most its bucket's size, padded to its boundary.
    sizes = dict(zip([32, 64, 256, 2048], [128, 64, 16, 4]))
    for part in (train, val):
        assert isinstance(part, SizeAwareFeed) and part.boundaries.tolist() == [32, 64, 256, 2048]
        for i in range(len(part)):
            width = part[i][0]["seq"].shape[1]
            assert width == part.batch_length(i) and len(part[i][0]["id"]) <= sizes[width]
    with pytest.raises(ConfigError):
        _feed(skewed, drop_remainder=True)


def test_tf_dataset_export_and_bucket_by_sequence_length(skewed):
    import tensorflow as tf

    from autobatch.feeds.size_aware import bucket_by_sequence_length

    feed = _feed(skewed.iloc[:400])
    rows = sum(int(batch[1].shape[0]) for batch in feed.to_tf_dataset(SIGNATURE))
    assert rows == 400 and feed.epoch == 1
    sequences = [np.asarray(s, np.float32) for s in skewed["seq"].iloc[:400]]
    dataset = tf.data.Dataset.from_generator(
        lambda: iter(sequences), output_signature=tf.TensorSpec((None,), tf.float32)
    )
    boundaries, sizes = [32, 64, 256, 2048], [128, 64, 16, 4]
    batched = bucket_by_sequence_length(dataset, lambda s: tf.shape(s)[0], boundaries=boundaries, batch_sizes=sizes)
    shapes = [tuple(batch.shape) for batch in batched]
    assert sum(s[0] for s in shapes) == 400
    assert {s[1] for s in shapes} <= set(boundaries)
    assert all(s[0] <= sizes[boundaries.index(s[1])] for s in shapes)


def _bucket_plan(frame):
    lengths = frame["seq"].map(len).to_numpy()
    return make_bucket_plan(_sized(lengths, LINEAR), [HOST_1GIB], buckets=[32, 64, 256], queue_batches=3)


def test_make_feed_with_a_bucket_plan_is_the_size_aware_feed_of_its_buckets(skewed):
    from autobatch.feeds import make_feed
    from autobatch.feeds.size_aware import SizeAwareFeed, make_size_aware_feed

    frame = skewed.iloc[:600]
    plan = _bucket_plan(frame)
    feed = make_feed(frame, "label", plan=plan, preprocess=pad_seq, seed=3)
    same = make_size_aware_feed(
        frame, "label", boundaries=plan.boundaries, batch_sizes=plan.batch_sizes, preprocess=pad_seq, seed=3
    )
    assert isinstance(feed, SizeAwareFeed) and isinstance(same, SizeAwareFeed)
    assert feed.boundaries.tolist() == same.boundaries.tolist() == list(plan.boundaries)
    assert feed.batch_sizes.tolist() == same.batch_sizes.tolist() == list(plan.batch_sizes)
    assert feed.output_signature == plan.probe.output_signature and feed.max_queue_size == 3
    assert len(feed) == len(same)
    for i in range(len(feed)):
        (x, y), (x_same, y_same) = feed[i], same[i]
        assert x["seq"].shape == x_same["seq"].shape and np.array_equal(x["id"], x_same["id"])
        assert np.array_equal(y, y_same)
    planned = make_size_aware_feed(frame, "label", plan=plan, preprocess=pad_seq, seed=3)
    assert [planned[i][0]["id"].tolist() for i in range(3)] == [feed[i][0]["id"].tolist() for i in range(3)]
    train, val = make_feed(frame, "label", plan=plan, preprocess=pad_seq, validation_split=0.2)
    assert train.n_samples + val.n_samples == 600 and train.boundaries.tolist() == list(plan.boundaries)


def test_bucket_by_sequence_length_takes_the_buckets_of_a_plan(skewed):
    import tensorflow as tf

    from autobatch.feeds.size_aware import bucket_by_sequence_length

    frame = skewed.iloc[:300]
    plan = _bucket_plan(frame)
    sequences = [np.asarray(s, np.float32) for s in frame["seq"]]

    def shapes(**buckets):
        dataset = tf.data.Dataset.from_generator(
            lambda: iter(sequences), output_signature=tf.TensorSpec((None,), tf.float32)
        )
        return sorted(tuple(b.shape) for b in bucket_by_sequence_length(dataset, lambda s: tf.shape(s)[0], **buckets))

    planned = shapes(plan=plan)
    assert planned == shapes(boundaries=plan.boundaries, batch_sizes=plan.batch_sizes)
    assert sum(s[0] for s in planned) == 300 and {s[1] for s in planned} <= set(plan.boundaries)


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_shard_feed_streams_every_row_once_holding_about_one_shard(tmp_path, fmt):
    from autobatch._data import ShardSource
    from autobatch.feeds.size_aware_shards import SizeAwareShardFeed

    frame = heavy_frame(900, seed=2)
    text = frame.assign(seq=frame["seq"].map(lambda a: " ".join(f"{v:.4g}" for v in a)))  # as CSV shards hold it
    files = []
    for i, part in enumerate(np.array_split(np.arange(len(frame)), 6)):
        path = tmp_path / f"{i}.{fmt}"
        if fmt == "csv":
            text.iloc[part].to_csv(path, index=False)
        else:
            frame.iloc[part].to_parquet(path, index=False)
        files.append(path)
    feed = SizeAwareShardFeed(
        ShardSource(tuple(files), "label"), boundaries=[32, 64, 256, 2048], batch_sizes=[64, 32, 8, 2],
        preprocess=pad_seq, output_signature=SIGNATURE,
    )
    assert feed.sequence_columns == ("seq",)
    largest = max(len(p) for p in np.array_split(np.arange(len(frame)), 6))
    for _ in range(2):
        ids, shapes = [], set()
        for i in range(len(feed)):
            x, _ = feed[i]
            ids += x["id"].astype(int).tolist()
            shapes.add(x["seq"].shape[1])
            carried = sum(len(kept) for kept, _ in feed._state.get("carry", {}).values())
            assert carried < 64 + 32 + 8 + 2, "less than one batch per bucket is carried between files"
            current = feed._state.get("current")
            assert current is None or len(current[1][0]) <= largest
        feed.on_epoch_end()
        assert sorted(ids) == list(range(len(frame)))
        assert shapes <= {32, 64, 256, 2048}
    # Random access reads what it needs and gives the batch sequential reading gives.
    sequential = [feed[i][0]["id"].tolist() for i in range(len(feed))]
    assert feed[3][0]["id"].tolist() == sequential[3]
    train, val = feed.split(0.3)
    assert len(set(train.files) & set(val.files)) == 0 and train.n_samples + val.n_samples == len(frame)


# ---------------------------------------------------------------- end to end: probe grid, plan, fit, memory

FIT_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.path[:0] = [{tests!r}, {examples!r}]
    import numpy as np, autobatch, keras
    from autobatch._memory import peak_rss_bytes
    from test_size_aware import heavy_frame

    frame = heavy_frame(4000, seed=4).drop(columns=["id"])
    inp = keras.Input((None, 1), name="seq")
    hidden = keras.layers.Conv1D(128, 5, padding="same", activation="relu")(inp)
    out = keras.layers.Dense(1, activation="sigmoid")(keras.layers.GlobalMaxPooling1D()(hidden))
    model = keras.Model({{"seq": inp}}, out)
    model.compile(optimizer="adam", loss="binary_crossentropy")

    def pad(batch_x, batch_y):
        return autobatch.pad_columns(batch_x, ["seq"], add_feature_axis=True), np.asarray(batch_y, "float32")[:, None]

    history = autobatch.fit(model, frame.drop(columns=["label"]), frame["label"], preprocess=pad, epochs=1,
                            ram_limit="{limit}", batching="size-aware")
    plan = history.autobatch_plan
    print(json.dumps({{"vmhwm": peak_rss_bytes(), "plan": plan.to_dict(), "mean": plan.mean_batch_size,
                      "monitor_peak": history.autobatch_summary.peak_rss_bytes,
                      "held_out_error": plan.sized.held_out_error, "loss": history.history["loss"]}}))
    """
)


def test_fit_size_aware_keeps_the_worst_batch_under_ram_limit_with_larger_batches(tmp_path):
    import psutil

    limit = 1024 * MiB  # TF's runtime is 640-770 MiB here: 1 GiB leaves room for real batches while memory binds
    assert psutil.virtual_memory().available > 4 * limit, "the limit must bind, not the machine"
    script = tmp_path / "fit_sized.py"
    root = str(canonical.__file__).rsplit("/", 2)[0]
    script.write_text(FIT_SCRIPT.format(tests=root + "/tests", examples=root + "/examples", limit="1GiB"))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    plan = result["plan"]
    grid = plan["sized"]["grid"]
    buckets = plan["buckets"]
    print(
        f"size-aware: {len(buckets)} buckets, batches {[b['batch_size'] for b in buckets]}, mean {result['mean']:.0f}, "
        f"fixed {plan['fixed_batch_size']}; VmHWM {result['vmhwm'] / MiB:.0f} MiB of {limit / MiB:.0f}; "
        f"held-out error {result['held_out_error']:+.2%}"
    )
    # The grid: 3 lengths × 2 batch sizes fitted, one held out, measured in the child.
    assert sum(not t["held_out"] for t in grid) >= 6 and sum(t["held_out"] for t in grid) == 1
    assert len({t["length"] for t in grid if not t["held_out"]}) >= 3
    assert abs(result["held_out_error"]) < 0.05, "the model predicts a trial it was not fitted on"
    # The whole run, every bucket's batches included, stayed under the limit: measured, not predicted.
    # The monitor also samples VmRSS, which the kernel counts a few pages ahead of VmHWM: the same peak to within that.
    assert result["vmhwm"] < limit and abs(result["monitor_peak"] - result["vmhwm"]) <= MiB
    assert plan["confirmed"]
    assert all(b["predicted_peak_bytes"] <= plan["budgets"][0]["usable_bytes"] for b in buckets)
    # The best fixed batch that is also safe must hold the longest sequences: several times smaller on average.
    assert plan["fixed_batch_size"] >= 1 and result["mean"] >= 3 * plan["fixed_batch_size"]
    assert len(buckets) <= 8 and all(np.isfinite(result["loss"]))


def test_cli_size_aware_prints_the_bucket_table_and_json(shard_dirs):
    PREPROCESS = f"{canonical.__file__}:preprocess"
    MODEL = f"{canonical.__file__}:build_model"
    buffer = io.StringIO()
    args = ["probe", str(shard_dirs / "parquet"), "--target", "label", "--preprocess", PREPROCESS, "--model", MODEL,
            "--ram-limit", "2GiB", "--size-aware", "--buckets", "4", "--trial-batch-sizes", "4,16", "--no-confirm"]
    code = main([*args, "--json"], console=Console(file=buffer, width=160))
    assert code == 0
    data = json.loads(buffer.getvalue())
    assert len(data["buckets"]) <= 4 and data["sized"]["sequence_columns"] == ["in1", "in2"]
    assert {t["batch_size"] for t in data["sized"]["grid"] if not t["held_out"]} == {4, 16}
    assert data["sized"]["host_model"]["per_token_bytes"] > 0
    sized = SizeAwareProbe.from_dict(data["sized"])
    assert sized.held_out_error is not None and "held-out trial" in str(sized)


def test_cli_size_aware_without_a_model_exits_1(shard_dirs, capsys):
    code = main(["probe", str(shard_dirs / "parquet"), "--target", "label", "--size-aware"])
    assert code == 1
    assert "ConfigError" in capsys.readouterr().err


def test_make_size_aware_feed_streams_or_loads_shards_and_refuses_unknown_data(shard_dirs):
    from autobatch.feeds.size_aware import SizeAwareFeed, make_size_aware_feed
    from autobatch.feeds.size_aware_shards import SizeAwareShardFeed

    options = dict(boundaries=[32, 128], batch_sizes=[64, 16], preprocess=canonical.preprocess)
    streamed = make_size_aware_feed(str(shard_dirs / "csv"), "label", strategy="stream", **options)
    loaded = make_size_aware_feed(str(shard_dirs / "parquet"), "label", strategy="in_memory", **options)
    assert isinstance(streamed, SizeAwareShardFeed) and isinstance(loaded, SizeAwareFeed)
    assert len(streamed) == len(loaded)  # the same rows, the same buckets: the same number of batches
    train, val = make_size_aware_feed(str(shard_dirs / "parquet"), "label", validation_split=0.2, **options)
    assert train.n_samples + val.n_samples == loaded.n_samples
    with pytest.raises(DataError) as excinfo:
        make_size_aware_feed(42, **options)
    assert "Unrecognized data type" in str(excinfo.value)


def test_a_preprocess_without_a_padded_axis_or_a_missing_model_is_refused_before_any_trial():
    from types import SimpleNamespace

    from autobatch.size_probe import SizeAwareProber

    result = _sized(heavy_lengths(100), LINEAR).probe
    fixed_shapes = dataclasses.replace(result, output_signature=(TensorSpec("x/seq", "float32", (None, 64, 1)),))
    with pytest.raises(ConfigError) as excinfo:
        SizeAwareProber(SimpleNamespace(_model="model.keras")).measure(fixed_shapes)
    assert "padded axis" in str(excinfo.value) and "batching='fixed'" in str(excinfo.value)
    with pytest.raises(ConfigError) as excinfo:
        SizeAwareProber(SimpleNamespace(_model=None)).measure(result)
    assert "pass `model=`" in str(excinfo.value)
    with pytest.raises(ConfigError):
        SizeAwareProber(SimpleNamespace(_model=None), grid_batch_sizes=(0, 4))


@pytest.mark.parametrize("padding", ["post", "pre"])
def test_a_preprocess_padding_past_the_boundary_is_brought_back_to_it(skewed, padding):
    """A preprocess padding to its own bucket (64) would serve wider batches than the plan measured."""

    def pad64(batch_x, batch_y):
        inputs = autobatch.pad_columns(batch_x, ["seq"], add_feature_axis=True, bucket=64, padding=padding)
        inputs["id"] = batch_x["id"].to_numpy(np.float32)
        return inputs, np.asarray(batch_y, dtype=np.float32).reshape(-1, 1)

    feed = _feed(skewed.iloc[:600], preprocess=pad64)
    for i in range(len(feed)):
        x, _ = feed[i]
        assert x["seq"].shape[1] == feed.batch_length(i)  # 32 for the shortest bucket, not 64
        for row, sample in zip(x["id"].astype(int), x["seq"][..., 0]):
            original = np.asarray(skewed["seq"][skewed["id"] == row].iloc[0], np.float32)
            assert np.array_equal(sample[sample != 0], original[original != 0])  # only padding was cut


def test_a_preprocess_longer_than_the_bucket_on_both_sides_is_an_error(skewed):
    def too_long(batch_x, batch_y):
        inputs = {"seq": np.ones((len(batch_x), 3000, 1), np.float32), "id": batch_x["id"].to_numpy(np.float32)}
        return inputs, np.asarray(batch_y, dtype=np.float32).reshape(-1, 1)

    with pytest.raises(PreprocessError) as excinfo:
        _feed(skewed.iloc[:100], preprocess=too_long)[0]
    assert "x/seq" in str(excinfo.value) and "values on both sides" in str(excinfo.value)


def test_distribute_feed_refuses_a_size_aware_feed(skewed):
    with pytest.raises(ConfigError) as excinfo:
        autobatch.distribute_feed(_feed(skewed.iloc[:100]), 8)
    assert "SizeAwareFeed" in str(excinfo.value) and "fixed-batch feed" in str(excinfo.value)


def test_a_trial_stopped_at_the_limit_bounds_the_line_but_does_not_bend_it():
    fitted = [GridTrial(b, n, int(600 * MiB + 1000.0 * b * n)) for b in (16, 64) for n in (64, 256, 1024)]
    stopped = GridTrial(256, 1024, int(700 * MiB), fits=False, note="; stopped")  # far below the line: a lower bound
    model = fit_length_model([*fitted, stopped])
    assert model.per_token_bytes == pytest.approx(1000.0, rel=1e-6)
    above = GridTrial(8, 64, int(650 * MiB), fits=False, note="; stopped")  # above the line: lifts the intercept
    lifted = fit_length_model([*fitted, above])
    assert lifted.intercept_bytes >= 650 * MiB - 1000.0 * 8 * 64 - 1


def test_a_trial_after_a_larger_one_in_the_same_child_does_not_lift_the_fit():
    fitted = [GridTrial(b, n, int(600 * MiB + 1000.0 * b * n)) for b in (16, 64) for n in (64, 256, 1024)]
    # The child's RSS never drops (TensorFlow's pools keep what 64 × 1024 used): a confirmation at 40 × 1024 reads that.
    confirmation = GridTrial(40, 1024, fitted[-1].peak_rss_bytes)
    model = fit_length_model([*fitted, confirmation])
    assert model.intercept_bytes == pytest.approx(600 * MiB, abs=2)
    assert model(40, 1024) < confirmation.peak_rss_bytes - 20 * MiB
    # Run first, the same trial is a point of its own.
    assert fit_length_model([confirmation, *fitted]).intercept_bytes > 620 * MiB


def test_a_split_shard_feed_recomputes_its_own_overflow_bucket(tmp_path):
    from autobatch._data import ShardSource
    from autobatch.feeds.size_aware_shards import SizeAwareShardFeed

    frame = heavy_frame(600, seed=4)
    files = []
    for i, part in enumerate(np.array_split(np.arange(len(frame)), 6)):
        frame.iloc[part].to_parquet(tmp_path / f"{i}.parquet", index=False)
        files.append(tmp_path / f"{i}.parquet")
    feed = SizeAwareShardFeed(
        ShardSource(tuple(files), "label"), boundaries=[32, 64, 256], batch_sizes=[64, 32, 8],
        preprocess=pad_seq, output_signature=SIGNATURE,
    )
    assert feed.boundaries.tolist()[:3] == [32, 64, 256] and feed.boundaries[-1] == frame["seq"].map(len).max()
    for part in feed.split(0.3):
        longest = max(int(pd.read_parquet(path)["seq"].map(len).max()) for path in part.files)
        expected = [32, 64, 256] + ([longest] if longest > 256 else [])
        assert part.boundaries.tolist() == expected, (part.boundaries, longest)


def test_a_shard_with_other_columns_or_a_missing_target_is_named_when_the_feed_is_made(tmp_path):
    from autobatch._data import ShardSource
    from autobatch.feeds.size_aware_shards import SizeAwareShardFeed

    frame = heavy_frame(300, seed=5)
    files = []
    for i, part in enumerate(np.array_split(np.arange(len(frame)), 3)):
        shard = frame.iloc[part]
        if i == 2:
            shard = shard.rename(columns={"label": "target"})
        shard.to_parquet(tmp_path / f"{i}.parquet", index=False)
        files.append(tmp_path / f"{i}.parquet")
    options = dict(boundaries=[64, 2048], batch_sizes=[16, 4], preprocess=pad_seq, output_signature=SIGNATURE)
    with pytest.raises(DataError) as excinfo:
        SizeAwareShardFeed(ShardSource(tuple(files), "label"), **options)
    message = str(excinfo.value)
    assert f"shard {str(files[2])!r} has columns" in message and "missing: ['label'], unexpected: ['target']" in message
    with pytest.raises(DataError, match=r"column\(s\) \['weight'\] not found"):
        SizeAwareShardFeed(ShardSource(tuple(files[:2]), "label"), sample_weight="weight", **options)
