import dataclasses
import json
import math
import subprocess
import sys
import textwrap

import pytest

import autobatch
from autobatch import ProbeResult
from autobatch._memory import Budget
from autobatch._planning import confirm_plan
from autobatch.probe import StepTrial

import canonical

MiB = 1024**2


def _base(trials) -> ProbeResult:
    return ProbeResult(
        n_samples=100_000, source="in_memory", raw_bytes=0, raw_bytes_per_sample=0.0, raw_scope="test",
        largest_shard_raw_bytes=0, sample_batch_size=32, preprocessed_bytes_per_sample=1024.0,
        worst_preprocessed_bytes_per_sample=1024.0, worst_scope="test", preprocess_peak_bytes_per_sample=0.0,
        output_signature=(), device="CPU", trials=tuple(trials),
    )


class FakeProber:
    """Measures a 'true' step peak that grows faster than linearly, or runs out of memory past a size."""

    def __init__(self, true_peak, oom_above=None):
        self.true_peak = true_peak
        self.oom_above = oom_above
        self.tried: list[int] = []

    def confirm(self, result, batch_size, *, rss_limit_bytes, fresh=False):
        self.tried.append(batch_size)
        if self.oom_above is not None and batch_size > self.oom_above:
            return result.with_trial(StepTrial(batch_size, None, fits=False, note="out of memory"))
        peak = self.true_peak(batch_size)
        if rss_limit_bytes is not None and peak > rss_limit_bytes:
            # As the real watchdog does: stopped just past the limit, which is a lower bound on the peak.
            return result.with_trial(StepTrial(batch_size, rss_limit_bytes + 1, fits=False, note="stopped"))
        return result.with_trial(StepTrial(batch_size, int(peak)))


def quadratic(b):
    return 600 * MiB + 0.5 * MiB * b + 0.002 * MiB * b * b


def test_far_extrapolation_is_confirmed_and_stepped_down():
    prober = FakeProber(quadratic)
    probed = _base(StepTrial(b, int(quadratic(b))) for b in (8, 32, 128))
    budget = Budget("host", 3000 * MiB, "test")
    plan, final = confirm_plan(prober, probed, [budget], safety=0.1, queue_batches=0)

    def with_margin(b):  # the true peak plus the 10% margin on what grows with the batch
        peak = quadratic(b) + b * 1024
        return peak + 0.1 * (peak - 600 * MiB)

    true_max = max(b for b in range(1, 5000) if with_margin(b) <= 3000 * MiB)
    # The linear fit from small batches overshoots; each trial pulls the plan down until one fits.
    assert prober.tried[0] > true_max
    # The first is stopped at twice what the plan allows; the next ones step between what fitted and what did not.
    assert not final.trials[3].fits and all(t.fits for t in final.trials[4:])
    over = [b for b in prober.tried[1:] if quadratic(b) + b * 1024 > 3000 * MiB]
    fitting = [b for b in prober.tried[1:] if b not in over]
    assert fitting and max(fitting) < min(over, default=math.inf), prober.tried
    # A real trial at or above the plan fitted its budget.
    assert plan.confirmed and plan.batch_size <= plan.confirmed_batch_size == max(fitting)
    # Never past what really fits; the margin is on the fitted growth, so it may sit a little above `true_max`.
    assert quadratic(plan.batch_size) + plan.batch_size * 1024 <= 3000 * MiB
    assert 0.9 * true_max <= plan.batch_size <= 1.1 * true_max
    assert quadratic(plan.batch_size) + plan.budget("host").margin_bytes <= 3000 * MiB
    assert len(final.trials) == 3 + len(prober.tried)


def test_out_of_memory_trial_steps_below_it():
    prober = FakeProber(lambda b: 600 * MiB + 0.25 * MiB * b, oom_above=1000)
    probed = _base(StepTrial(b, int(600 * MiB + 0.25 * MiB * b)) for b in (8, 32, 128))
    plan, _ = confirm_plan(prober, probed, [Budget("host", 4000 * MiB, "test")], queue_batches=0)
    assert prober.tried[0] > 1000
    # Each OOM halves the interval between the largest fitting and the smallest failed trial.
    failed = [b for b in prober.tried if b > 1000]
    assert all(later < earlier for earlier, later in zip(failed, failed[1:]))
    assert plan.confirmed and 600 <= plan.batch_size <= 1000


def test_no_trial_needed_when_one_already_covers_the_plan():
    prober = FakeProber(quadratic)
    probed = _base(StepTrial(b, int(quadratic(b))) for b in (8, 32, 128))
    plan, _ = confirm_plan(prober, probed, [Budget("host", 64 * 1024 * MiB, "test")], max_batch_size=100, queue_batches=0)
    assert prober.tried == [] and plan.confirmed and plan.batch_size == 100


# ---------------------------------------------------------------- real: plan, then train at the plan, check VmHWM

