"""Peak resident memory of this process, per measured figure (Linux VmHWM, reset between
figures; elsewhere the lifetime peak). Torch-free."""

from __future__ import annotations

import resource
from pathlib import Path


def reset_peak_rss() -> str:
    """Reset the kernel's peak-RSS mark (Linux: clear_refs 5) so each figure has its own
    peak; where that is impossible the figure is the process's lifetime peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return "VmHWM after reset"
    except OSError:
        return "process lifetime peak (ru_maxrss)"


def peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
