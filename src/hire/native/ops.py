"""The native kernels as Python functions (``torch.ops.hire.*``), and their eager meaning.

* ``rows_dot(x, W, idx, scales=None, parts=1, act=None)`` -> float32 ``(c,)`` (or ``(c, parts)``
  without an activation): ``act(W[idx[j], :D] . x) * (W[idx[j], D:] . x)`` for gated rows.
* ``rows_axpy(W, idx, a)`` -> float32 ``(D_out,)``: ``sum_j a[j] * W[idx[j]]``.
* ``ffn_rows(x, rows, idx, act, parts)``: an FFN over the neurons ``idx`` (None: all) of its
  neuron-major rows ``[input part(s) | output row]``, each neuron one contiguous read.
* ``ffn_decode(scores, x, rows, count, act, gated)``: one sparse FFN step after its proxy.
* ``qgemv`` / ``qgemv_batch`` / ``qaxpy`` / ``qdequant``: products with GGUF block codes.
* ``torch.classes.hire.DecodeModel``: a whole decode step (hire.engine.plan builds it); its
  ``step_batch`` runs B sequences' tokens at once over their KV cache slots.
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
from hire.topk import local_topk

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


def _act_code(act: str) -> int:
    if act not in ACTIVATIONS or act is None:
        raise ValueError(f"act must be one of {sorted(a for a in ACTIVATIONS if a)}, got {act!r}")
    return ACTIVATIONS[act]


def ffn_rows(x, rows, idx, act: str, parts: int) -> torch.Tensor:
    """The FFN output of the neurons ``idx`` (None: all, in order) from neuron-major ``rows``.
    Neurons are split across threads, each thread streaming whole rows.

    # x: (1, D), rows: (I, (parts+1)*D), idx: (c,) or None -> float32 (D,)"""
    mod = _ops()
    return mod.ffn_rows(x, rows, torch.empty(0, dtype=torch.long) if idx is None else idx, _act_code(act), parts)


def ffn_decode(scores, x, rows, count: int, act: str, gated: bool) -> torch.Tensor:
    """One sparse FFN step after its proxy, in one call: |activation| estimates from the proxy
    ``scores`` (gated: gate then up scores), the best ``count`` neurons (``hire.topk.select_neurons``)
    and their output from the neuron-major ``rows`` (see ``ffn_rows``).

    # scores: (1, parts*I), x: (1, D), rows: (I, (parts+1)*D) -> float32 (D,)"""
    mod = _ops()
    return mod.ffn_decode(scores, x, rows, count, _act_code(act), gated)


def attend(q, k, v, first: int, end: int, scale: float, softcap: float = 0.0, ops=None) -> torch.Tensor:
    """One token's attention over one layer's KV cache, as the decode step runs it: each query head's
    softmax(q . K[first:end] * scale) . V[first:end] against its kv head (``hq // hkv`` query heads
    share one); ``softcap`` > 0: each score s becomes softcap * tanh(s / softcap) first.
    ``reference_attend`` is the eager meaning.
    # q: (hq, hd), k, v: (hkv, S, hd) float32/float16/bfloat16 -> float32 (hq, hd); ops: another build's"""
    return (ops or _ops()).attend(q, k, v, first, end, scale, softcap)


def reference_attend(q, k, v, first: int, end: int, scale: float, softcap: float = 0.0) -> torch.Tensor:
    """``attend`` in eager float32 torch.  # q: (hq, hd), k, v: (hkv, S, hd) -> float32 (hq, hd)"""
    group = q.shape[0] // k.shape[0]
    keys = k[:, first:end].float().repeat_interleave(group, 0)
    values = v[:, first:end].float().repeat_interleave(group, 0)
    scores = torch.einsum("hd,hsd->hs", q.float(), keys) * scale
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    return torch.einsum("hs,hsd->hd", scores.softmax(-1), values)


def gemv(x, w) -> torch.Tensor:
    """``W x`` over every row, accumulated and returned in float32, rows split across threads.
    # x: (1, D), w: (n, D) -> float32 (n,)"""
    return _ops().gemv(x, w)


