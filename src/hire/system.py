"""The machine HiRE runs on: how many cores it may use, torch's thread count, and how the C heap
gives memory back.

The bottom floor: imports nothing from hire (torch only when threads are set), so every room may
read it.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import ctypes.util
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


@functools.lru_cache(maxsize=1)
def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


@functools.lru_cache(maxsize=4)
def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags (the first ``flags`` line of ``cpuinfo``); empty where there is none."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return frozenset()
    return frozenset(line.partition(":")[2].split())


def native_bfloat16() -> bool:
    """Whether the CPU multiplies bfloat16 in hardware (AVX512_BF16 or AMX-BF16): there torch's
    bfloat16 matrix products beat float32's (Qwen2.5 0.5B's forward passes: 1.3-1.6x on AVX512_BF16)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def release_freed_memory() -> None:
    """Hand the heap's freed blocks back to the OS (glibc's malloc_trim; nothing elsewhere). glibc
    keeps blocks under its mmap threshold (adaptive, up to 32 MB) in the heap when freed, and
    fragmentation keeps them resident: measured on a 0.5B GGUF, the exact top-k of 5,120 states over
    its 152k-row head, a slice of rows at a time, left the process 430 MB larger than it began, all
    of it free. Called after each such phase (loading, calibration, fitting, each evaluation window),
    so that the next one starts from what is live; a few ms each. (A fixed low threshold instead,
    glibc's M_MMAP_THRESHOLD at 4 MB, kept the memory down too but made every eager forward pass
    fault in its dequantized weights afresh: 84 s of system time in one first ``hire eval``, not 25.)"""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter: the size from which an allocation is its own memory map
GLIBC_MMAP_THRESHOLD_MAX = 32 << 20  # where glibc's adaptive threshold ends up after the first large frees


@contextlib.contextmanager
def returned_allocations(threshold: int = 1 << 20):
    """Within: every allocation of ``threshold`` bytes or more is its own memory map, handed back to
    the OS when freed, so that a loop allocating and freeing MB-sized tensors in turn stays at what
    is live (in the heap, fragmentation kept up to 0.5 GB of freed slices resident mid-loop on a 0.5B
    model's 152k-row head). On leaving, glibc's threshold is set to the 32 MB its adaptive one
    reaches anyway (a low one everywhere would make each eager forward pass fault its dequantized
    weights in afresh: 84 s of system time in one first ``hire eval``, not 25) and the heap trimmed.
    Nothing happens off glibc."""
    libc = _libc()
    ok = libc is not None and hasattr(libc, "mallopt") and bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    try:
        yield
    finally:
        if ok:
            libc.mallopt(M_MMAP_THRESHOLD, GLIBC_MMAP_THRESHOLD_MAX)
        release_freed_memory()
