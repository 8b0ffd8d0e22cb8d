"""The benchmark script (bench/run.py): its helpers, and a smoke run of every benchmark at tiny sizes.

The benchmarks themselves are not part of the test suite (``./dev bench`` runs them);
this only checks that ``./dev bench --quick`` still runs end to end and reports every number.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import cases  # noqa: E402
import measure  # noqa: E402
import run  # noqa: E402


class FakeRun:
    """Records the order variants run in."""

    def __init__(self, name: str, order: list[str], seconds: float) -> None:
        self.name, self.order, self.seconds = name, order, seconds

    def __call__(self) -> measure.Run:
        self.order.append(self.name)
        return measure.Run(samples=100, seconds=self.seconds)


def test_interleave_alternates_the_order_of_variants():
    order: list[str] = []
    runs = {"a": FakeRun("a", order, 1.0), "b": FakeRun("b", order, 2.0)}
    results = measure.interleave(runs, reps=3)
    assert order == ["a", "b", "b", "a", "a", "b"]
    assert [r.rate for r in results["a"]] == [100.0, 100.0, 100.0]


def test_ratio_is_the_median_pair_and_reports_best_over_best():
    a = tuple(measure.Run(100, s, cpu_seconds=1.0) for s in (1.0, 2.0, 4.0))
    b = tuple(measure.Run(100, s, cpu_seconds=2.0) for s in (4.0, 0.5, 1.0))
    result = measure.Ratio(a, b)
    assert result.per_rep == [4.0, 0.25, 0.25]
    assert result.value == 0.25  # the median pair, not one variant's lucky phase
    assert result.best == 0.5  # best 100/s ÷ best 200/s
    assert result.cpu_value == 2.0
    text = result.describe("a", "b")
    assert "median of 3 interleaved pairs, range 0.25–4.00; best ÷ best 0.50" in text
    four = measure.Ratio((*a, measure.Run(100, 2.0)), (*b, measure.Run(100, 1.0)))
    assert four.per_rep == [4.0, 0.25, 0.25, 0.5]
    assert "median of 4 interleaved pairs, middle half 0.25–1.38, range 0.25–4.00" in four.describe("a", "b")
    single = measure.Ratio(a[:1], b[:1])
    assert single.value == single.best == 4.0


@pytest.mark.parametrize(
    ("target", "value", "met"),
    [
        (cases.Target(0.97), 0.97, True),
        (cases.Target(0.97), 0.96, False),
        (cases.Target(high=1.10), 1.2, False),
        (cases.Target(0.9, 1.0), 1.01, False),
        (cases.Target(0.9, 1.0), 0.95, True),
    ],
)
def test_target(target, value, met):
    assert target.met(value) is met


def test_write_block_replaces_only_the_results_block(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(f"# Benchmarks\n\nanalysis\n\n{run.BEGIN}\nold\n{run.END}\n\nmore analysis\n")
    run.write_block(path, "new\n")
    assert path.read_text() == f"# Benchmarks\n\nanalysis\n\n{run.BEGIN}\nnew\n{run.END}\n\nmore analysis\n"


def test_unknown_benchmark_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as excinfo:
        run.main(["nope"])
    assert excinfo.value.code == 2
    assert "unknown benchmark(s) ['nope']" in capsys.readouterr().err


def test_quick_run_reports_every_benchmark(tmp_path):
    env = dict(os.environ, AUTOBATCH_BENCH_DATA=str(tmp_path / "data"), TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    out = tmp_path / "results.json"
    markdown = tmp_path / "BENCHMARKS.md"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--json", str(out), "--markdown", str(markdown)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert {r["benchmark"] for r in results} == {
        "feed", "shards", "tutorial", "planning", "memory", "probe", "padding", "sizeaware", "stability", "models"
    }
    assert all(isinstance(r["value"], (int, float)) and r["value"] > 0 for r in results)
    assert "| benchmark | measurement |" in proc.stdout
    assert run.BEGIN in markdown.read_text()
