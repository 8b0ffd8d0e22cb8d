import io
import json
import logging
import os
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import autobatch
from autobatch import ModelError, PreprocessError, ProbeError, ProbeResult
from autobatch._cache import cache_dir
from autobatch._child import Child, child_environment
from autobatch._data import as_in_memory, sample_in_memory
from autobatch._units import format_bytes
from autobatch.probe import Prober, StepTrial

import canonical

MiB = 1024**2


def _nbytes(outputs) -> int:
    inputs, targets = outputs
    return sum(a.nbytes for a in inputs.values()) + targets.nbytes


def test_preprocessed_bytes_are_the_real_arrays_nbytes(frame):
    result = autobatch.probe(frame, "label", preprocess=canonical.preprocess, cache=False)
    sample = sample_in_memory(as_in_memory(frame, "label"), k=32)
    random_bytes = _nbytes(canonical.preprocess(*sample.random.take(np.arange(32))))
    worst_bytes = _nbytes(canonical.preprocess(*sample.worst.take(np.arange(32))))
    assert result.preprocessed_bytes_per_sample == random_bytes / 32
    assert result.worst_preprocessed_bytes_per_sample == worst_bytes / 32
    assert result.raw_bytes == as_in_memory(frame, "label").nbytes
    assert result.n_samples == len(frame) and result.trials == () and result.device == "none"


def test_worst_case_batch_is_much_larger_on_skewed_lengths():
    # 1000 short rows and two 1000-long ones: a random batch pads to ~10, the worst to 1000.
    lengths = np.full(1000, 10)
    lengths[[17, 612]] = 1000
    rng = np.random.default_rng(0)
    skewed = pd.DataFrame(
        {
            "in1": [rng.standard_normal(k).astype(np.float32) for k in lengths],
            "in2": [rng.standard_normal(5).astype(np.float32) for _ in lengths],
            "label": np.arange(1000) % 2,
        }
    )
    result = autobatch.probe(skewed, "label", preprocess=canonical.preprocess, cache=False)
    assert result.worst_preprocessed_bytes_per_sample > 20 * result.preprocessed_bytes_per_sample
    # Padding expands data: every sample of the worst batch holds the longest sequence's length.
    assert result.worst_preprocessed_bytes_per_sample >= 4 * 1000
    assert result.worst_preprocessed_bytes_per_sample > 3 * result.raw_bytes_per_sample
    # The transient peak of preprocessing covers at least its own output.
    assert result.preprocess_peak_bytes_per_sample >= result.worst_preprocessed_bytes_per_sample


def test_output_signature_marks_padded_axes_unknown(frame):
    result = autobatch.probe(frame, "label", preprocess=canonical.preprocess, cache=False)
    specs = {s.name: s for s in result.output_signature}
    assert specs["x/in1"].dtype == "float32" and specs["x/in1"].shape == (None, None, 1)
    assert specs["y"].shape == (None, 1)


def test_parquet_shards_measure_like_the_frame(frame, shard_dirs):
    shards = autobatch.probe(str(shard_dirs / "parquet"), "label", preprocess=canonical.preprocess, cache=False)
    memory = autobatch.probe(frame, "label", preprocess=canonical.preprocess, cache=False)
    assert shards.source == "shards" and shards.n_samples == memory.n_samples
    assert shards.worst_preprocessed_bytes_per_sample == memory.worst_preprocessed_bytes_per_sample


def _drop_one(x, y):
    inputs, targets = canonical.preprocess(x, y)
    return inputs, targets[:-1]


def _keys_depend_on_length(x, y):
    inputs, targets = canonical.preprocess(x, y)
    if inputs["in1"].shape[1] > 100:
        inputs["extra"] = inputs.pop("in2")
    return inputs, targets


def _dtype_depends_on_length(x, y):
    inputs, targets = canonical.preprocess(x, y)
    if inputs["in1"].shape[1] > 100:
        inputs["in1"] = inputs["in1"].astype(np.float64)
    return inputs, targets


