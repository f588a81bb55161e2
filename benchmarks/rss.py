"""Resident-memory readings shared by the benchmark scripts (Linux /proc, else getrusage)."""

from __future__ import annotations

import resource
import sys


def maxrss_mb() -> float:
    """Peak resident memory of this process, in MiB.

    On Linux this reads ``VmHWM`` from /proc/self/status: ``ru_maxrss`` of a
    child started by fork + exec keeps the parent's peak from before the exec,
    so every child would report at least the (large) parent's peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


def reset_peak_rss() -> bool:
    """Returns freed heap to the OS and restarts the peak-RSS count (Linux), if possible.

    Compiling a step takes more memory than running it; without this the peak
    would measure XLA's compiler, not the step.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except (OSError, AttributeError):
        return False


def current_rss_mb() -> float:
    """Resident memory of this process now, in MiB (NaN where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")