TRAIN_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {examples!r})
    import numpy as np, pandas as pd
    import canonical
    from autobatch._memory import peak_rss_bytes
    frame = pd.read_parquet({data!r})
    x, y = frame.drop(columns=["label"]), frame["label"]
    model = canonical.build_model()
    batch = {batch}
    # The tutorial's loop: slice the frame per batch, pad per batch, train. Longest rows first,
    # so the worst-case batch certainly runs, then the rest of the epoch in order.
    order = np.argsort(-(x["in1"].map(len) + x["in2"].map(len)).to_numpy(), kind="stable")
    for start in range(0, len(x), batch):
        rows = order[start:start + batch]
        inputs, targets = canonical.preprocess(x.iloc[rows], y.iloc[rows])
        model.train_on_batch(inputs, targets)
    print(json.dumps({{"vmhwm": peak_rss_bytes()}}))
    """
)


@pytest.fixture(scope="module")
def long_frame_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("long") / "frame.parquet"
    canonical.make_frame(2400, seed=5, max_len=2048).to_parquet(path, index=False)
    return path


def test_planned_batch_keeps_a_real_training_run_under_the_limit(long_frame_path, tmp_path):
    import pandas as pd

    frame = pd.read_parquet(long_frame_path)
    # TF's runtime alone is 640-770 MiB RSS depending on how much of its libraries the page cache maps in;
    # 1 GiB leaves room for a real batch on any of those machines while memory still binds.
    ram_limit = 1024 * MiB
    plan = autobatch.plan(
        frame, "label", preprocess=canonical.preprocess, model=f"{canonical.__file__}:build_model",
        ram_limit=ram_limit, cache=False, trial_batch_sizes=(4, 16, 64),
        in_process=False,  # the training run is another process, as with the CLI
    )
    # Memory is the limit: the fitted line, or a confirming trial that the watchdog stopped at the limit.
    assert plan.confirmed and (
        plan.limited_by in ("host memory", "confirming trials") or "ran out of memory" in plan.limited_by
    ), plan.explanation
    assert 1 < plan.batch_size < len(frame)
    script = tmp_path / "train.py"
    examples = str(canonical.__file__).rsplit("/", 1)[0]
    script.write_text(TRAIN_SCRIPT.format(examples=examples, data=str(long_frame_path), batch=plan.batch_size))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    vmhwm = json.loads(out.stdout.strip().splitlines()[-1])["vmhwm"]
    assert vmhwm < ram_limit, f"peak {vmhwm / MiB:.0f} MiB over the {ram_limit / MiB:.0f} MiB limit at batch {plan.batch_size}"
    # The prediction is honest, not wildly conservative either.
    assert vmhwm > 0.6 * plan.predicted_peak_bytes
    print(f"batch {plan.batch_size}: predicted {plan.predicted_peak_bytes / MiB:.0f} MiB, measured {vmhwm / MiB:.0f} MiB")


def test_second_plan_on_the_same_setup_comes_from_the_cache(frame, small_model_path):
    kwargs = dict(preprocess=canonical.preprocess, model=small_model_path, ram_limit="2GiB", trial_batch_sizes=(4, 16))
    first = autobatch.plan(frame, "label", **kwargs)
    second = autobatch.plan(frame, "label", **kwargs)
    assert not first.probe.from_cache and second.probe.from_cache
    assert second.batch_size == first.batch_size and second.confirmed
    # The confirming trial is part of what was cached: nothing was re-run.
    assert second.probe.trials == first.probe.trials


# ---------------------------------------------------------------- autobatch.fit end to end


def _learnable(n, seed=0):
    """Two sequence inputs; the label is whether in1's mean is positive: learnable by the canonical model."""
    frame = canonical.make_frame(n, seed=seed, max_len=64)
    frame["label"] = (frame["in1"].map(lambda a: a.mean()) > 0).astype("int64")
    return frame


def test_fit_in_memory_trains_at_the_plan_and_reports(tmp_path):
    import io

    from rich.console import Console

    frame = _learnable(600)
    model = canonical.build_model()
    out = io.StringIO()
    history = autobatch.fit(
        model, frame.drop(columns=["label"]), frame["label"], preprocess=canonical.preprocess, epochs=3,
        ram_limit="4GiB", max_batch_size=64, validation_split=0.2, console=Console(file=out, width=140),
        log_path=tmp_path / "run.jsonl", cache=False,
    )
    plan = history.autobatch_plan
    assert plan.batch_size == 64 and plan.limited_by == "max_batch_size"
    losses = history.history["loss"]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert "val_loss" in history.history
    summary = history.autobatch_summary
    # 480 training rows (the rest held out) per epoch, every one once: 3 epochs.
    assert summary.samples == 3 * 480
    assert summary.peak_rss_bytes < 4 * 1024**3 and summary.feed_seconds > 0
    text = out.getvalue()
    assert "autobatch plan" in text and "autobatch memory summary" in text
    assert (tmp_path / "run.jsonl").read_text().count('"type": "summary"') == 1


