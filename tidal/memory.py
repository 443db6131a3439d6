"""This process's resident memory, read from /proc/self/status (Linux), for memory benchmarks.

Not getrusage's ru_maxrss: Linux carries the peak of the address space a process had before exec
over into it, so a worker spawned (fork + exec) by a large process would report that process's
size. ru_maxrss is the fallback only where /proc is missing (not Linux).
"""
from __future__ import annotations

import resource
from pathlib import Path


def status_kb(field: str) -> int:
    """A field of /proc/self/status in kB, e.g. VmRSS (now) or VmHWM (the high-water mark)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB (VmHWM)."""
    try:
        return status_kb("VmHWM") / 1024
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
