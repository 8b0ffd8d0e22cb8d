import dataclasses
import json
import subprocess
import sys
import textwrap

import pytest

import autobatch
from autobatch import Budget, ProbeResult, StepTrial
from autobatch.api import confirm_plan

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

    def confirm(self, result, batch_size, *, rss_limit_bytes):
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
    usable = 3000 * MiB * 0.9
    true_max = max(b for b in range(1, 5000) if quadratic(b) + b * 1024 <= usable)
    # The linear fit from small batches overshoots; each trial pulls the plan down until one fits.
    assert prober.tried[0] > true_max
    # Trials bisect between what fitted and what did not: failures above the true maximum, fits below it.
    outcomes = {t.batch_size: t.fits for t in final.trials[3:]}
    assert all(fits == (b <= true_max) for b, fits in outcomes.items()), outcomes
    assert plan.batch_size == max(b for b, fits in outcomes.items() if fits)
    assert plan.confirmed and plan.batch_size <= true_max
    assert plan.batch_size >= 0.8 * true_max
    assert quadratic(plan.batch_size) <= usable
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
    canonical.make_frame(1200, seed=5, max_len=2048).to_parquet(path, index=False)
    return path


def test_planned_batch_keeps_a_real_training_run_under_the_limit(long_frame_path, tmp_path):
    import pandas as pd

    frame = pd.read_parquet(long_frame_path)
    ram_limit = 900 * MiB
    plan = autobatch.plan(
        frame, "label", preprocess=canonical.preprocess, model=f"{canonical.__file__}:build_model",
        ram_limit=ram_limit, cache=False, trial_batch_sizes=(4, 16, 64),
        in_process=False,  # the training run is another process, as with the CLI
    )
    # Memory is the limit: the fitted line, or a confirming trial that the watchdog stopped at the limit.
    assert plan.confirmed and (plan.limited_by == "host memory" or "ran out of memory" in plan.limited_by), plan.explanation
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