def qgemv(x, q, rows=None, ops=None) -> torch.Tensor:
    """``W[rows] x`` for a ``hire.quant.QTensor`` in the rows layout (None: every row), x quantized
    per 32 columns to ``q.act_bits`` (``hire.quant.reference_qgemv`` is the eager meaning).
    # x: (1, in) or (in,), rows: (c,) -> float32 (c,) or (out,); ops: another build's torch.ops namespace"""
    mod = ops or _ops()
    r = torch.empty(0, dtype=torch.long) if rows is None else rows
    return mod.qgemv(x, q.codes, q.scales, q.mins, q.bits, q.group, q.shape[1], r, q.act_bits, q.supers)


def qgemv_batch(x, q, rows=None, ops=None) -> torch.Tensor:
    """``qgemv`` for B activations at once (B sequences' decode step): each row of codes is read from
    memory once for the batch, and each activation's products are what ``qgemv`` gives it (from 6
    activations on AVX-512, in int16 whatever ``q.act_bits``: the lanes kernel).
    # x: (B, in), rows: (c,) or None -> float32 (B, c) or (B, out)"""
    mod = ops or _ops()
    r = torch.empty(0, dtype=torch.long) if rows is None else rows
    return mod.qgemv_batch(x, q.codes, q.scales, q.mins, q.bits, q.group, q.shape[1], r, q.act_bits, q.supers)


def qdequant(q, start: int = 0, stop: int | None = None, ops=None) -> torch.Tensor:
    """Rows ``start:stop`` of a rows-layout QTensor as float32 (``QTensor.dequantize`` is the eager
    meaning).  # -> (stop - start, in)"""
    mod = ops or _ops()
    return mod.qdequant(q.codes, q.scales, q.mins, q.bits, q.group, q.shape[1], start,
                        q.shape[0] if stop is None else stop, q.supers)


def qaxpy(q, idx, a, ops=None) -> torch.Tensor:
    """``sum_j a[j] W[:, idx[j]]`` for a QTensor in the columns layout (idx None: every column), in
    float32 (``hire.quant.reference_qaxpy``).  # idx: (c,), a: (c,) -> float32 (out,)"""
    mod = ops or _ops()
    i = torch.empty(0, dtype=torch.long) if idx is None else idx
    return mod.qaxpy(a, i, q.codes, q.scales, q.mins, q.bits, q.group, q.shape[0])


def int4_estimates(x, packed, scales, group: int, parts: int, act: str) -> torch.Tensor:
    """The FFN's |activation| estimates from its 4-bit proxy (a QuantizedMatrix's ``packed`` codes
    and ``scales``: gate rows then up rows when ``parts`` is 2), fused: the activation is quantized to
    int8 with one scale (``quantize_activation``) and each 64-column chunk is an exact integer
    dot product times its group's scale.

    # x: (1, D), packed: (parts*I, Dp/2) uint8, scales: (parts*I, Dp/group) float16 -> float32 (I,)"""
    return _ops().int4_estimates(x, packed, scales, group, parts, _act_code(act))


def int4_ffn(x, rows, packed, scales, group: int, keep: int, act: str, parts: int) -> torch.Tensor:
    """One HiRE FFN step on its 4-bit proxy, as the native decode step runs it: ``int4_estimates``,
    the best ``keep`` neurons (``hire.topk.select_neurons``), their rows (``ffn_rows``), in one
    parallel region.  # x: (1, D), rows: (I, (parts+1)*D), packed/scales: (parts*I, ...) -> float32 (D,)"""
    return _ops().int4_ffn(x, rows, packed, scales, group, keep, _act_code(act), parts)


