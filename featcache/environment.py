"""What this process runs on: library versions, decode-worker counts, memory available (stdlib only).

Imported by both sides (torch and JAX) and by core modules that record versions; imports nothing heavy.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from pathlib import Path

# Every package whose version a cache or run records (those not installed are left out).
RECORDED_PACKAGES = ("featcache", "torch", "torchvision", "timm", "numpy", "h5py", "pillow", "jax", "jaxlib", "flax",
                     "optax")


def library_versions(packages=RECORDED_PACKAGES) -> dict[str, str]:
    """Versions recorded in every cache and run (read from package metadata, nothing imported)."""
    versions = {"python": platform.python_version()}
    for pkg in packages:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def default_num_workers() -> int:
    """Decode workers when --num-workers is not given: half the cores, at most 4 (forward uses the rest).

    None when JAX is loaded in this process (e.g. `featcache demo` after head-train): DataLoader
    workers are forked, and forking a process that runs JAX's threads can deadlock.
    """
    if "jax" in sys.modules:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return max(0, min(4, cores // 2))


def worker_context(num_workers: int) -> str | None:
    """The multiprocessing start method of DataLoader workers: "forkserver" when JAX is loaded in this process
    and workers are asked for (forking a process that runs JAX's threads can deadlock, and JAX warns about every
    os.fork(); a fork server is a fresh process that never loaded JAX), else None (torch's default, fork)."""
    return "forkserver" if num_workers > 0 and "jax" in sys.modules else None


def memory_available(*, proc: str = "/proc", cgroup_root: str = "/sys/fs/cgroup") -> int | None:
    """Bytes this process can still get: Linux MemAvailable, lowered to the room under its cgroup's memory
    limit when there is one (a container's, or a batch job's as Slurm sets it); None where neither is known."""
    known = [x for x in (_meminfo_available(proc), _cgroup_room(proc, cgroup_root)) if x is not None]
    return min(known) if known else None


def _meminfo_available(proc: str) -> int | None:
    try:
        with open(Path(proc, "meminfo")) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_room(proc: str, root: str) -> int | None:
    """Room under the tightest memory limit of this process's cgroup and its parents (cgroup v1 or v2), the
    page cache counted as free (the kernel reclaims it first); None when no limit is set or none can be read."""
    try:
        lines = Path(proc, "self/cgroup").read_text().splitlines()
    except OSError:
        return None
    rooms = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[1] == "":  # v2, at the root or (hybrid) under unified/
            layouts = [(Path(root), "memory.max", "memory.current", "file"),
                       (Path(root, "unified"), "memory.max", "memory.current", "file")]
        elif "memory" in parts[1].split(","):  # v1
            layouts = [(Path(root, "memory"), "memory.limit_in_bytes", "memory.usage_in_bytes", "total_cache")]
        else:
            continue
        for base, limit_file, usage_file, cache_key in layouts:
            here = base / parts[2].lstrip("/")
            while True:
                limit = _read_bytes(here / limit_file)
                if limit is not None and limit < 2**60:  # v1 writes "no limit" as about 2**63
                    used = (_read_bytes(here / usage_file) or 0) - (_stat_value(here / "memory.stat", cache_key) or 0)
                    rooms.append(max(limit - max(used, 0), 0))
                if here == base or base not in here.parents:
                    break
                here = here.parent
    return min(rooms) if rooms else None


def _read_bytes(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def _stat_value(path: Path, key: str) -> int | None:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return None
