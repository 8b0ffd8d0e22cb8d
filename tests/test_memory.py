import logging
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from autobatch._memory import (
    CgroupMemory,
    child_rss_limit_bytes,
    host_budget,
    is_oom_error,
    peak_rss_bytes,
    read_cgroup_memory,
    reset_peak_rss,
    rss_bytes,
)
from autobatch._units import format_bytes


MiB, GiB = 2**20, 2**30


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _group(directory: Path, files: dict[str, object]) -> Path:
    """One fake cgroup directory: each file holds its value, ``memory.stat`` a dict of counters."""
    for name, value in files.items():
        text = "".join(f"{k} {v}\n" for k, v in value.items()) if isinstance(value, dict) else f"{value}\n"
        _write(directory / name, text)
    return directory


def _v1(directory: Path, limit: int | None, usage: int, **stat: int) -> Path:
    files: dict[str, object] = {
        "memory.limit_in_bytes": limit if limit is not None else 9223372036854771712,
        "memory.usage_in_bytes": usage,
        "memory.use_hierarchy": 1,
    }
    return _group(directory, {**files, "memory.stat": stat} if stat else files)


def _v2(directory: Path, limit: int | None, usage: int, **stat: int) -> Path:
    files: dict[str, object] = {"memory.max": limit if limit is not None else "max", "memory.current": usage}
    return _group(directory, {**files, "memory.stat": stat} if stat else files)


def _proc(tmp_path: Path, text: str) -> Path:
    _write(tmp_path / "proc_cgroup", text)
    return tmp_path / "proc_cgroup"


def test_cgroup_v2_limit_in_the_process_group(tmp_path):
    proc = _proc(tmp_path, "0::/kubepods/pod1\n")
    _v2(tmp_path / "fs/kubepods/pod1", 2 * GiB, GiB)
    group = read_cgroup_memory(tmp_path / "fs", proc)
    assert group == CgroupMemory(2 * GiB, GiB, tmp_path / "fs/kubepods/pod1/memory.max")
    assert group.charged_bytes == GiB and group.headroom_bytes == GiB


def test_cgroup_v2_max_means_unlimited(tmp_path):
    proc = _proc(tmp_path, "0::/\n")
    _write(tmp_path / "fs/memory.max", "max\n")
    assert read_cgroup_memory(tmp_path / "fs", proc) is None


def test_cgroup_v1_limit(tmp_path):
    proc = _proc(tmp_path, "4:memory:/docker/abc\n0::/\n")
    _v1(tmp_path / "fs/memory/docker/abc", 512 * MiB, 100)
    group = read_cgroup_memory(tmp_path / "fs", proc)
    assert group is not None and group.limit_bytes == 512 * MiB and group.usage_bytes == 100
    assert group.path == tmp_path / "fs/memory/docker/abc/memory.limit_in_bytes"


def test_cgroup_v1_huge_value_means_unlimited(tmp_path):
    proc = _proc(tmp_path, "4:memory:/\n")
    _write(tmp_path / "fs/memory/memory.limit_in_bytes", "9223372036854771712\n")
    assert read_cgroup_memory(tmp_path / "fs", proc) is None