def test_fit_with_pad_columns_pads_in_tensorflow_and_budgets_the_copy_it_holds(monkeypatch):
    frame = _learnable(600, seed=1)
    x, y = frame.drop(columns=["label"]), frame["label"]
    pad = autobatch.PadColumns(["in1", "in2"], add_feature_axis=True, target_axis=True)
    monkeypatch.setattr("autobatch._planning.rss_bytes", lambda: 0)  # nothing else held by this process
    history = autobatch.fit(
        canonical.build_model(), x, y, preprocess=pad, epochs=3, ram_limit="4GiB", max_batch_size=64, cache=False,
        monitor=False,
    )
    losses = history.history["loss"]
    assert len(losses) == 3 and losses[-1] < losses[0]
    copy = pad.export_bytes(x, y)
    assert copy > 600 * 4, "the export holds the padded columns' values and the targets"
    host = dict(history.autobatch_plan.budget("host").components)
    assert host["tf.data copy"] == copy and host["this process"] == 0, host  # the copy is a part of its own


def test_fit_with_pad_columns_on_shards_budgets_the_copy_of_the_strategy_it_plans(tmp_path):
    import types

    from autobatch._planning import _export_bytes

    frame = _learnable(400, seed=1)
    canonical.write_shards(frame, tmp_path, shards=4)
    pad = autobatch.PadColumns(["in1", "in2"], add_feature_axis=True, target_axis=True)
    history = autobatch.fit(
        canonical.build_model(), str(tmp_path / "parquet"), "label", preprocess=pad, epochs=2, ram_limit="4GiB",
        max_batch_size=48, monitor=False, cache=False,
    )
    plan = history.autobatch_plan
    assert len(history.history["loss"]) == 2
    copies = _export_bytes(types.SimpleNamespace(preprocess=pad, data=None), plan.probe)
    # In memory the whole data's values (its raw bytes bound them); streaming one shard's, reordered as it is read.
    assert copies == {"in_memory": plan.probe.raw_bytes, "stream": plan.probe.largest_shard_raw_bytes}
    assert dict(plan.budget("host").components)["tf.data copy"] == copies[plan.strategy] > 0
    python = autobatch.PadColumns(["in1", "in2"], padding="pre")
    assert _export_bytes(types.SimpleNamespace(preprocess=python, data=None), plan.probe) == {}


def test_fit_streams_shards_and_sees_every_row(tmp_path):
    frame = _learnable(400, seed=1)
    canonical.write_shards(frame, tmp_path, shards=4)
    model = canonical.build_model()
    history = autobatch.fit(
        model, str(tmp_path / "parquet"), "label", preprocess=canonical.preprocess, epochs=2, ram_limit="4GiB",
        max_batch_size=48, monitor=False, cache=False,
    )
    plan = history.autobatch_plan
    assert plan.n_samples == 400 and plan.batch_size == 48 and plan.steps_per_epoch == 9
    assert history.autobatch_summary is None and len(history.history["loss"]) == 2


def _recording_fit(model):
    """``model.fit`` wrapped to record the training data's cardinality and the ``steps_per_epoch`` it was given."""
    calls = []
    fit = model.fit

    def recorded(data, **kwargs):
        calls.append((int(data.cardinality()), kwargs.get("steps_per_epoch")))
        return fit(data, **kwargs)

    model.fit = recorded
    return calls


def test_fit_keeps_one_iterator_for_the_whole_fit():
    frame = _learnable(400, seed=1)
    model = canonical.build_model()
    calls = _recording_fit(model)
    history = autobatch.fit(
        model, frame.drop(columns=["label"]), frame["label"], preprocess=canonical.preprocess, epochs=3,
        ram_limit="4GiB", max_batch_size=48, validation_split=0.25, cache=False,
    )
    # One repeating pass of the 3 epochs (steps_per_epoch=len(feed)): Keras keeps its iterator across them.
    assert calls == [(3 * math.ceil(300 / 48), math.ceil(300 / 48))]
    assert len(history.history["loss"]) == 3 and "val_loss" in history.history
    assert history.autobatch_summary.samples == 3 * 300, "every training row once an epoch, the last batch short"


