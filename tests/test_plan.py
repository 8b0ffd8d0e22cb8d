import dataclasses
import io
import math

import numpy as np
import pytest
from rich.console import Console

from autobatch import BudgetError, ConfigError, ProbeResult, format_bytes
from autobatch._memory import Budget
from autobatch._replicas import Distribution, ReplicaLimit
from autobatch._size_result import LengthMemoryModel, SizeAwareProbe
from autobatch.bucket_plan import make_bucket_plan
from autobatch.plan import make_plan
from autobatch.probe import StepTrial

MiB = 1024**2


def result(*, n=10_000, raw=100 * MiB, trials=((8, 600 * MiB), (64, 656 * MiB)), worst=4096.0, source="in_memory",
           shard=10 * MiB, gpu=None, baseline=592 * MiB):
    """A probe result with made-up but self-consistent numbers: step peak = 592 MiB + 1 MiB/sample."""
    steps = tuple(
        StepTrial(b, peak, None if gpu is None else gpu[i]) if peak is not None else StepTrial(b, None, fits=False)
        for i, (b, peak) in enumerate(trials)
    )
    return ProbeResult(
        n_samples=n, source=source, raw_bytes=raw, raw_bytes_per_sample=raw / n, raw_scope="test",
        largest_shard_raw_bytes=shard, sample_batch_size=32, preprocessed_bytes_per_sample=1024.0,
        worst_preprocessed_bytes_per_sample=worst, worst_scope="test", preprocess_peak_bytes_per_sample=worst,
        output_signature=(), device="CPU", trials=steps, baseline_rss_bytes=baseline,
    )


def host(limit):
    return Budget("host", limit, "test")


def predicted_host(r, batch, *, queue=2, strategy="in_memory"):
    data = r.raw_bytes if strategy == "in_memory" else 2 * r.largest_shard_raw_bytes
    return 592 * MiB + 1 * MiB * batch + data + queue * batch * r.worst_preprocessed_bytes_per_sample + batch * r.worst_preprocessed_bytes_per_sample


def test_largest_batch_whose_predicted_peak_fits():
    r = result()
    plan = make_plan(r, [host(2048 * MiB)], safety=0.1)

    def with_margin(b):  # the runtime/model (592 MiB) and the dataset are measured: the margin covers the growth
        return predicted_host(r, b) + 0.1 * (predicted_host(r, b) - 592 * MiB - r.raw_bytes)

    assert with_margin(plan.batch_size) <= 2048 * MiB < with_margin(plan.batch_size + 1)
    assert plan.limited_by == "host memory"
    assert plan.predicted_peak_bytes == pytest.approx(predicted_host(r, plan.batch_size), abs=1)
    use = plan.budget("host")
    assert use.margin_bytes == pytest.approx(with_margin(plan.batch_size) - predicted_host(r, plan.batch_size), abs=1)
    assert use.usable_bytes == 2048 * MiB - use.margin_bytes
    assert plan.steps_per_epoch == math.ceil(r.n_samples / plan.batch_size)
    assert "limited by host memory" in plan.explanation and "10% margin on what training adds" in plan.explanation
    assert not plan.confirmed  # no trial at or above that size yet


def test_safety_margin_shrinks_the_batch():
    r = result()
    assert make_plan(r, [host(2 * 1024 * MiB)], safety=0.3).batch_size < make_plan(r, [host(2 * 1024 * MiB)], safety=0.0).batch_size


def test_safety_margin_spares_the_measured_runtime_and_covers_estimated_shard_reads():
    # A tight budget over a large measured runtime: 10% of the budget would take a quarter of the room for batches;
    # a 10% margin on the growth costs the batch a factor 1/1.1 and no more.
    r = result(n=100_000)
    no_margin = make_plan(r, [host(1024 * MiB)], safety=0.0).batch_size
    with_margin = make_plan(r, [host(1024 * MiB)], safety=0.1).batch_size
    assert with_margin / no_margin == pytest.approx(1 / 1.1, abs=0.01)
    streamed = result(n=100_000, raw=10_000 * MiB, shard=50 * MiB, source="shards")
    plan = make_plan(streamed, [host(1024 * MiB)], safety=0.1)
    assert plan.strategy == "stream"
    shards = dict(plan.budget("host").components)["shards read"]
    growth = plan.predicted_peak_bytes - 592 * MiB - shards
    assert plan.budget("host").margin_bytes == pytest.approx(0.1 * (growth + shards), abs=2)


