"""QuantizedMatrix: a 4- or 8-bit copy of a matrix with one 16-bit scale per group of columns.

Its own module because both the proxies that store one (``quantized``, ``lowrank``) and the decode
kernels that read one (``kernels``) need it, and neither of those should import the other's user.
"""

from __future__ import annotations

import torch

SCALE_BYTES = 2  # scales are stored in 16 bits


def _padded(width: int, bits: int, group_size: int) -> int:
    """Columns after padding: a multiple of the group, and of 2 groups where 4-bit codes would end
    on half a byte."""
    padded = -(-width // group_size) * group_size
    return padded + group_size if bits == 4 and padded % 2 else padded


class QuantizedMatrix:
    """Symmetric per-group quantization of an (n, D) matrix.

    Codes are signed integers in [-(2^(b-1) - 1), 2^(b-1) - 1]; 4-bit codes are packed two per
    byte, so ``nbytes`` is what a kernel streaming this copy reads. Columns are zero-padded to a
    multiple of ``group_size``.
    """

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int, width: int):
        self.packed = packed  # (n, Dp) int8, or (n, Dp/2) uint8 for 4 bits
        self.scales = scales  # (n, Dp / group_size) float16
        self.bits = bits
        self.group_size = group_size
        self.width = width  # D before padding

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bits: int = 4, group_size: int = 64) -> "QuantizedMatrix":
        # weight: (n, D) -> codes (n, Dp), scales (n, Dp/g)
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits}")
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D (n, D), got shape {tuple(weight.shape)}")
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        n, width = weight.shape
        group_size = min(group_size, width)
        w = torch.nn.functional.pad(weight.detach().float(), (0, _padded(width, bits, group_size) - width))  # (n, Dp)
        groups = w.reshape(n, -1, group_size)  # (n, G, g)
        qmax = 2 ** (bits - 1) - 1
        exact_scales = groups.abs().amax(-1) / qmax  # (n, G)
        scales = exact_scales.to(torch.float16)
        # round the 16-bit scale up where it rounded down, so no code is clipped
        low = scales.float() < exact_scales
        scales = torch.where(low, torch.nextafter(scales, torch.tensor(float("inf"), dtype=torch.float16)), scales)
        safe = torch.where(scales == 0, torch.ones_like(scales), scales).float().unsqueeze(-1)  # all-zero groups -> code 0
        codes = torch.round(groups / safe).clamp_(-qmax, qmax).to(torch.int8).reshape(n, -1)
        if bits == 4:
            nib = (codes + 8).to(torch.uint8)  # 0..15
            codes = nib[:, 0::2] | (nib[:, 1::2] << 4)
        return cls(codes.contiguous(), scales.contiguous(), bits, group_size, width)

    @staticmethod
    def nbytes_for(rows: int, width: int, bits: int, group_size: int) -> int:
        """``nbytes`` of what ``from_weight`` makes of a ``rows`` x ``width`` matrix, without making it."""
        group_size = min(group_size, width)
        padded = _padded(width, bits, group_size)
        return rows * (padded * bits // 8 + padded // group_size * SCALE_BYTES)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.packed.shape[0], self.width)

    def take_rows(self, rows: torch.Tensor) -> "QuantizedMatrix":
        """The same codes and scales for ``rows`` only (a tensor-parallel shard).  # rows: (m,) -> (m, D)"""
        return QuantizedMatrix(self.packed.index_select(0, rows).contiguous(),
                               self.scales.index_select(0, rows).contiguous(), self.bits, self.group_size, self.width)

    def codes(self, packed: torch.Tensor) -> torch.Tensor:
        """Signed codes of packed rows (4-bit: two per byte, low nibble first).  # packed: (m, Dp/2|Dp) -> (m, Dp) int8"""
        if self.bits == 8:
            return packed
        low = (packed & 0x0F).to(torch.int8) - 8
        high = (packed >> 4).to(torch.int8) - 8
        return torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], -1)

    def dequantize(self, rows: torch.Tensor | None = None, dtype=torch.float32) -> torch.Tensor:
        # rows: (m,) or None -> (m or n, D)
        packed = self.packed if rows is None else self.packed.index_select(0, rows)
        scales = self.scales if rows is None else self.scales.index_select(0, rows)
        codes = self.codes(packed).to(dtype)  # (m, Dp)
        m = codes.shape[0]
        w = codes.reshape(m, -1, self.group_size) * scales.to(dtype).unsqueeze(-1)
        return w.reshape(m, -1)[:, : self.width]

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        # x: (N, D) -> (N, n)
        return x @ self.dequantize(dtype=x.dtype).t()

    def matmul_rows(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        # x: (N, D), idx: (N, m) -> (N, m)
        if x.shape[0] == 1:
            return (self.dequantize(idx[0], dtype=x.dtype) @ x[0]).unsqueeze(0)
        w = self.dequantize(idx.reshape(-1), dtype=x.dtype).reshape(*idx.shape, -1)  # (N, m, D)
        return torch.einsum("nmd,nd->nm", w, x)

    def nbytes(self, rows: int | None = None) -> int:
        n = self.packed.shape[0] if rows is None else rows
        per_row = self.packed.shape[1] * self.packed.element_size() + self.scales.shape[1] * SCALE_BYTES
        return n * per_row

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        meta = torch.tensor([self.bits, self.group_size, self.width], dtype=torch.int64)
        return {prefix + "packed": self.packed, prefix + "scales": self.scales, prefix + "meta": meta}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], prefix: str = "") -> "QuantizedMatrix":
        bits, group_size, width = (int(v) for v in state[prefix + "meta"])
        return cls(state[prefix + "packed"], state[prefix + "scales"], bits, group_size, width)