def test_no_cgroup_files_at_all(tmp_path):
    assert read_cgroup_memory(tmp_path / "nothing", tmp_path / "missing") is None


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_parents_smaller_limit_binds_with_the_parents_usage(tmp_path, version):
    make, fs = (_v1, tmp_path / "fs/memory") if version == "v1" else (_v2, tmp_path / "fs")
    proc = _proc(tmp_path, "4:memory:/batch/job/step\n" if version == "v1" else "0::/batch/job/step\n")
    make(fs, None, 20 * GiB)
    make(fs / "batch", 8 * GiB, 5 * GiB)
    job = make(fs / "batch/job", 1800 * MiB, 1200 * MiB)  # the smallest limit, two levels up
    make(fs / "batch/job/step", 4 * GiB, 700 * MiB)  # the process's own group: a larger limit that never binds
    group = read_cgroup_memory(tmp_path / "fs", proc)
    limit_file = "memory.limit_in_bytes" if version == "v1" else "memory.max"
    assert group == CgroupMemory(1800 * MiB, 1200 * MiB, job / limit_file)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_fuller_parent_with_a_larger_limit_sets_the_headroom(tmp_path, version):
    make, fs = (_v1, tmp_path / "fs/memory") if version == "v1" else (_v2, tmp_path / "fs")
    proc = _proc(tmp_path, "4:memory:/pod/app\n" if version == "v1" else "0::/pod/app\n")
    make(fs / "pod", 4 * GiB, 3896 * MiB)  # siblings hold most of it
    make(fs / "pod/app", 2 * GiB, 100 * MiB)
    group = read_cgroup_memory(tmp_path / "fs", proc)
    assert group is not None and group.limit_bytes == 2 * GiB and group.usage_bytes == 100 * MiB
    assert group.headroom_bytes == 200 * MiB and group.path_headroom_bytes == 200 * MiB


@pytest.mark.parametrize(
    ("version", "stat", "reclaimable"),
    [
        # v1: the hierarchical total_* counters, not the group's own; mapped file pages are in use.
        ("v1", dict(active_file=1, inactive_file=1, total_active_file=300 * MiB, total_inactive_file=900 * MiB,
                    total_mapped_file=200 * MiB, total_cache=1300 * MiB, total_shmem=100 * MiB), 1000 * MiB),
        ("v1", dict(total_cache=1300 * MiB, total_shmem=100 * MiB, total_mapped_file=200 * MiB), 1000 * MiB),
        ("v2", dict(active_file=300 * MiB, inactive_file=900 * MiB, file_mapped=200 * MiB, file=1300 * MiB,
                    shmem=100 * MiB), 1000 * MiB),
        ("v2", dict(file=1300 * MiB, shmem=100 * MiB), 1200 * MiB),  # tmpfs is in `file` but needs swap to leave
    ],
)
def test_page_cache_in_usage_is_reclaimable(tmp_path, version, stat, reclaimable):
    make, fs = (_v1, tmp_path / "fs/memory") if version == "v1" else (_v2, tmp_path / "fs")
    proc = _proc(tmp_path, "4:memory:/job\n" if version == "v1" else "0::/job\n")
    make(fs / "job", 2 * GiB, 1800 * MiB, **stat)
    group = read_cgroup_memory(tmp_path / "fs", proc)
    assert group is not None and group.reclaimable_bytes == reclaimable
    assert group.charged_bytes == 1800 * MiB - reclaimable and group.headroom_bytes == 248 * MiB + reclaimable


def test_v1_hierarchical_limit_binds_when_the_ancestors_are_not_mounted(tmp_path):
    # In a container the mount's root is the container's group: its parents' limits are not visible, but
    # the kernel reports their minimum as hierarchical_memory_limit.
    proc = _proc(tmp_path, "4:memory:/docker/abc\n")
    _v1(tmp_path / "fs/memory", None, 600 * MiB, hierarchical_memory_limit=1800 * MiB, total_inactive_file=100 * MiB)
    group = read_cgroup_memory(tmp_path / "fs", proc)
    assert group == CgroupMemory(1800 * MiB, 600 * MiB, tmp_path / "fs/memory/memory.stat", reclaimable_bytes=100 * MiB)


@pytest.mark.parametrize(
    ("line", "mounted"),
    [
        ("4:memory:/docker/abc", ""),  # the mount shows the container's own group as its root
        ("4:memory:/docker/abc/worker", "worker"),  # and groups below it under their tail
        ("4:memory:/../../outside", ""),  # a group named from outside the cgroup namespace
    ],
)
def test_v1_group_relative_to_a_container_mount_root(tmp_path, line, mounted):
    proc = _proc(tmp_path, line + "\n")
    _v1(tmp_path / "fs/memory", 3 * GiB, 2 * GiB)
    if mounted:
        _v1(tmp_path / "fs/memory" / mounted, GiB, 500 * MiB)
    group = read_cgroup_memory(tmp_path / "fs", proc)
    assert group is not None and group.limit_bytes == (GiB if mounted else 3 * GiB)


