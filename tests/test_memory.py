import subprocess
import sys
from pathlib import Path

import psutil

from autobatch._memory import (
    CgroupMemory,
    host_budget,
    is_oom_error,
    peak_rss_bytes,
    read_cgroup_memory,
    reset_peak_rss,
    rss_bytes,
)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_limit_in_the_process_group(tmp_path):
    proc = tmp_path / "cgroup"
    _write(proc, "0::/kubepods/pod1\n")
    _write(tmp_path / "fs/kubepods/pod1/memory.max", "2147483648\n")
    _write(tmp_path / "fs/kubepods/pod1/memory.current", "1073741824\n")
    group = read_cgroup_memory(tmp_path / "fs", proc)
    assert group == CgroupMemory(2 * 1024**3, 1024**3, tmp_path / "fs/kubepods/pod1/memory.max")


def test_cgroup_v2_max_means_unlimited(tmp_path):
    proc = tmp_path / "cgroup"
    _write(proc, "0::/\n")
    _write(tmp_path / "fs/memory.max", "max\n")
    assert read_cgroup_memory(tmp_path / "fs", proc) is None


def test_cgroup_v1_limit(tmp_path):
    proc = tmp_path / "cgroup"
    _write(proc, "4:memory:/docker/abc\n0::/\n")
    _write(tmp_path / "fs/memory/docker/abc/memory.limit_in_bytes", "536870912\n")
    _write(tmp_path / "fs/memory/docker/abc/memory.usage_in_bytes", "100\n")
    group = read_cgroup_memory(tmp_path / "fs", proc)
    assert group is not None and group.limit_bytes == 512 * 1024**2 and group.usage_bytes == 100


def test_cgroup_v1_huge_value_means_unlimited(tmp_path):
    proc = tmp_path / "cgroup"
    _write(proc, "4:memory:/\n")
    _write(tmp_path / "fs/memory/memory.limit_in_bytes", "9223372036854771712\n")
    assert read_cgroup_memory(tmp_path / "fs", proc) is None


def test_no_cgroup_files_at_all(tmp_path):
    assert read_cgroup_memory(tmp_path / "nothing", tmp_path / "missing") is None


def test_host_budget_explicit_limit_wins():
    budget = host_budget("1.5GiB")
    assert budget.limit_bytes == int(1.5 * 1024**3) and budget.kind == "host" and "ram_limit" in budget.source


def test_host_budget_is_free_ram_plus_own_rss_without_cgroup():
    budget = host_budget(cgroup=None)
    expected = psutil.virtual_memory().available + psutil.Process().memory_info().rss
    assert abs(budget.limit_bytes - expected) < 64 * 1024**2
    assert "psutil" in budget.source


def test_host_budget_capped_by_cgroup_headroom(tmp_path):
    own = psutil.Process().memory_info().rss
    group = CgroupMemory(limit_bytes=own + 300 * 1024**2, usage_bytes=own + 100 * 1024**2, path=tmp_path / "memory.max")
    budget = host_budget(cgroup=group)
    # headroom = limit - usage + own RSS
    assert abs(budget.limit_bytes - (own + 200 * 1024**2)) < 1024**2
    assert "cgroup" in budget.source


def test_peak_rss_grows_and_resets_in_a_child():
    code = (
        "from autobatch._memory import peak_rss_bytes, reset_peak_rss, rss_bytes\n"
        "import numpy as np\n"
        "before = peak_rss_bytes()\n"
        "a = np.ones(200 * 2**20 // 8); del a\n"
        "grown = peak_rss_bytes()\n"
        "ok = reset_peak_rss()\n"
        "print(before, grown, peak_rss_bytes(), rss_bytes(), ok)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    before, grown, after, rss, ok = int(out[0]), int(out[1]), int(out[2]), int(out[3]), out[4] == "True"
    assert grown - before >= 190 * 1024**2
    if ok:
        assert after < grown - 150 * 1024**2
        assert abs(after - rss) < 16 * 1024**2


def test_current_process_readings_are_plausible():
    assert peak_rss_bytes() >= rss_bytes() > 10 * 1024**2
    assert isinstance(reset_peak_rss(), bool)


def test_is_oom_error():
    import tensorflow as tf

    assert is_oom_error(MemoryError())
    assert is_oom_error(tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor"))
    assert not is_oom_error(ValueError("out of memory"))  # matched by type, never by message
