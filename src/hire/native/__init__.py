"""Native gather-GEMV kernels (C++, built with torch's extension loader on first use).

Decode reads a few selected rows of large matrices. In eager torch that is an ``index_select``
copy followed by a GEMV (two passes over the rows and an allocation per layer); these kernels
read the selected rows in place with float32 accumulation:

* ``rows_dot(x, W, idx, scales=None, parts=1, act=None)`` -> float32 ``(c,)`` (or ``(c, parts)``
  without an activation): ``act(W[idx[j], :D] . x) * (W[idx[j], D:] . x)`` for gated rows.
* ``rows_axpy(W, idx, a)`` -> float32 ``(D_out,)``: ``sum_j a[j] * W[idx[j]]``.

The extension is compiled once per machine (gcc, ninja; ~30 s) into the HiRE cache and reused.
When it cannot be built (no compiler, ``HIRE_NATIVE=0``), ``available()`` is False and callers
keep their eager path; ``reference_rows_dot`` / ``reference_rows_axpy`` are that eager meaning,
used by the tests.
"""

from __future__ import annotations

import hashlib
import os
import sys
import warnings
from pathlib import Path

import torch
from torch.nn import functional as F

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int8)
ACTIVATIONS = {None: 0, "silu": 1, "gelu_tanh": 2, "gelu": 3, "relu": 4}
_EAGER_ACT = {"silu": F.silu, "relu": F.relu, "gelu": F.gelu,
              "gelu_tanh": lambda v: F.gelu(v, approximate="tanh")}
_SOURCE = Path(__file__).with_name("sparse_rows.cpp")
_module = None
_error: str | None = None


def _cpu_id() -> bytes:
    """The build is -march=native: a cache shared between different CPUs must not share the binary."""
    import platform

    flags = b""
    try:
        with open("/proc/cpuinfo", "rb") as f:
            flags = next((line for line in f if line.startswith(b"flags")), b"")
    except OSError:
        pass
    return platform.machine().encode() + flags


def _build():
    global _module, _error
    if _module is not None or _error is not None:
        return _module
    if os.environ.get("HIRE_NATIVE", "1") == "0":
        _error = "disabled by HIRE_NATIVE=0"
        return None
    try:
        from torch.utils import cpp_extension

        from hire.paths import cache_root

        digest = hashlib.sha256(_SOURCE.read_bytes() + torch.__version__.encode() + _cpu_id()).hexdigest()[:12]
        build = cache_root() / "native" / digest
        build.mkdir(parents=True, exist_ok=True)
        if not any(build.glob("*.so")):
            print("hire: building the native kernels (once per machine, ~30 s)", file=sys.stderr, flush=True)
        cpp_extension.load(
            name=f"hire_sparse_rows_{digest}",
            sources=[str(_SOURCE)],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(build),
            is_python_module=False,  # the library registers torch.ops.hire.* and is loaded into torch
            verbose=False,
        )
        _module = torch.ops.hire
    except Exception as exc:  # no compiler / ninja / headers: the eager path stays in use
        _error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        warnings.warn(f"HiRE native kernels unavailable ({_error}); using the slower eager path", stacklevel=3)
    return _module


def _ops():
    mod = _build()
    if mod is None:
        raise RuntimeError(f"HiRE native kernels unavailable: {_error}")
    return mod


def available() -> bool:
    """True when the native kernels are built (builds them on the first call)."""
    return _build() is not None


def usable(weight: torch.Tensor) -> bool:
    """True when the kernels can read ``weight`` (built, CPU, a dtype they take)."""
    return weight.device.type == "cpu" and weight.dtype in KERNEL_DTYPES and available()


def unavailable_reason() -> str | None:
    _build()
    return _error


def activation_name(act) -> str | None:
    """The kernel activation that computes what ``act`` (any callable) computes, found by probing
    it on a grid of inputs; None when no kernel activation matches."""
    probe = torch.linspace(-8.0, 8.0, 161)
    with torch.no_grad():
        got = act(probe)
    for name, fn in _EAGER_ACT.items():
        if torch.allclose(got, fn(probe), rtol=1e-5, atol=1e-6):
            return name
    return None


def rows_dot(x, w, idx, scales=None, parts: int = 1, act: str | None = None) -> torch.Tensor:
    mod = _ops()
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {sorted(a for a in ACTIVATIONS if a)} or None, got {act!r}")
    s = torch.empty(0) if scales is None else scales
    out = mod.rows_dot(x, w, idx, s, parts, ACTIVATIONS[act])
    return out[:, 0] if act is not None or parts == 1 else out


def ffn_decode(scores, x, w_in, w_out, count: int, act: str, gated: bool) -> torch.Tensor:
    """One sparse FFN step after its proxy, in one call: |activation| estimates from the proxy
    ``scores`` (gated: gate then up scores), the best ``count`` neurons, their exact activations
    from the neuron-major rows ``w_in`` (I, parts*D) and the weighted sum of their ``w_out`` rows.
    -> float32 (D_out,)"""
    mod = _ops()
    if act not in ACTIVATIONS or act is None:
        raise ValueError(f"act must be one of {sorted(a for a in ACTIVATIONS if a)}, got {act!r}")
    return mod.ffn_decode(scores, x, w_in, w_out, count, ACTIVATIONS[act], gated)


def rows_axpy(w, idx, a) -> torch.Tensor:
    mod = _ops()
    return mod.rows_axpy(w, idx, a)


def reference_rows_dot(x, w, idx, scales=None, parts: int = 1, act: str | None = None) -> torch.Tensor:
    """What ``rows_dot`` computes, in eager torch (float32)."""
    rows = w.index_select(0, idx).float().view(idx.numel(), parts, w.shape[1] // parts)
    out = rows @ x.reshape(-1).float()  # (c, parts)
    if scales is not None:
        out = out * scales.index_select(0, idx).float()[:, None]
    if act is None:
        return out[:, 0] if parts == 1 else out
    a = _EAGER_ACT[act](out[:, 0])
    return a * out[:, 1] if parts == 2 else a


def reference_rows_axpy(w, idx, a) -> torch.Tensor:
    return a.reshape(-1).float() @ w.index_select(0, idx).float()