def _rank_depends_on_length(x, y):
    inputs, targets = canonical.preprocess(x, y)
    if inputs["in1"].shape[1] > 100:
        inputs["in1"] = inputs["in1"][..., 0]
    return inputs, targets


def _raises(x, y):
    raise ValueError("bad row")


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        (_raises, "preprocess raised ValueError: bad row on a random batch"),
        (lambda x, y: None, "must return a pair (inputs, targets)"),
        (_drop_one, "31 rows for y"),
        (_keys_depend_on_length, "different arrays for different batches"),
        (_dtype_depends_on_length, "float64[3-D] on a random batch but float32[3-D] on the batch of smallest rows"),
        (lambda x, y: ({"in1": x["in1"].to_numpy()}, y), "dtype object"),
        (_rank_depends_on_length, "float32[2-D] on a random batch but float32[3-D] on the batch of smallest rows"),
    ],
)
def test_preprocess_errors_say_what_and_where(frame, fn, message):
    with pytest.raises(PreprocessError) as excinfo:
        autobatch.probe(frame, "label", preprocess=fn, cache=False)
    assert message in str(excinfo.value)


def test_default_preprocess_refuses_sequence_columns(frame):
    with pytest.raises(PreprocessError) as excinfo:
        autobatch.probe(frame, "label", cache=False)
    assert "column 'in1'" in str(excinfo.value) and "pass a `preprocess`" in str(excinfo.value)


def test_text_in_a_numeric_column_is_a_data_error_naming_column_and_row():
    df = pd.DataFrame({"a": np.arange(40.0), "label": np.arange(40) % 2}, index=[f"r{i}" for i in range(40)])
    df["a"] = df["a"].astype(object)
    df.loc["r21", "a"] = "oops"
    with pytest.raises(autobatch.DataError) as excinfo:
        autobatch.probe(df, "label", sample_batch_size=40, cache=False)
    message = str(excinfo.value)
    assert "column 'a' of x holds 'oops'" in message and "(index label 'r21')" in message, message
    assert "not a number" in message and "on a random batch" in message


def test_numeric_frame_needs_no_preprocess():
    df = pd.DataFrame({"a": np.arange(100.0), "b": np.arange(100), "label": np.arange(100) % 2})
    result = autobatch.probe(df, "label", cache=False)
    assert result.preprocessed_bytes_per_sample == 8 + 8 + 8


# ---------------------------------------------------------------- real training trials in a child


def test_step_memory_is_measured_and_grows_with_batch(model_probe):
    trials = model_probe.trials
    assert [t.batch_size for t in trials] == [4, 32, 128] and all(t.fits for t in trials)
    peaks = [t.peak_rss_bytes for t in trials]
    assert peaks[-1] > peaks[0]
    assert model_probe.baseline_rss_bytes is not None and model_probe.baseline_rss_bytes <= peaks[0]
    # TensorFlow's runtime alone is hundreds of MiB; a real measurement cannot be tiny.
    assert peaks[0] > 200 * 1024**2
    fit = model_probe.host_fit
    assert fit.slope_bytes >= model_probe.worst_preprocessed_bytes_per_sample
    # The line is the growth above the child's own baseline, on or above every measured point.
    assert all(model_probe.baseline_rss_bytes + fit(t.batch_size) >= t.peak_rss_bytes - 1 for t in trials)
    assert model_probe.device == "CPU" and model_probe.model_params > 0


def test_uncompiled_model_is_refused(frame):
    import keras

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    with pytest.raises(ModelError) as excinfo:
        autobatch.probe(frame, "label", preprocess=canonical.preprocess, model=model, cache=False)
    assert "not compiled" in str(excinfo.value)


def test_missing_model_file(frame, tmp_path):
    with pytest.raises(ModelError) as excinfo:
        autobatch.probe(frame, "label", preprocess=canonical.preprocess, model=tmp_path / "nope.keras", cache=False)
    assert "nope.keras" in str(excinfo.value)


