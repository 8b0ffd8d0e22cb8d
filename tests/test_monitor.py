import io
import json
import warnings

import pytest
from rich.console import Console

from autobatch._peak_lines import DEFAULT_SAFETY
from autobatch._readings import MemoryReading, summary_from_log
from autobatch.errors import ConfigError
from autobatch.monitor import MemoryMonitor

MiB = 1024**2


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


class ScriptedReader:
    """Returns the next scripted RSS (MiB) on each call; the last value repeats."""

    def __init__(self, rss_mib, gpu_mib=None):
        self.rss = list(rss_mib)
        self.gpu = list(gpu_mib) if gpu_mib else None
        self.calls = 0

    def __call__(self):
        i = min(self.calls, len(self.rss) - 1)
        self.calls += 1
        rss = self.rss[i] * MiB
        peak = max(self.rss[: i + 1]) * MiB
        gpu = None if self.gpu is None else self.gpu[min(i, len(self.gpu) - 1)] * MiB
        return MemoryReading(rss, peak, 10_000 * MiB, gpu, None if gpu is None else max(self.gpu[: i + 1]) * MiB)


def make(reader, clock, **kwargs):
    out = io.StringIO()
    monitor = MemoryMonitor(
        host_budget_bytes=1000 * MiB, batch_size=32, console=Console(file=out, width=200), reader=reader,
        clock=clock, background=False, **kwargs,
    )
    monitor.set_params({"epochs": 1, "steps": 4, "verbose": 0})
    return monitor, out


def run_epoch(monitor, clock, steps=4, step_s=0.5, gap_s=0.1, tick_each=True):
    monitor.on_train_begin()
    monitor.on_epoch_begin(0)
    for i in range(steps):
        clock.advance(gap_s)
        monitor.on_train_batch_begin(i)
        clock.advance(step_s)
        monitor.on_train_batch_end(i)
        if tick_each:
            monitor.tick()
    monitor.on_epoch_end(0)
    monitor.on_train_end()


def test_warns_once_per_crossing_and_names_the_budget():
    clock = FakeClock()
    monitor, out = make(ScriptedReader([500, 850, 920, 950, 700, 910]), clock)
    with pytest.warns(ResourceWarning) as record:
        run_epoch(monitor, clock)
    messages = [str(w.message) for w in record]
    # 920 crosses 90% of 1000 MiB; 950 stays above (no repeat); 700 re-arms (below 85%); 910 crosses again.
    assert len(messages) == 2
    assert "host memory at 920.0 MiB is 92% of the host budget 1000.0 MiB" in messages[0]
    assert "host_budget_bytes" in messages[0]
    assert "autobatch warning" in out.getvalue()
    assert monitor.summary.warnings == tuple(messages)


def test_non_tty_prints_a_concise_line_every_interval():
    clock = FakeClock()
    monitor, out = make(ScriptedReader([400, 410, 420, 430, 440, 450]), clock, line_interval_s=1.0)
    run_epoch(monitor, clock)  # 4 steps x 0.6 s: lines at t=0, >=1.2, >=2.4
    lines = [line for line in out.getvalue().splitlines() if line.startswith("autobatch |")]
    assert len(lines) == 3
    assert "epoch 1/1 step 0/4" in lines[0] and "RSS 400.0 MiB" in lines[0] and "of 1000.0 MiB budget (40%)" in lines[0]
    assert "samples/s" in lines[-1] and "\x1b[" not in out.getvalue()


def test_summary_numbers():
    clock = FakeClock()
    monitor, out = make(ScriptedReader([300, 350, 600, 500]), clock)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing crosses 90%
        run_epoch(monitor, clock, steps=4, step_s=0.5, gap_s=0.1)
    s = monitor.summary
    assert s.peak_rss_bytes == 600 * MiB and s.host_budget_bytes == 1000 * MiB
    assert s.samples == 4 * 32
    assert s.step_seconds == pytest.approx(2.0) and s.between_steps_seconds == pytest.approx(0.3)
    assert s.seconds == pytest.approx(2.4) and s.samples_per_second == pytest.approx(128 / 2.4)
    text = out.getvalue()
    assert "autobatch memory summary" in text and "600.0 MiB (60%)" in text and "time in training steps" in text


def test_gpu_is_shown_and_checked_against_its_budget():
    clock = FakeClock()
    monitor, out = make(ScriptedReader([300, 300], gpu_mib=[100, 200]), clock)
    monitor.gpu_budget_bytes = 210 * MiB
    with pytest.warns(ResourceWarning, match="gpu memory at 200.0 MiB"):
        run_epoch(monitor, clock, steps=1)
    assert monitor.summary.peak_gpu_bytes == 200 * MiB and "peak GPU" in out.getvalue()


