"""Decode-time kernels for the quantized copies: torch's fused CPU int8/int4 GEMV where the
shapes allow it, a dequantize-then-GEMV fallback elsewhere. Both compute x @ Q(W)^T for the same
codes. The fused kernels run in bfloat16 whatever the engine's dtype (their float16 paths were
several times slower here), with the copy's float16 scales rounded to bfloat16."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from hire import native
from hire.proxies.quantized_matrix import QuantizedMatrix

INT4_GROUPS = (32, 64, 128, 256)
KERNEL_DTYPE = torch.bfloat16


class QuantizedGEMV:
    """x (1, D) -> x @ Q(W)^T (1, n), prepared once from a QuantizedMatrix."""

    def __init__(self, matrix: QuantizedMatrix, dtype: torch.dtype = torch.bfloat16, rows_only: bool = False):
        self.matrix = matrix
        self.dtype = dtype
        n, width = matrix.shape
        codes = matrix.codes(matrix.packed)[:, :width]
        self.kind = "dequantize"
        # torch 2.13's _weight_int8pack_mm reads past the row (NaN, garbage, even a segfault) unless
        # the width is a multiple of 16 (found with a low-rank proxy of rank 4-8; tests/test_proxies.py)
        if matrix.bits == 8 and matrix.group_size >= width and width % 16 == 0:
            self.kind = "int8pack"
            self.codes = codes.contiguous()  # (n, D) int8
            self.scales = matrix.scales[:, 0].to(KERNEL_DTYPE).contiguous()  # (n,)
            # survivors' rows: read in place by the native kernel (no gathered copy) when it is built, else
            # gathered by its eager reference; both accumulate in float32 with float32 scales, so the
            # candidates a cascade passes on do not depend on whether this machine built the kernels
            self.row_scales = matrix.scales[:, 0].float().contiguous()  # (n,)
            self.native_rows = native.usable(self.codes)
        elif not rows_only and matrix.bits == 4 and matrix.group_size in INT4_GROUPS and width % matrix.group_size == 0 \
                and n % 16 == 0:
            self.kind = "int4pack"
            self.packed = torch._convert_weight_to_int4pack_for_cpu((codes.to(torch.int32) + 8).contiguous(), 1)
            scales = matrix.scales[:, : width // matrix.group_size].t().to(KERNEL_DTYPE)  # (G, n)
            self.scales_zeros = torch.stack([scales, torch.zeros_like(scales)], dim=-1).contiguous()  # (G, n, 2)
        elif not rows_only:
            self.weight = matrix.dequantize(dtype=dtype).contiguous()  # (n, D)

    def rows(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Scores of the rows ``idx`` only (reads only those rows).  # x: (1, D), idx: (m,) -> (1, m)"""
        if self.kind == "int8pack":
            rows_dot = native.rows_dot if self.native_rows else native.reference_rows_dot
            return rows_dot(x, self.codes, idx, self.row_scales).view(1, -1).to(self.dtype)
        return F.linear(x.to(self.dtype), self.matrix.dequantize(idx, dtype=self.dtype))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # x: (1, D) -> (1, n)
        if self.kind == "int8pack":
            return torch._weight_int8pack_mm(x.to(KERNEL_DTYPE), self.codes, self.scales).to(self.dtype)
        if self.kind == "int4pack":
            out = torch._weight_int4pack_mm_for_cpu(x.to(KERNEL_DTYPE), self.packed, self.matrix.group_size, self.scales_zeros)
            return out.to(self.dtype)
        return F.linear(x.to(self.dtype), self.weight)