def test_fit_repeats_its_pass_unless_batches_vary_or_validation_reads_shards(tmp_path):
    import types

    from autobatch.api import _repeats
    from autobatch.feeds import InMemoryFeed, ShardFeed
    from autobatch.feeds.size_aware import SizeAwareFeed

    frame = _learnable(120, seed=1)
    canonical.write_shards(frame, tmp_path, shards=3)
    stream, memory = types.SimpleNamespace(strategy="stream"), types.SimpleNamespace(strategy="in_memory")
    shards = ShardFeed(tmp_path / "parquet", "label", batch_size=16)
    rows = InMemoryFeed(frame, "label", batch_size=16)
    validation = ShardFeed(tmp_path / "parquet", "label", batch_size=16)
    assert _repeats(shards, None, stream, adaptive=False)
    assert not _repeats(shards, validation, stream, adaptive=False), "validation reads shards beside it"
    assert _repeats(rows, validation, memory, adaptive=False)
    assert not _repeats(rows, None, memory, adaptive=True)
    sized = SizeAwareFeed(frame, "label", boundaries=[64], batch_sizes=[16], preprocess=canonical.preprocess)
    assert not _repeats(sized, None, memory, adaptive=False)


def _streamed(monkeypatch):
    """Have autobatch.fit stream the shards (the plan would hold this little data in memory)."""
    import autobatch.api

    planned = autobatch.api.plan
    monkeypatch.setattr(
        autobatch.api, "plan", lambda *args, **kwargs: dataclasses.replace(planned(*args, **kwargs), strategy="stream")
    )


@pytest.mark.parametrize(
    ("source", "max_batch_size", "epochs", "initial_epoch"),
    [("memory", 160, 2, 0), ("memory", 48, 3, 1), ("csv", 160, 2, 0), ("csv", 48, 2, 0)],
    ids=["memory-one-step-an-epoch", "memory-several-steps-resumed", "csv-one-step-an-epoch", "csv-several-steps"],
)
def test_fit_prepares_exactly_the_epochs_that_train(
    tmp_path, monkeypatch, recwarn, source, max_batch_size, epochs, initial_epoch
):
    from collections import Counter

    from autobatch.feeds import ShardFeed

    n = 160
    frame = _learnable(n, seed=9).assign(id=range(n))
    seen, recording = [], [False]
    reads = []  # (epoch, file) of every shard read while training
    read = ShardFeed._load

    def counted(self, file_index, epoch):
        if recording[0]:
            reads.append((epoch, self.shards[file_index].path.name))
        return read(self, file_index, epoch)

    monkeypatch.setattr(ShardFeed, "_load", counted)
    if source == "memory":
        data, target, options = frame.drop(columns=["label"]), frame["label"], {"validation_split": 0.25}
    else:
        canonical.write_shards(frame, tmp_path, shards=4)
        _streamed(monkeypatch)
        data, target, options = str(tmp_path / "csv"), "label", {}
    steps = _epoch_steps_callback(recording)
    history = autobatch.fit(
        canonical.build_model(), data, target, preprocess=_recording(canonical.preprocess, seen, recording),
        epochs=epochs, initial_epoch=initial_epoch, ram_limit="4GiB", max_batch_size=max_batch_size,
        callbacks=[steps], monitor=False, cache=False, **options,
    )
    plan, trained = history.autobatch_plan, epochs - initial_epoch
    assert plan.strategy == ("stream" if source == "csv" else "in_memory") and plan.batch_size == max_batch_size
    n_train = n - 40 if source == "memory" else n  # validation holds out 25%
    assert steps.per_epoch == [math.ceil(n_train / max_batch_size)] * trained
    # preprocess ran once per sample in each epoch that trained (training rows) and in each validation pass
    # (held-out rows), and never for an epoch past the last.
    times = Counter(seen)
    assert sorted(times) == list(range(n)) and set(times.values()) == {trained}, Counter(times.values())
    if source == "csv":
        files = sorted(path.name for path in (tmp_path / "csv").iterdir())
        assert sorted(reads) == sorted((e, f) for e in range(initial_epoch, epochs) for f in files), reads
    assert not [w for w in recwarn if "ran out of data" in str(w.message)], "Keras never asked past the last epoch"


def test_fit_keeps_the_effective_batch_by_gradient_accumulation():
    frame = _learnable(300, seed=2)
    model = canonical.build_model()
    history = autobatch.fit(
        model, frame.drop(columns=["label"]), frame["label"], preprocess=canonical.preprocess, epochs=1,
        ram_limit="4GiB", max_batch_size=25, target_batch_size=100, monitor=False, cache=False,
    )
    plan = history.autobatch_plan
    assert plan.batch_size == 25 and plan.gradient_accumulation_steps == 4 and plan.effective_batch_size == 100
    assert model.optimizer.gradient_accumulation_steps == 4
    # 12 steps of 25 samples, one optimizer update per 4 steps.
    assert int(model.optimizer.iterations.numpy()) == 300 // 100


def test_fit_refuses_an_optimizer_already_built_without_accumulation():
    import numpy as np

    frame = _learnable(100, seed=3)
    model = canonical.build_model()
    inputs, targets = canonical.preprocess(frame.drop(columns=["label"]).iloc[:8], frame["label"].iloc[:8])
    model.train_on_batch(inputs, targets)  # builds the optimizer
    with pytest.raises(autobatch.ConfigError) as excinfo:
        autobatch.fit(
            model, frame.drop(columns=["label"]), frame["label"], preprocess=canonical.preprocess,
            ram_limit="4GiB", max_batch_size=10, target_batch_size=40, monitor=False, cache=False,
        )
    assert "gradient_accumulation_steps=4" in str(excinfo.value)
    assert np.isfinite(model.evaluate(inputs, targets, verbose=0))


