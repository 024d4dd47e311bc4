"""Compiling and loading the native kernels: once per machine, into the HiRE cache.

``cpp_extension.load`` guards its build directory with a lock file (``<build>/lock``) that it
waits on forever, even when the library is already built; a build killed mid-way (OOM, Ctrl-C, a
torchrun rank) leaves that file behind and every later run hangs. So:

* a finished build is marked by a ``built`` file written after the library loaded; with it, the
  library is loaded directly and torch's lock is never read. A build killed before the mark does
  not count: the next run builds again (ninja redoes only what is missing or stale);
* a build holds our own OS lock (``flock`` on ``<build>/hire-build.lock``) around the whole
  build. The kernel releases it when the holder dies, so it can never be stale; while we hold it
  no other HiRE process is building, so torch's ``lock``, if present, is stale and is removed.
  Waiting for it has a timeout (``HIRE_NATIVE_BUILD_TIMEOUT`` seconds) and a message saying
  which process holds it and what to do.

``HIRE_NATIVE=0`` (read at the first build) and ``disabled()`` (a block in one process) keep the
kernels off: callers take their eager path.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Iterator

import torch

from hire.errors import HireError
from hire.files import atomic_write_text
from hire.paths import cache_root

HERE = Path(__file__).parent
SOURCES = tuple(HERE / name for name in ("sparse_rows.cpp", "int4.cpp", "decode.cpp", "head.cpp", "quant.cpp",
                                         "attention.cpp"))  # one library
HEADERS = (HERE / "simd.h", HERE / "rows.h", HERE / "int4.h", HERE / "quant.h", HERE / "attention.h")
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-Wfatal-errors")  # the first compile error is the message
LDFLAGS = ("-fopenmp",)
BUILD_TIMEOUT_S = 600.0  # a cold build takes ~30 s on 2 cores; ten minutes means the holder is stuck
BUILT_MARK = "built"  # written after a successful load: a build killed before it never counts
HIRE_LOCK = "hire-build.lock"  # ours: an flock, released by the kernel when its holder dies
TORCH_LOCK = "lock"  # cpp_extension's FileBaton: a plain file, left behind by a killed build
ERROR_LOG = "build-error.log"


class NativeUnavailableError(HireError, RuntimeError):
    """The native kernels are not built (no compiler, a failed build, HIRE_NATIVE=0, disabled())."""


class NativeBuildTimeout(NativeUnavailableError):
    """Another process held the build lock for longer than HIRE_NATIVE_BUILD_TIMEOUT."""


_library: str | None = None  # path of the loaded library
_error: str | None = None  # why the kernels are unavailable (set once, like _library)
_disabled = 0  # depth of active disabled() blocks


def _cpu_id() -> bytes:
    """The build is -march=native: a cache shared between different CPUs must not share the binary."""
    flags = b""
    try:
        with open("/proc/cpuinfo", "rb") as f:
            flags = next((line for line in f if line.startswith(b"flags")), b"")
    except OSError:
        pass
    return platform.machine().encode() + flags


def _digest(cflags: tuple[str, ...] = CFLAGS) -> str:
    # everything the binary depends on: a change to any of them builds into a fresh directory
    code = tuple(path.read_bytes() for path in SOURCES + HEADERS)
    parts = (*code, torch.__version__.encode(), _cpu_id(), " ".join(cflags + LDFLAGS).encode())
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:12]


def library_name() -> str:
    return f"hire_sparse_rows_{_digest()}"


def build_dir() -> Path:
    """Where the kernels for this source, torch version, CPU and flags are built:
    ``<cache>/native/<digest>`` (not created here)."""
    return cache_root() / "native" / _digest()


def build_timeout() -> float:
    """Seconds to wait for another process's build: ``HIRE_NATIVE_BUILD_TIMEOUT`` or 600."""
    raw = os.environ.get("HIRE_NATIVE_BUILD_TIMEOUT", "")
    if not raw:
        return BUILD_TIMEOUT_S
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise HireError(f"HIRE_NATIVE_BUILD_TIMEOUT must be a positive number of seconds, got {raw!r}")
    return seconds


@contextlib.contextmanager
def build_lock(directory: Path, timeout: float) -> Iterator[None]:
    """Hold ``directory/hire-build.lock`` exclusively, waiting at most ``timeout`` seconds."""
    path = directory / HIRE_LOCK
    with open(path, "a+") as f:  # not inherited by the compiler's processes (close-on-exec)
        deadline = time.monotonic() + timeout
        told = False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pass
            holder = _holder(path)
            if time.monotonic() >= deadline:
                raise NativeBuildTimeout(
                    f"waited {timeout:.0f} s for {holder} to finish building the native kernels (it holds {path}); "
                    "let it finish or stop it, or raise HIRE_NATIVE_BUILD_TIMEOUT (seconds); HIRE_NATIVE=0 runs "
                    "without the kernels"
                )
            if not told:
                print(f"hire: waiting for {holder} to finish building the native kernels (up to {timeout:.0f} s)",
                      file=sys.stderr, flush=True)
                told = True
            time.sleep(0.1)
        try:
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()}\n")  # for the message of a process that waits
            f.flush()
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        pid = ""
    return f"process {pid}" if pid.isdigit() else "another process"


