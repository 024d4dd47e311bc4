"""Sampling on device tensors, over a candidate set or all logits; past the candidates with a tail bound.

HiRE's head computes exact logits for its k' candidates only. Greedy and top-k sampling need nothing
else (exact whenever the candidates hold the winners). Temperature sampling and top-p need the whole
vocabulary; ``sample`` with a ``tail`` (hire.layers.head.TailBound: an upper bound a_i on every row's
logit from the first-pass proxy, and exact rows on demand) accounts for it (docs/sampling.md):

- temperature (top_p 1): rejection sampling (or the whole head, where the bound puts more than
  ``TAIL_DENSE_SHARE`` of the proposal on the tail: rejections would cost more). Propose i ~ q, q_i proportional to exp(l_i / T) on the
  candidates S and exp(a_i / T) on the tail; a tail proposal computes its exact logit l_i (one row) and
  is accepted with probability min(1, exp((l_i - a_i) / T)). The law drawn is proportional to
  min(exp(l_i / T), exp(a_i / T)): exact wherever l_i <= a_i on the tail.
- top-p: the nucleus needs Z = Z_S + Z_tail, and Z_tail lies in [0, sum of exp(a_i / T)]. When both
  ends give the same nucleus, inside S, and every tail bound is below its last logit, the nucleus is
  exact; else the ``GROW_ROWS`` tail rows with the highest bounds join S (exact logits) and it is tried again; past
  ``NUCLEUS_GROW`` rounds Z_tail is estimated by importance sampling of the tail (the one inexact
  step, counted), and where even that nucleus could reach the tail the whole head is computed.

``SamplingStats`` counts what happened, violations of the bound included: the sampler says how far it is.

Where the bound is loose (SmolLM2 on its own samples: 63 of 64 steps past ``TAIL_DENSE_SHARE``), a step
pays for the HiRE selection, the candidates and the bound's second proxy pass and then computes the
whole head anyway. ``DensePolicy`` (one per sequence) skips that: after a step that fell back to the
whole head, the next ``probe_every - 1`` steps compute the dense logits directly and sample them (exact,
one dense head), and the step after probes HiRE again; a probe that stays on the candidates keeps the
sequence on HiRE. The law stays exact: a dense step samples the exact logits, and whether a step is
dense is decided before it from earlier steps only, never from the step's own draws, so conditioned on
the history each step's law is the one the sampler would draw anyway (the dense head's, or the probe's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

TRIALS = 32  # rejection trials drawn together (one tail draw and one exact-rows call for all of them)
# temperature: where the proposal puts more than this share of its mass on the tail, the whole head is
# computed instead (exact, one dense head): a loose bound there means many rejections, each a draw over
# the vocabulary (SmolLM2 at T 1 on its own samples, margin 8: tail share 0.98, ~340 rejections a token)
TAIL_DENSE_SHARE = 0.5
NUCLEUS_GROW = 4  # top-p: rounds of adding tail rows (highest bounds first) before estimating Z_tail
GROW_ROWS = 256  # rows added per round (SmolLM2's k' of 3,584 per round read 12,700 rows a token: too many)
ESTIMATE_DRAWS = 64  # top-p: tail rows drawn to estimate Z_tail (importance sampling against the bound)
# after a step that fell back to the whole head, the steps until HiRE is probed again (DensePolicy). A
# failed probe costs ~0.5 of a dense decode step on top of it (SmolLM2: 8.6 ms a token against 5.8 dense)
# and a step that stays on HiRE saves ~0.1 of one (5.2 ms greedy): probing every 8th step bounds the
# waste of a sequence that stays loose to ~6 % of a dense step, and one whose candidates come to hold
# the mass again is back on HiRE within 8 tokens
PROBE_EVERY = 8
# a probe that computed more tail rows than this share of the vocabulary counts as falling back too: a
# scattered read of most rows costs more than the dense head (BatchDecoder's dense_above, the same 0.5)
DENSE_ROWS_SHARE = 0.5


@dataclass
class SamplingStats:
    """What the tail-corrected sampler did since it was made (sums; a new one starts over)."""

    steps: int = 0  # tokens sampled with a tail
    tail_share: float = 0.0  # sum over steps of the proposal's tail mass / its whole mass
    tail_tokens: int = 0  # tokens drawn from outside the candidates
    rows: int = 0  # tail rows whose exact logit was computed (proposals, nucleus growth, estimates)
    rejections: int = 0  # rejected tail proposals
    dense: int = 0  # temperature draws made over the whole head (the tail share above TAIL_DENSE_SHARE)
    violations: int = 0  # computed tail rows whose exact logit exceeded its bound (inexact there)
    max_violation: float = 0.0  # the largest exact logit - bound seen, in logits
    nucleus_exact: int = 0  # top-p steps whose nucleus was settled exactly (maybe after growing)
    nucleus_grown: int = 0  # of those, the ones that needed tail rows added
    nucleus_estimated: int = 0  # top-p steps that used the estimate of Z_tail (inexact)
    nucleus_dense: int = 0  # top-p steps that computed the whole head
    skipped: int = 0  # steps DensePolicy sampled from the dense head without probing HiRE (not in steps)

    @property
    def fallbacks(self) -> int:
        """Steps that computed the whole head after probing HiRE (temperature and top-p)."""
        return self.dense + self.nucleus_dense

    def summary(self) -> dict:
        proposals = self.tail_tokens + self.rejections
        return {"steps": self.steps, "tail_share_mean": self.tail_share / self.steps if self.steps else 0.0,
                "tail_tokens": self.tail_tokens, "rows_per_step": self.rows / self.steps if self.steps else 0.0,
                "acceptance": self.tail_tokens / proposals if proposals else 1.0, "dense": self.dense,
                "violations": self.violations,
                "max_violation": self.max_violation, "nucleus_exact": self.nucleus_exact,
                "nucleus_grown": self.nucleus_grown, "nucleus_estimated": self.nucleus_estimated,
                "nucleus_dense": self.nucleus_dense, "skipped": self.skipped}


@dataclass
class DensePolicy:
    """One sequence's choice between probing HiRE and the dense head for temperature / top-p steps
    (module docstring). ``dense_now`` before a step (from past steps only), ``probed`` after a probe."""

    probe_every: int = PROBE_EVERY  # 1: probe every step (the policy off)
    wait: int = 0  # dense steps left before the next probe
    _mark: tuple[int, int] = (0, 0)  # the stats' fallbacks and rows before the probe

    def __post_init__(self):
        if self.probe_every < 1:
            raise ValueError(f"probe_every must be >= 1 (1: probe HiRE on every step), got {self.probe_every}")

    def dense_now(self) -> bool:
        """True when this step should sample the dense head without probing (counts the step down)."""
        if self.wait > 0:
            self.wait -= 1
            return True
        return False

    def mark(self, stats: SamplingStats) -> None:
        """Before a probe (``sample`` with a tail, counting into ``stats``)."""
        self._mark = (stats.fallbacks, stats.rows)

    def probed(self, stats: SamplingStats, vocab: int) -> None:
        """After a probe: one that fell back to the whole head, or read more than DENSE_ROWS_SHARE of its
        rows, makes the next probe_every - 1 steps dense; one that stayed on the candidates keeps probing."""
        fallbacks, rows = self._mark
        fell_back = stats.fallbacks > fallbacks or stats.rows - rows > DENSE_ROWS_SHARE * vocab
        self.wait = self.probe_every - 1 if fell_back else 0


def needs_tail(idx: torch.Tensor | None, temperature: float, top_k: int | None) -> bool:
    """True when a draw over candidates ``idx`` depends on the rows outside them: temperature
    sampling without top-k (greedy and top-k are exact when the candidates hold the winners)."""
    return idx is not None and temperature > 0 and top_k is None


def sample(
    logits: torch.Tensor,
    idx: torch.Tensor | None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    tail=None,
    stats: SamplingStats | None = None,
) -> torch.Tensor:
    """Next token id as a (1,) tensor. ``idx`` maps candidate positions to token ids (None: identity).

    Greedy for temperature 0; else softmax(logits / T) restricted to the top_k and the top_p
    nucleus, sampled with the exponential-race trick (argmax of p / Exp(1)), which needs no sort
    of the full vocabulary and no synchronisation. With a ``tail`` (hire.layers.head.TailBound of
    this token) and ``needs_tail``, the draw accounts for the rows outside the candidates (see the
    module docstring; it synchronises to accept or reject); without one it is over the candidates only.
    # logits: (1, m), idx: (1, m) or None -> (1,)
    """
    if tail is not None and needs_tail(idx, temperature, top_k):
        return _sample_with_tail(logits, idx, temperature, top_p, generator, tail, stats or SamplingStats())
    if temperature <= 0:
        pos = logits.argmax(-1)
    else:
        scaled = logits.float() / temperature
        if top_k is not None and top_k < scaled.shape[-1]:
            kth = scaled.topk(top_k, dim=-1).values[..., -1:]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        probs = scaled.softmax(-1)
        if top_p is not None and top_p < 1.0:
            sorted_probs, order = probs.sort(-1, descending=True)
            drop = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the smallest set reaching top_p
            probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
        race = torch.empty_like(probs).exponential_(1, generator=generator)
        pos = (probs / race).argmax(-1)
    return pos if idx is None else idx.gather(-1, pos.unsqueeze(-1))[:, 0]


def _sample_with_tail(logits, idx, temperature, top_p, generator, tail, stats) -> torch.Tensor:
    # logits, idx: (1, m) -> (1,)
    scaled = logits[0].float() / temperature  # (m,)
    ids = idx[0]
    bound = tail.bound[0].float() / temperature  # (V,)
    bound = bound.index_fill(0, ids, float("-inf"))  # the candidates' logits are known exactly
    stats.steps += 1
    if top_p is None or top_p >= 1.0:
        return _rejection(scaled, ids, bound, temperature, generator, tail, stats).view(1)
    return _nucleus(scaled, ids, bound, temperature, top_p, generator, tail, stats).view(1)


def _exact_tail(rows, bound, temperature, tail, stats) -> torch.Tensor:
    """Exact scaled logits of tail ``rows``, counting the rows whose bound they exceed.
    # rows: (t,), bound: (V,) -> (t,)"""
    exact = tail.rows(rows).float() / temperature
    over = exact - bound[rows]
    stats.rows += rows.numel()
    worst = float(over.max()) if rows.numel() else 0.0
    if worst > 0:
        stats.violations += int((over > 0).sum())
        stats.max_violation = max(stats.max_violation, worst * temperature)
    return exact