@pytest.mark.parametrize(("cap", "multiple", "expected"), [(100, None, 100), (None, 64, None), (100, 32, 96)])
def test_max_batch_size_and_multiple_of(cap, multiple, expected):
    r = result()
    free = make_plan(r, [host(2048 * MiB)]).batch_size
    plan = make_plan(r, [host(2048 * MiB)], max_batch_size=cap, multiple_of=multiple)
    assert plan.batch_size == (expected if expected is not None else free - free % multiple)
    if cap is not None:
        assert plan.limited_by == "max_batch_size"


def test_dataset_size_caps_the_batch():
    plan = make_plan(result(n=50), [host(64 * 1024 * MiB)])
    assert plan.batch_size == 50 and plan.limited_by == "the dataset size" and plan.steps_per_epoch == 1


def test_budget_smaller_than_one_sample_says_what_and_how_much():
    with pytest.raises(BudgetError) as excinfo:
        make_plan(result(), [host(512 * MiB)])
    message = str(excinfo.value)
    assert "cannot hold even one sample" in message and "train step" in message and "needs 693.0 MiB" in message and "leaves 511.9 MiB" in message


def test_gpu_budget_can_be_the_limit():
    r = result(gpu=(100 * MiB, 1100 * MiB))  # GPU peak = ~28.6 MiB + 15.6 MiB/sample
    plan = make_plan(r, [host(64 * 1024 * MiB), Budget("gpu", 4096 * MiB, "gpu_limit=4GiB")])
    assert plan.limited_by == "gpu memory"
    gpu = plan.budget("gpu")
    assert gpu is not None and gpu.predicted_peak_bytes <= gpu.usable_bytes
    assert "limited by gpu memory" in plan.explanation


def test_failed_trial_caps_the_batch_below_it():
    r = result(trials=((8, 600 * MiB), (64, 656 * MiB), (900, None)))
    plan = make_plan(r, [host(64 * 1024 * MiB)])
    assert plan.batch_size == 899 and "ran out of memory" in plan.limited_by


def test_a_measured_point_above_the_line_pulls_the_plan_down():
    easy = result()
    hard = result(trials=((8, 600 * MiB), (64, 656 * MiB), (1000, 2000 * MiB)))
    b_easy = make_plan(easy, [host(3000 * MiB)]).batch_size
    b_hard = make_plan(hard, [host(3000 * MiB)]).batch_size
    assert b_hard < b_easy
    # the fitted line lies on or above every measured point
    fit = hard.host_fit
    assert all(hard.baseline_rss_bytes + fit(t.batch_size) >= t.peak_rss_bytes - 1 for t in hard.trials)


def test_between_two_trials_the_step_is_their_chord_and_planning_again_gives_the_same_batch():
    # Convex growth (8, 64, 508 MiB above the runtime): a line over every trial overshoots between them.
    r = result(trials=((8, 600 * MiB), (64, 656 * MiB), (256, 1100 * MiB)))

    def with_margin(b):  # the chord of the trials at 64 and 256, plus queue and preprocess, and 10% of that growth
        growth = 64 * MiB + (b - 64) * (444 / 192) * MiB + 3 * 4096 * b
        return 592 * MiB + r.raw_bytes + 1.1 * growth

    plan = make_plan(r, [host(1024 * MiB)], safety=0.1)
    expected = max(b for b in range(65, 256) if with_margin(b) <= 1024 * MiB)
    assert plan.batch_size == expected
    assert plan.predicted_peak_bytes == pytest.approx(with_margin(expected) - plan.budget("host").margin_bytes, abs=2)
    line = r.host_fit
    assert r.baseline_rss_bytes + r.raw_bytes + 1.1 * (line(expected) + 3 * 4096 * expected) > 1024 * MiB
    assert "interpolated between real trials at batch 64 and 256" in plan.explanation
    # Planning again from the same measurements, capped at the batch agreed, keeps it (tf.distribute relies on it).
    again = make_plan(r, [host(1024 * MiB)], safety=0.1, max_batch_size=plan.batch_size)
    assert (again.batch_size, again.predicted_peak_bytes) == (plan.batch_size, plan.predicted_peak_bytes)


