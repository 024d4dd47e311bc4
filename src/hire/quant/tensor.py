"""QTensor: a GGUF-quantized weight kept in its block codes (no 16- or 32-bit copy), and the
modules that run it inside a Hugging Face model (``QLinear``, ``QEmbedding``).

A QTensor is the logical matrix W (out, in) with ``value = scale * (code - zero) + min`` per group
of ``group`` input columns (``hire.quant.formats``). Two layouts:

* ``rows`` (the default): row r holds W[r, :] as codes in the kernel's planes; scales and mins are
  (out, in_padded / group): float16/float32, or for the K formats int8 sub-scales whose float16
  super-scales per 256 columns are ``supers`` (out, in / 256), then the super-mins (the file's
  bytes). A token's product is the native ``qgemv`` (the activation quantized per 32 columns to
  ``act_bits``: int16 by default, int8 as llama.cpp does), and a subset of rows is the same kernel
  over those rows.
* ``columns``: neuron-major, row j holds W[:, j] (the FFN's down projection, whose selected
  neurons are columns); scales and mins are (in / group, out_padded). Its product over selected
  columns is the native ``qaxpy``, in float32 (no activation rounding).

Several tokens at once (prefill, perplexity) dequantize blocks of rows to float32 and multiply:
the transformers float32 model, computed from the same codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from hire.quant.formats import (CHUNK, FORMATS, K_FORMATS, SUPER, chunk_bytes, compact_scales, k_scale_parts, pack_codes,
                                unpack, unpack_codes, zero_point)

REPACK_ROWS = 4096  # rows repacked at a time when loading
DEQUANT_ROWS = 8192  # rows dequantized at a time by the multi-token product (32 MB of float32 at D = 1024)
QX_GROUP = 32  # columns per activation scale in the native product
ACT_BITS = 16


@dataclass
class QTensor:
    codes: torch.Tensor  # uint8 (rows, chunks * chunk_bytes): rows = out (rows layout) or in (columns layout)
    scales: torch.Tensor  # float16 or float32: (out, groups) or (in / group, out_padded)
    mins: torch.Tensor  # like scales, or empty (symmetric formats)
    bits: int
    group: int
    shape: tuple[int, int]  # logical (out, in)
    format: str  # the GGUF format it came from
    layout: str = "rows"
    act_bits: int = ACT_BITS  # the one-token product's activation: int16 (float32 to ~1e-5) or int8 (llama.cpp's)
    # K formats: float16 (out, in / SUPER) super-scales, then as many super-mins where there are mins;
    # scales and mins are then int8 sub-scales (empty: scales and mins are the float values)
    supers: torch.Tensor = torch.zeros(0, dtype=torch.float16)

    @property
    def zero(self) -> int:
        return zero_point(self.bits, self.mins.numel() > 0)

    @property
    def two_level(self) -> bool:
        """Whether scales (and mins) are int8 sub-scales of ``supers`` (the K formats' own bytes)."""
        return self.supers.numel() > 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.mins, self.supers))

    def row_nbytes(self) -> float:
        """Bytes read per row of the logical matrix (codes, scales and mins)."""
        return self.nbytes / self.shape[0]

    @classmethod
    def from_blocks(cls, fmt_name: str, data: np.ndarray, shape: tuple[int, int], layout: str = "rows",
                    row_order: np.ndarray | None = None) -> "QTensor":
        """From a GGUF tensor's raw blocks ``data`` (out rows of bytes) of logical ``shape`` (out, in);
        ``row_order``: a permutation applied to the rows (llama's q/k heads). Repacked REPACK_ROWS
        rows at a time into the final arrays (the intermediates of a 262k-row head stay small)."""
        fmt = FORMATS[fmt_name]
        out, inp = shape
        if inp % fmt.block:
            raise ValueError(f"{fmt_name} rows hold whole blocks of {fmt.block} columns, got {inp}")
        flat = np.asarray(data).reshape(-1)
        if flat.size != out * inp // fmt.block * fmt.nbytes:
            raise ValueError(f"{fmt_name} tensor of shape {shape} needs {out * inp // fmt.block} blocks, "
                             f"got {flat.size / fmt.nbytes:g}")
        rows = flat.reshape(out, -1)
        if row_order is not None:
            rows = rows[row_order]
        if layout == "rows" and fmt_name in K_FORMATS:
            return cls._from_k_blocks(fmt_name, rows, shape)
        if layout != "rows":
            codes, scales, mins = unpack(fmt, np.ascontiguousarray(rows).reshape(-1, fmt.nbytes))
            groups = inp // fmt.group
            return cls.from_codes(codes.reshape(out, inp), scales.reshape(out, groups),
                                  None if mins is None else mins.reshape(out, groups), fmt.bits, fmt.group, fmt_name, layout)
        pad = -inp % CHUNK
        width = inp + pad
        packed = np.empty((out, width // CHUNK * chunk_bytes(fmt.bits)), np.uint8)
        scales = np.zeros((out, width // fmt.group), np.float32)  # zero scale and min: padded columns are 0
        mins = np.zeros_like(scales) if fmt.has_min else None
        for r0 in range(0, out, REPACK_ROWS):
            r1 = min(out, r0 + REPACK_ROWS)
            c, s_, m = unpack(fmt, np.ascontiguousarray(rows[r0:r1]).reshape(-1, fmt.nbytes))
            packed[r0:r1] = pack_codes(np.pad(c.reshape(r1 - r0, inp), ((0, 0), (0, pad))), fmt.bits)
            scales[r0:r1, : inp // fmt.group] = s_.reshape(r1 - r0, -1)
            if mins is not None:
                mins[r0:r1, : inp // fmt.group] = m.reshape(r1 - r0, -1)
        s_final, m_final = _scale_pair(scales, mins)
        return cls(torch.from_numpy(packed), torch.from_numpy(s_final), torch.from_numpy(m_final), fmt.bits, fmt.group,
                   (out, inp), fmt_name)

    @classmethod
    def _from_k_blocks(cls, fmt_name: str, rows: np.ndarray, shape: tuple[int, int]) -> "QTensor":
        """The rows layout of a K format: codes in the kernel's planes (the file's nibble order), the
        scales in the file's two levels (``k_scale_parts``)."""
        fmt = FORMATS[fmt_name]
        out, inp = shape
        per = SUPER // fmt.group
        packed = np.empty((out, inp // CHUNK * chunk_bytes(fmt.bits)), np.uint8)
        subs = np.empty((out, inp // fmt.group), np.int8)
        sub_mins = np.empty_like(subs) if fmt.has_min else None
        supers = np.empty((out, (2 if fmt.has_min else 1) * (inp // SUPER)), np.float16)
        nsup = inp // SUPER
        for r0 in range(0, out, REPACK_ROWS):
            r1 = min(out, r0 + REPACK_ROWS)
            blocks = np.ascontiguousarray(rows[r0:r1]).reshape(-1, fmt.nbytes)
            c, _, _ = unpack(fmt, blocks)
            packed[r0:r1] = pack_codes(c.reshape(r1 - r0, inp), fmt.bits)
            sub, sub_min, sup = k_scale_parts(fmt, blocks)
            subs[r0:r1] = sub.reshape(r1 - r0, nsup * per)
            if sub_mins is not None:
                sub_mins[r0:r1] = sub_min.reshape(r1 - r0, nsup * per)
            supers[r0:r1] = sup.reshape(r1 - r0, nsup, -1).transpose(0, 2, 1).reshape(r1 - r0, -1)
        mins = torch.from_numpy(sub_mins) if sub_mins is not None else torch.zeros(0, dtype=torch.int8)
        return cls(torch.from_numpy(packed), torch.from_numpy(subs), mins, fmt.bits, fmt.group, (out, inp), fmt_name,
                   supers=torch.from_numpy(supers))

    def float_scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scales, mins) as float32 (rows layout: (out, groups)); mins empty where there are none."""
        if not self.two_level:
            return self.scales.float(), self.mins.float()
        nsup = self.supers.shape[1] // (2 if self.mins.numel() else 1)
        per = self.scales.shape[1] // nsup
        sup = self.supers.float().repeat_interleave(per, dim=1)
        scales = sup[:, : nsup * per] * self.scales.float()
        mins = sup[:, nsup * per :] * self.mins.float() if self.mins.numel() else self.mins.float()
        return scales, mins

    @classmethod
    def from_codes(cls, codes: np.ndarray, scales: np.ndarray, mins: np.ndarray | None, bits: int, group: int,
                   fmt_name: str, layout: str = "rows") -> "QTensor":
        """From unpacked codes (out, in) uint8 and per-group scales/mins (out, in / group)."""
        out, inp = codes.shape
        if layout == "rows":
            pad = -inp % CHUNK
            codes = np.pad(codes, ((0, 0), (0, pad)))
            scales = np.pad(scales, ((0, 0), (0, pad // group)))  # zero scale and min: padded columns are 0
            mins = None if mins is None else np.pad(mins, ((0, 0), (0, pad // group)))
        elif layout == "columns":
            pad = -out % CHUNK
            codes = np.pad(np.ascontiguousarray(codes.T), ((0, 0), (0, pad)))
            scales = np.pad(np.ascontiguousarray(scales.T), ((0, 0), (0, pad)))
            mins = None if mins is None else np.pad(np.ascontiguousarray(mins.T), ((0, 0), (0, pad)))
        else:
            raise ValueError(f"layout must be 'rows' or 'columns', got {layout!r}")
        packed = torch.from_numpy(pack_codes(codes, bits))
        s, m = _scale_pair(scales, mins)
        return cls(packed, torch.from_numpy(s), torch.from_numpy(m), bits, group, (out, inp), fmt_name, layout)

    def take_rows(self, idx: torch.Tensor | slice) -> "QTensor":
        """The rows ``idx`` (rows layout) as a QTensor of their own: a copy for a tensor of row ids,
        views (no copy) for a slice (Phi-3's fused q/k/v and gate/up read as their parts)."""
        if self.layout != "rows":
            raise ValueError("take_rows reads the rows layout")
        codes = self.codes[idx]
        mins = self.mins[idx] if self.mins.numel() else self.mins
        supers = self.supers[idx] if self.two_level else self.supers
        return QTensor(codes, self.scales[idx], mins, self.bits, self.group, (codes.shape[0], self.shape[1]),
                       self.format, act_bits=self.act_bits, supers=supers)

    def to_layout(self, layout: str) -> "QTensor":
        if layout == self.layout:
            return self
        codes, scales, mins = self.unpacked()
        out = QTensor.from_codes(codes, scales, mins, self.bits, self.group, self.format, layout)
        out.act_bits = self.act_bits
        return out

    def unpacked(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(codes (out, in), scales (out, in / group), mins or None), float32 scales."""
        out, inp = self.shape
        fs, fm = self.float_scales()
        scales = fs.numpy()
        mins = fm.numpy() if self.mins.numel() else None
        if self.layout == "rows":
            codes = unpack_codes(self.codes.numpy(), self.bits, inp)
            g = inp // self.group
            return codes, scales[:, :g], None if mins is None else mins[:, :g]
        codes = unpack_codes(self.codes.numpy(), self.bits, out).T
        return codes, scales[:, :out].T, None if mins is None else mins[:, :out].T

    def dequantize(self, rows: slice | None = None) -> torch.Tensor:
        """float32 (out, in), or the rows ``rows`` of it (the rows layout reads only those; natively
        where the kernels are built)."""
        from hire import native

        if self.layout == "rows" and native.available():
            start, stop, _ = (rows or slice(None)).indices(self.shape[0])
            return native.qdequant(self, start, max(start, stop))
        return self.eager_dequantize(rows)

    def eager_dequantize(self, rows: slice | None = None) -> torch.Tensor:
        """``dequantize`` in numpy (the reference of the native one)."""
        if self.layout == "rows" and rows is not None:
            return self.take_rows(rows).eager_dequantize()
        codes, scales, mins = self.unpacked()
        w = (codes.astype(np.float32) - np.float32(self.zero)).reshape(codes.shape[0], -1, self.group)
        w = w * scales[:, :, None]
        if mins is not None:
            w = w + mins[:, :, None]
        w = torch.from_numpy(w.reshape(codes.shape))
        return w if rows is None else w[rows]

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T in float32 over dequantized blocks of rows (several tokens: prefill, perplexity).
        # x: (T, in) -> (T, out)"""
        x = x.float()
        if self.layout == "columns":
            return x @ self.dequantize().T
        return torch.cat([x @ self.dequantize(slice(r, r + DEQUANT_ROWS)).T
                          for r in range(0, self.shape[0], DEQUANT_ROWS)], dim=-1)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T: the native kernels for one token, else ``matmul``.  # x: (..., in) -> float32 (..., out)"""
        from hire import native

        lead = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] == 1 and native.available():
            y = native.qgemv(flat, self) if self.layout == "rows" else native.qaxpy(self, None, flat[0])
            return y.view(*lead, -1)
        return self.matmul(flat).view(*lead, -1)

    def __repr__(self) -> str:
        return f"QTensor({self.format}, shape={self.shape}, layout={self.layout}, {self.nbytes / 1e6:.1f} MB)"


def fuse_rows(parts: list[QTensor]) -> QTensor | tuple[QTensor, ...]:
    """One QTensor of the parts' rows stacked (q, k, v read in one pass) where they share a
    layout; else the parts as a tuple."""
    first = parts[0]
    if not all(isinstance(p, QTensor) for p in parts):
        return tuple(parts)
    same = all(p.layout == "rows" and p.bits == first.bits and p.group == first.group and p.shape[1] == first.shape[1]
               and p.scales.dtype == first.scales.dtype and (p.mins.numel() > 0) == (first.mins.numel() > 0)
               and p.scales.shape[1] == first.scales.shape[1] and p.two_level == first.two_level
               and p.supers.shape[1:] == first.supers.shape[1:] for p in parts)
    if not same:
        return tuple(parts)
    mins = torch.cat([p.mins for p in parts]) if first.mins.numel() else first.mins
    supers = torch.cat([p.supers for p in parts]) if first.two_level else first.supers
    return QTensor(torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]), mins, first.bits,
                   first.group, (sum(p.shape[0] for p in parts), first.shape[1]), "+".join(sorted({p.format for p in parts})),
                   act_bits=first.act_bits, supers=supers)


def _scale_pair(scales: np.ndarray, mins: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Scales and mins in one dtype (the kernel reads them as a pair): float16 where exact for both."""
    if mins is None:
        s = compact_scales(scales)
        return np.ascontiguousarray(s), np.zeros(0, dtype=s.dtype)
    s, m = compact_scales(scales), compact_scales(mins)
    if s.dtype != m.dtype:
        s, m = scales.astype(np.float32), mins.astype(np.float32)
    return np.ascontiguousarray(s), np.ascontiguousarray(m)


class QLinear(nn.Module):
    """An nn.Linear whose weight stays in its GGUF codes (``q``)."""

    def __init__(self, q: QTensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.q = q
        self.out_features, self.in_features = q.shape
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        """The float32 weight, dequantized on each access (fitting proxies, tests): not kept."""
        return self.q.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.q.linear(x)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.q.format}"


class FloatLinear(nn.Linear):
    """An nn.Linear whose weight keeps the GGUF file's float16/bfloat16: inputs are cast to it."""

    @classmethod
    def wrap(cls, linear: nn.Linear) -> "FloatLinear":
        out = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        out.weight, out.bias = linear.weight, linear.bias
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        return F.linear(x.to(w.dtype), w, None if self.bias is None else self.bias.to(w.dtype)).to(x.dtype)


class QEmbedding(nn.Module):
    """Token embeddings read from quantized rows (times ``scale``: Gemma's sqrt(hidden))."""

    def __init__(self, q: QTensor, scale: float = 1.0, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.q = q
        self.scale = scale
        self.dtype = dtype
        self.num_embeddings, self.embedding_dim = q.shape

    @property
    def weight(self) -> torch.Tensor:
        return self.q.dequantize()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
            raise IndexError(f"token ids must be in [0, {self.num_embeddings}), got {int(flat.min())}..{int(flat.max())}")
        out = self.q.take_rows(flat).dequantize() * self.scale
        return out.view(*ids.shape, self.embedding_dim).to(self.dtype)


def reference_quantize_x(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The native product's activation codes: per 32 columns, scale max|x| / 127 (int8) or / 32512
    (int16; 1 where all zero), round half to even.  # x: (D,) -> codes (D,) int8 or int16, scales float32 (ceil(D/32),)"""
    x = x.reshape(-1).float()
    top = 127 if bits == 8 else 127 * 256  # int16: 256 hi + lo in two int8 (the native K kernels' split)
    pad = -x.numel() % QX_GROUP
    g = F.pad(x, (0, pad)).view(-1, QX_GROUP)
    amax = g.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / top, torch.ones_like(amax))
    codes = torch.round(g / scale[:, None]).clamp(-top, top).to(torch.int8 if bits == 8 else torch.int16)
    return codes.reshape(-1)[: x.numel()], scale


def reference_qgemv(x: torch.Tensor, q: QTensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """What ``native.qgemv`` computes: the dequantized rows times the rounded activation (``q.act_bits``), float32."""
    codes, scale = reference_quantize_x(x, q.act_bits)
    xr = (codes.float().view(-1) * scale.repeat_interleave(QX_GROUP)[: codes.numel()])
    w = q.dequantize() if rows is None else q.dequantize()[rows.long()]
    return w @ xr


def reference_qaxpy(q: QTensor, idx: torch.Tensor | None, a: torch.Tensor) -> torch.Tensor:
    """What ``native.qaxpy`` computes: sum_j a[j] W[:, idx[j]] in float32 (idx None: every column)."""
    w = q.dequantize()
    cols = w if idx is None else w[:, idx.long()]
    return cols @ a.float()