def _rejection(scaled, ids, bound, temperature, generator, tail, stats) -> torch.Tensor:
    """Rejection sampling (module docstring). Trials are drawn ``TRIALS`` at a time; the first that is
    a candidate draw or an accepted tail proposal wins, as in one trial after another.
    # scaled: (m,), ids: (m,), bound: (V,) -> () token id"""
    lse_s, lse_t = torch.logsumexp(scaled, 0), torch.logsumexp(bound, 0)
    p_tail = float(torch.sigmoid(lse_t - lse_s))  # the proposal's tail mass over its whole mass
    stats.tail_share += p_tail
    if p_tail > TAIL_DENSE_SHARE:
        stats.dense += 1
        return sample(tail.dense(), None, temperature, None, None, generator)[0]
    tail_probs = None
    while True:
        is_tail = torch.rand(TRIALS, generator=generator) < p_tail
        first_s = TRIALS if bool(is_tail.all()) else int((~is_tail).nonzero()[0, 0])
        if first_s:  # the tail proposals before the first candidate draw
            if tail_probs is None:
                tail_probs = (bound - lse_t).exp()
            rows = torch.multinomial(tail_probs, first_s, replacement=True, generator=generator)  # (t,)
            exact = _exact_tail(rows, bound, temperature, tail, stats)
            accept = torch.rand(first_s, generator=generator) < (exact - bound[rows]).exp()
            if bool(accept.any()):
                j = int(accept.nonzero()[0, 0])
                stats.rejections += j
                stats.tail_tokens += 1
                return rows[j]
            stats.rejections += first_s
        if first_s < TRIALS:
            pos = torch.multinomial(scaled.softmax(0), 1, generator=generator)
            return ids[pos[0]]