def _compile(directory: Path, name: str, cflags: tuple[str, ...]) -> None:
    from torch.utils import cpp_extension

    print("hire: building the native kernels (once per machine, ~30 s)", file=sys.stderr, flush=True)
    try:
        cpp_extension.load(
            name=name,
            sources=[str(path) for path in SOURCES],
            extra_cflags=list(cflags),
            extra_ldflags=list(LDFLAGS),
            build_directory=str(directory),
            is_python_module=False,  # the library registers torch.ops.hire.* (or a variant's) and is loaded into torch
            verbose=False,
        )
    except Exception as exc:
        log = directory / ERROR_LOG
        atomic_write_text(log, f"{type(exc).__name__}: {exc}\n")
        lines = str(exc).strip().splitlines()
        # the compiler's first error says more than the build tool's last line
        first = next((line.strip() for line in lines if ": error:" in line or ": fatal error:" in line), None)
        summary = first or (lines[-1] if lines else type(exc).__name__)
        raise NativeUnavailableError(f"the build failed: {summary} (full log: {log})") from exc


def _load(directory: Path, name: str, cflags: tuple[str, ...] = CFLAGS) -> str:
    """Build ``name`` into ``directory`` (when needed) and load the library into torch; return its path."""
    library = directory / f"{name}.so"
    if (directory / BUILT_MARK).exists() and library.exists():
        torch.ops.load_library(str(library))
        return str(library)
    directory.mkdir(parents=True, exist_ok=True)
    with build_lock(directory, build_timeout()):
        if (directory / BUILT_MARK).exists() and library.exists():  # built by the process we waited for
            torch.ops.load_library(str(library))
            return str(library)
        # no HiRE process is building while we hold our lock: torch's lock is left by a killed build
        (directory / TORCH_LOCK).unlink(missing_ok=True)
        (directory / ERROR_LOG).unlink(missing_ok=True)
        _compile(directory, name, cflags)
        atomic_write_text(directory / BUILT_MARK, f"{name}\n")
    return str(library)


def _variant_cflags(variant: str, extra_cflags: tuple[str, ...]) -> tuple[str, ...]:
    if not variant.isidentifier() or not variant.isascii():
        raise ValueError(f"a variant name must be a Python identifier (it names torch.ops.hire_<variant>), got {variant!r}")
    return CFLAGS + tuple(extra_cflags) + (f"-DHIRE_OPS_NAMESPACE={variant_namespace(variant)}",)


def variant_namespace(variant: str) -> str:
    """The ``torch.ops`` namespace a variant build registers its ops under: ``hire_<variant>``."""
    return f"hire_{variant}"


def build_variant(variant: str, extra_cflags: tuple[str, ...] = ()) -> str:
    """Build (once, with the same lock and ``built`` mark as the default build) and load the kernels
    compiled with ``extra_cflags`` after the usual flags, e.g. ``("-mno-avx512f",)`` for the AVX2
    path on an AVX-512 machine; return the library's path. Its ops are
    ``torch.ops.hire_<variant>.*`` (see ``variant_namespace``), so it loads beside the default
    build. Built into ``<cache>/native/<variant>-<digest>``. For tests and benchmarks of other
    SIMD paths; raises NativeUnavailableError when the build fails. ``HIRE_NATIVE`` and ``disabled()`` do not apply."""
    cflags = _variant_cflags(variant, tuple(extra_cflags))
    digest = _digest(cflags)
    directory = cache_root() / "native" / f"{variant}-{digest}"
    return _load(directory, f"hire_sparse_rows_{variant}_{digest}", cflags)


def loaded() -> bool:
    """Build and load the kernels on the first call; True when ``torch.ops.hire`` is usable."""
    global _library, _error
    if _disabled:
        return False
    if _library is not None or _error is not None:
        return _library is not None
    if os.environ.get("HIRE_NATIVE", "1") == "0":
        _error = "disabled by HIRE_NATIVE=0"
        return False
    try:
        _library = _load(build_dir(), library_name())
    except NativeUnavailableError as exc:
        _error = str(exc)
    except Exception as exc:  # no compiler / ninja / headers: callers keep their eager path
        lines = str(exc).strip().splitlines()
        _error = f"{type(exc).__name__}: {lines[-1] if lines else ''}"
    if _error is not None:
        warnings.warn(f"HiRE native kernels unavailable ({_error}); using the slower eager path", stacklevel=3)
    return _library is not None


def available() -> bool:
    """True when the native kernels are built (builds them on the first call)."""
    return loaded()


def unavailable_reason() -> str | None:
    """Why ``available()`` is False, or None when it is True."""
    if loaded():
        return None
    return "disabled by hire.native.disabled()" if _disabled else _error


def explicitly_disabled() -> bool:
    """True when the kernels are off on purpose (HIRE_NATIVE=0 or inside ``disabled()``), not
    because they failed to build."""
    return bool(_disabled) or (not loaded() and _error == "disabled by HIRE_NATIVE=0")


def under_ci() -> bool:
    """True when ``CI`` is set (as CI services and .ci/run's environment do): there a build that
    fails is an error, not a fallback to the eager path."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Inside the block ``available()`` is False, so layers prepared there take their eager path
    (a layer decides when it is prepared for decoding). Builds nothing; nests."""
    global _disabled
    _disabled += 1
    try:
        yield
    finally:
        _disabled -= 1


def require() -> None:
    """Raise NativeUnavailableError (with the reason) unless the kernels are available."""
    if not available():
        raise NativeUnavailableError(f"HiRE native kernels unavailable: {unavailable_reason()}")
