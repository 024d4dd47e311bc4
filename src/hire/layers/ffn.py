"""HiReFFN: an FFN that computes only its selected neurons, and its decode plan."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from hire import native
from hire.arch import FFNWeights  # defined with the architecture table that builds it; re-exported by hire.layers
from hire.config import FFNConfig
from hire.topk import ceil_count, count_for_density, idx_to_mask, mask_recall, select_neurons, shard_range, split_count


def neuron_rows(weights: FFNWeights, dtype: torch.dtype) -> torch.Tensor:
    """An FFN's weights neuron-major in one buffer: row i = [gate_i | up_i | down column i]
    (plain: [in_i | out column i]).  # -> (I, (2|1)*D + D_out)"""
    parts = [weights.w_in, weights.w_up] if weights.gated else [weights.w_in]
    return torch.cat([p.detach().to(dtype) for p in parts + [weights.w_out_t]], dim=1).contiguous()


def estimates_from_scores(scores: torch.Tensor, act: Callable, gated: bool, b_in: torch.Tensor | None = None) -> torch.Tensor:
    """Every neuron's estimated |activation| from its proxy scores.

    # scores: (N, 2I) gated (gate rows then up rows) or (N, I) plain -> (N, I)
    """
    if gated:
        gate, up = scores.chunk(2, dim=-1)
        return (act(gate) * up).abs()
    return act(scores if b_in is None else scores + b_in).abs()