def _nucleus_size(cum_before: torch.Tensor, top_p: float, share: float) -> int:
    """How many of the sorted candidates the nucleus keeps when they hold ``share`` of Z: each token
    whose preceding mass is at most top_p (as ``sample`` keeps them).  # cum_before: (m,) fractions of Z_S"""
    return int((cum_before * share <= top_p).sum())


def _nucleus(scaled, ids, bound, temperature, top_p, generator, tail, stats) -> torch.Tensor:
    # scaled: (m,), ids: (m,), bound: (V,) -> () token id
    kept = _settle_nucleus(scaled, ids, bound, temperature, top_p, generator, tail, stats)
    if kept is None:  # the whole head, exact
        return sample(tail.dense(), None, temperature, None, top_p, generator)[0]
    kept_ids, kept_scaled = kept
    return kept_ids[torch.multinomial(kept_scaled.softmax(0), 1, generator=generator)[0]]


def top_p_nucleus(logits: torch.Tensor, idx: torch.Tensor, temperature: float, top_p: float,
                  generator: torch.Generator | None, tail, stats: SamplingStats | None = None):
    """The nucleus ``sample`` draws from with a ``tail`` (for measuring it: benchmarks/sampling.py):
    its token ids and their logits / temperature, or None where the whole head decides it.
    # logits, idx: (1, m) -> ((j,), (j,)) or None"""
    scaled = logits[0].float() / temperature
    bound = (tail.bound[0].float() / temperature).index_fill(0, idx[0], float("-inf"))
    return _settle_nucleus(scaled, idx[0], bound, temperature, top_p, generator, tail, stats or SamplingStats())


