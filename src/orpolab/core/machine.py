"""What this process may use of the machine."""

from __future__ import annotations

import os


def available_cores() -> int:
    """The cores this process may use (a container's or Slurm's CPU set, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