def test_fit_warns_about_arguments_it_decides_itself():
    frame = _learnable(100, seed=4)
    # The warning comes first; the unparseable limit then stops the call before any probing.
    with pytest.warns(UserWarning, match="chooses `batch_size`"), pytest.raises(autobatch.ConfigError) as excinfo:
        autobatch.fit(
            canonical.build_model(), frame.drop(columns=["label"]), frame["label"], preprocess=canonical.preprocess,
            ram_limit="plenty", batch_size=7, monitor=False, cache=False,
        )
    assert "ram_limit" in str(excinfo.value)


# ---------------------------------------------------------------- bad input on the fit path


def test_fit_refuses_an_uncompiled_model_before_probing():
    import keras

    frame = _learnable(50, seed=5)
    model = keras.Model.from_config(canonical.build_model().get_config())  # same layers, never compiled
    with pytest.raises(autobatch.ModelError) as excinfo:
        autobatch.fit(model, frame.drop(columns=["label"]), frame["label"], preprocess=canonical.preprocess, cache=False)
    assert "not compiled" in str(excinfo.value) and model.name in str(excinfo.value)


def test_fit_with_a_budget_smaller_than_one_sample_says_how_much_is_needed():
    frame = _learnable(60, seed=6)
    model = canonical.build_model()
    with pytest.raises(autobatch.BudgetError) as excinfo:
        autobatch.fit(
            model, frame.drop(columns=["label"]), frame["label"], preprocess=canonical.preprocess, ram_limit="200MiB",
            monitor=False, cache=False,
        )
    message = str(excinfo.value)
    assert "cannot hold even one sample" in message and "ram_limit=200MiB" in message, message
    assert model.optimizer.iterations.numpy() == 0, "nothing was trained"


def _csv_style(frame):
    """Sequences written as CSV cells hold them: space-separated numbers."""
    return frame.assign(**{c: frame[c].map(lambda a: " ".join(f"{v:.4g}" for v in a)) for c in ("in1", "in2")})


def _pad_text(batch_x, batch_y):
    return autobatch.pad_columns(batch_x, ["in1", "in2"], add_feature_axis=True), batch_y.to_numpy("float32").reshape(-1, 1)


def test_fit_raises_the_feeds_error_naming_the_row_not_tensorflows_wrapper():
    from autobatch._data import as_in_memory, sample_in_memory

    frame = _csv_style(_learnable(300, seed=7))
    frame.index = [f"s{i}" for i in range(300)]
    x, y = frame.drop(columns=["label"]), frame["label"]
    # A row the probe never preprocesses (it samples random, largest and smallest rows): only training meets it.
    sample = sample_in_memory(as_in_memory(x, y), k=32)
    probed = {*sample.random.x.index, *sample.worst.x.index, *sample.smallest.x.index}
    lengths = x["in1"].str.len()
    bad = next(label for label in lengths.sort_values().index[100:] if label not in probed)
    tokens = x.at[bad, "in1"].split()
    x.at[bad, "in1"] = " ".join(["abc", *tokens[1:]])  # same length: the probe's samples stay the same
    with pytest.raises(autobatch.DataError) as excinfo:
        autobatch.fit(
            canonical.build_model(), x, y, preprocess=_pad_text, epochs=1, ram_limit="4GiB", max_batch_size=32,
            monitor=False, cache=False,
        )
    message = str(excinfo.value)
    assert "column 'in1'" in message and "holds 'abc', which is not a float32 number" in message, message
    assert f"row {x.index.get_loc(bad)} of the data (index label {bad!r})" in message, message
    assert "tensorflow" in type(excinfo.value.__context__).__module__, "TensorFlow's own error is kept as context"


def _refuse_to_plan(monkeypatch):
    """autobatch.fit must stop before it probes: planning fails the test."""
    import autobatch.api

    def refuse(*args, **kwargs):
        raise AssertionError("autobatch.fit probed although it should have refused the call first")

    monkeypatch.setattr(autobatch.api, "plan", refuse)
    monkeypatch.setattr(autobatch.api, "plan_size_aware", refuse)


