"""A cascade of proxies: a cheap pass over all rows, finer passes over each stage's survivors."""

from __future__ import annotations

import torch

from hire.proxies.lowrank import LowRankProxy
from hire.topk import approx_topk, check_blocks, check_k, local_topk


class Cascade:
    """Stage i scores the survivors of stage i-1 with its proxy and keeps its best ``keep[i]``.

    ``blocks`` > 0 makes the first pass a local top-k (``hire.topk.local_topk``) over that many
    row blocks instead of one exact top-k. With one stage this is plain HiRE candidate selection. ``select`` returns the final
    candidate rows; the caller computes them exactly.
    """

    def __init__(self, proxies: list, keep: list[int], blocks: int = 0):
        if not proxies or len(proxies) != len(keep):
            raise ValueError("a cascade needs one keep count per proxy, and at least one proxy")
        n = proxies[0].shape[0]
        prev = n
        for i, (proxy, count) in enumerate(zip(proxies, keep)):
            if proxy.shape[0] != n:
                raise ValueError(f"cascade stage {i} proxy has {proxy.shape[0]} rows, stage 0 has {n}")
            check_k(count, prev, f"cascade stage {i} keep")
            prev = count
        if blocks:
            check_blocks(keep[0], n, blocks)
        self.proxies = proxies
        self.keep = keep
        self.blocks = blocks

    def take_rows(self, rows: torch.Tensor, keep: list[int]) -> "Cascade":
        """The same stages over ``rows`` only, keeping ``keep[i]`` at stage i (a tensor-parallel shard
        keeps its share). The first pass is one exact top-k over the shard.  # rows: (m,)"""
        return Cascade([p.take_rows(rows) for p in self.proxies], keep)

    def _first(self, scores: torch.Tensor) -> torch.Tensor:
        if self.blocks:
            return local_topk(scores, self.keep[0], self.blocks)
        return approx_topk(scores, self.keep[0])

    @property
    def shape(self) -> tuple[int, int]:
        return self.proxies[0].shape

    def select(self, x: torch.Tensor) -> torch.Tensor:
        # x: (N, D) -> idx: (N, keep[-1])
        idx = self._first(self.proxies[0].scores(x))
        rows = self.shape[0]
        for proxy, count in zip(self.proxies[1:], self.keep[1:]):
            if x.shape[0] * idx.shape[1] > rows:  # a batch touching more rows than exist: score all once
                sub = proxy.scores(x).gather(-1, idx)  # (N, keep_prev)
            else:  # decode: read only the survivors' rows
                sub = proxy.scores_rows(x, idx)  # (N, keep_prev)
            idx = idx.gather(-1, sub.topk(count, dim=-1, sorted=False).indices)
        return idx

    def prepare_decode(self, dtype: torch.dtype) -> None:
        self.proxies[0].prepare_decode(dtype)
        for proxy in self.proxies[1:]:
            proxy.prepare_decode(dtype, rows_only=True)

    def decode_select(self, x: torch.Tensor) -> torch.Tensor:
        """select() for one token, with the first (full) pass on its fused kernel.  # x: (1, D) -> (1, keep[-1])"""
        first = self.proxies[0]
        if self.blocks and isinstance(first, LowRankProxy) and first.fused_first_pass(self.blocks):
            idx = first.decode_local_topk(x, self.keep[0], self.blocks)  # scores and selection in one native pass
        else:
            idx = self._first(first.decode_scores(x))
        for proxy, count in zip(self.proxies[1:], self.keep[1:]):
            sub = proxy.decode_scores_rows(x, idx[0])
            idx = idx.gather(-1, sub.topk(count, dim=-1, sorted=False).indices)
        return idx

    def decode_select_batch(self, x: torch.Tensor, dtype: torch.dtype = torch.float16) -> torch.Tensor:
        """select() as decoding selects, for N tokens at once: a one-stage low-rank selector with blocks
        runs its first pass on the native block-major kernel (block_select: U read once for the N, each
        token's low-rank projection in int8 as decoding quantizes it), prepared for decoding in ``dtype``
        first if it is not; any other selector, or without that kernel, select().
        # x: (N, D) -> (N, keep[-1])"""
        first = self.proxies[0]
        if len(self.proxies) != 1 or not self.blocks or not isinstance(first, LowRankProxy):
            return self.select(x)
        if first.decode_v is None:
            first.prepare_decode(dtype)
        if first.block_pack(self.blocks) is None:
            return self.select(x)
        return first.decode_local_topk_batch(x, self.keep[0], self.blocks, with_union=False)[0]

    def decode_bound(self, x: torch.Tensor, margin: float, logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """An upper bound on every row's exact logit, for sampling past the candidates ``idx`` (exact
        ``logits``): the first pass's score plus ``margin`` of the row's error spread where the
        proxy knows it (LowRankProxy.spread); else plus ``margin`` times the root-mean-square error of
        this token's candidates, one spread for every row (a quantized first pass, a low-rank one
        fitted without optimism). Scores every row again: the fused first pass keeps only its picks.
        # x: (1, D), logits/idx: (1, m) -> float32 (1, n)"""
        first = self.proxies[0]
        if isinstance(first, LowRankProxy) and first.spread is not None:
            return first.decode_bound(x, margin)
        scores = first.decode_scores(x).float()  # (1, n)
        error = logits.float() - scores.gather(-1, idx)  # (1, m)
        return scores + margin * error.square().mean().sqrt()

    def decode_log_mass(self, x: torch.Tensor, logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Each row's expected exp(logit) in log form, from the proxy: its score plus half its error's
        variance (a normal error e of std s has E[exp(score + e)] = exp(score + s^2 / 2); the score
        alone underrates a tail's mass). The error's std is the row's spread where the proxy knows it,
        else the root-mean-square error of this token's candidates, one for every row.
        # x: (1, D), logits/idx: (1, m) -> float32 (1, n)"""
        first = self.proxies[0]
        if isinstance(first, LowRankProxy) and first.spread is not None:
            return first.decode_scores(x, bias=False).float() + 0.5 * first.spread.square()
        scores = first.decode_scores(x).float()
        error = logits.float() - scores.gather(-1, idx)
        return scores + 0.5 * error.square().mean()

    def head_nbytes(self) -> int:
        """Bytes a HiRE head using this selector reads per token: the proxies plus the final
        candidates' exact rows in 16 bits."""
        return self.nbytes() + self.keep[-1] * self.shape[1] * 2

    def nbytes(self) -> int:
        total = self.proxies[0].nbytes()
        for proxy, prev in zip(self.proxies[1:], self.keep[:-1]):
            total += proxy.nbytes(prev)
        return total
