"""Tensor-parallel decode: attention heads and FFN neurons split over the ranks (column-parallel
in, row-parallel out, one all-reduce each), the LM head split by vocabulary, and three ways to
select the top-k rows of a sharded layer:

* ``dense``: no selection; the head's top-k is each rank's exact local top-k merged by one gather
  (``head_topk``: every mode ends with it, sampling needs the k best (value, token) pairs).
* ``exact``: single-process HiRE, done globally: every selection (the FFN's candidates, each
  cascade stage of the head) is the exact global top-k of the proxy scores, by each rank's local
  top-k plus one gather of (value, index) pairs and a merge (``global_topk``).
* ``da``: DA-TOP-k. Each rank keeps its own share (top-k/P of its rows): the FFN needs no
  selection collective at all; the head rescores its local candidates exactly and one gather of
  (value, index) pairs gives the final top-k.

The proxies are the single-process ones restricted to each rank's rows, so ``da`` on one rank
is single-process HiRE and ``exact`` on any number of ranks selects what it selects.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn
from torch.nn import functional as F

from hire import native
from hire.arch import arch_spec, ffn_weights
from hire.config import HiReConfig
from hire.distributed.comm import Comm
from hire.distributed.topk import global_topk, owned, shard_range, split_count
from hire.engine import Engine
from hire.layers import HiReFFN, HiReLMHead, TopKMLP
from hire.layers.ffn import FFNDecodePlan
from hire.topk import expand_groups, group_scores, recall_at_k

MODES = ("dense", "exact", "da")


def head_split(n_heads: int, n_kv: int, rank: int, world: int) -> tuple[list[int], list[int]]:
    """The query heads of ``rank`` (a contiguous, balanced share) and the kv heads they read
    (a kv head shared by two ranks' query heads is held by both)."""
    size, extra = divmod(n_heads, world)
    start = rank * size + min(rank, extra)
    q = list(range(start, start + size + (1 if rank < extra else 0)))
    group = n_heads // n_kv
    return q, sorted({h // group for h in q})


def check_tp(model: nn.Module, config: HiReConfig | None, world: int) -> None:
    """Every shape that must split over ``world`` ranks, checked once before anything is built."""
    cfg = model.config
    problems = []
    if cfg.num_attention_heads < world:
        problems.append(f"{cfg.num_attention_heads} attention heads cannot give each of {world} ranks one")
    inter = cfg.intermediate_size
    group = config.ffn.group_size if config is not None and config.ffn.enabled else 1
    if inter % (world * group):
        problems.append(f"the FFN width {inter} does not split into {world} ranks x groups of {group} neurons")
    if cfg.vocab_size % world:
        problems.append(f"the vocabulary ({cfg.vocab_size}) does not split evenly over {world} ranks")
    if any(isinstance(m, TopKMLP) for m in model.modules()):
        raise ValueError("tensor parallel does not run top-k-trained FFNs (hire train / sparsify-train models) yet: "
                         "its dense mode would compute every neuron; decode them in one process (hire bench without --tp)")
    if problems:
        raise ValueError(f"--tp {world} does not fit {cfg.model_type} ({'; '.join(problems)}); choose another --tp")


class TPFFN:
    """Rank r's neurons [start, end) of one FFN, in the three modes; the output is this rank's
    partial sum, all-reduced here. A HiReFFN's decode step is its plan's ``shard(rank, world)``."""

    def __init__(self, mlp: nn.Module, weights, comm: Comm, dtype: torch.dtype):
        n, world, rank = weights.neurons, comm.world, comm.rank
        self.comm = comm
        self.start, self.end = shard_range(n, rank, world)
        sl = slice(self.start, self.end)
        local = type(weights)(
            w_in=weights.w_in[sl], w_out_t=weights.w_out_t[sl], act=weights.act,
            w_up=None if weights.w_up is None else weights.w_up[sl],
            b_in=None if weights.b_in is None else weights.b_in[sl],
            b_out=weights.b_out if rank == 0 else None,  # the bias is added once, not once per rank
        )
        self.weights = local
        self.plan: FFNDecodePlan | None = None
        if isinstance(mlp, HiReFFN):
            self.plan = mlp.decode_plan().shard(rank, world)  # DA-TOP-k: this rank's share of the selection
            self.group_size, self.aggregate = mlp.config.group_size, mlp.config.aggregate
            self.global_keep, self.global_candidates = mlp.keep_groups, mlp.candidate_groups
            self.group_offset = self.start // self.group_size
        # the dense shard as a dense engine reads it: gate and up rows stacked, the down projection row-major
        rows = [local.w_in, local.w_up] if local.gated else [local.w_in]
        self.dense_in = torch.cat(rows).detach().to(dtype).contiguous()  # (2n or n, D)
        self.dense_b_in = None if local.b_in is None else local.b_in.detach().to(dtype)
        self.dense_out = local.w_out_t.t().detach().to(dtype).contiguous()  # (D_out, n)
        self.dense_b_out = None if local.b_out is None else local.b_out.detach().to(dtype)
        self.track = False
        self.hits = 0.0
        self.kept = 0.0

    # --- this rank's partial outputs ---------------------------------------------------------
    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """All of this rank's neurons.  # x: (T, D) -> (T, D_out) partial"""
        w = self.weights
        if w.gated:
            gate, up = F.linear(x, self.dense_in).chunk(2, dim=-1)  # (T, n) each
            a = w.act(gate) * up
        else:
            a = w.act(F.linear(x, self.dense_in, self.dense_b_in))
        return F.linear(a, self.dense_out, self.dense_b_out)

    def _groups_to_rows(self, groups: torch.Tensor) -> torch.Tensor:
        return expand_groups(groups.unsqueeze(0), self.group_size)[0]

    def select_exact(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Single-process HiRE's selection, exactly: the global top candidates by proxy (one
        gather), and with oversampling the global best of them by exact activation (another); ties
        go to the lowest global group, as ``select_neurons`` breaks them in one process.
        # x: (1, D) -> this rank's kept neurons (m,) local, their activations (m,)"""
        plan = self.plan
        g = group_scores(plan.estimates(x), self.group_size, self.aggregate)  # (1, G_local) float32
        n_groups = g.shape[-1]
        off = self.group_offset
        _, top = global_topk(g, off, self.global_candidates, self.comm, "ffn_select")
        cand = self._groups_to_rows(owned(top[0], off, off + n_groups).sort().values)  # sorted rows
        a = plan.activations(x, cand) if cand.numel() else x.new_zeros(0, dtype=torch.float32)
        if self.global_candidates == self.global_keep:
            return cand, a
        exact = g.new_full((1, n_groups), float("-inf"))  # only candidates compete
        if cand.numel():
            cand_groups = cand.view(-1, self.group_size)[:, 0] // self.group_size
            exact[0, cand_groups] = group_scores(a.abs().unsqueeze(0).to(g.dtype), self.group_size, self.aggregate)[0]
        _, top = global_topk(exact, off, self.global_keep, self.comm, "ffn_select")
        keep = self._groups_to_rows(owned(top[0], off, off + n_groups).sort().values)
        pos = torch.searchsorted(cand, keep)  # where each kept row sits among the (sorted) candidates
        return keep, a.index_select(0, pos)

    def select_da(self, x: torch.Tensor) -> torch.Tensor:
        """DA-TOP-k's local share, as the shard's plan decodes it.  # x: (1, D) -> kept rows (m,) local"""
        plan = self.plan
        cand = plan.candidates(plan.estimates(x))
        return plan.keep_best(plan.activations(x, cand), cand)[1]

    def __call__(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        """This FFN over all ranks.  # x: (T, D) -> (T, D_out) float32, the same on every rank"""
        plan = self.plan
        if mode == "dense" or plan is None or x.shape[0] != 1:
            y = self.dense(x)
        elif mode == "da":
            if self.track:
                self._track(x)
            y = self.dense(x) if plan.keeps_all else plan.decode(x)
        elif mode == "exact":
            cand, a = self.select_exact(x)
            if cand.numel():
                y = plan.output(a, cand, x.dtype)
            else:  # this rank holds none of the kept neurons: its share is the bias (rank 0) or nothing
                y = x.new_zeros(1, self.dense_out.shape[0])
                y = y if plan.b_out is None else y + plan.b_out
        else:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        return self.comm.all_reduce(y.float(), "ffn")

    def _track(self, x: torch.Tensor) -> None:
        # recall of DA's kept neurons against the exact global selection (measurement only: its gathers count)
        da = self.select_da(x)
        exact, _ = self.select_exact(x)
        self.hits += float(torch.isin(da, exact).sum())
        self.kept += self.global_keep * self.group_size / self.comm.world  # summed over ranks: the global count


class TPHead:
    """Rank r's vocabulary rows [start, end) of the LM head; returns the merged top-k (values,
    token ids), the same on every rank."""

    def __init__(self, weight: torch.Tensor, hire_head: HiReLMHead | None, k: int, comm: Comm, dtype: torch.dtype):
        vocab = weight.shape[0]
        self.comm = comm
        self.start, self.end = shard_range(vocab, comm.rank, comm.world)
        self.weight = weight[self.start : self.end].to(dtype).contiguous()  # (V/P, D)
        self._native = native.usable(self.weight)
        self.k = k
        self.selector = None
        if hire_head is not None:
            sel = hire_head.selector
            rows = torch.arange(self.start, self.end)
            shares = [split_count(count, comm.rank, comm.world) for count in sel.keep]
            if min(shares) < 1:
                raise ValueError(f"the head keeps {min(sel.keep)} candidates at some stage, fewer than {comm.world} ranks")
            self.keep = sel.keep  # the single-process counts: the exact mode's global selections
            self.selector = sel.take_rows(rows, shares)  # DA-TOP-k: this rank's shares
            self.selector.prepare_decode(dtype)
        self.track = False
        self.recall_sum = 0.0
        self.top1_sum = 0.0
        self.steps = 0

    def _exact_rows(self, h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        # h: (1, D), idx: (m,) local rows -> exact logits (1, m)
        if self._native:
            return native.rows_dot(h, self.weight, idx).view(1, -1)
        return F.linear(h.to(self.weight.dtype), self.weight.index_select(0, idx)).float()

    def _final(self, logits: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # this rank's exact logits (1, m) of local rows idx (m,) -> merged top-k over all ranks
        return global_topk(logits, (idx + self.start).unsqueeze(0), self.k, self.comm, "head_topk")

    def dense(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(h.to(self.weight.dtype), self.weight)  # (1, V/P)
        return global_topk(logits, self.start, self.k, self.comm, "head_topk")

    def __call__(self, h: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        """# h: (1, D) -> values (1, k), token ids (1, k)"""
        if mode == "dense" or self.selector is None:
            out = self.dense(h)
        elif mode == "da":
            idx = self.selector.decode_select(h)[0]  # local candidates, no collective
            out = self._final(self._exact_rows(h, idx), idx)
        elif mode == "exact":
            out = self._exact(h)
        else:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if self.track and mode != "dense":
            true = self.dense(h)[1]
            self.recall_sum += float(recall_at_k(true, out[1]).sum())
            self.top1_sum += float((true[:, 0] == out[1][:, 0]).sum())
            self.steps += 1
        return out

    def _exact(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Single-process HiRE's cascade with every stage's selection the exact global top-k."""
        proxies = self.selector.proxies
        scores = proxies[0].decode_scores(h)  # (1, V/P)
        _, top = global_topk(scores, self.start, self.keep[0], self.comm, "head_select")
        idx = owned(top[0], self.start, self.end)
        for proxy, count in zip(proxies[1:], self.keep[1:]):
            stage = scores.new_full(scores.shape, float("-inf"))
            if idx.numel():
                stage[0, idx] = proxy.decode_scores_rows(h, idx)[0].to(stage.dtype)
            _, top = global_topk(stage, self.start, count, self.comm, "head_select")
            idx = owned(top[0], self.start, self.end)
        logits = self._exact_rows(h, idx) if idx.numel() else h.new_zeros(1, 0, dtype=torch.float32)
        return self._final(logits, idx)

    @torch.no_grad()
    def log_prob(self, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Vocabulary-parallel log p(target): each rank's logsumexp and (if it owns the target) its
        logit, one gather of two floats.  # h: (1, D), target: (1,) -> (1,)"""
        logits = F.linear(h.to(self.weight.dtype), self.weight).float()  # (1, V/P)
        t = int(target[0]) - self.start
        mine = logits[0, t] if 0 <= t < logits.shape[1] else logits.new_tensor(float("-inf"))
        parts = self.comm.all_gather(torch.stack([logits.logsumexp(-1)[0], mine]), "head_logprob")  # (P, 2)
        return (parts[:, 1].max() - parts[:, 0].logsumexp(0)).view(1)


class TPEngine(Engine):
    """The engine on rank ``comm.rank`` of ``comm.world``: this rank's attention heads, FFN
    neurons and vocabulary rows; ``mode`` picks the selection (``MODES``) for HiRE decode steps.
    Prefill is dense and tensor-parallel. Every rank runs the same steps and returns the same
    tokens. The residual stream, the norms and the embedding are replicated; partial outputs are
    all-reduced in float32."""

    supports_fused = False  # its attention and FFN steps add collectives: the eager step, sharded

    def __init__(self, model: nn.Module, config: HiReConfig | None, comm: Comm, *, head_proxy=None,
                 dtype: torch.dtype = torch.float16, max_seq_len: int = 1024):
        check_tp(model, config, comm.world)
        if config is not None and config.head.select_blocks:
            # the exact mode is the exact global top-k at every stage, and DA-TOP-k is the distributed
            # form of block-local selection: the single-process yardstick selects exactly too
            config = replace(config, head=replace(config.head, select_blocks=0))
        super().__init__(model, config, head_proxy=head_proxy, dtype=dtype, max_seq_len=max_seq_len)
        if self.logit_map is not None:
            raise ValueError(f"tensor parallelism does not map the logits as this model does after its head "
                             f"({self.logit_map}); run it on one process (without --tp)")
        self.comm = comm
        self.mode = "dense"
        rank, world = comm.rank, comm.world
        q_heads, kv_heads = head_split(self.n_heads, self.n_kv, rank, world)
        hd, hq, hkv = self.head_dim, self.n_heads, self.n_kv
        kv_of_q = [h // (hq // hkv) for h in q_heads]  # each query head's kv head
        per_kv = len(q_heads) // len(kv_heads)
        if len(q_heads) % len(kv_heads) or kv_of_q != [kv_heads[i // per_kv] for i in range(len(q_heads))]:
            # the shard's query heads do not group evenly over its kv heads (a kv head split between
            # ranks): hold one kv head per query head, duplicates included, so that the engine's
            # grouped attention pairs them as it does everywhere else (a little more projection and cache)
            kv_heads = kv_of_q

        def rows(heads, base):
            return [base + h * hd + j for h in heads for j in range(hd)]

        qkv_rows = torch.tensor(rows(q_heads, 0) + rows(kv_heads, hq * hd) + rows(kv_heads, (hq + hkv) * hd))
        o_cols = torch.tensor(rows(q_heads, 0))
        for layer in self.layers:
            layer.qkv = layer.qkv.index_select(0, qkv_rows).contiguous()
            if layer.qkv_bias is not None:
                layer.qkv_bias = layer.qkv_bias.index_select(0, qkv_rows)
            layer.o = layer.o.index_select(1, o_cols).contiguous()
            if rank != 0:  # the all-reduce sums the ranks' outputs: the bias is added once
                layer.o_bias = None
        self.n_heads, self.n_kv = len(q_heads), len(kv_heads)
        self.heads = (q_heads, kv_heads)
        shape = (len(self.layers), self.n_kv, max_seq_len, hd)
        self.k_cache = torch.zeros(shape, dtype=dtype)
        self.v_cache = torch.zeros(shape, dtype=dtype)
        spec = arch_spec(model)
        self.tp_ffns = {}
        for layer in self.layers:
            mlp = getattr(layer.module, spec.mlp)
            weights = mlp.weights if isinstance(mlp, HiReFFN) else ffn_weights(spec, mlp)
            self.tp_ffns[id(layer.module)] = TPFFN(mlp, weights, comm, dtype)
        k = config.head.k if config is not None and config.head.enabled else 50
        self.tp_head = TPHead(self.head_weight, self.head, k, comm, dtype)

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode

    def attention_block(self, layer, index: int, x: torch.Tensor, start: int) -> torch.Tensor:
        # this rank's heads, then the sum over ranks  # x: (T, D) -> (T, D) float32
        return self.comm.all_reduce(super().attention_block(layer, index, x, start).float(), "attention")

    def ffn_block(self, layer: nn.Module, x: torch.Tensor, hire: bool) -> torch.Tensor:
        return self.tp_ffns[id(layer)](x, self.mode if hire else "dense")

    def logits(self, hidden: torch.Tensor, hire: bool):
        return self.tp_head(hidden, self.mode if hire else "dense")

    def log_prob(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.tp_head.log_prob(hidden, target)

    # --- measurement ---------------------------------------------------------------------------
    def track(self, on: bool) -> None:
        """Recall of DA-TOP-k against the exact global selection, accumulated on the next steps."""
        parts = list(self.tp_ffns.values()) + [self.tp_head]
        for part in parts:
            part.track = on
            if on:
                for name in ("hits", "kept", "recall_sum", "top1_sum", "steps"):
                    if hasattr(part, name):
                        setattr(part, name, 0.0 if name != "steps" else 0)

    def recall(self) -> dict:
        """FFN recall (summed over ranks and layers) and head recall@k / top-1 of the tracked steps."""
        ffns = [f for f in self.tp_ffns.values() if f.plan is not None]
        totals = torch.tensor([sum(f.hits for f in ffns), sum(f.kept for f in ffns)], dtype=torch.float64)
        self.comm.all_reduce(totals, "measurement")
        head = self.tp_head
        return {
            "ffn": float(totals[0] / totals[1]) if totals[1] > 0 else None,
            "head_recall_at_k": head.recall_sum / head.steps if head.steps else None,
            "head_top1": head.top1_sum / head.steps if head.steps else None,
        }