def test_confirmed_by_a_fitting_trial_at_or_above_the_size():
    r = result(n=500, trials=((8, 600 * MiB), (64, 656 * MiB), (500, 1092 * MiB)))
    plan = make_plan(r, [host(4096 * MiB)])
    assert plan.batch_size == 500 and plan.confirmed and plan.confirmed_batch_size == 500
    assert plan.measured_peak_bytes == pytest.approx(1092 * MiB + predicted_host(r, 500) - (592 * MiB + 500 * MiB), abs=2)


def test_shards_stream_when_the_dataset_does_not_fit():
    r = result(source="shards", raw=3000 * MiB, shard=20 * MiB)
    plan = make_plan(r, [host(2048 * MiB)])
    assert plan.strategy == "stream"
    def with_margin(b):  # the margin (the default 10%) covers the growth and the shard reads
        predicted = predicted_host(r, b, strategy="stream")
        return predicted + plan.safety * (predicted - 592 * MiB)

    assert plan.safety == 0.1
    assert with_margin(plan.batch_size) <= 2048 * MiB < with_margin(plan.batch_size + 1)
    assert "streamed" in plan.explanation


def test_shards_load_in_memory_when_they_fit_alongside():
    plan = make_plan(result(source="shards", raw=5 * MiB, shard=1 * MiB), [host(8192 * MiB)])
    assert plan.strategy == "in_memory" and "fits in memory" in plan.explanation


def test_the_copy_a_tf_data_export_holds_is_budgeted_for_the_strategy_chosen():
    copies = {"in_memory": 50 * MiB, "stream": 20 * MiB}
    for raw, strategy in ((3000 * MiB, "stream"), (5 * MiB, "in_memory")):
        r = result(source="shards", raw=raw, shard=20 * MiB)
        plain = make_plan(r, [host(2048 * MiB)])
        plan = make_plan(r, [host(2048 * MiB)], export_bytes=copies)
        assert plain.strategy == plan.strategy == strategy
        components = dict(plan.budget("host").components)
        assert components["tf.data copy"] == copies[strategy]
        assert "tf.data copy" not in dict(plain.budget("host").components)

        def with_margin(b):  # the copy is exact (or an upper bound): the margin covers the rest, not it
            predicted = predicted_host(r, b, strategy=strategy)
            growth = predicted - 592 * MiB - (raw if strategy == "in_memory" else 0)
            return predicted + copies[strategy] + plan.safety * growth

        assert with_margin(plan.batch_size) <= 2048 * MiB < with_margin(plan.batch_size + 1)
    with pytest.raises(ConfigError, match="export_bytes"):
        make_plan(result(), [host(2048 * MiB)], export_bytes={"stream": -1})


def test_without_a_model_the_plan_says_step_memory_is_missing():
    plan = make_plan(result(n=1000, trials=()), [host(8192 * MiB)])
    assert plan.batch_size == 1000 and "no model was probed" in plan.explanation


@pytest.mark.parametrize(
    "kwargs", [{"safety": 1.0}, {"safety": -0.1}, {"max_batch_size": 0}, {"multiple_of": 0}, {"queue_batches": -1}]
)
def test_bad_options(kwargs):
    with pytest.raises(ConfigError):
        make_plan(result(), [host(2048 * MiB)], **kwargs)


def test_plan_renders_with_numbers():
    text = str(make_plan(result(), [host(2048 * MiB)]))
    assert "batch_size" in text and "host" in text and "2.0 GiB" in text and "runtime + model (probe child)" in text


def test_target_batch_that_fits_is_used_as_is():
    plan = make_plan(result(), [host(64 * 1024 * MiB)], target_batch_size=256)
    assert plan.batch_size == 256 and plan.gradient_accumulation_steps == 1 and plan.limited_by == "target_batch_size"


def test_target_batch_too_large_is_kept_by_gradient_accumulation():
    r = dataclasses.replace(result(), model_params=10_000_000)
    free = make_plan(r, [host(2048 * MiB)])
    plan = make_plan(r, [host(2048 * MiB)], target_batch_size=4096)
    assert plan.gradient_accumulation_steps > 1
    assert plan.effective_batch_size == 4096  # exactly the target, never silently smaller
    assert plan.batch_size <= free.batch_size
    # the accumulators (one float32 per weight) are budgeted
    components = dict(plan.budget("host").components)
    assert components["gradient accumulators"] == 40_000_000
    assert plan.predicted_peak_bytes <= 2048 * MiB * 0.9
    assert "accumulates gradients over" in plan.explanation and "4,096" in str(plan)


