"""Read memory: host RAM (psutil + cgroup), process RSS/peak, GPU limits.

Nothing here imports TensorFlow at module level; the probe's child process and
the monitor are the only places that ask TensorFlow about device memory.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Literal

import psutil

from autobatch._units import format_bytes, parse_bytes

logger = logging.getLogger(__name__)

# cgroup v1 reports "no limit" as a huge page-aligned number rather than "max".
_UNLIMITED = 1 << 60


@dataclasses.dataclass(frozen=True)
class Budget:
    """How much memory one kind of device may use at peak."""

    kind: Literal["host", "gpu"]
    """``"host"`` for process RAM, ``"gpu"`` for accelerator memory."""
    limit_bytes: int
    """Peak the training process (or one device) may reach, before the safety margin."""
    source: str
    """Where the number came from, e.g. ``"ram_limit=4GiB"`` or ``"cgroup memory.max"``."""

    def __str__(self) -> str:
        return f"{self.kind} {format_bytes(self.limit_bytes)} ({self.source})"


@dataclasses.dataclass(frozen=True)
class CgroupMemory:
    """The cgroup memory limit that binds this process, and what its group is charged.

    The limit is the smallest on the path from the process's group up to the root
    (a parent's limit holds for everything below it); usage and page cache are
    those of the group that sets it.
    """

    limit_bytes: int
    """The smallest memory limit on the path (v2 ``memory.max``, v1 ``memory.limit_in_bytes`` or
    ``memory.stat``'s ``hierarchical_memory_limit``)."""
    usage_bytes: int | None
    """What the group with that limit is charged now (v2 ``memory.current``, v1 ``memory.usage_in_bytes``),
    page cache included; ``None`` when unreadable."""
    path: Path
    """The file the limit was read from."""
    reclaimable_bytes: int = 0
    """The part of ``usage_bytes`` the kernel reclaims before it kills for memory: file pages no process
    maps (``memory.stat``'s ``active_file`` + ``inactive_file`` less mapped file pages; not tmpfs or
    shared memory, which need swap to leave)."""
    path_headroom_bytes: int | None = None
    """Set when another limited group on the path (a parent with a larger limit but fuller, say) has
    less headroom than this one: that headroom."""

    @property
    def charged_bytes(self) -> int:
        """What the group is charged that the kernel cannot reclaim: ``usage_bytes − reclaimable_bytes``."""
        return max((self.usage_bytes or 0) - self.reclaimable_bytes, 0)

    @property
    def headroom_bytes(self) -> int:
        """How much more unreclaimable memory this group, and every limited group on the path, can be charged."""
        own = max(self.limit_bytes - self.charged_bytes, 0)
        return own if self.path_headroom_bytes is None else min(own, self.path_headroom_bytes)


@dataclasses.dataclass(frozen=True)
class _Level:
    """One limited group on the path from the process's group to the root."""

    limit_bytes: int
    usage_bytes: int | None
    reclaimable_bytes: int
    path: Path

    @property
    def headroom_bytes(self) -> int:
        return max(self.limit_bytes - max((self.usage_bytes or 0) - self.reclaimable_bytes, 0), 0)


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return None if value >= _UNLIMITED else value


def _read_stat(path: Path) -> dict[str, int]:
    stat: dict[str, int] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return stat
    for line in lines:
        name, _, value = line.partition(" ")
        try:
            stat[name] = int(value)
        except ValueError:
            continue
    return stat


def _reclaimable_bytes(stat: dict[str, int], *, v1: bool) -> int:
    """File pages in a group's usage that the kernel can drop or write back before an OOM kill."""

    def get(name: str) -> int | None:
        # v1's total_* count the group's descendants too, as its usage does; v2's memory.stat always does.
        return stat.get(f"total_{name}", stat.get(name)) if v1 else stat.get(name)

    active, inactive = get("active_file"), get("inactive_file")
    if active is not None or inactive is not None:
        file = (active or 0) + (inactive or 0)  # the file LRUs: tmpfs and shared memory live on the anon ones
    else:
        file = (get("cache") if v1 else get("file")) or 0
        file -= get("shmem") or 0
    # Mapped pages (the process's own libraries among them) are in use: reclaiming them only makes it fault
    # them back in, so they count as used. v1's mapped_file also counts mapped tmpfs: a little conservative.
    mapped = (get("mapped_file") if v1 else get("file_mapped")) or 0
    return max(file - mapped, 0)


def _group_dir(base: Path, relative: str) -> Path | None:
    """The process's group under a hierarchy's mount, or the mount root itself.

    Inside a container ``/proc/self/cgroup`` names the group from the host's root while the mount
    shows the container's own group as its root: the longest tail of the name that exists is taken,
    down to the mount root.
    """
    if not base.is_dir():
        return None
    parts = [p for p in relative.split("/") if p and p != "."]
    if ".." in parts:  # a group outside this cgroup namespace: only what follows can be under the mount
        parts = parts[len(parts) - parts[::-1].index("..") :]
    for start in range(len(parts)):
        candidate = base.joinpath(*parts[start:])
        if candidate.is_dir():
            return candidate
    return base


def _levels(base: Path, relative: str, *, v1: bool) -> list[_Level]:
    """The limited groups from the process's group up to the mount root, nearest first."""
    group = _group_dir(base, relative)
    if group is None:
        return []
    if v1:
        limit_name, usage_name = "memory.limit_in_bytes", "memory.usage_in_bytes"
    else:
        limit_name, usage_name = "memory.max", "memory.current"
    levels: list[_Level] = []
    directory = group
    while True:
        limit = _read_int(directory / limit_name)
        # The kernel's own minimum over the ancestors (v1), including any the mount does not show.
        hierarchical, usage, reclaimable = None, None, 0
        if limit is not None or (v1 and directory == group):
            stat = _read_stat(directory / "memory.stat")
            usage = _read_int(directory / usage_name)
            reclaimable = min(_reclaimable_bytes(stat, v1=v1), usage or 0)
            hierarchical = stat.get("hierarchical_memory_limit") if v1 and directory == group else None
        if limit is not None:
            levels.append(_Level(limit, usage, reclaimable, directory / limit_name))
        if hierarchical is not None and hierarchical < _UNLIMITED:
            levels.append(_Level(hierarchical, usage, reclaimable, directory / "memory.stat"))
        if directory == base or base not in directory.parents:
            break
        # v1 with use_hierarchy 0 (kernels before 5.x could set it): the parent neither counts nor limits its children.
        if v1 and _read_int(directory.parent / "memory.use_hierarchy") == 0:
            break
        directory = directory.parent
    return levels


def read_cgroup_memory(
    root: str | os.PathLike[str] = "/sys/fs/cgroup",
    proc_cgroup: str | os.PathLike[str] = "/proc/self/cgroup",
) -> CgroupMemory | None:
    """Find the cgroup memory limit that binds this process, with its group's usage and page cache.

    Walks from the process's group up to the root of the memory hierarchy (v2: ``memory.max`` under
    ``root``; v1: ``memory.limit_in_bytes`` under ``root/memory``, and the group's
    ``hierarchical_memory_limit``) and takes the smallest limit on the way, since a parent's limit holds
    for all its descendants.

    Args:
        root: where the cgroup filesystem is mounted (injectable for tests).
        proc_cgroup: the ``/proc/<pid>/cgroup`` file naming this process's groups.

    Returns:
        The smallest limit, what its group is charged and how much of that is reclaimable page cache,
        or ``None`` when no group on the path has a limit.

    Example:
        >>> group = read_cgroup_memory()
        >>> group.headroom_bytes if group else None  # what the group can still be charged
    """
    root = Path(root)
    relative: dict[str, str] = {}
    try:
        for line in Path(proc_cgroup).read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for controller in controllers.split(",") if controllers else [""]:
                relative[controller] = path
    except (OSError, ValueError):
        pass
    # cgroup v2: one unified tree. cgroup v1: a separate memory hierarchy. (Hybrid set-ups mount both;
    # only one of them has the memory controller.)
    levels = _levels(root, relative.get("", ""), v1=False)
    levels += _levels(root / "memory", relative.get("memory", ""), v1=True)
    if not levels:
        return None
    binding = min(levels, key=lambda level: (level.limit_bytes, level.headroom_bytes))
    least = min(level.headroom_bytes for level in levels)
    return CgroupMemory(
        limit_bytes=binding.limit_bytes,
        usage_bytes=binding.usage_bytes,
        path=binding.path,
        reclaimable_bytes=binding.reclaimable_bytes,
        path_headroom_bytes=least if least < binding.headroom_bytes else None,
    )


def _auto_cgroup(cgroup: CgroupMemory | None | Literal["auto"]) -> CgroupMemory | None:
    if isinstance(cgroup, str):  # "auto"
        return read_cgroup_memory()
    return cgroup


def host_budget(
    ram_limit: int | str | None = None,
    *,
    cgroup: CgroupMemory | None | Literal["auto"] = "auto",
    own_rss_bytes: int | None = None,
    available_bytes: int | None = None,
) -> Budget:
    """The host RAM the training process may use at peak.

    The smallest of: ``ram_limit`` when given; under a cgroup memory limit (Docker, Kubernetes), what
    this process can reach before its group is full — its RSS plus the group's headroom (the limit
    less what the group is charged beyond reclaimable page cache), never more than the limit; and the
    memory the system has available now plus this process's RSS. A ``ram_limit`` above either of the
    others is capped, and a warning logged.

    Args:
        ram_limit: an explicit limit (bytes or a string such as ``"8GiB"``).
        cgroup: the cgroup reading to use; ``"auto"`` reads it from ``/sys/fs/cgroup``.
        own_rss_bytes: this process's RSS (default: read from ``/proc``).
        available_bytes: the system's available memory (default: psutil's ``available``).

    Returns:
        The host budget; its ``source`` names the bound that set it.

    Raises:
        ConfigError: ``ram_limit`` is not a size.

    Example:
        >>> print(host_budget("8GiB"))  # in a 4 GiB container
        host 4.0 GiB (cgroup limit 4.0 GiB (/sys/fs/cgroup/memory.max); ram_limit=8GiB capped)
    """
    bounds: list[tuple[int, str]] = []
    if ram_limit is not None:
        bounds.append((parse_bytes(ram_limit, name="ram_limit"), f"ram_limit={ram_limit}"))
    own = rss_bytes() if own_rss_bytes is None else int(own_rss_bytes)
    group = _auto_cgroup(cgroup)
    if group is not None:
        # What this process holds is part of what the group is charged — unless some of its pages were
        # charged elsewhere (to the group that first touched them, say): adding back more than the group is
        # charged would count them as room in this group, and could put the budget above its limit.
        reach = min(group.limit_bytes, group.headroom_bytes + min(own, group.charged_bytes))
        source = f"cgroup limit {format_bytes(group.limit_bytes)} ({group.path})"
        if reach < group.limit_bytes:
            source += f", less {format_bytes(group.limit_bytes - reach)} charged to other memory"
        bounds.append((reach, source))
    available = psutil.virtual_memory().available if available_bytes is None else int(available_bytes)
    bounds.append((available + own, "free RAM (psutil available + this process)"))
    limit, source = min(bounds, key=lambda bound: bound[0])  # ties: the first, so ram_limit names itself
    if ram_limit is not None and source != bounds[0][1]:
        logger.warning(
            "ram_limit=%s is more than this process can use: the host budget is capped to %s (%s)",
            ram_limit, format_bytes(limit), source,
        )
        source = f"{source}; ram_limit={ram_limit} capped"
    logger.debug("host budget %s (%s)", format_bytes(limit), source)
    return Budget("host", max(limit, 0), source)


def child_rss_limit_bytes(
    child_rss_bytes: int,
    *,
    reserve_bytes: int = 64 * 2**20,
    cgroup: CgroupMemory | None | Literal["auto"] = "auto",
    available_bytes: int | None = None,
) -> int:
    """How large a child process may grow before it must be stopped, so that it and its parent still fit.

    The child (a probe's trial process) runs in its parent's cgroup and takes from the same RAM: it may
    grow by the group's headroom now (its limit less what the group is charged beyond reclaimable page
    cache), and by no more than the system has available, less ``reserve_bytes`` for what the parent may
    still add while the child runs. Call it again as the child runs: the headroom moves.

    Args:
        child_rss_bytes: the child's RSS now (e.g. ``rss_bytes(pid)``).
        reserve_bytes: what the calling process may still allocate meanwhile.
        cgroup: the cgroup reading to use; ``"auto"`` reads this process's from ``/sys/fs/cgroup``.
        available_bytes: the system's available memory (default: psutil's ``available``).

    Returns:
        The RSS past which the child should be stopped; at or below ``child_rss_bytes`` when there is no
        room left. Never above the group's limit.

    Raises:
        ValueError: ``child_rss_bytes`` or ``reserve_bytes`` is negative.

    Example:
        >>> if rss_bytes(child.pid) > child_rss_limit_bytes(rss_bytes(child.pid)):
        ...     child.kill()
    """
    if child_rss_bytes < 0 or reserve_bytes < 0:
        raise ValueError(
            "`child_rss_bytes` and `reserve_bytes` must be at least 0. "
            f"Received: child_rss_bytes={child_rss_bytes}, reserve_bytes={reserve_bytes}"
        )
    headroom = psutil.virtual_memory().available if available_bytes is None else int(available_bytes)
    group = _auto_cgroup(cgroup)
    ceiling = child_rss_bytes + headroom - reserve_bytes
    if group is not None:
        grown = child_rss_bytes + group.headroom_bytes - reserve_bytes
        ceiling = min(grown, ceiling, group.limit_bytes - reserve_bytes)
    return max(ceiling, 0)


def gpu_memory_totals() -> list[tuple[int, int]] | None:
    """(total, free) bytes of each visible NVIDIA GPU, via NVML or ``nvidia-smi``; ``None`` if unknown."""
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        try:
            out = []
            for i in range(pynvml.nvmlDeviceGetCount()):
                info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i))
                out.append((int(info.total), int(info.free)))
            return out
        finally:
            pynvml.nvmlShutdown()
    except Exception as exc:  # NVML missing or no driver: try the CLI next.
        logger.debug("NVML unavailable: %s", exc)
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        text = subprocess.run(
            [smi, "--query-gpu=memory.total,memory.free", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
        rows = [line.split(",") for line in text.strip().splitlines() if line.strip()]
        return [(int(float(t)) * 1024**2, int(float(f)) * 1024**2) for t, f in rows]
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        logger.debug("nvidia-smi failed: %s", exc)
        return None


def gpu_budget(gpu_limit: int | str | None = None, *, device_index: int = 0) -> Budget | None:
    """The accelerator memory one replica may use, or ``None`` when there is no GPU.

    Args:
        gpu_limit: an explicit limit (bytes or a string such as ``"16GiB"``).
        device_index: which GPU (as NVML numbers them).
    """
    if gpu_limit is not None:
        return Budget("gpu", parse_bytes(gpu_limit, name="gpu_limit"), f"gpu_limit={gpu_limit}")
    totals = gpu_memory_totals()
    if not totals or device_index >= len(totals):
        return None
    total, free = totals[device_index]
    return Budget("gpu", free, f"GPU:{device_index} free memory (NVML), {format_bytes(total)} total")


def _status_kib(field: str, pid: int | str = "self") -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def peak_rss_bytes(pid: int | str = "self") -> int | None:
    """Peak resident memory of a process (Linux ``VmHWM``), or ``None`` off Linux."""
    return _status_kib("VmHWM", pid)


def rss_bytes(pid: int | str = "self") -> int:
    """Current resident memory of a process."""
    value = _status_kib("VmRSS", pid)
    if value is not None:
        return value
    return psutil.Process(None if pid == "self" else int(pid)).memory_info().rss


def reset_peak_rss() -> bool:
    """Reset this process's ``VmHWM`` to its current RSS (Linux ``clear_refs``); ``False`` if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def is_oom_error(exc: BaseException) -> bool:
    """Whether an exception means "out of memory" (host ``MemoryError`` or TF's ``ResourceExhaustedError``)."""
    if isinstance(exc, MemoryError):
        return True
    tf = sys.modules.get("tensorflow")
    if tf is not None and isinstance(exc, tf.errors.ResourceExhaustedError):
        return True
    return False

