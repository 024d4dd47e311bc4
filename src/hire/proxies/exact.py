"""The exact product as a proxy: the reference every approximate proxy is tested against."""

from __future__ import annotations

import torch

from hire.topk import rescore


class ExactProxy:
    """scores = W x exactly, reading W in 16 bits."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight  # (n, D)
        self._weight: torch.Tensor | None = None  # in the decode dtype (prepare_decode)

    @property
    def decode_weight(self) -> torch.Tensor | None:
        """W in the decode dtype, what decode_scores multiplies by (None before prepare_decode).  # (n, D)"""
        return self._weight

    decode_kind = "dense"  # decode_scores is a 16-bit GEMV

    @classmethod
    def from_weight(cls, weight: torch.Tensor) -> "ExactProxy":
        return cls(weight)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    def take_rows(self, rows: torch.Tensor) -> "ExactProxy":
        return ExactProxy(self.weight.index_select(0, rows))

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        # x: (N, D) -> (N, n)
        return x @ self.weight.t().to(x.dtype)

    def scores_rows(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        # x: (N, D), idx: (N, m) -> (N, m)
        return rescore(self.weight, x, idx)

    def prepare_decode(self, dtype: torch.dtype) -> None:
        self._weight = self.weight.to(dtype)

    def decode_scores(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x.to(self._weight.dtype), self._weight)

    def nbytes(self, rows: int | None = None) -> int:
        n, d = self.weight.shape
        return (n if rows is None else rows) * d * 2