@pytest.mark.parametrize(
    ("keywords", "expected"),
    [
        (
            {"target": "label"},
            [
                "unknown keyword argument(s) `target`: autobatch.fit passes the keywords it does not take itself to "
                "Functional.fit, which does not take it either.",
                "`target`: did you mean y='label'? y is the target column name (or names) of the data",
                "Received: target='label'",
            ],
        ),
        ({"labels": ["label"]}, ["`labels`: did you mean y=['label']?"]),
        ({"targets": [0.0, 1.0]}, ["`targets`: did you mean y=? y is the target column name", "targets themselves"]),
        (
            {"batch": 32},
            ["`batch`: autobatch.fit chooses the batch size itself; did you mean max_batch_size= (never train on "
             "larger batches) or target_batch_size= (the batch the optimizer sees, kept by gradient accumulation)?"],
        ),
        ({"max_batchsize": 64}, ["`max_batchsize`: did you mean max_batch_size=?"]),
        ({"validaton_freq": 2}, ["`validaton_freq`: did you mean validation_freq=?"]),
        ({"memory_limit": "4GiB"}, ["`memory_limit`: did you mean ram_limit= (e.g. ram_limit='8GiB')?"]),
        (
            {"epoch": 3, "class_weights": {0: 1.0}, "initial_epoch": 0},
            ["argument(s) `epoch`, `class_weights`:", "which does not take them either", "`epoch`: did you mean epochs=",
             "`class_weights`: did you mean class_weight=", "Received: epoch=3, class_weights={0: 1.0}"],
        ),
        ({"zzz": 1}, ["`zzz`: no close match; see help(autobatch.fit) and help(model.fit)."]),
    ],
    ids=["target", "labels", "targets", "batch", "typo-own", "typo-model-fit", "memory", "several", "no-match"],
)
def test_fit_names_an_unknown_keyword_and_the_one_meant_before_probing(tmp_path, monkeypatch, keywords, expected):
    canonical.write_shards(_learnable(40, seed=10), tmp_path, shards=2)
    model = canonical.build_model()
    _refuse_to_plan(monkeypatch)
    with pytest.raises(autobatch.ConfigError) as excinfo:
        autobatch.fit(
            model, str(tmp_path / "csv"), preprocess=canonical.preprocess, monitor=False, cache=False, **keywords
        )
    message = str(excinfo.value)
    for part in expected:
        assert part in message, message
    assert "initial_epoch" not in message, "model.fit takes it"
    assert model.optimizer.iterations.numpy() == 0


def test_fit_checks_keywords_against_what_an_overridden_model_fit_takes():
    import keras

    from autobatch._fit_checks import model_fit_parameters

    class Forwarding(keras.Model):
        def fit(self, *args, patience=3, **kwargs):  # passes the rest on to keras.Model.fit
            return super().fit(*args, **kwargs)

    class Closed(keras.Model):
        def fit(self, x, y=None, *, epochs=1):
            return None

    model = canonical.build_model()
    keras_names = model_fit_parameters(model)
    assert {"x", "y", "class_weight", "initial_epoch", "validation_freq"} <= keras_names and "self" not in keras_names
    assert model_fit_parameters(Forwarding()) == keras_names | {"patience"}
    assert model_fit_parameters(Closed()) == {"x", "y", "epochs"}
    model.fit = lambda data, **kwargs: None  # a wrapper, as tests and tools install: judged by keras.Model.fit
    assert model_fit_parameters(model) == keras_names | {"data"}


def test_fit_without_targets_names_the_columns_to_choose_from_before_probing(tmp_path, monkeypatch):
    import numpy as np

    frame = _learnable(40, seed=11)
    canonical.write_shards(frame, tmp_path, shards=2)
    _refuse_to_plan(monkeypatch)
    for data in (frame, str(tmp_path / "csv"), str(tmp_path / "parquet" / "0.parquet")):
        with pytest.raises(autobatch.ConfigError) as excinfo:
            autobatch.fit(canonical.build_model(), data, monitor=False, cache=False)
        message = str(excinfo.value)
        assert message.startswith(
            "no targets: pass y= the target column name (one of: ['in1', 'in2', 'label']) or the targets themselves"
        ), message
        assert "'two_sequence_classifier' is compiled with a loss" in message and message.endswith("Received: y=None")
    with pytest.raises(autobatch.ConfigError) as excinfo:
        autobatch.fit(canonical.build_model(), np.zeros((8, 3), "float32"), monitor=False, cache=False)
    assert str(excinfo.value).startswith("no targets: pass y= the targets (an array with one row per sample")


def test_fit_takes_no_targets_where_preprocess_or_the_model_needs_none(tmp_path):
    import keras

    from autobatch._data import ShardSource
    from autobatch._fit_checks import check_targets

    frame = _learnable(40, seed=12)
    canonical.write_shards(frame, tmp_path, shards=2)
    with_loss = canonical.build_model()
    without_loss = keras.Model.from_config(with_loss.get_config())
    without_loss.compile(optimizer="adam")  # e.g. a model that adds its own losses (add_loss)
    shards = str(tmp_path / "csv")
    assert check_targets(with_loss, frame, None, canonical.preprocess) is None, "preprocess may build the targets"
    assert check_targets(with_loss, shards, None, canonical.preprocess) is None
    assert check_targets(without_loss, frame, None, None) is None
    assert check_targets(with_loss, ShardSource.from_spec(shards, "label"), None, None) is None
    assert check_targets(with_loss, f"{canonical.__file__}:load", None, None) is None, "the function gives y"
    assert check_targets(with_loss, frame, "label", None) is None