def test_prime_target_uses_the_fewest_steps_that_reach_it():
    r = result()
    plan = make_plan(r, [host(2048 * MiB)], target_batch_size=4099)  # prime: no exact split
    assert plan.effective_batch_size >= 4099
    assert plan.effective_batch_size - 4099 < plan.gradient_accumulation_steps


def test_the_fixed_part_is_the_training_process_measured_else_the_probe_child():
    r = result()
    cli = make_plan(r, [host(2048 * MiB)])
    parts = dict(cli.budget("host").components)
    assert parts["runtime + model (probe child)"] == 592 * MiB and parts["dataset"] == r.raw_bytes
    assert "probe child's runtime + model (592.0 MiB)" in cli.explanation
    # In the training process: its RSS (which holds the in-memory dataset) replaces the child's baseline.
    here = make_plan(r, [host(2048 * MiB)], process_rss_bytes=650 * MiB + r.raw_bytes)
    parts = dict(here.budget("host").components)
    assert parts["this process"] == 650 * MiB and "runtime + model (probe child)" not in parts
    assert here.predicted_peak_bytes - cli.predicted_peak_bytes == pytest.approx(
        58 * MiB + (here.batch_size - cli.batch_size) * (MiB + 3 * r.worst_preprocessed_bytes_per_sample), abs=2
    )
    assert here.batch_size < cli.batch_size and "probe child" not in here.explanation
    # Neither fixed part gets a margin: the margin is the same function of the batch in both.
    assert here.budget("host").margin_bytes == pytest.approx(
        0.1 * here.batch_size * (MiB + 3 * r.worst_preprocessed_bytes_per_sample), abs=2
    )


def test_the_default_margin_is_10_percent_of_what_training_adds():
    r = result(n=100_000)
    budget = [host(1024 * MiB)]
    assert make_plan(r, budget).safety == 0.1
    assert make_plan(r, budget).batch_size == make_plan(r, budget, safety=0.1).batch_size
    assert make_plan(r, budget, safety=0.05).batch_size > make_plan(r, budget).batch_size
    assert "10% margin on what training adds" in make_plan(r, budget).explanation
    with pytest.raises(ConfigError, match="safety"):
        make_plan(r, budget, safety=1.0)