def test_v1_parent_without_use_hierarchy_does_not_limit_its_children(tmp_path):
    proc = _proc(tmp_path, "4:memory:/a/b\n")
    _v1(tmp_path / "fs/memory/a", 512 * MiB, 100 * MiB)
    _write(tmp_path / "fs/memory/a/memory.use_hierarchy", "0\n")
    _v1(tmp_path / "fs/memory/a/b", 2 * GiB, 100 * MiB)
    group = read_cgroup_memory(tmp_path / "fs", proc)
    assert group is not None and group.limit_bytes == 2 * GiB


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
    budget = host_budget(cgroup=group, own_rss_bytes=own, available_bytes=64 * GiB)
    # this process's RSS + headroom (limit - usage)
    assert budget.limit_bytes == own + 200 * MiB
    assert budget.source.startswith(f"cgroup limit {format_bytes(own + 300 * MiB)} (")
    assert "charged to other memory" in budget.source  # 100 MiB of the usage is not this process's


def test_host_budget_never_above_the_limit_when_own_pages_are_charged_elsewhere(tmp_path):
    # The case: inside a 1.8 GiB group the process holds 1.3 GiB, but only 1.0 GiB is charged to the
    # group (pages touched before it moved in stay charged where they were): limit - usage + RSS = 2.1 GiB.
    limit = 1800 * MiB
    group = CgroupMemory(limit, 1000 * MiB, tmp_path / "memory.limit_in_bytes")
    budget = host_budget(cgroup=group, own_rss_bytes=1300 * MiB, available_bytes=20 * GiB)
    assert limit - group.usage_bytes + 1300 * MiB == 2100 * MiB
    assert budget.limit_bytes == limit
    assert budget.source == f"cgroup limit 1.8 GiB ({tmp_path / 'memory.limit_in_bytes'})"


def test_host_budget_does_not_count_page_cache_as_used(tmp_path):
    # 1.9 GiB charged, 1.5 GiB of it page cache: 300 MiB is this process, 100 MiB another process.
    group = CgroupMemory(2 * GiB, 1900 * MiB, tmp_path / "memory.max", reclaimable_bytes=1500 * MiB)
    budget = host_budget(cgroup=group, own_rss_bytes=300 * MiB, available_bytes=20 * GiB)
    assert budget.limit_bytes == 2 * GiB - 100 * MiB  # was 2 GiB - 1.9 GiB + 300 MiB = 400 MiB
    assert "less 100.0 MiB charged to other memory" in budget.source


def test_host_budget_caps_a_ram_limit_above_the_cgroup_limit_and_says_so(tmp_path, caplog):
    group = CgroupMemory(1800 * MiB, 400 * MiB, tmp_path / "memory.limit_in_bytes")
    with caplog.at_level(logging.WARNING, logger="autobatch._memory"):
        budget = host_budget("8GiB", cgroup=group, own_rss_bytes=400 * MiB, available_bytes=20 * GiB)
    assert budget.limit_bytes == 1800 * MiB
    assert budget.source == f"cgroup limit 1.8 GiB ({tmp_path / 'memory.limit_in_bytes'}); ram_limit=8GiB capped"
    assert "ram_limit=8GiB is more than this process can use" in caplog.text and "1.8 GiB" in caplog.text