# ---------------------------------------------------------------- memory pressure during fit


class _LowHeadroomAfterStep:
    """A memory reader that reports real readings, but (after `flip()`) only 100 MiB available on the system."""

    def __init__(self):
        self.low = False

    def __call__(self):
        from autobatch._readings import read_memory

        reading = read_memory()
        return dataclasses.replace(reading, available_bytes=100 * MiB if self.low else 64 * 1024 * MiB)


def _recording(preprocess, seen, recording):
    def wrapped(batch_x, batch_y):
        if recording[0]:
            seen.extend(batch_x["id"].tolist())
        return preprocess(batch_x, batch_y)

    return wrapped


def _epoch_steps_callback(recording, on_step=None):
    """Counts steps per epoch; turns `recording` on as training starts (after the probe and the signature check)."""
    import keras

    class Steps(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.per_epoch = []

        def on_train_begin(self, logs=None):
            recording[0] = True

        def on_epoch_begin(self, epoch, logs=None):
            self.per_epoch.append(0)

        def on_train_batch_end(self, batch, logs=None):
            self.per_epoch[-1] += 1
            if on_step is not None:
                on_step(len(self.per_epoch) - 1, batch)

    return Steps()


def _assert_each_epoch_exactly_once(seen, n, epochs):
    assert len(seen) == epochs * n, f"{len(seen)} rows produced during fit, expected {epochs} x {n}"
    passes = [seen[k * n : (k + 1) * n] for k in range(epochs)]
    for rows in passes:
        assert sorted(rows) == list(range(n))
    assert passes[0] != passes[1], "epochs reshuffle"


def test_fit_adaptive_shrinks_batches_on_low_headroom_and_keeps_the_effective_batch():
    frame = _learnable(600, seed=8).assign(id=range(600))
    reader = _LowHeadroomAfterStep()
    seen, recording = [], [False]

    def on_step(epoch, batch):
        if epoch == 0 and batch == 2:
            reader.low = True  # another process took memory: 100 MiB left, the 4 GiB budget's margin is 410 MiB

    steps = _epoch_steps_callback(recording, on_step)
    model = canonical.build_model()
    with pytest.warns(ResourceWarning, match="memory headroom is .* below the safety margin") as record:
        history = autobatch.fit(
            model, frame.drop(columns=["label"]), frame["label"],
            preprocess=_recording(canonical.preprocess, seen, recording), epochs=2, ram_limit="4GiB",
            max_batch_size=32, target_batch_size=128, adaptive=True, callbacks=[steps], cache=False,
            monitor_options={"reader": reader, "interval_s": 0.01},
        )
    plan = history.autobatch_plan
    assert (plan.batch_size, plan.gradient_accumulation_steps) == (32, 4)
    headroom = [str(w.message) for w in record if issubclass(w.category, ResourceWarning) and "headroom" in str(w.message)]
    assert len(headroom) == 1 and "cut from 32 to at most 16 samples" in headroom[0], headroom
    assert history.autobatch_summary.shrinks == 1 and history.autobatch_summary.smallest_batch_size == 16
    # Epoch 0 switched to pieces of 16 part-way, epoch 1 is all pieces; every sample exactly once in each.
    assert plan.steps_per_epoch < steps.per_epoch[0] < 2 * plan.steps_per_epoch, steps.per_epoch
    assert steps.per_epoch[1] == 2 * plan.steps_per_epoch, steps.per_epoch
    _assert_each_epoch_exactly_once(seen, 600, epochs=2)
    assert history.autobatch_summary.samples == 2 * 600 and len(history.history["loss"]) == 2
    # Each update still averages 128 samples: 8 steps of 16 instead of 4 of 32.
    assert model.optimizer.gradient_accumulation_steps == 8


HOG = textwrap.dedent(
    """
    import sys
    sys.stdout.write("ready\\n"); sys.stdout.flush()
    held = []
    for line in sys.stdin:
        held.append(b"\\x01" * (int(line) * 1024 * 1024))  # written, so resident, not just reserved
        sys.stdout.write("holding\\n"); sys.stdout.flush()
    """
)


def test_fit_adaptive_survives_a_second_process_taking_memory():
    """A real second process allocates memory mid-fit; the monitor sees the headroom fall and batches shrink.

    The host has far more memory than this test may take, so the machine is modelled as a small one: available
    memory = a fixed total - this process's RSS - the other process's RSS, both read from /proc as training runs.
    The total leaves 1 GiB beyond the margin at the start; the other process then takes 1.25 GiB for real.
    """
    from autobatch._memory import rss_bytes
    from autobatch._readings import read_memory

    hog = subprocess.Popen([sys.executable, "-c", HOG], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert hog.stdout.readline().strip() == "ready"
        margin = 256 * MiB
        total = []

        def small_machine():
            reading = read_memory()
            used = reading.rss_bytes + rss_bytes(hog.pid)
            if not total:
                total.append(used + 1024 * MiB + margin)
            return dataclasses.replace(reading, available_bytes=max(total[0] - used, 0))

        def on_step(epoch, batch):
            if epoch == 0 and batch == 2:
                hog.stdin.write(f"{1280}\n")
                hog.stdin.flush()
                assert hog.stdout.readline().strip() == "holding"

        frame = _learnable(600, seed=9).assign(id=range(600))
        seen, recording = [], [False]
        steps = _epoch_steps_callback(recording, on_step)
        with pytest.warns(ResourceWarning, match="memory headroom"):
            history = autobatch.fit(
                canonical.build_model(), frame.drop(columns=["label"]), frame["label"],
                preprocess=_recording(canonical.preprocess, seen, recording), epochs=2, ram_limit="4GiB",
                max_batch_size=32, adaptive=True, callbacks=[steps], cache=False,
                monitor_options={"reader": small_machine, "interval_s": 0.02, "min_headroom_bytes": margin},
            )
        hog_rss = rss_bytes(hog.pid)
    finally:
        hog.kill()
        hog.wait()
    assert hog_rss > 1280 * MiB, "the other process really holds the memory"
    summary = history.autobatch_summary
    assert summary.shrinks >= 1 and summary.smallest_batch_size <= 16, summary
    assert steps.per_epoch[1] > history.autobatch_plan.steps_per_epoch, steps.per_epoch
    _assert_each_epoch_exactly_once(seen, 600, epochs=2)
    assert len(history.history["loss"]) == 2


# ---------------------------------------------------------------- limits honoured end to end

EXAMPLE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {examples!r})
    import seed_style
    from autobatch._memory import peak_rss_bytes
    history = seed_style.main(["--rows", "3000", "--epochs", "{epochs}", "--ram-limit", "{limit}"])
    plan = history.autobatch_plan
    print(json.dumps({{"vmhwm": peak_rss_bytes(), "batch": plan.batch_size, "predicted": plan.predicted_peak_bytes,
                      "limited_by": plan.limited_by, "monitor_peak": history.autobatch_summary.peak_rss_bytes}}))
    """
)


def test_fit_on_the_example_keeps_the_process_peak_under_ram_limit_for_a_whole_long_run(tmp_path):
    import psutil

    limit = 1024 * MiB  # see test_planned_batch_keeps_a_real_training_run_under_the_limit
    assert psutil.virtual_memory().available > 4 * limit, "the limit must bind, not the machine"
    script = tmp_path / "fit_example.py"
    examples = str(canonical.__file__).rsplit("/", 1)[0]
    # Many epochs: every new padded shape leaves TensorFlow's allocators a little more fragmented, so the
    # peak rises for tens of epochs (a plan from the worst-case batch alone went ~50 MiB over by epoch 30).
    script.write_text(EXAMPLE_SCRIPT.format(examples=examples, limit="1GiB", epochs=30))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(
        f"autobatch.fit at batch {result['batch']} ({result['limited_by']}): VmHWM {result['vmhwm'] / MiB:.0f} MiB, "
        f"predicted {result['predicted'] / MiB:.0f} MiB, ram_limit {limit / MiB:.0f} MiB"
    )
    limited = result["limited_by"]
    assert limited in ("host memory", "confirming trials") or "ran out of memory" in limited, result
    assert result["vmhwm"] < limit, result
    assert result["vmhwm"] > 0.6 * result["predicted"], "the prediction is honest, not wildly conservative"
    # The same peak, to within the few pages by which the kernel counts VmRSS (which the monitor samples) ahead of VmHWM.
    assert abs(result["monitor_peak"] - result["vmhwm"]) <= MiB, "the monitor reports the same peak"


def test_a_plan_nudged_just_above_a_confirmed_batch_takes_it_instead_of_trialling_again():
    # Concave memory (allocator reuse at larger batches): each fitting trial lowers the slope a little,
    # so every re-plan lands a few samples above the last confirmed batch.
    def concave(b):
        return 600 * MiB + 0.3 * MiB * b - 0.00004 * MiB * b * b

    prober = FakeProber(concave)
    probed = _base(StepTrial(b, int(concave(b))) for b in (8, 32, 128))
    plan, final = confirm_plan(prober, probed, [Budget("host", 1024 * MiB, "test")], safety=0.1, queue_batches=0)
    assert plan.confirmed and plan.batch_size == max(t.batch_size for t in final.trials if t.fits)
    assert len(prober.tried) <= 2, prober.tried
    assert plan.limited_by == "confirming trials" and "max_batch_size" not in plan.explanation