def test_disabled_monitor_prints_nothing():
    clock = FakeClock()
    reader = ScriptedReader([999])
    monitor, out = make(reader, clock, disable=True)
    monitor.on_train_begin()
    monitor.on_train_end()
    assert out.getvalue() == "" and reader.calls == 0 and monitor.summary is None


def test_log_path_records_and_report_round_trip(tmp_path):
    clock = FakeClock()
    log = tmp_path / "run.jsonl"
    monitor, _ = make(ScriptedReader([300, 320, 340, 360, 380, 400]), clock, log_path=log)
    run_epoch(monitor, clock)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert lines[0]["type"] == "header" and lines[0]["host_budget_bytes"] == 1000 * MiB
    assert lines[-1]["type"] == "summary"
    records = lines[1:-1]
    assert [r["rss_bytes"] // MiB for r in records] == [300, 320, 340, 360, 380, 400]
    summary, parsed, header = summary_from_log(log)
    assert summary == monitor.summary and len(parsed) == len(records) and header["batch_size"] == 32


def test_report_of_a_killed_run_rebuilds_the_summary(tmp_path):
    log = tmp_path / "killed.jsonl"
    log.write_text(
        json.dumps({"type": "header", "host_budget_bytes": 1000, "gpu_budget_bytes": None, "predicted_peak_bytes": 900,
                    "batch_size": 8}) + "\n"
        + json.dumps({"t": 1.0, "epoch": 0, "step": 3, "rss_bytes": 500, "peak_rss_bytes": 510, "available_bytes": 1,
                      "gpu_bytes": None, "gpu_peak_bytes": None, "samples_per_s": 24.0}) + "\n"
    )
    summary, records, _ = summary_from_log(log)
    assert summary.peak_rss_bytes == 510 and summary.samples == 24 and summary.predicted_peak_bytes == 900


def test_not_a_log(tmp_path):
    bad = tmp_path / "x.jsonl"
    bad.write_text("hello\n")
    with pytest.raises(ValueError, match="line 1 is not JSON"):
        summary_from_log(bad)


def test_live_display_in_a_terminal_renders_the_numbers():
    clock = FakeClock()
    out = io.StringIO()
    monitor = MemoryMonitor(
        host_budget_bytes=1000 * MiB, batch_size=8, console=Console(file=out, width=120, force_terminal=True),
        reader=ScriptedReader([321]), clock=clock, interval_s=0.01,
    )
    monitor.set_params({"epochs": 2, "steps": 3})
    monitor.on_train_begin()
    assert monitor._live is not None
    monitor.on_train_end()
    text = out.getvalue()
    assert "process RSS" in text and "321.0 MiB" in text and "autobatch memory summary" in text


def test_report_cli_prints_the_summary_and_saves_a_png(tmp_path):
    from autobatch.cli import main

    clock = FakeClock()
    log = tmp_path / "run.jsonl"
    monitor, _ = make(ScriptedReader([300, 320, 340, 360, 380, 400]), clock, log_path=log)
    run_epoch(monitor, clock)
    out = io.StringIO()
    assert main(["report", str(log)], console=Console(file=out, width=150)) == 0
    text = out.getvalue()
    assert "autobatch memory summary" in text and "400.0 MiB (40%)" in text
    png = tmp_path / "run.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert main(["report", str(tmp_path / "missing.jsonl")], console=Console(file=io.StringIO())) == 1


# ---------------------------------------------------------------- headroom: another process takes memory


class AvailableReader:
    """RSS stays at 400 MiB (peak 400 MiB); available memory follows a script (MiB), the last value repeating."""

    def __init__(self, available_mib):
        self.available = list(available_mib)
        self.calls = 0

    def __call__(self):
        value = self.available[min(self.calls, len(self.available) - 1)]
        self.calls += 1
        return MemoryReading(400 * MiB, 400 * MiB, int(value * MiB))


class ShrinkableFeed:
    """Records shrink requests as the real feeds take them: pieces double, never below one sample per piece."""

    def __init__(self, batch_size=64):
        self.batch_size = batch_size
        self.pieces = 1

    @property
    def current_batch_size(self):
        return -(-self.batch_size // self.pieces)

    def shrink(self, factor=2):
        self.pieces = min(self.pieces * factor, self.batch_size)
        return self.pieces


def test_low_headroom_warns_and_shrinks_an_adaptive_feed_once_per_fall():
    clock = FakeClock()
    feed = ShrinkableFeed()
    # Margin 200 MiB. 150: falls below -> warn + shrink. 150, 120: still low, not falling by half a margin -> quiet.
    # 40: fell 110 MiB more after enough steps -> shrink again. 400: recovered (>= 1.25 x margin). 150: a new fall.
    reader = AvailableReader([10_000, 150, 150, 120, 40, 400, 150])
    monitor, out = make(reader, clock, feed=feed, adaptive=True, min_headroom_bytes=200 * MiB, adapt_after_steps=2)
    monitor.on_train_begin()  # reading 1
    pieces = []
    with pytest.warns(ResourceWarning) as record:
        for step in range(6):
            monitor.on_train_batch_begin(step)
            monitor.on_train_batch_end(step)
            monitor.tick()
            pieces.append(feed.pieces)
    assert pieces == [2, 2, 2, 4, 4, 8]
    messages = [str(w.message) for w in record]
    assert len(messages) == 3
    assert "memory headroom is 150.0 MiB, below the safety margin of 200.0 MiB" in messages[0]
    assert "the following batches are cut from 64 to at most 32 samples" in messages[0]
    assert "from 32 to at most 16" in messages[1] and "from 16 to at most 8" in messages[2]
    monitor.on_train_end()
    assert monitor.summary.shrinks == 3 and monitor.summary.smallest_batch_size == 8
    assert "batches shrunk (low headroom)" in out.getvalue() and "3× to 8" in out.getvalue()


def test_low_headroom_without_adaptive_warns_once_with_the_remedy():
    clock = FakeClock()
    monitor, _ = make(AvailableReader([10_000, 150, 100, 20]), clock, min_headroom_bytes=200 * MiB)
    with pytest.warns(ResourceWarning) as record:
        run_epoch(monitor, clock, steps=3)
    messages = [str(w.message) for w in record]
    assert len(messages) == 1 and "Pass adaptive=True to autobatch.fit to shrink batches instead" in messages[0]


def plan_on_1000_mib(**options):
    """A plan on a 1000 MiB host budget whose trials measured 492 MiB + 1 MiB per sample."""
    from autobatch import ProbeResult
    from autobatch._memory import Budget
    from autobatch.plan import make_plan
    from autobatch.probe import StepTrial

    probe = ProbeResult(
        n_samples=1000, source="in_memory", raw_bytes=0, raw_bytes_per_sample=0.0, raw_scope="t",
        largest_shard_raw_bytes=0, sample_batch_size=32, preprocessed_bytes_per_sample=1024.0,
        worst_preprocessed_bytes_per_sample=1024.0, worst_scope="t", preprocess_peak_bytes_per_sample=0.0,
        output_signature=(), device="CPU", trials=(StepTrial(8, 500 * MiB), StepTrial(64, 556 * MiB)),
        baseline_rss_bytes=492 * MiB,
    )
    return make_plan(probe, [Budget("host", 1000 * MiB, "test")], queue_batches=0, **options)


def test_headroom_counts_the_growth_the_plan_still_expects_and_defaults_to_its_margin():
    plan = plan_on_1000_mib(max_batch_size=64)
    monitor = MemoryMonitor(plan, console=Console(file=io.StringIO()), reader=AvailableReader([0]), background=False)
    assert plan.safety == DEFAULT_SAFETY  # the default margin on the growth
    # safety × the limit (above the plan's margin on growth)
    assert monitor.min_headroom_bytes == int(DEFAULT_SAFETY * 1000 * MiB)
    reading = MemoryReading(400 * MiB, 400 * MiB, 1000 * MiB)
    assert monitor.headroom_bytes(reading) == 1000 * MiB - (plan.predicted_peak_bytes - 400 * MiB)


def test_adaptive_needs_a_feed_that_can_shrink():
    with pytest.raises(ConfigError) as excinfo:
        MemoryMonitor(host_budget_bytes=MiB, adaptive=True, console=Console(file=io.StringIO()))
    assert "adaptive=True" in str(excinfo.value) and "feed=" in str(excinfo.value)


def test_a_plan_close_to_the_limit_warns_past_its_prediction_not_at_90_percent():
    plan = plan_on_1000_mib()
    predicted = plan.predicted_peak_bytes / MiB
    assert 950 < predicted < 1000  # the plan expects more than warn_at=0.9 of the budget
    clock = FakeClock()
    reader = ScriptedReader([500, 940, predicted - 5, predicted + 5])
    monitor = MemoryMonitor(plan, console=Console(file=io.StringIO()), reader=reader, clock=clock, background=False)
    monitor.set_params({"epochs": 1, "steps": 4, "verbose": 0})
    with pytest.warns(ResourceWarning) as record:
        run_epoch(monitor, clock)
    messages = [str(w.message) for w in record]
    assert len(messages) == 1, messages  # not at 940 MiB (94%) nor just under the prediction
    assert f"host memory at {predicted + 5:.1f} MiB" in messages[0]
    assert f"above the plan's predicted peak of {predicted:.1f} MiB" in messages[0]
