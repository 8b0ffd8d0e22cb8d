"""A real memory cgroup: ``autobatch.fit`` without ``ram_limit`` inside a limited group.

The test makes a memory cgroup under its own (v1: ``memory.limit_in_bytes``; v2: ``memory.max``), starts a
Python process in it that trains with ``autobatch.fit`` and no ``ram_limit``, and checks that the plan's budget
is not above the group's limit, that nothing was killed for memory, and that the process's peak RSS came out
as predicted. Skipped where the test may not make a memory cgroup.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

MiB = 2**20
LIMIT = 1300 * MiB
"""Well under the ~2.2 GiB that batch 4,000 (the whole dataset) needs, so the budget binds; the smaller batches
keep the trials short (at 1.6 GiB a run took 22–86 s here)."""
ROWS = 4000
CGROUP = Path("/sys/fs/cgroup")

pytestmark = pytest.mark.cgroup

SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    started = time.monotonic()
    sys.path.insert(0, {examples!r})
    import canonical
    import autobatch
    from autobatch._memory import peak_rss_bytes

    frame = canonical.make_frame({rows}, seed=0, max_len=1024)
    model = canonical.build_model()
    history = autobatch.fit(
        model, frame.drop(columns=["label"]), frame["label"], preprocess=canonical.preprocess, epochs=2,
        ram_limit=None, cache=False,
    )
    plan = history.autobatch_plan
    host = plan.budget("host")
    print(json.dumps({{
        "budget": host.budget.limit_bytes, "source": host.budget.source, "predicted": plan.predicted_peak_bytes,
        "vmhwm": peak_rss_bytes(), "batch": plan.batch_size, "limited_by": plan.limited_by,
        "seconds": time.monotonic() - started,
    }}))
    """
)


def _own_group() -> tuple[str, Path]:
    """The cgroup version and this process's memory group directory, or skip."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError as exc:
        pytest.skip(f"no /proc/self/cgroup ({exc})")
    groups = {controller: path for _, controllers, path in (line.split(":", 2) for line in lines)
              for controller in (controllers.split(",") if controllers else [""])}
    if "memory" in groups and (CGROUP / "memory").is_dir():
        own = CGROUP / "memory" / groups["memory"].lstrip("/")
        return "v1", own if own.is_dir() else CGROUP / "memory"  # a container's mount shows its group as root
    controllers = CGROUP / "cgroup.controllers"  # cgroup v2 mounted at /sys/fs/cgroup
    if "" in groups and controllers.is_file() and "memory" in controllers.read_text().split():
        own = CGROUP / groups[""].lstrip("/")
        return "v2", own if own.is_dir() else CGROUP
    pytest.skip("no cgroup memory controller is mounted at /sys/fs/cgroup")


def _make_limited_group(limit_bytes: int) -> tuple[str, Path, Path | None]:
    """A new memory cgroup under this process's own, limited to ``limit_bytes``: (version, its directory,
    the ``cgroup.subtree_control`` this enabled the memory controller in, to undo), or skip."""
    version, own = _own_group()
    enabled = None
    if version == "v2":
        control = own / "cgroup.subtree_control"
        if "memory" not in (control.read_text().split() if control.is_file() else []):
            try:  # refused while the group itself holds processes ("no internal processes")
                control.write_text("+memory")
            except OSError as exc:
                pytest.skip(f"cannot enable the memory controller in {control} ({exc})")
            enabled = control
    group = own / f"autobatch-test-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        group.mkdir()
    except OSError as exc:
        _remove_group(None, enabled)
        pytest.skip(f"cannot make a memory cgroup under {own} ({exc})")
    try:
        (group / ("memory.limit_in_bytes" if version == "v1" else "memory.max")).write_text(str(limit_bytes))
    except OSError as exc:
        _remove_group(group, enabled)
        pytest.skip(f"cannot set a memory limit on {group} ({exc})")
    return version, group, enabled


def _remove_group(group: Path | None, enabled: Path | None = None) -> None:
    try:
        if group is not None:
            _remove_dir(group)
    finally:
        if enabled is not None:
            try:
                enabled.write_text("-memory")
            except OSError:
                pass


def _remove_dir(group: Path) -> None:
    # The processes have exited (the test waited for them); move out any straggler, then remove the group.
    for _ in range(50):
        try:
            pids = (group / "cgroup.procs").read_text().split()
        except OSError:
            return
        for pid in pids:
            try:
                (group.parent / "cgroup.procs").write_text(pid)
            except OSError:
                pass
        try:
            group.rmdir()
            return
        except OSError:
            time.sleep(0.1)
    group.rmdir()  # let the error show


def _counters(version: str, group: Path) -> dict[str, int | None]:
    def read(name: str) -> str:
        try:
            return (group / name).read_text()
        except OSError:
            return ""

    def field(text: str, key: str) -> int | None:
        values = [int(line.split()[1]) for line in text.splitlines() if line.split()[:1] == [key]]
        return values[0] if values else None

    if version == "v1":
        oom = read("memory.oom_control")
        return {
            "max_usage": int(read("memory.max_usage_in_bytes") or 0) or None,
            "failcnt": int(read("memory.failcnt") or 0),
            "under_oom": field(oom, "under_oom"),
            "oom_kill": field(oom, "oom_kill"),
        }
    events = read("memory.events")
    return {
        "max_usage": int(read("memory.peak") or 0) or None,
        "failcnt": field(events, "max"),
        "under_oom": field(events, "oom"),
        "oom_kill": field(events, "oom_kill"),
    }


def test_fit_without_ram_limit_inside_a_memory_cgroup_plans_under_its_limit(tmp_path):
    version, group, enabled = _make_limited_group(LIMIT)
    try:
        script = tmp_path / "fit_in_group.py"
        examples = str(Path(__file__).resolve().parents[1] / "examples")
        script.write_text(SCRIPT.format(examples=examples, rows=ROWS))
        # The shell joins the group before it becomes Python, so every page the run touches is charged there.
        join = 'echo $$ > "$0/cgroup.procs" || exit 97; exec "$@"'
        command = ["/bin/sh", "-c", join, str(group), sys.executable, str(script)]
        started = time.monotonic()
        out = subprocess.run(command, capture_output=True, text=True, timeout=300)
        seconds = time.monotonic() - started
        counters = _counters(version, group)
    finally:
        _remove_group(group, enabled)
    if out.returncode == 97:
        pytest.skip(f"cannot move a process into {group}: {out.stderr.strip()}")
    assert out.returncode == 0, (out.returncode, counters, out.stderr[-3000:])
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(
        f"cgroup {version} limit {LIMIT / MiB:.0f} MiB: budget {result['budget'] / MiB:.0f} MiB ({result['source']}), "
        f"batch {result['batch']} ({result['limited_by']}), predicted {result['predicted'] / MiB:.0f} MiB, "
        f"VmHWM {result['vmhwm'] / MiB:.0f} MiB ({result['vmhwm'] / result['predicted'] - 1:+.1%}), group {counters}, "
        f"{seconds:.0f} s"
    )
    assert counters["oom_kill"] in (None, 0), counters
    assert result["budget"] <= LIMIT, result
    assert result["source"].startswith("cgroup limit"), result
    limited = result["limited_by"]
    assert limited != "the dataset size", "the group's limit must bind, not the data"
    assert limited in ("host memory", "confirming trials") or "ran out of memory" in limited, result
    assert abs(result["vmhwm"] / result["predicted"] - 1) <= 0.10, result
