"""How the benchmarks measure: interleaved timing, paired ratios, child processes, the machine.

On a shared 2-core machine absolute times are noise: what holds is a ratio of two
things measured side by side. Every timed comparison runs its variants in turn,
in ABBA order (forwards, then backwards, ...), so a slow patch of the machine hits
both. The reported ratio is the median of the per-repetition ratios (see
:class:`Ratio`); best ÷ best, their spread and a CPU-time ratio are reported
beside it.

Peak RSS (``VmHWM``) only ever grows within a process, so every memory
measurement is a fresh child process (``bench/child.py``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
REPLY_PREFIX = "@@bench "


@dataclasses.dataclass(frozen=True)
class Run:
    """One timed run: how many samples were trained on, in how many wall and CPU seconds."""

    samples: int
    seconds: float
    cpu_seconds: float = 0.0
    """CPU time of this whole process (all its threads) during the run."""

    @property
    def rate(self) -> float:
        """Samples per second."""
        return self.samples / self.seconds if self.seconds > 0 else float("inf")

    @property
    def cpu_rate(self) -> float:
        """Samples per CPU second."""
        return self.samples / self.cpu_seconds if self.cpu_seconds > 0 else float("inf")


def timed(samples: int, fn: Callable[[], Any]) -> Run:
    """Run ``fn`` once and time it as training on ``samples`` samples."""
    cpu = time.process_time()
    start = time.perf_counter()
    fn()
    return Run(samples, time.perf_counter() - start, time.process_time() - cpu)


def interleave(runs: Mapping[str, Callable[[], Run]], reps: int) -> dict[str, list[Run]]:
    """Run every variant ``reps`` times, alternating the order each repetition (ABBA)."""
    names = list(runs)
    out: dict[str, list[Run]] = {name: [] for name in names}
    for rep in range(reps):
        for name in names if rep % 2 == 0 else reversed(names):
            out[name].append(runs[name]())
    return out


@dataclasses.dataclass(frozen=True)
class Ratio:
    """``a ÷ b`` of samples/s, from runs measured side by side.

    The headline is the median of the per-repetition ratios: the two runs of a
    pair ran next to each other in time, and this machine's speed moves in
    phases of tens of seconds (the same pre-padded epoch took 1.2 s in one
    minute and 1.7 s in another), which a pair shares but a best-of-all-runs
    of each variant does not (one fast phase for one variant skews best ÷ best).
    Best ÷ best (other load only ever adds time, as ``timeit`` reasons) and the
    CPU-time ratio are reported beside it.
    """

    a: tuple[Run, ...]
    b: tuple[Run, ...]

    @property
    def value(self) -> float:
        """Median of the per-pair ratios (best ÷ best with a single pair)."""
        return statistics.median(self.per_rep) if len(self.a) > 1 else self.best

    @property
    def best(self) -> float:
        """Best samples/s of ``a`` ÷ best samples/s of ``b``."""
        return self.rate_a / self.rate_b

    @property
    def per_rep(self) -> list[float]:
        """The ratio within each repetition (the two runs next to each other in time)."""
        return [x.rate / y.rate for x, y in zip(self.a, self.b, strict=True)]

    @property
    def cpu_value(self) -> float:
        """Samples per CPU second of ``a`` ÷ of ``b`` (medians): the work, whatever the wall clock did."""
        return statistics.median(r.cpu_rate for r in self.a) / statistics.median(r.cpu_rate for r in self.b)

    @property
    def rate_a(self) -> float:
        return max(r.rate for r in self.a)

    @property
    def rate_b(self) -> float:
        return max(r.rate for r in self.b)

    def describe(self, name_a: str, name_b: str) -> str:
        pairs = self.per_rep
        text = f"best {name_a} {self.rate_a:,.0f} vs {name_b} {self.rate_b:,.0f} samples/s"
        if len(pairs) > 1:
            spread = f"range {min(pairs):.2f}–{max(pairs):.2f}"
            if len(pairs) >= 4:
                q1, _, q3 = statistics.quantiles(pairs, n=4, method="inclusive")
                spread = f"middle half {q1:.2f}–{q3:.2f}, {spread}"
            text = f"median of {len(pairs)} interleaved pairs, {spread}; best ÷ best {self.best:.2f} ({text})"
        return text + f"; samples per CPU second ratio {self.cpu_value:.2f}"


def ratio(results: Mapping[str, list[Run]], a: str, b: str) -> Ratio:
    return Ratio(tuple(results[a]), tuple(results[b]))


# --------------------------------------------------------------------------- child processes


def run_child(job: Mapping[str, Any], *, cache_dir: Path, timeout_s: float = 900) -> dict[str, Any]:
    """Run one job of ``bench/child.py`` in a fresh process and return its JSON answer.

    Raises:
        RuntimeError: the child failed; the message holds the end of its stderr.
    """
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["AUTOBATCH_CACHE_DIR"] = str(cache_dir)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "child.py"), json.dumps(dict(job))],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=env,
        cwd=ROOT,
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(REPLY_PREFIX):
            return json.loads(line[len(REPLY_PREFIX) :])
    raise RuntimeError(
        f"bench child {job.get('job')!r} exited with code {proc.returncode} and no answer. "
        f"Its stderr ends:\n{proc.stderr[-3000:]}"
    )


# --------------------------------------------------------------------------- the machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    import psutil

    from autobatch._memory import read_cgroup_memory
    from autobatch._units import format_bytes

    group = read_cgroup_memory()
    load = os.getloadavg()
    return {
        "cpus": f"{len(os.sched_getaffinity(0))} usable (nproc), {os.cpu_count()} online",
        "cpu model": _cpu_model(),
        "ram": format_bytes(psutil.virtual_memory().total)
        + (f", cgroup limit {format_bytes(group.limit_bytes)}" if group is not None else ""),
        "load average at start": f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": ", ".join(
            f"{name} {_version(name)}" for name in ("tensorflow", "keras", "numpy", "pandas", "pyarrow", "psutil")
        ),
        "autobatch": f"{_version('autobatch')} at {_git_commit()}",
    }