def _settle_nucleus(scaled, ids, bound, temperature, top_p, generator, tail, stats):
    """top-p with the tail: the nucleus settled exactly where the bound allows (module docstring).
    # scaled: (m,), ids: (m,), bound: (V,) -> (ids (j,), scaled (j,)) or None for the dense head"""
    for round_ in range(NUCLEUS_GROW + 1):
        lse_s, lse_t = torch.logsumexp(scaled, 0), torch.logsumexp(bound, 0)
        probs, order = scaled.softmax(0).sort(descending=True)
        cum_before = probs.cumsum(0) - probs
        low_share = float(torch.sigmoid(lse_s - lse_t))  # Z_S / (Z_S + sum exp(a)): the least S can hold
        size = _nucleus_size(cum_before, top_p, 1.0)  # Z_tail = 0
        size_hi = _nucleus_size(cum_before, top_p, low_share)  # Z_tail at its bound
        a_max = float(bound.max())
        settled = size < scaled.numel() or a_max == float("-inf")  # else the nucleus may reach the tail
        if size == size_hi and settled and a_max < float(scaled[order[size - 1]]):
            stats.nucleus_exact += 1
            stats.nucleus_grown += round_ > 0
            return ids[order[:size]], scaled[order[:size]]
        if round_ == NUCLEUS_GROW or a_max == float("-inf"):
            break
        rows = bound.topk(min(GROW_ROWS, int(torch.isfinite(bound).sum()))).indices  # the highest bounds join S
        scaled = torch.cat([scaled, _exact_tail(rows, bound, temperature, tail, stats)])
        ids = torch.cat([ids, rows])
        bound = bound.index_fill(0, rows, float("-inf"))
    # Z_tail by importance sampling against the bound (M_t mean(exp(l - a))), unless no Z_tail could
    # settle it: a larger Z_tail only widens the nucleus, lowering its last logit below a_max
    if size < scaled.numel() and a_max < float(scaled[order[size - 1]]):
        rows = torch.multinomial((bound - lse_t).exp(), ESTIMATE_DRAWS, replacement=True, generator=generator)
        exact = _exact_tail(rows, bound, temperature, tail, stats)
        lse_tail = lse_t + torch.logsumexp(exact - bound[rows], 0) - math.log(ESTIMATE_DRAWS)
        size = _nucleus_size(cum_before, top_p, float(torch.sigmoid(lse_s - lse_tail)))
        if size < scaled.numel() and a_max < float(scaled[order[size - 1]]):
            stats.nucleus_estimated += 1
            return ids[order[:size]], scaled[order[:size]]
    stats.nucleus_dense += 1
    return None
