"""HiRE-Q: a 4- or 8-bit copy of W with one scale per group of columns."""

from __future__ import annotations

import torch

from hire.proxies.kernels import QuantizedGEMV
from hire.proxies.quantized_matrix import QuantizedMatrix

__all__ = ["QuantizedMatrix", "QuantizedProxy"]  # QuantizedMatrix lives in quantized_matrix; importable here too


class QuantizedProxy:
    """scores~ = Q(W) x with Q a per-group 4/8-bit quantization of W."""

    kind = "quantized"

    def __init__(self, matrix: QuantizedMatrix):
        self.matrix = matrix
        self._gemv: QuantizedGEMV | None = None  # the decode kernel (prepare_decode)

    @property
    def decode_gemv(self) -> QuantizedGEMV | None:
        """The kernel decode_scores runs, with its operands (None before prepare_decode)."""
        return self._gemv

    @property
    def decode_kind(self) -> str:
        """The kernel decode_scores runs ("int8pack", "int4pack", "dequantize"); "unprepared" before prepare_decode."""
        return self._gemv.kind if self._gemv is not None else "unprepared"

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bits: int = 4, group_size: int = 64) -> "QuantizedProxy":
        return cls(QuantizedMatrix.from_weight(weight, bits, group_size))

    @property
    def shape(self) -> tuple[int, int]:
        return self.matrix.shape

    def take_rows(self, rows: torch.Tensor) -> "QuantizedProxy":
        """This proxy restricted to ``rows`` (the same scores for them).  # rows: (m,)"""
        return QuantizedProxy(self.matrix.take_rows(rows))

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        # x: (N, D) -> (N, n)
        return self.matrix.matmul(x)

    def scores_rows(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        # x: (N, D), idx: (N, m) -> (N, m)
        return self.matrix.matmul_rows(x, idx)

    def nbytes(self, rows: int | None = None) -> int:
        return self.matrix.nbytes(rows)

    def prepare_decode(self, dtype: torch.dtype, rows_only: bool = False) -> None:
        """``rows_only``: this proxy only ever scores a few rows (a cascade's later stage)."""
        self._gemv = QuantizedGEMV(self.matrix, dtype, rows_only=rows_only)

    def decode_scores_rows(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """# x: (1, D), idx: (m,) -> (1, m)"""
        return self._gemv.rows(x, idx)

    def decode_scores(self, x: torch.Tensor) -> torch.Tensor:
        """scores for one token with the fused kernel.  # x: (1, D) -> (1, n)"""
        return self._gemv(x)

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        return self.matrix.state_dict(prefix)

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], prefix: str = "") -> "QuantizedProxy":
        return cls(QuantizedMatrix.from_state(state, prefix))