@dataclass(frozen=True)
class FFNDecodePlan:
    """One HiReFFN's decode step, built once (``HiReFFN.prepare_decode``): the neuron-major rows, the
    proxy prepared for one token, the counts and the kernel choice. Everything that decodes this FFN
    one token at a time (the layer, the native decode step's plan, each tensor-parallel rank through
    ``shard``) reads it here. Selection is ``hire.topk.select_neurons`` on every path.
    """

    rows: torch.Tensor  # (I, parts*D + D_out): [gate_i | up_i | down column i] or [in_i | out column i]
    width: int  # parts*D: where a row's input part ends
    act: Callable[[torch.Tensor], torch.Tensor]
    gated: bool
    proxy: object  # scores the 2I (gated: gate rows then up rows) or I rows; prepared for decode
    keep_groups: int
    candidate_groups: int
    group_size: int
    aggregate: str
    dtype: torch.dtype
    b_in: torch.Tensor | None = None  # (I,) in dtype
    b_out: torch.Tensor | None = None  # (D_out,) in dtype
    native_act: str | None = None  # the kernels' name of act, where they read these rows in place; None: eager
    fuse: bool = True  # allow the single-call kernel (tests turn it off to compare the paths)

    @property
    def neurons(self) -> int:
        return self.rows.shape[0]

    @property
    def parts(self) -> int:
        return 2 if self.gated else 1

    @property
    def in_rows(self) -> torch.Tensor:
        """# -> (I, parts*D) view"""
        return self.rows[:, : self.width]

    @property
    def out_rows(self) -> torch.Tensor:
        """# -> (I, D_out) view"""
        return self.rows[:, self.width :]

    @property
    def keeps_all(self) -> bool:
        return self.keep_groups * self.group_size == self.neurons

    @property
    def fused(self) -> bool:
        """Single neurons, no oversampling, a kernel for the activation: the step after the proxy is
        one native call (``native.ffn_decode``)."""
        return self.fuse and self.native_act is not None and self.group_size == 1 \
            and self.candidate_groups == self.keep_groups

    # --- the step's parts ------------------------------------------------------------------
    def estimates(self, x: torch.Tensor) -> torch.Tensor:
        """The proxy's |activation| estimates in float32, as the fused kernel makes them, so that
        every path picks the same neurons.  # x: (1, D) -> (1, I)"""
        b_in = None if self.b_in is None else self.b_in.float()
        return estimates_from_scores(self.proxy.decode_scores(x).float(), self.act, self.gated, b_in)

    def candidates(self, est: torch.Tensor) -> torch.Tensor:
        """The candidate neurons, ascending.  # est: (1, I) -> (candidate_groups * group_size,)"""
        return select_neurons(est[0], self.candidate_groups, self.group_size, self.aggregate)

    def keep_best(self, a: torch.Tensor, cand: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """With oversampling, the best ``keep_groups`` candidates by exact |activation| (the same
        rule, on exact values).  # a, cand: (c,) -> (kept,), (kept,)"""
        if self.candidate_groups == self.keep_groups:
            return a, cand
        pos = select_neurons(a.abs(), self.keep_groups, self.group_size, self.aggregate)
        return a.index_select(0, pos), cand.index_select(0, pos)

    def activations(self, x: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        """Exact activations of the neurons ``cand`` only (reads their input rows), in float32.
        # x: (1, D), cand: (c,) -> (c,)"""
        if self.native_act is not None:
            return native.rows_dot(x, self.in_rows, cand, parts=self.parts, act=self.native_act)
        # eager: float32 like the kernel, so that a machine without it decodes the same tokens
        rows = self.in_rows.index_select(0, cand).float().view(-1, x.shape[-1])  # (c*parts, D)
        pre = F.linear(x.float(), rows)  # (1, c*parts)
        if self.gated:
            pre = pre.view(-1, 2)
            return self.act(pre[:, 0]) * pre[:, 1]
        return self.act(pre if self.b_in is None else pre + self.b_in.index_select(0, cand).float())[0]

    def output(self, a: torch.Tensor, cand: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Output from the neurons ``cand`` only (reads their output rows), bias included.
        # a, cand: (c,) -> (1, D_out)"""
        rows_axpy = native.rows_axpy if self.native_act is not None else native.reference_rows_axpy
        y = rows_axpy(self.out_rows, cand, a).view(1, -1).to(dtype)  # float32 accumulation either way
        return y if self.b_out is None else y + self.b_out

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """One token through the selected neurons only.  # x: (1, D) -> (1, D_out)"""
        if self.fused:
            y = native.ffn_decode(self.proxy.decode_scores(x), x, self.rows, self.keep_groups, self.native_act,
                                  self.gated).view(1, -1).to(x.dtype)
            return y if self.b_out is None else y + self.b_out
        cand = self.candidates(self.estimates(x))
        a, cand = self.keep_best(self.activations(x, cand), cand)
        return self.output(a, cand, x.dtype)

    # --- tensor parallel -------------------------------------------------------------------
    def shard(self, rank: int, world: int) -> "FFNDecodePlan":
        """Rank ``rank``'s plan of ``world``: its contiguous neurons (their rows are a view of these),
        the proxy restricted to them, and its DA-TOP-k share of the selections (the shares sum to the
        single-process counts). The output bias is added by rank 0 only: the ranks' outputs are summed.
        """
        start, end = shard_range(self.neurons // self.group_size, rank, world)
        start, end = start * self.group_size, end * self.group_size
        keep = split_count(self.keep_groups, rank, world)
        if keep < 1:
            raise ValueError(f"the FFN keeps {self.keep_groups} groups, fewer than the {world} ranks: "
                             "raise the density or lower --tp")
        rows = torch.arange(start, end)
        proxy = self.proxy.take_rows(torch.cat([rows, rows + self.neurons]) if self.gated else rows)
        proxy.prepare_decode(self.dtype)
        return replace(
            self, rows=self.rows[start:end], proxy=proxy, keep_groups=keep,
            candidate_groups=split_count(self.candidate_groups, rank, world),
            b_in=None if self.b_in is None else self.b_in[start:end],
            b_out=self.b_out if rank == 0 else None,
        )


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
        self._plan: FFNDecodePlan | None = None  # the decode layout (prepare_decode)
        self.track_recall = False
        self.recall_sum = 0.0
        self.recall_count = 0

    def _count(self, density: float) -> None:
        c = self.config
        self.keep_groups = count_for_density(self.weights.neurons, density, c.group_size)
        self.candidate_groups = ceil_count(self.keep_groups, c.oversample, self.groups)

    def set_density(self, density: float) -> None:
        """Keep a different fraction of neurons (the autotuner tries several per layer)."""
        self.config = replace(self.config, density=density, layer_density=[])
        self._count(density)
        if self._plan is not None:
            self._plan = replace(self._plan, keep_groups=self.keep_groups, candidate_groups=self.candidate_groups)

    # --- selection (hire.topk.select_neurons on every path) ---------------------------------
    def estimate(self, x: torch.Tensor) -> torch.Tensor:
        """Proxy estimate of every neuron's |activation|.  # x: (N, D) -> (N, I)"""
        w = self.weights
        return estimates_from_scores(self.proxy.scores(x), w.act, w.gated, w.b_in)

    def _select(self, scores: torch.Tensor, count: int) -> torch.Tensor:
        # scores: (N, I) -> neuron idx (N, count * group_size), ascending
        return select_neurons(scores, count, self.config.group_size, self.config.aggregate)

    # --- forward paths ---------------------------------------------------------------------
    def forward_sparse(self, x: torch.Tensor) -> torch.Tensor:
        """One token: reads the proxy, the candidates' input rows and the kept output rows.

        # x: (1, D) -> (1, D_out)
        """
        w = self.weights
        cand = self._select(self.estimate(x), self.candidate_groups)[0]  # (c,)
        a = w.activations(x, cand)  # (1, c) exact
        if self.candidate_groups > self.keep_groups:
            pos = self._select(a.abs(), self.keep_groups)[0]  # positions among the candidates
            a, cand = a.index_select(1, pos), cand.index_select(0, pos)
        return w.project(a, cand)

    def forward_masked(self, x: torch.Tensor) -> torch.Tensor:
        """Every token at once, with the neurons forward_sparse would compute (as a mask).

        # x: (N, D) -> (N, D_out)
        """
        w = self.weights
        n = w.neurons
        a = w.activations(x)  # (N, I) exact
        cand_mask = idx_to_mask(self._select(self.estimate(x), self.candidate_groups), n)
        if self.candidate_groups > self.keep_groups:
            masked = a.abs().masked_fill(~cand_mask, float("-inf"))
            keep_mask = idx_to_mask(self._select(masked, self.keep_groups), n)
        else:
            keep_mask = cand_mask
        if self.track_recall:
            true_mask = idx_to_mask(self._select(a.abs(), self.keep_groups), n)
            self.recall_sum += float(mask_recall(true_mask, keep_mask).sum())
            self.recall_count += x.shape[0]
        return w.project(a * keep_mask)

    # --- decode-time layout ----------------------------------------------------------------
    def prepare_decode(self, dtype: torch.dtype) -> None:
        """Build the decode plan: one neuron-major buffer whose row i holds neuron i's gate and up rows
        and its down column side by side, so a selected neuron is one contiguous read (~3.5 KB on
        SmolLM2); the proxy on its fused kernel. Costs a copy of the FFN weights (hire.Engine then
        points the model's gate and up at it)."""
        w = self.weights
        rows = neuron_rows(w, dtype)  # (I, (1|2)*D + D_out)
        width = (2 if w.gated else 1) * w.w_in.shape[1]
        self.proxy.prepare_decode(dtype)
        # the native kernels read the selected rows in place: gated, or plain without a bias
        act = native.activation_name(w.act) if w.gated or w.b_in is None else None
        c = self.config
        self._plan = FFNDecodePlan(
            rows, width, w.act, w.gated, self.proxy, self.keep_groups, self.candidate_groups, c.group_size,
            c.aggregate, dtype, b_in=None if w.b_in is None else w.b_in.detach().to(dtype),
            b_out=None if w.b_out is None else w.b_out.detach().to(dtype),
            native_act=act if act is not None and native.usable(rows[:, :width]) else None,
        )

    def decode_plan(self) -> FFNDecodePlan:
        """The decode plan ``prepare_decode`` built (the engine's native step, TP's shards and
        ``decode`` all read it)."""
        if self._plan is None:
            raise RuntimeError("this HiReFFN has no decode plan yet: call prepare_decode(dtype) first "
                               "(hire.Engine does it when it is built)")
        return self._plan

    @property
    def keeps_all(self) -> bool:
        """Density 1 (a tuned config may leave some layers dense): decode runs the dense FFN."""
        return self.keep_groups == self.groups

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """One token through the selected neurons only.  # x: (1, D) -> (1, D_out)"""
        if self.keeps_all:
            return self._dense_forward(x)
        return self.decode_plan().decode(x)

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