def quantize_activation(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """int8 codes and the scale the 4-bit proxy kernel uses for x: max|x| / 127, round half to even.
    # x: (D,) -> (D,) int8 codes"""
    x = x.reshape(-1).float()
    amax = float(x.abs().max()) if x.numel() else 0.0
    scale = torch.tensor(amax / 127 if amax > 0 else 1.0, dtype=torch.float32)
    return torch.round(x / scale).clamp(-127, 127).to(torch.int8), float(scale)


def reference_int4_estimates(x, packed, scales, group: int, parts: int, act: str) -> torch.Tensor:
    """What ``int4_estimates`` computes, in eager torch (float64 sums).  # same shapes"""
    codes, scale = quantize_activation(x)
    low = (packed & 0x0F).to(torch.int64) - 8
    high = (packed >> 4).to(torch.int64) - 8
    w = torch.stack((low, high), dim=-1).reshape(packed.shape[0], -1)  # (n, Dp) codes
    xq = torch.zeros(w.shape[1], dtype=torch.int64)
    xq[: codes.numel()] = codes.to(torch.int64)
    per_group = (w * xq).reshape(w.shape[0], -1, group).sum(-1).double()  # exact integer sums per group
    s = (per_group * scales.double()).sum(-1) * scale  # (n,)
    s = s.float().reshape(parts, -1)
    a = EAGER_ACTIVATIONS[act](s[0])
    return (a * s[1] if parts == 2 else a).abs()


def pack_lowrank(codes: torch.Tensor) -> torch.Tensor:
    """A low-rank proxy's int8 U codes repacked for ``lowrank_block_topk``: tiles of 16 rows, 4
    columns at a time, as unsigned bytes (code + 128).  # codes: (V, r) int8 -> (V/16, r/4, 16, 4) uint8"""
    return _ops().pack_lowrank(codes)


def lowrank_block_topk(z, packed, scales, blocks: int, per: int, bias=None) -> torch.Tensor:
    """The best ``per`` rows of each interleaved block (``hire.topk.local_topk``) by the low-rank
    scores ``scales[i] * (U[i] . z) + bias[i]``, in one pass over the packed codes, with z quantized
    to int8 (one scale, as ``quantize_activation``).
    # z: (1, r), scales: (V,) float32, bias: (V,) float16 or None -> (blocks * per,) int64"""
    return _ops().lowrank_block_topk(z, packed, scales, blocks, per, bias)


def topk_rank_counts(scores, ref, blocks: int, ops=None) -> torch.Tensor:
    """For ``hire.topk.topk_ranks``: per position, block (row % blocks) and j in [1, k], how many rows
    have exactly j of the position's k ``ref`` scores (ascending, no NaN) below their own; j = 0 is
    left 0. NaN scores count as -inf.  # scores: (N, n) float32, ref: (N, k) -> (N, blocks, k + 1) int64"""
    return (ops or _ops()).topk_rank_counts(scores, ref, blocks)


def reference_lowrank_block_topk(z, codes, scales, blocks: int, per: int, bias=None) -> torch.Tensor:
    """What ``lowrank_block_topk`` selects, in eager torch, from the unpacked int8 ``codes`` (V, r)."""
    zq, scale = quantize_activation(z)
    scores = (codes.to(torch.int64) @ zq.to(torch.int64)).double() * scales.double()  # exact sums, then the scale
    if bias is not None:  # the kernel's units: the bias over z's scale
        scores += bias.double() * float(1 / torch.tensor(scale, dtype=torch.float32))
    return local_topk(scores.float().view(1, -1), blocks * per, blocks)[0]


def decode_model_class():
    """``torch.classes.hire.DecodeModel``: a whole decode step over an engine's tensors (built by
    ``hire.engine.plan.native_steps``)."""
    require()
    return torch.classes.hire.DecodeModel


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


def reference_ffn_rows(x, rows, idx, act: str, parts: int) -> torch.Tensor:
    """What ``ffn_rows`` computes, in eager torch (float32).  # same shapes as ffn_rows"""
    d = x.numel()
    picked = rows if idx is None else rows.index_select(0, idx)
    picked = picked.float()
    pre = picked[:, : parts * d].reshape(-1, parts, d) @ x.reshape(-1).float()  # (c, parts)
    a = EAGER_ACTIVATIONS[act](pre[:, 0])
    if parts == 2:
        a = a * pre[:, 1]
    return a @ picked[:, parts * d:]


def reference_rows_axpy(w, idx, a) -> torch.Tensor:
    """What ``rows_axpy`` computes, in eager torch (float32).  # w: (n, D_out), idx, a: (c,) -> (D_out,)"""
    return a.reshape(-1).float() @ w.index_select(0, idx).float()
