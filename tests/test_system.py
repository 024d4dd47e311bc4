"""hire.system: the cores, and how freed memory goes back to the OS."""

import platform

import pytest

from hire import system


class FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


def test_returned_allocations_sets_the_threshold_and_leaves_glibcs_ceiling(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(system, "_libc", lambda: libc)

    @system.returned_allocations(1 << 20)
    def work():
        assert libc.calls == [("mallopt", system.M_MMAP_THRESHOLD, 1 << 20)]
        return 7

    assert work() == 7
    assert libc.calls[1:] == [("mallopt", system.M_MMAP_THRESHOLD, system.GLIBC_MMAP_THRESHOLD_MAX), ("malloc_trim", 0)]
    libc.calls.clear()
    try:  # restored even when the work fails
        with system.returned_allocations():
            raise KeyError("boom")
    except KeyError:
        pass
    assert [c[0] for c in libc.calls] == ["mallopt", "mallopt", "malloc_trim"]


def test_off_glibc_nothing_is_called(monkeypatch):
    monkeypatch.setattr(system, "_libc", lambda: None)
    with system.returned_allocations():
        pass
    system.release_freed_memory()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the threshold is glibc's")
def test_glibc_takes_the_thresholds():
    libc = system._libc()
    assert libc is not None
    assert libc.mallopt(system.M_MMAP_THRESHOLD, 1 << 20) == 1
    assert libc.mallopt(system.M_MMAP_THRESHOLD, system.GLIBC_MMAP_THRESHOLD_MAX) == 1