@pytest.mark.parametrize(
    ("ram_limit", "available", "expected", "source"),
    [
        ("1GiB", 20 * GiB, GiB, "ram_limit=1GiB"),  # the smallest bound names itself
        ("1800MiB", 20 * GiB, 1800 * MiB, "ram_limit=1800MiB"),  # a tie goes to ram_limit
        (None, 20 * GiB, 1800 * MiB, "cgroup limit 1.8 GiB"),
        (None, 600 * MiB, 1000 * MiB, "free RAM (psutil available + this process)"),
        ("1GiB", 300 * MiB, 700 * MiB, "free RAM (psutil available + this process); ram_limit=1GiB capped"),
    ],
)
def test_host_budget_is_the_smallest_bound(tmp_path, ram_limit, available, expected, source):
    group = CgroupMemory(1800 * MiB, 400 * MiB, tmp_path / "memory.limit_in_bytes")
    budget = host_budget(ram_limit, cgroup=group, own_rss_bytes=400 * MiB, available_bytes=available)
    assert budget.limit_bytes == expected and budget.source.startswith(source)


def test_host_budget_from_a_fake_cgroup_tree(tmp_path):
    # End to end through the reader: a v1 job limited to 1.8 GiB by its parent, with page cache in its usage.
    proc = _proc(tmp_path, "4:memory:/job/step\n")
    _v1(tmp_path / "fs/memory/job", 1800 * MiB, 1500 * MiB, total_inactive_file=900 * MiB, total_active_file=0)
    _v1(tmp_path / "fs/memory/job/step", None, 1500 * MiB, total_inactive_file=900 * MiB, total_active_file=0)
    group = read_cgroup_memory(tmp_path / "fs", proc)
    for rss in (500 * MiB, 2100 * MiB):  # all of this process charged here, or more than the group holds
        budget = host_budget(cgroup=group, own_rss_bytes=rss, available_bytes=20 * GiB)
        assert budget.limit_bytes <= 1800 * MiB
    assert host_budget(cgroup=group, own_rss_bytes=500 * MiB, available_bytes=20 * GiB).limit_bytes == 1700 * MiB


def test_child_rss_limit_leaves_the_callers_reserve_in_the_group(tmp_path):
    group = CgroupMemory(2 * GiB, 1524 * MiB, tmp_path / "memory.max", reclaimable_bytes=500 * MiB)
    # headroom 1 GiB: the child may grow by it, less what the caller keeps.
    limit = child_rss_limit_bytes(300 * MiB, reserve_bytes=100 * MiB, cgroup=group, available_bytes=20 * GiB)
    assert limit == 300 * MiB + GiB - 100 * MiB
    # The system's available memory bounds it too.
    assert child_rss_limit_bytes(300 * MiB, reserve_bytes=0, cgroup=group, available_bytes=200 * MiB) == 500 * MiB
    # Never above the group's limit, less the reserve.
    roomy = CgroupMemory(GiB, 0, tmp_path / "memory.max", path_headroom_bytes=None)
    assert child_rss_limit_bytes(800 * MiB, reserve_bytes=0, cgroup=roomy, available_bytes=20 * GiB) == GiB


def test_child_rss_limit_without_a_cgroup_is_available_memory():
    assert child_rss_limit_bytes(300 * MiB, cgroup=None, available_bytes=GiB) == 300 * MiB + GiB - 64 * MiB
    real = child_rss_limit_bytes(300 * MiB, cgroup=None)
    assert abs(real - (300 * MiB + psutil.virtual_memory().available - 64 * MiB)) < 256 * MiB


def test_child_rss_limit_with_no_room_left_is_at_most_the_childs_rss(tmp_path):
    full = CgroupMemory(GiB, GiB, tmp_path / "memory.max")
    assert child_rss_limit_bytes(400 * MiB, cgroup=full, available_bytes=20 * GiB) < 400 * MiB
    assert child_rss_limit_bytes(0, cgroup=full, available_bytes=20 * GiB) == 0
    with pytest.raises(ValueError) as excinfo:
        child_rss_limit_bytes(-1, cgroup=None)
    assert "child_rss_bytes=-1" in str(excinfo.value)


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
