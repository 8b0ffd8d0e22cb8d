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
    """The memory limit of the cgroup this process runs in."""

    limit_bytes: int
    usage_bytes: int | None
    path: Path


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


def read_cgroup_memory(
    root: str | os.PathLike[str] = "/sys/fs/cgroup",
    proc_cgroup: str | os.PathLike[str] = "/proc/self/cgroup",
) -> CgroupMemory | None:
    """Find this process's cgroup memory limit (v2 ``memory.max`` or v1 ``memory.limit_in_bytes``).

    Args:
        root: where the cgroup filesystem is mounted (injectable for tests).
        proc_cgroup: the ``/proc/<pid>/cgroup`` file naming this process's groups.

    Returns:
        The limit and current usage, or ``None`` when no limit is set.
    """
    root = Path(root)
    relative: dict[str, str] = {}
    try:
        for line in Path(proc_cgroup).read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for controller in controllers.split(",") if controllers else [""]:
                relative[controller] = path.lstrip("/")
    except (OSError, ValueError):
        pass
    candidates: list[tuple[Path, str, str]] = []
    # cgroup v2: one unified tree; inside a container the group is usually the mount root.
    v2 = relative.get("", "")
    for base in dict.fromkeys([root / v2, root]):
        candidates.append((base, "memory.max", "memory.current"))
    # cgroup v1: a separate memory hierarchy.
    v1 = relative.get("memory", "")
    for base in dict.fromkeys([root / "memory" / v1, root / "memory"]):
        candidates.append((base, "memory.limit_in_bytes", "memory.usage_in_bytes"))
    for base, limit_name, usage_name in candidates:
        limit = _read_int(base / limit_name)
        if limit is not None:
            return CgroupMemory(limit_bytes=limit, usage_bytes=_read_int(base / usage_name), path=base / limit_name)
    return None


def host_budget(
    ram_limit: int | str | None = None,
    *,
    cgroup: CgroupMemory | None | Literal["auto"] = "auto",
) -> Budget:
    """The host RAM the training process may use at peak.

    Without ``ram_limit`` this is the memory the system has available now plus
    what this process already holds, capped by the cgroup's headroom when the
    process runs under a cgroup memory limit (as in Docker or Kubernetes).

    Args:
        ram_limit: an explicit limit (bytes or a string such as ``"8GiB"``).
        cgroup: the cgroup reading to use; ``"auto"`` reads it from ``/sys/fs/cgroup``.

    Returns:
        The host budget and where it came from.
    """
    if ram_limit is not None:
        limit = parse_bytes(ram_limit, name="ram_limit")
        return Budget("host", limit, f"ram_limit={ram_limit}")
    own = psutil.Process().memory_info().rss
    available = psutil.virtual_memory().available
    budget = Budget("host", available + own, "free RAM (psutil available + this process)")
    group = read_cgroup_memory() if cgroup == "auto" else cgroup
    if group is not None:
        headroom = group.limit_bytes - (group.usage_bytes or 0) + own
        if headroom < budget.limit_bytes:
            budget = Budget("host", max(headroom, 0), f"cgroup limit {format_bytes(group.limit_bytes)} ({group.path})")
    return budget


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
