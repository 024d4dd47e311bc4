"""HiReFFN: an FFN that computes only its selected neurons."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from hire import native
from hire.arch import FFNWeights  # defined with the architecture table that builds it; re-exported by hire.layers
from hire.config import FFNConfig
from hire.topk import ceil_count, count_for_density, expand_groups, group_scores, idx_to_mask, mask_recall


def neuron_rows(weights: FFNWeights, dtype: torch.dtype) -> torch.Tensor:
    """An FFN's weights neuron-major in one buffer: row i = [gate_i | up_i | down column i]
    (plain: [in_i | out column i]).  # -> (I, (2|1)*D + D_out)"""
    parts = [weights.w_in, weights.w_up] if weights.gated else [weights.w_in]
    return torch.cat([p.detach().to(dtype) for p in parts + [weights.w_out_t]], dim=1).contiguous()


class HiReFFN(nn.Module):
    """Wraps an FFN (kept as ``base_layer``) and, for decoding, computes only selected neurons.

    Decode (one new token per sequence) takes the HiRE path: the proxy estimates every neuron's
    activation, the best groups of neurons (``density`` of them, times ``oversample`` candidates)
    are computed exactly, the top ``density`` fraction by exact |activation| is kept, and only
    their rows of the output projection are read. Prefill (several tokens) stays dense.
    ``mode="always"`` applies HiRE to every token of a batch at once, which is what teacher-forced
    perplexity of a HiRE decoder measures; it computes the same neurons with a mask.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        weights: FFNWeights,
        config: FFNConfig,
        proxy,
        dense_forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        super().__init__()
        self.base_layer = base_layer
        self.weights = weights
        self.config = config
        self.proxy = proxy  # scores all 2I (gated: gate rows then up rows) or I rows
        self._dense_forward = dense_forward or base_layer
        n = weights.neurons
        if n % config.group_size:
            raise ValueError(
                f"ffn group_size {config.group_size} does not divide the FFN width {n}; "
                f"choose a divisor of {n}"
            )
        self.groups = n // config.group_size
        self._count(config.density)
        self.mode = "decode"
        # the decode layout (prepare_decode): None until the layer is prepared
        self.decode_rows: torch.Tensor | None = None
        self._in: torch.Tensor | None = None
        self._out: torch.Tensor | None = None
        self._b_in: torch.Tensor | None = None
        self._b_out: torch.Tensor | None = None
        self._native_act: str | None = None
        self._fused = False
        self.track_recall = False
        self.recall_sum = 0.0
        self.recall_count = 0

    def _count(self, density: float) -> None:
        c = self.config
        self.keep_groups = count_for_density(self.weights.neurons, density, c.group_size)
        self.candidate_groups = ceil_count(self.keep_groups, c.oversample, self.groups)

    def set_density(self, density: float) -> None:
        """Keep a different fraction of neurons (the autotuner tries several per layer)."""
        from dataclasses import replace

        self.config = replace(self.config, density=density, layer_density=[])
        self._count(density)
        self._fused = self._fusable()

    # --- selection -------------------------------------------------------------------------
    def estimate(self, x: torch.Tensor) -> torch.Tensor:
        """Proxy estimate of every neuron's |activation|.  # x: (N, D) -> (N, I)"""
        return self._estimate_from_scores(self.proxy.scores(x), self.weights.b_in)

    def _estimate_from_scores(self, s: torch.Tensor, b_in: torch.Tensor | None) -> torch.Tensor:
        # proxy scores (N, 2I) gated: gate rows then up rows, or (N, I) plain -> |activation| (N, I)
        w = self.weights
        if w.gated:
            gate, up = s.split(w.neurons, dim=-1)
            return (w.act(gate) * up).abs()
        return w.act(s if b_in is None else s + b_in).abs()

    def _top_groups(self, neuron_scores: torch.Tensor, count: int) -> torch.Tensor:
        # neuron_scores: (N, I) -> group idx: (N, count)
        g = group_scores(neuron_scores, self.config.group_size, self.config.aggregate)
        return g.topk(count, dim=-1, sorted=False).indices

    def _rows(self, group_idx: torch.Tensor) -> torch.Tensor:
        # group_idx: (N, g) -> neuron idx: (N, g * group_size)
        return expand_groups(group_idx, self.config.group_size)

    # --- forward paths ---------------------------------------------------------------------
    def forward_sparse(self, x: torch.Tensor) -> torch.Tensor:
        """One token: reads the proxy, the candidates' input rows and the kept output rows.

        # x: (1, D) -> (1, D_out)
        """
        w = self.weights
        cand = self._rows(self._top_groups(self.estimate(x), self.candidate_groups))[0]  # (c,)
        a = w.activations(x, cand)  # (1, c) exact
        if self.candidate_groups > self.keep_groups:
            g = group_scores(a.abs(), self.config.group_size, self.config.aggregate)  # (1, cg)
            keep = g.topk(self.keep_groups, dim=-1, sorted=False).indices  # positions among candidates
            pos = self._rows(keep)[0]
            a, cand = a.index_select(1, pos), cand.index_select(0, pos)
        return w.project(a, cand)

    def forward_masked(self, x: torch.Tensor) -> torch.Tensor:
        """Every token at once, with the neurons forward_sparse would compute (as a mask).

        # x: (N, D) -> (N, D_out)
        """
        w = self.weights
        n = w.neurons
        a = w.activations(x)  # (N, I) exact
        cand_mask = idx_to_mask(self._rows(self._top_groups(self.estimate(x), self.candidate_groups)), n)
        if self.candidate_groups > self.keep_groups:
            masked = a.abs().masked_fill(~cand_mask, float("-inf"))
            keep_mask = idx_to_mask(self._rows(self._top_groups(masked, self.keep_groups)), n)
        else:
            keep_mask = cand_mask
        if self.track_recall:
            true_mask = idx_to_mask(self._rows(self._top_groups(a.abs(), self.keep_groups)), n)
            self.recall_sum += float(mask_recall(true_mask, keep_mask).sum())
            self.recall_count += x.shape[0]
        return w.project(a * keep_mask)

    # --- decode-time layout ----------------------------------------------------------------
    def prepare_decode(self, dtype: torch.dtype) -> None:
        """The decode layout: one neuron-major buffer ``decode_rows`` whose row i holds neuron i's gate
        and up rows and its down column side by side, so a selected neuron is one contiguous read
        (~3.5 KB on SmolLM2); ``_in`` and ``_out`` are views of its input and output parts. The
        proxy on its fused kernel. Costs a copy of the FFN weights."""
        w = self.weights
        self.decode_rows = neuron_rows(w, dtype)  # (I, (1|2)*D + D_out)
        width = (2 if w.gated else 1) * w.w_in.shape[1]
        self._in, self._out = self.decode_rows[:, :width], self.decode_rows[:, width:]  # (I, 2D), (I, D_out) views
        self._b_in = None if w.b_in is None else w.b_in.detach().to(dtype)
        self._b_out = None if w.b_out is None else w.b_out.detach().to(dtype)
        self.proxy.prepare_decode(dtype)
        # the native kernels read the selected rows in place: gated, or plain without a bias
        act = native.activation_name(w.act) if w.gated or w.b_in is None else None
        self._native_act = act if act is not None and native.usable(self._in) else None
        self._fused = self._fusable()

    def _fusable(self) -> bool:
        """Single neurons, no oversampling: the whole step after the proxy is one native call."""
        return self._native_act is not None and self.config.group_size == 1 \
            and self.candidate_groups == self.keep_groups

    @property
    def keeps_all(self) -> bool:
        """Density 1 (a tuned config may leave some layers dense): decode runs the dense FFN."""
        return self.keep_groups == self.groups

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """One token through the selected neurons only.  # x: (1, D) -> (1, D_out)"""
        if self.keeps_all:
            return self._dense_forward(x)
        w = self.weights
        if self._fused:
            y = native.ffn_decode(self.proxy.decode_scores(x), x, self.decode_rows, self.keep_groups,
                                  self._native_act, w.gated).view(1, -1).to(x.dtype)
            return y if self._b_out is None else y + self._b_out
        # estimates in float32, as the fused kernel makes them: both paths pick the same neurons
        est = self._estimate_from_scores(self.proxy.decode_scores(x).float(), self._b_in)  # (1, I)
        cand = self._rows(self._top_groups(est, self.candidate_groups))[0]  # (c,)
        a, cand = self._keep_best(self.rows_activations(x, cand), cand)
        return self.rows_output(a, cand, x.dtype)

    def rows_activations(self, x: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        """Exact activations of the neurons ``cand`` only (reads their input rows).  # x: (1, D), cand: (c,) -> (c,)"""
        w = self.weights
        if self._native_act is not None:
            return native.rows_dot(x, self._in, cand, parts=2 if w.gated else 1, act=self._native_act)
        # eager: float32 like the kernel, so that a machine without it decodes the same tokens
        rows = self._in.index_select(0, cand).float().view(-1, x.shape[-1])  # (c*parts, D)
        pre = F.linear(x.float(), rows)  # (1, c*parts)
        if w.gated:
            pre = pre.view(-1, 2)
            return w.act(pre[:, 0]) * pre[:, 1]
        return w.act(pre if self._b_in is None else pre + self._b_in.index_select(0, cand).float())[0]

    def rows_output(self, a: torch.Tensor, cand: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Output from the neurons ``cand`` only (reads their output rows).  # a, cand: (c,) -> (1, D_out)"""
        if self._native_act is not None:
            y = native.rows_axpy(self._out, cand, a).view(1, -1).to(dtype)
        else:  # eager, float32 like the kernel
            y = native.reference_rows_axpy(self._out, cand, a).view(1, -1).to(dtype)
        return y if self._b_out is None else y + self._b_out

    def _keep_best(self, a: torch.Tensor, cand: torch.Tensor):
        """With oversampling, keep the best groups by exact |activation|.  # a, cand: (c,) -> (kept,)"""
        if self.candidate_groups == self.keep_groups:
            return a, cand
        g = group_scores(a.abs().unsqueeze(0), self.config.group_size, self.config.aggregate)
        pos = self._rows(g.topk(self.keep_groups, dim=-1, sorted=False).indices)[0]
        return a.index_select(0, pos), cand.index_select(0, pos)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, D) or (N, D) -> same leading shape, D_out
        tokens = x.shape[-2] if x.dim() >= 3 else x.shape[0]
        if self.mode == "dense" or (self.mode == "decode" and tokens != 1):
            return self._dense_forward(x)
        flat = x.reshape(-1, x.shape[-1])
        if self.mode == "decode" and flat.shape[0] == 1:
            y = self.forward_sparse(flat)
        else:
            y = self.forward_masked(flat)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    # --- accounting ------------------------------------------------------------------------
    def recall(self) -> float | None:
        return self.recall_sum / self.recall_count if self.recall_count else None

    def reset_recall(self) -> None:
        self.recall_sum, self.recall_count = 0.0, 0

    def dense_nbytes(self) -> int:
        w = self.weights
        mats = 2 if w.gated else 1
        return (mats * w.w_in.numel() + w.w_out_t.numel()) * 2

    def nbytes(self) -> int:
        """Bytes read per decoded token (16-bit weights): proxy + candidates' input rows + kept output rows."""
        if self.keeps_all:
            return self.dense_nbytes()
        w = self.weights
        size = self.config.group_size
        in_rows = (2 if w.gated else 1) * self.candidate_groups * size
        exact_in = 0 if self.config.proxy == "exact" else in_rows * w.w_in.shape[1] * 2
        out = self.keep_groups * size * w.w_out_t.shape[1] * 2
        return self.proxy.nbytes() + exact_in + out

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"proxy={c.proxy}, density={c.density}, keep={self.keep_groups * c.group_size}/"
            f"{self.weights.neurons}, candidates={self.candidate_groups * c.group_size}, "
            f"group_size={c.group_size}, mode={self.mode}"
        )
