"""Several sequences decoding together (continuous batching): a KV cache slot per sequence and one
decode step for all of them.

B sequences that share a decode step read each weight once for B tokens (``DecodeModel.step_batch``,
whose quantized products are ``qgemv_batch``); on a machine where the step is bound by memory that
makes B tokens cost little more than one (on this project's 2 cores the int16-activation products
are bound by arithmetic too: 8 tokens cost ~4.5x one, benchmarks/batch_step.py). HiRE's rows then stop being one token's: the head computes the exact logits of
the *union* of the B rows' candidates for every row, and a sparse FFN the union of their selected
neurons. The union grows with B, and with it the rows read; past ``dense_above`` of the head's
rows the step reads them all (a scattered read of most rows costs more than the dense one), and
a step of ``dense_batch`` or more sequences reads them all without selecting (each row's selection
costs as much as a token's whole head at batch 1: past some batch size the dense head is cheaper).
``UnionStats`` counts what the unions were.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hire.engine.engine import Engine
from hire.engine.logprobs import TokenLogprobs, token_logprobs


@dataclass
class UnionStats:
    """The HiRE unions of the steps since it was made (sums, for means over steps; a new one starts over)."""

    steps: int = 0  # batched head evaluations
    rows: int = 0  # sequences over those steps (sum of the batch sizes)
    head_union: int = 0  # head rows computed exactly (the union of the rows' candidates), summed over steps
    head_candidates: int = 0  # one row's candidates (k'), summed over steps
    head_dense: int = 0  # steps whose union passed dense_above and read every row
    batch_dense: int = 0  # steps of dense_batch or more sequences (dense head, no selection, not in the sums)
    ffn_union: int = 0  # FFN neurons computed, summed over layers and steps (the native step's count)
    ffn_layer_steps: int = 0

    def summary(self, vocab: int | None = None) -> dict:
        out = {"steps": self.steps, "mean_batch": self.rows / self.steps if self.steps else 0.0,
               "head_dense_steps": self.head_dense, "batch_dense_steps": self.batch_dense}
        if self.head_candidates:
            out["head_union_mean"] = self.head_union / self.steps
            out["head_union_over_candidates"] = self.head_union / self.head_candidates
            if vocab:
                out["head_union_share"] = self.head_union / self.steps / vocab
        if self.ffn_layer_steps:
            out["ffn_union_mean"] = self.ffn_union / self.ffn_layer_steps
        return out


class BatchDecoder:
    """Up to ``slots`` sequences over one ``Engine``'s weights, each in its own KV cache slot.

    ``acquire``/``release`` hand out slots; ``prefill`` runs one sequence's prompt densely into
    its slot; ``step`` runs one token of each of several sequences; ``logits`` gives their next
    tokens' logits (HiRE: over the union of their candidates). Without the native kernels each
    row runs the engine's eager step alone (the same tokens, no shared reads, no unions).
    """

    def __init__(self, engine: Engine, slots: int, *, dense_above: float = 0.5, dense_batch: int | None = None):
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        if not 0.0 < dense_above <= 1.0:
            raise ValueError(f"dense_above must be in (0, 1] (a share of the head's rows), got {dense_above}")
        if dense_batch is not None and dense_batch < 1:
            raise ValueError(f"dense_batch must be >= 1 (or None: never), got {dense_batch}")
        self.engine = engine
        self.slots = slots
        self.dense_above = dense_above
        self.dense_batch = dense_batch
        shape = (slots, *engine.k_cache.shape)  # (slots, L, Hkv, S, hd)
        self.k = torch.zeros(shape, dtype=engine.k_cache.dtype)
        self.v = torch.zeros(shape, dtype=engine.v_cache.dtype)
        self.free = list(range(slots - 1, -1, -1))  # slot 0 handed out first
        self.stats = UnionStats()

    @property
    def max_seq_len(self) -> int:
        return self.engine.max_seq_len

    @property
    def vocab_size(self) -> int:
        w = self.engine.head_weight
        return w.shape[0]

    def acquire(self) -> int:
        if not self.free:
            raise RuntimeError(f"all {self.slots} slots are in use")
        return self.free.pop()

    def release(self, slot: int) -> None:
        if slot in self.free or not 0 <= slot < self.slots:
            raise ValueError(f"slot {slot} is not in use")
        self.free.append(slot)

    @torch.inference_mode()
    def prefill(self, slot: int, prompt: torch.Tensor, start: int = 0) -> torch.Tensor:
        """The prompt's keys and values into ``slot`` from position ``start`` (the earlier positions
        already there: a prompt in chunks); the last position's hidden state.
        # prompt: (T,) -> (1, D)"""
        prompt = prompt.reshape(-1)
        if not (0 < prompt.numel() and 0 <= start and start + prompt.numel() < self.max_seq_len):
            raise ValueError(f"a prompt of {start + prompt.numel()} tokens does not fit a context of {self.max_seq_len}")
        return self.engine.prefill(prompt, (self.k, self.v), slot, start)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, positions: list[int], slots: list[int], hire: bool) -> torch.Tensor:
        """One token of each sequence: token j at position positions[j] of slot slots[j].
        # tokens: (B,) -> final-normed hidden (B, D)"""
        e = self.engine
        h = e.embed_tokens(tokens.reshape(-1))  # (B, D)
        if e.native_steps is not None:
            step = e.native_steps[hire]
            out = step.step_batch(h, torch.tensor(positions), torch.tensor(slots), self.k, self.v)
            if hire:
                union, layer_steps = step.take_union()
                self.stats.ffn_union += union
                self.stats.ffn_layer_steps += layer_steps
            return out.to(e.dtype)
        rows = []
        for j, (pos, slot) in enumerate(zip(positions, slots)):
            with e.using_cache(self.k[slot], self.v[slot]):
                rows.append(e.eager_forward(h[j : j + 1], pos, hire))
        return torch.cat(rows)

    def can_fuse_prefill(self, hire: bool) -> bool:
        """Whether a prompt's chunk can ride in the running sequences' decode step (``step_with_prefill``):
        a native step whose layers are the dense prefill's (no HiRE FFN when ``hire``)."""
        return self.engine.native_steps is not None and not (hire and self.engine.ffns)

    @torch.inference_mode()
    def step_with_prefill(self, tokens: torch.Tensor, positions: list[int], slots: list[int], hire: bool,
                          chunk: torch.Tensor, chunk_slot: int, chunk_start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``step`` of the running sequences and the next ``chunk`` of a prompt (its tokens at positions
        chunk_start.. of ``chunk_slot``) in one native call: each layer's weights are read once for both
        (``can_fuse_prefill`` says when). Returns the sequences' hidden states and the chunk's last.
        # tokens: (B,), chunk: (T,) -> (B, D), (1, D)"""
        chunk = chunk.reshape(-1)
        if not (0 <= chunk_start and chunk_start + chunk.numel() < self.max_seq_len):
            raise ValueError(f"a prompt of {chunk_start + chunk.numel()} tokens does not fit a context of "
                             f"{self.max_seq_len}")
        e, b = self.engine, tokens.numel()
        h = e.embed_tokens(torch.cat([tokens.reshape(-1), chunk]))
        pos = torch.tensor(list(positions) + list(range(chunk_start, chunk_start + chunk.numel())))
        slot = torch.tensor(list(slots) + [chunk_slot] * chunk.numel())
        step = e.native_steps[hire]
        out = step.step_batch(h, pos, slot, self.k, self.v)
        if hire:
            union, layer_steps = step.take_union()
            self.stats.ffn_union += union
            self.stats.ffn_layer_steps += layer_steps
        return out[:b].to(e.dtype), out[-1:].to(e.dtype)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor, hire: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each row's exact logits over the union of the rows' head candidates (HiRE), or over the
        whole vocabulary (dense, or a union past ``dense_above``).
        # hidden: (B, D) -> logits (B, m), token ids (B, m) or None for the whole vocabulary"""
        head = self.engine.head
        if not (hire and head is not None):
            return self._rows(hidden, None), None
        if self.dense_batch is not None and hidden.shape[0] >= self.dense_batch:
            self.stats.batch_dense += 1
            return self._rows(hidden, None), None
        union, candidates = head.select_union(hidden)  # (m,) ascending; one pass over the proxy for all rows
        s = self.stats
        s.steps += 1
        s.rows += hidden.shape[0]
        s.head_union += union.numel()
        s.head_candidates += candidates
        if union.numel() > self.dense_above * self.vocab_size:
            s.head_dense += 1
            return self._rows(hidden, None), None
        return self._rows(hidden, union), union.expand(hidden.shape[0], -1)

    def tail(self, hidden: torch.Tensor, logits: torch.Tensor, idx: torch.Tensor | None):
        """One row's TailBound past its candidates ``idx`` (the union), for temperature and top-p
        sampling (``Engine.tail``; None for a dense step or with the engine's ``sample_tail`` off).
        # hidden: (1, D), logits/idx: (1, m)"""
        return self.engine.tail(hidden, logits, idx)

    def token_logprobs(self, hidden: torch.Tensor, logits: torch.Tensor, idx: torch.Tensor | None, token: int,
                       top: int) -> TokenLogprobs:
        """One row's ``token`` log-probability and its ``top`` best alternatives over the whole
        vocabulary (hire.engine.logprobs: exact on a dense step; over the union ``idx``, the tail of
        the normaliser from the head's proxy).  # hidden: (1, D), logits/idx: (1, m)"""
        head = self.engine.head
        return token_logprobs(
            logits, idx, token, top,
            tail_scores=None if idx is None else (lambda: head.log_mass(hidden, logits, idx)),
            exact_row=lambda t: float(self._rows(hidden, torch.tensor([t]))[0, 0]))

    def rows(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Exact logits of the head rows ``rows`` only (a grammar's few allowed tokens).
        # hidden: (b, D), rows: (m,) -> (b, m)"""
        return self._rows(hidden, rows)

    def dense_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Exact logits over the whole vocabulary for rows that sample the dense head (a sequence whose
        DensePolicy skips HiRE this step, hire.engine.sampling).  # hidden: (b, D) -> (b, V)"""
        return self._rows(hidden, None)

    @property
    def sampling_stats(self):
        """The engine's SamplingStats: what the tail-corrected sampler did (hire.engine.sampling)."""
        return self.engine.sampling_stats

    def _rows(self, hidden: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """float32 logits of the head rows ``rows`` (None: all): the engine's exact head (Engine.dense_logits).
        # hidden: (B, D), rows: (m,) -> (B, m)"""
        return self.engine.dense_logits(hidden, rows)