@pytest.mark.parametrize(("n", "warned"), [(5_000, True), (200_000, False)])
def test_a_batch_leaving_few_optimizer_steps_says_so(n, warned):
    # ~1 MiB/sample: 8 GiB lets ~7,000 samples into one batch, the whole 5,000-row set.
    plan = make_plan(result(n=n), [host(8 * 1024 * MiB)])
    steps = math.ceil(n / plan.batch_size)
    assert ("optimizer step(s) per epoch" in plan.explanation) is warned
    if warned:
        assert steps < 10 and f"Only {steps} optimizer step(s)" in plan.explanation
        assert "max_batch_size=" in plan.explanation and "target_batch_size=" in plan.explanation
    capped = make_plan(result(n=n), [host(8 * 1024 * MiB)], max_batch_size=n // 20)
    assert "optimizer step(s) per epoch" not in capped.explanation


# ---------------------------------------------------------------- rendering: what a person reads at 80 columns


def rendered(plan):
    """The lines ``plan`` prints on an 80-column terminal."""
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(plan)
    return console.export_text().splitlines()


def _fixed_plans():
    alone = make_plan(result(), [host(2048 * MiB)])
    gpu = make_plan(
        result(gpu=(100 * MiB, 1100 * MiB)),
        [host(64 * 1024 * MiB), Budget("gpu", 4096 * MiB, "GPU:0 free memory (NVML), 80.0 GiB total for device:GPU:0")],
        target_batch_size=4096,
    )
    limit = ReplicaLimit(
        worker=1, replica=3, max_batch_size=alone.batch_size, limited_by="host", budget_bytes=2048 * MiB
    )
    split = Distribution("MultiWorkerMirroredStrategy", 2, 0, 4, alone.batch_size, (limit,), limit)
    distributed = dataclasses.replace(alone, distribution=split, limited_by="worker 1's host memory")
    return {"host": alone, "gpu": gpu, "distributed": distributed}


@pytest.mark.parametrize("which", ["host", "gpu", "distributed"])
def test_a_plan_renders_in_80_columns_with_a_short_header_and_one_row_per_part(which):
    plan = _fixed_plans()[which]
    lines = rendered(plan)
    assert max(map(len, lines)) <= 80, "\n".join(lines)
    assert str(plan).splitlines() == lines  # str() renders at 80 columns too
    assert lines[0].startswith("autobatch plan") and f"batch_size {plan.batch_size:,}" in lines[0]
    assert f"strategy {plan.strategy}, {plan.steps_per_epoch:,} steps/epoch" in lines[1]
    assert f"limited by {plan.limited_by}" in lines
    rows = [line.split() for line in lines]
    for use in plan.budgets:
        peak, limit = format_bytes(use.predicted_peak_bytes), format_bytes(use.budget.limit_bytes)
        assert any(line.startswith(f"{use.budget.kind} peak {peak} of {limit}") for line in lines), lines
        assert [use.budget.kind, *peak.split(), "100%"] in rows
        for name, value in use.components:  # the whole name, its bytes and its share of the peak on one row
            share = f"{value / use.predicted_peak_bytes:.0%}"
            assert [*name.split(), *format_bytes(value).split(), share] in rows, (name, lines)
    if plan.gradient_accumulation_steps > 1:
        assert f"= {plan.effective_batch_size:,} per update" in lines[0]
    if plan.distribution is not None:
        split = plan.distribution
        expected = f"on {split.num_workers} worker(s), global batch {split.global_batch_size:,}"
        assert any(line.startswith(split.strategy) and line.endswith(expected) for line in lines), lines


def _sized_plan(*, gpu: bool):
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(3.6, 0.6, size=20_000).astype(int), 4, 2048)
    values, counts = np.unique(lengths, return_counts=True)
    probe = dataclasses.replace(result(n=len(lengths), raw=10 * MiB, worst=0.0), baseline_rss_bytes=700 * MiB)
    sized = SizeAwareProbe(
        probe=probe, sequence_columns=("seq",), variable_leaves=("x/seq",), length_values=tuple(values.tolist()),
        length_counts=tuple(counts.tolist()), grid=(), host_model=LengthMemoryModel(700 * MiB, 2000.0),
        gpu_model=LengthMemoryModel(300 * MiB, 8000.0) if gpu else None, bytes_per_token=4.0,
        preprocess_peak_per_token=8.0, step_seconds=(0.005, 2e-7),
    )
    budgets = [host(1024 * MiB)] + ([Budget("gpu", 2048 * MiB, "gpu_limit=2GiB")] if gpu else [])
    return make_bucket_plan(sized, budgets)


@pytest.mark.parametrize("gpu", [False, True])
def test_a_bucket_plan_renders_in_80_columns_with_one_row_per_bucket(gpu):
    plan = _sized_plan(gpu=gpu)
    lines = rendered(plan)
    assert max(map(len, lines)) <= 80, "\n".join(lines)
    assert str(plan).splitlines() == lines
    assert lines[0].startswith("autobatch size-aware plan") and f"{len(plan.buckets)} buckets" in lines[0]
    assert f"limited by {plan.limited_by}" in lines
    for use in plan.budgets:
        peak, limit = format_bytes(use.predicted_peak_bytes), format_bytes(use.budget.limit_bytes)
        assert any(line.startswith(f"{use.budget.kind} peak {peak} of {limit}") for line in lines), lines
    rows = [line.split() for line in lines if line.strip()[:1].isdigit()]
    for bucket in plan.buckets:
        cells = [
            f"{bucket.lo:,}–{bucket.hi:,}", f"{bucket.batch_size:,}", f"{bucket.n_samples:,}", f"{bucket.steps:,}",
            *format_bytes(bucket.predicted_peak_bytes).split(),
        ]
        assert [row[: len(cells)] for row in rows].count(cells) == 1, (bucket, lines)
    assert f"{plan.fixed_batch_size:,}" in str(plan) and "padded to" in str(plan)
