"""The machine HiRE runs on: how many cores it may use, and torch's thread count.

The bottom floor: imports nothing from hire (torch only when threads are set), so every room may
read it.
"""

from __future__ import annotations

import os


def available_cores() -> int:
    """Cores this process may run on: its CPU affinity where the OS reports one (a container or
    ``taskset`` limits it), else every core of the machine; at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def set_threads(threads: int | None = None) -> int:
    """Give torch ``threads`` intra-op threads (default: every available core); returns the count."""
    import torch

    count = threads or available_cores()
    torch.set_num_threads(count)
    return count
