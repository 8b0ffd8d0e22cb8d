"""Benchmark 9: the planned batch run after run, from fresh processes, by the CLI and by ``autobatch.fit``'s plan.

Each run is a new Python process planning the bundled demo data (``examples/data/csv``) with no cache, so
everything is measured again: ``autobatch probe --json`` (the CLI, which plans for a training process it does
not run) or ``autobatch.plan`` in a process that has built the model, as ``autobatch.fit`` plans.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA, TARGET = "examples/data/csv", "label"
PREPROCESS, MODEL = "examples/canonical.py:preprocess", "examples/canonical.py:build_model"

FIT_PLAN = """
import json, sys, time
sys.path.insert(0, "examples")
import autobatch, canonical
model = canonical.build_model()  # as a training script holds it before autobatch.fit
start = time.perf_counter()
plan = autobatch.plan({data!r}, {target!r}, preprocess=canonical.preprocess, model=model, ram_limit={limit!r},
                      cache=False)
print(json.dumps({{"plan": plan.to_dict(), "seconds": time.perf_counter() - start}}))
"""


def plan_once(kind: str, limit: str, timeout_s: float = 600) -> dict[str, Any]:
    """One fresh process's plan: ``kind`` is ``"cli"`` or ``"fit"``. Returns its batch, prediction and wall time."""
    if kind == "cli":
        command = [str(Path(sys.executable).with_name("autobatch")), "probe", DATA, "--target", TARGET,
                   "--preprocess", PREPROCESS, "--model", MODEL, "--ram-limit", limit, "--no-cache", "--json"]
    else:
        command = [sys.executable, "-c", FIT_PLAN.format(data=DATA, target=TARGET, limit=limit)]
    start = time.perf_counter()
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    seconds = time.perf_counter() - start
    if out.returncode != 0:
        raise RuntimeError(f"{kind} plan at {limit} failed:\n{out.stderr[-3000:]}")
    payload = json.loads(out.stdout.strip().splitlines()[-1])
    plan = payload.get("plan", payload)
    host = next(b for b in plan["budgets"] if b["budget"]["kind"] == "host")
    return {
        "batch_size": plan["batch_size"],
        "predicted_peak_bytes": host["predicted_peak_bytes"],
        "components": dict(host["components"]),
        "trials": [t["batch_size"] for t in plan["probe"]["trials"]],
        "probe_seconds": plan["probe"]["wall_seconds"],
        "process_seconds": seconds,
        "plan_seconds": payload.get("seconds", seconds),
    }


def spread(batches: list[int]) -> float:
    """max ÷ min of the planned batches."""
    return max(batches) / max(min(batches), 1)


def summarize(runs: dict[tuple[str, str], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per limit: the spread of each kind, CLI ÷ fit (medians), and the median plan wall time."""
    out = []
    for limit in sorted({limit for _, limit in runs}):
        cli, fit = runs[("cli", limit)], runs[("fit", limit)]
        out.append({
            "limit": limit,
            "cli_batches": [r["batch_size"] for r in cli],
            "fit_batches": [r["batch_size"] for r in fit],
            "cli_spread": spread([r["batch_size"] for r in cli]),
            "fit_spread": spread([r["batch_size"] for r in fit]),
            "cli_over_fit": statistics.median(r["batch_size"] for r in cli)
            / statistics.median(r["batch_size"] for r in fit),
            "cli_seconds": statistics.median(r["plan_seconds"] for r in cli),
            "fit_seconds": statistics.median(r["plan_seconds"] for r in fit),
        })
    return out


def run(limits: list[str], reps: int, log: Any = print) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """``reps`` CLI and ``reps`` fit plans per limit, interleaved so the machine's state drifts over both alike."""
    if not (ROOT / "examples/data/.complete").exists():  # as ./dev demo builds it
        subprocess.run([sys.executable, "examples/canonical.py", "--out", "examples/data"], cwd=ROOT, check=True)
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for rep in range(reps):
        for limit in limits:
            for kind in ("cli", "fit"):
                result = plan_once(kind, limit)
                runs.setdefault((kind, limit), []).append(result)
                log(f"stability {kind} {limit} #{rep + 1}: batch {result['batch_size']} in "
                    f"{result['plan_seconds']:.1f} s, trials {result['trials']}")
    return runs


if __name__ == "__main__":
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    for row in summarize(run(["1GiB", "2GiB"], reps)):
        print(json.dumps(row))
