"""The native kernels as Python functions (``torch.ops.hire.*``), and their eager meaning.

* ``rows_dot(x, W, idx, scales=None, parts=1, act=None)`` -> float32 ``(c,)`` (or ``(c, parts)``
  without an activation): ``act(W[idx[j], :D] . x) * (W[idx[j], D:] . x)`` for gated rows.
* ``rows_axpy(W, idx, a)`` -> float32 ``(D_out,)``: ``sum_j a[j] * W[idx[j]]``.
* ``ffn_decode(scores, x, w_in, w_out, count, act, gated)``: one sparse FFN step after its proxy.
* ``simd_path()``: the build's SIMD path, "avx512", "avx2" or "scalar" (all give the same results
  up to float32 summation order).

``reference_rows_dot`` / ``reference_rows_axpy`` compute the same in eager torch, in float32 as
the kernels accumulate: the tests hold the kernels to them, and callers without the kernels use
them so that both paths give the same numbers.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from hire.native.build import available, require

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int8)
ACTIVATIONS = {None: 0, "silu": 1, "gelu_tanh": 2, "gelu": 3, "relu": 4}  # the kernel's enum Act
EAGER_ACTIVATIONS = {"silu": F.silu, "relu": F.relu, "gelu": F.gelu,
                     "gelu_tanh": lambda v: F.gelu(v, approximate="tanh")}


def usable(weight: torch.Tensor) -> bool:
    """True when the kernels can read ``weight`` (built, CPU, a dtype they take)."""
    return weight.device.type == "cpu" and weight.dtype in KERNEL_DTYPES and available()


def activation_name(act) -> str | None:
    """The kernel activation that computes what ``act`` (any callable) computes, found by probing
    it on a grid of inputs; None when no kernel activation matches."""
    probe = torch.linspace(-8.0, 8.0, 161)
    with torch.no_grad():
        got = act(probe)
    for name, fn in EAGER_ACTIVATIONS.items():
        if torch.allclose(got, fn(probe), rtol=1e-5, atol=1e-6):
            return name
    return None


def _ops():
    require()
    return torch.ops.hire


def rows_dot(x, w, idx, scales=None, parts: int = 1, act: str | None = None) -> torch.Tensor:
    """# x: (1, D), w: (n, parts*D), idx: (c,), scales: (n,) float32 for int8 w -> float32 (c,) or (c, parts)"""
    mod = _ops()
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {sorted(a for a in ACTIVATIONS if a)} or None, got {act!r}")
    s = torch.empty(0) if scales is None else scales
    out = mod.rows_dot(x, w, idx, s, parts, ACTIVATIONS[act])
    return out[:, 0] if act is not None or parts == 1 else out


def rows_axpy(w, idx, a) -> torch.Tensor:
    """# w: (n, D_out), idx: (c,), a: (c,) -> float32 (D_out,)"""
    return _ops().rows_axpy(w, idx, a)


def ffn_decode(scores, x, w_in, w_out, count: int, act: str, gated: bool) -> torch.Tensor:
    """One sparse FFN step after its proxy, in one call: |activation| estimates from the proxy
    ``scores`` (gated: gate then up scores), the best ``count`` neurons, their exact activations
    from the neuron-major rows ``w_in`` (I, parts*D) and the weighted sum of their ``w_out`` rows.

    # scores: (1, parts*I), x: (1, D), w_in: (I, parts*D), w_out: (I, D_out) -> float32 (D_out,)"""
    mod = _ops()
    if act not in ACTIVATIONS or act is None:
        raise ValueError(f"act must be one of {sorted(a for a in ACTIVATIONS if a)}, got {act!r}")
    return mod.ffn_decode(scores, x, w_in, w_out, count, ACTIVATIONS[act], gated)


def simd_path() -> str | None:
    """Which SIMD path the built kernels take ("avx512", "avx2" or "scalar", fixed at compile
    time by -march=native); None without the kernels."""
    return str(torch.ops.hire.simd_path()) if available() else None


def reference_rows_dot(x, w, idx, scales=None, parts: int = 1, act: str | None = None) -> torch.Tensor:
    """What ``rows_dot`` computes, in eager torch (float32).  # same shapes as rows_dot"""
    rows = w.index_select(0, idx).float().view(idx.numel(), parts, w.shape[1] // parts)
    out = rows @ x.reshape(-1).float()  # (c, parts)
    if scales is not None:
        out = out * scales.index_select(0, idx).float()[:, None]
    if act is None:
        return out[:, 0] if parts == 1 else out
    a = EAGER_ACTIVATIONS[act](out[:, 0])
    return a * out[:, 1] if parts == 2 else a


def reference_rows_axpy(w, idx, a) -> torch.Tensor:
    """What ``rows_axpy`` computes, in eager torch (float32).  # w: (n, D_out), idx, a: (c,) -> (D_out,)"""
    return a.reshape(-1).float() @ w.index_select(0, idx).float()