def test_model_function_that_is_not_a_model_fails_in_the_child_not_here(frame, tmp_path, monkeypatch):
    (tmp_path / "notamodel.py").write_text("def build():\n    return 42\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError) as excinfo:
        autobatch.probe(frame, "label", preprocess=canonical.preprocess, model="notamodel:build", cache=False)
    assert "did not give a keras.Model" in str(excinfo.value)


def test_trial_over_its_memory_limit_is_stopped_and_reported(frame, small_model_path):
    with Prober(frame, "label", preprocess=canonical.preprocess, model=small_model_path) as prober:
        stopped = prober.run_trial(8, rss_limit_bytes=64 * 1024**2)
        assert not stopped.fits and "passed the limit of 64.0 MiB" in stopped.note
        # The caller survives and the next trial gets a fresh child.
        again = prober.run_trial(8)
        assert again.fits and again.peak_rss_bytes > 64 * 1024**2


class _DataLimitedProber:
    """Confirms with the real prober, after capping the child's heap (RLIMIT_DATA) just above what it holds now.

    A trial that needs more than ``allowance_bytes`` then really runs out of memory inside the child (malloc
    fails: TensorFlow reports it or the child dies of it), with no watchdog involved; a child started to replace
    a dead one gets the same cap.
    """

    def __init__(self, prober, allowance_bytes):
        self.prober = prober
        self.allowance_bytes = allowance_bytes
        self.tried = []

    def confirm(self, result, batch_size, *, rss_limit_bytes, fresh=False):
        import resource

        child = self.prober._child_process()
        child.info  # a replacement child starts loading at once: cap it once TensorFlow and the model are in
        pid = child.proc.pid
        with open(f"/proc/{pid}/status") as fh:
            data = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmData:"))
        cap = data + self.allowance_bytes
        resource.prlimit(pid, resource.RLIMIT_DATA, (cap, resource.RLIM_INFINITY))  # soft: may be moved again
        self.tried.append(batch_size)
        return self.prober.confirm(result, batch_size, rss_limit_bytes=None)


def test_a_trial_that_really_runs_out_of_memory_steps_the_plan_down():
    import keras

    from autobatch._memory import Budget
    from autobatch._planning import confirm_plan

    # 32 MiB of activations per 1024 samples: large batches need far more than the child's cap allows.
    inputs = keras.Input((512,))
    model = keras.Model(inputs, keras.layers.Dense(1)(keras.layers.Dense(8192, activation="relu")(inputs)))
    model.compile(optimizer="sgd", loss="mse")
    x = np.random.default_rng(0).standard_normal((4096, 512)).astype(np.float32)
    y = np.zeros((4096, 1), np.float32)
    with Prober(x, y, model=model, trial_batch_sizes=(8, 32)) as prober:
        measured = prober.measure()
        limited = _DataLimitedProber(prober, allowance_bytes=96 * 1024**2)
        budgets = [Budget("host", 64 * 1024**3, "test")]  # the budget allows everything: only the real OOM limits
        plan, final = confirm_plan(limited, measured, budgets, queue_batches=0, multiple_of=512)
    failed = [t for t in final.trials if not t.fits]
    assert failed, [(t.batch_size, t.note) for t in final.trials]
    assert all("out of memory" in t.note or "killed by signal" in t.note for t in failed), [t.note for t in failed]
    # Each failure bisects below it; the plan is a size that really trained under the cap.
    sizes = [t.batch_size for t in failed]
    assert sizes == sorted(sizes, reverse=True) and limited.tried[0] == 4096
    assert plan.confirmed and plan.batch_size < min(sizes)
    assert any(t.fits and t.batch_size == plan.confirmed_batch_size for t in final.trials[2:])
    assert "does not fit" in str(final)
    print(f"real OOM at {sizes} ({[t.note for t in failed]}); confirmed batch {plan.batch_size} (tried {limited.tried})")


def test_hanging_child_is_killed_after_the_timeout(frame, tmp_path, monkeypatch):
    (tmp_path / "slow.py").write_text("import time\ndef build():\n    time.sleep(60)\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ProbeError) as excinfo:
        autobatch.probe(frame, "label", preprocess=canonical.preprocess, model="slow:build", timeout_s=4, cache=False)
    assert "longer than 4 s" in str(excinfo.value)


# ---------------------------------------------------------------- what the child logs

TF_LOG_SOURCE = re.compile(r"^[IWEF]\d{4} [\d:.]+ +\d+ ([\w.]+\.cc):\d+\] ", re.MULTILINE)
"""The C++ file a line of TensorFlow's logging names (``I0000 00:00:17.7 12604 port.cc:153] oneDNN ...``)."""


def _tf_start_up_logs(level: str) -> set[str]:
    """The C++ files whose lines TensorFlow's start-up as the child does it logs at ``TF_CPP_MIN_LOG_LEVEL=level``."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": level}
    code = "import tensorflow as tf; tf.config.list_physical_devices('GPU')"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    return set(TF_LOG_SOURCE.findall(out.stderr))


def _child_stderr(tmp_path, monkeypatch, level: str | None) -> str:
    """All a probe child writes on stderr (its TensorFlow start-up, then a builder printing its log level)."""
    (tmp_path / "says_level.py").write_text(
        "import os\n"
        "def build():\n"
        "    print('child level', os.environ.get('TF_CPP_MIN_LOG_LEVEL', 'unset'))\n"
        "    return 42\n"
    )
    monkeypatch.chdir(tmp_path)
    if level is None:
        monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    else:
        monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", level)
    workdir = tmp_path / f"level-{level}"
    workdir.mkdir()
    child = Child({"kind": "callable", "spec": "says_level:build"}, timeout_s=300, workdir=workdir)
    with pytest.raises(ModelError) as excinfo:
        child.info  # noqa: B018 (loads TensorFlow, then the builder's 42 is refused)
    assert "did not give a keras.Model" in str(excinfo.value)
    return (workdir / "child-stderr.log").read_text()


def test_children_get_a_quiet_tensorflow_log_level_unless_the_caller_set_one():
    assert child_environment({"PATH": "/bin"}) == {"PATH": "/bin", "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
    assert child_environment({"TF_CPP_MIN_LOG_LEVEL": "0"})["TF_CPP_MIN_LOG_LEVEL"] == "0"


def test_the_child_hides_tensorflow_start_up_logs_unless_the_caller_asks_for_them(tmp_path, monkeypatch):
    # What level 2 hides in this TensorFlow (2.21 on this CPU: cpu_feature_guard.cc; port.cc and cudart_stub.cc
    # log before absl::InitializeLog whatever the level, and a failed cuInit is an ERROR, which level 2 shows).
    hidden = _tf_start_up_logs("0") - _tf_start_up_logs("2")
    quiet = _child_stderr(tmp_path, monkeypatch, None)
    verbose = _child_stderr(tmp_path, monkeypatch, "0")
    assert "child level 2" in quiet and "child level 0" in verbose, (quiet, verbose)
    assert hidden <= set(TF_LOG_SOURCE.findall(verbose)), verbose
    assert not hidden & set(TF_LOG_SOURCE.findall(quiet)), quiet
    print(f"start-up logs hidden at the default level: {sorted(hidden)}")


# ---------------------------------------------------------------- cache


def test_second_probe_answers_from_cache_and_corrupt_entries_are_rebuilt(frame):
    first = autobatch.probe(frame, "label", preprocess=canonical.preprocess)
    second = autobatch.probe(frame, "label", preprocess=canonical.preprocess)
    assert not first.from_cache and second.from_cache
    assert second.worst_preprocessed_bytes_per_sample == first.worst_preprocessed_bytes_per_sample
    entry = cache_dir() / f"{first.cache_key}.json"
    entry.write_text("{ not json")
    third = autobatch.probe(frame, "label", preprocess=canonical.preprocess)
    assert not third.from_cache and json.loads(entry.read_text())["key"] == first.cache_key


def test_a_cache_entry_that_parses_but_is_not_a_result_is_rebuilt(frame):
    first = autobatch.probe(frame, "label", preprocess=canonical.preprocess)
    entry = cache_dir() / f"{first.cache_key}.json"
    for broken in ({"n_samples": 300}, {**first.to_dict(), "trials": "not a list"}, {**first.to_dict(), "n_samples": 0}):
        entry.write_text(json.dumps({"format": 1, "key": first.cache_key, "value": broken}))
        again = autobatch.probe(frame, "label", preprocess=canonical.preprocess)
        assert not again.from_cache and again.worst_preprocessed_bytes_per_sample == first.worst_preprocessed_bytes_per_sample
        assert json.loads(entry.read_text())["value"]["n_samples"] == len(frame), "rewritten with a valid result"


def test_cache_writes_are_atomic_and_leave_no_temp_files(tmp_path):
    from autobatch import _cache

    assert _cache.store("k", {"a": 1}, tmp_path) == tmp_path / "k.json"
    (tmp_path / ".k.crashed.tmp").write_text('{"format": 1, "key": "k", "value": {"a": 2}')  # an interrupted write
    assert _cache.load("k", tmp_path) == {"a": 1}, "a temp file is never read"
    assert _cache.store("k", {"a": object()}, tmp_path) is None  # cannot be written: logged, not raised
    assert _cache.load("k", tmp_path) == {"a": 1}, "the old entry survives a failed write"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".k.crashed.tmp", "k.json"], "the failed write cleaned up"


def test_cache_key_changes_with_preprocess_and_data(frame):
    a = autobatch.probe(frame, "label", preprocess=canonical.preprocess)
    b = autobatch.probe(frame.iloc[:200], "label", preprocess=canonical.preprocess)
    c = autobatch.probe(frame, "label", preprocess=_drop_one_free)
    assert len({a.cache_key, b.cache_key, c.cache_key}) == 3 and not b.from_cache and not c.from_cache


def _drop_one_free(x, y):
    return canonical.preprocess(x, y)


def test_probe_result_round_trips_through_json(model_probe):
    restored = autobatch.ProbeResult.from_dict(json.loads(json.dumps(model_probe.to_dict())))
    assert restored == model_probe


def test_probe_result_renders(model_probe):
    text = str(model_probe)
    assert "train step, batch 128" in text and "after preprocess" in text and "MiB" in text


# ---------------------------------------------------------------- the sweep of padded lengths before each trial


def test_sweep_spans_the_padded_axes_only_and_keeps_equal_lengths_equal():
    from autobatch._sweep import sweep_lengths

    observed = {
        "x.in1": [(900, 497, 1), (32, 200, 1), (32, 10, 1)],  # trial, typical row, smallest batch
        "x.in2": [(900, 497, 1), (32, 200, 1), (32, 10, 1)],
        "y": [(900, 1), (32, 1), (32, 1)],
    }
    sweep = sweep_lengths(observed, 8, seed=0)
    assert len(sweep) == 8 and all(set(step) == {"x.in1", "x.in2"} for step in sweep)  # y has no padded axis
    lengths = [step["x.in1"][0] for step in sweep]
    assert all(step["x.in1"][1] is None for step in sweep)  # the feature axis is kept
    assert all(step["x.in1"] == step["x.in2"] for step in sweep)
    # Evenly from the typical row's length up to, not including, the trial's own, in a shuffled order.
    assert sorted(lengths) == [200 + (497 - 200) * j // 8 for j in range(8)] and lengths != sorted(lengths)
    assert sweep == sweep_lengths(observed, 8, seed=0) and sweep != sweep_lengths(observed, 8, seed=1)


def test_sweep_keeps_to_the_multiple_a_bucketing_preprocess_pads_to():
    from autobatch._sweep import sweep_lengths

    sweep = sweep_lengths({"x.seq": [(64, 512), (32, 192), (32, 64)]}, 16)
    lengths = {step["x.seq"][0] for step in sweep}
    # Each length once: 16 fractions round to 5 multiples of 64, and a shape a run reuses is not swept again.
    assert len(sweep) == 5 and lengths == {192, 256, 320, 384, 448}
    # The typical row already as long as the trial's: batches of that size all pad to it, nothing to sweep.
    assert sweep_lengths({"x.seq": [(64, 512), (1, 512), (32, 64)]}, 8) == []


def test_the_sweep_starts_where_batches_of_the_trials_size_begin():
    # 1,000 rows of lengths 1..1000: nine in ten batches of b rows hold one longer than the 0.1 ** (1 / b) quantile.
    frame = pd.DataFrame({"seq": [np.ones(n, np.float32) for n in range(1, 1001)], "label": np.zeros(1000)})

    def pad(x, y):
        return autobatch.padding.pad_sequences_batch(list(x["seq"])), y.to_numpy()

    prober = Prober(frame, "label", preprocess=pad, sample_batch_size=64)
    starts = {b: prober._typical_shapes(b)["x"][1] for b in (2, 8, 64, 512)}
    for b, start in starts.items():
        q = 0.1 ** (1 / b)
        assert abs(start - 1000 * q) <= 3000 * (q * (1 - q) / 64) ** 0.5 + 2, starts  # a 64-row sample's quantile
    assert starts[2] < starts[8] < starts[64] < starts[512] and starts[512] >= 995


def test_no_sweep_without_padded_axes_or_steps():
    from autobatch._sweep import sweep_lengths

    assert sweep_lengths({"x": [(64, 10), (32, 10)], "y": [(64, 1), (32, 1)]}, 16) == []
    assert sweep_lengths({"x": [(64, 10), (32, 5)]}, 0) == []
    with pytest.raises(autobatch.ConfigError, match="sweep_steps"):
        Prober(pd.DataFrame({"a": [1.0]}), sweep_steps=-1)


def test_a_trial_steps_through_its_sweep_then_the_worst_case_batch(tmp_path):
    import keras
    import tensorflow as tf

    from autobatch._trial import trial as _trial
    from autobatch._wire import pack_batch

    seen: list[tuple[int, ...]] = []

    class RecordShape(keras.layers.Layer):
        def call(self, x):
            shape = tf.numpy_function(lambda s: seen.append(tuple(int(d) for d in s)) or s, [tf.shape(x)], tf.int32)
            return x + tf.cast(tf.reduce_sum(shape) * 0, x.dtype)

    seq = keras.Input((None, 1), name="in1")
    out = keras.layers.Dense(1)(keras.layers.GlobalMaxPooling1D()(RecordShape()(seq)))
    model = keras.Model({"in1": seq}, out)
    model.compile(optimizer="sgd", loss="mse")
    inputs = {"in1": np.ones((4, 10, 1), np.float32)}
    arrays, structure = pack_batch(inputs, np.zeros((4, 1), np.float32))
    np.savez(tmp_path / "batch.npz", **arrays)
    message = {
        "arrays": str(tmp_path / "batch.npz"), "structure": structure, "steps": 2, "prefetch": 1,
        "rows": 4, "batch_size": 6, "sweep": [{"x.in1": [6, None]}, {"x.in1": [3, None]}],
    }
    reply = _trial(model, message, gpu=False)
    assert reply["ok"] and reply["peak_rss_bytes"] > 0 and reply["seconds_per_step"] > 0
    # The rows are cycled to the batch size first; the sweep's shorter lengths train before the full batch.
    assert seen == [(6, 6, 1), (6, 3, 1), (6, 10, 1), (6, 10, 1)]


def test_step_curve_passes_through_every_finished_trial_and_never_falls():
    trials = [StepTrial(8, 610 * MiB), StepTrial(32, 640 * MiB), StepTrial(32, 650 * MiB), StepTrial(64, 645 * MiB),
              StepTrial(128, 800 * MiB), StepTrial(900, None, fits=False)]
    r = ProbeResult(
        n_samples=1000, source="in_memory", raw_bytes=0, raw_bytes_per_sample=0.0, raw_scope="test",
        largest_shard_raw_bytes=0, sample_batch_size=32, preprocessed_bytes_per_sample=1024.0,
        worst_preprocessed_bytes_per_sample=1024.0, worst_scope="test", preprocess_peak_bytes_per_sample=0.0,
        output_signature=(), device="CPU", trials=tuple(trials), baseline_rss_bytes=600 * MiB,
    )
    curve = r.host_curve
    # Through each measured growth (the larger repeat at 32; 64 measured less than 32, so it keeps 32's).
    assert [(b, g / MiB) for b, g in curve.points] == [(8, 10), (32, 50), (64, 50), (128, 200)]
    assert all(curve(b) == pytest.approx(g) for b, g in curve.points)
    values = [curve(b) for b in range(0, 400)]
    assert all(later >= earlier - 1e-6 for earlier, later in zip(values, values[1:]))
    # Between trials, their chord; past the largest, the fitted line above every point; below the first, capped by it.
    assert curve(96) == pytest.approx(125 * MiB) and curve.piece_at(96).between == (64, 128)
    assert curve(300) == pytest.approx(r.host_fit(300)) and curve.piece_at(300).between is None
    assert curve(4) <= 10 * MiB


def test_errors_quote_the_child_without_tensorflows_start_up_lines_and_debug_logging_shows_all(
    tmp_path, monkeypatch, caplog
):
    (tmp_path / "builder_breaks.py").write_text(
        "import sys\ndef build():\n    print('building', file=sys.stderr)\n    raise RuntimeError('the builder broke')\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")  # every start-up line, as `autobatch probe --debug` asks
    child = Child({"kind": "callable", "spec": "builder_breaks:build"}, timeout_s=300, workdir=tmp_path)
    with caplog.at_level(logging.DEBUG, logger="autobatch._child"), pytest.raises(ModelError) as excinfo:
        child.info  # noqa: B018 (the builder raises; the child is closed)
    everything = child.stderr()
    assert TF_LOG_SOURCE.search(everything), everything  # the child's own log keeps them
    tail = child.stderr_tail()
    assert "building" in tail and "the builder broke" in str(excinfo.value)
    assert not re.search(r"^I\d{4} |^To enable", tail, re.MULTILINE) and "absl::InitializeLog" not in tail, tail
    assert everything.strip() in caplog.text, "debug logging shows all the child printed"


def test_the_probe_table_fits_80_columns_without_wrapping_a_name_or_a_number(frame):
    from rich.console import Console

    result = autobatch.probe(frame, "label", preprocess=canonical.preprocess, model=canonical.build_model)
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(result)
    lines = console.export_text().splitlines()
    assert max(map(len, lines)) <= 80
    for name, value in [
        ("after preprocess / sample (worst)", format_bytes(result.worst_preprocessed_bytes_per_sample)),
        ("runtime + model (child RSS)", format_bytes(result.baseline_rss_bytes)),
        (f"train step, batch {result.trials[-1].batch_size}", f"+{format_bytes(result.trials[-1].peak_rss_bytes - result.baseline_rss_bytes)}"),
        ("fit: step growth, per sample", format_bytes(result.host_fit.slope_bytes)),
    ]:
        assert any(line.startswith(name) and line.rstrip().endswith(value) for line in lines), (name, value, lines)
    assert any(line.strip() == f"largest rows of {result.worst_scope}" for line in lines), lines
    assert max(map(len, str(result).splitlines())) <= 80
