"""Sampling past HiRE's candidates (hire.engine.sampling): temperature and top-p draws follow dense
sampling's law where the tail bound holds (chi-square against the dense probabilities, and failing
with the tail correction off); the sampler's pieces against torch references; the one exact head."""

from __future__ import annotations

import math
import time

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from hire.config import FFNConfig, HeadConfig, HiReConfig
from hire.engine import BatchDecoder, Engine
from hire.engine import sampling
from hire.engine.sampling import DensePolicy, SamplingStats, needs_tail, sample
from hire.layers.head import exact_logits
from hire.proxies import LowRankProxy
from tiny_models import VOCAB, WIDTH, make

DRAWS = 2000
PROMPT = torch.tensor([3, 17, 42, 5])


def _engine(rank: int = 8, candidates: int = 16, head_scale: float = 1.0, bias: bool = False) -> Engine:
    """A tiny Mistral (untied head) with a low-rank HiRE head of k' = ``candidates`` of 384 rows
    (with optimism, so the rows' error spreads are known) and dense FFNs."""
    model = make("mistral", seed=1)
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    if bias:
        model.lm_head.bias = torch.nn.Parameter(torch.randn(VOCAB))
    weight = model.lm_head.weight.detach()
    states = torch.randn(2000, WIDTH, generator=torch.Generator().manual_seed(2))
    proxy = LowRankProxy.from_weight(weight, rank, states=states, u_bits=8).with_optimism(weight, states, 2.0)
    head = HeadConfig(k=4, candidates=candidates, proxy="lowrank", rank=rank, optimism=2.0)
    return Engine(model, HiReConfig(head=head, ffn=FFNConfig(enabled=False)), head_proxy=proxy,
                  dtype=torch.float32, max_seq_len=32)


def _nucleus_probs(logits: torch.Tensor, top_p: float | None) -> torch.Tensor:
    """Dense sampling's law: softmax, restricted to the top-p nucleus as ``sample`` keeps it.
    # logits: (V,) -> (V,)"""
    probs = logits.float().softmax(-1)
    if top_p is None:
        return probs
    sorted_probs, order = probs.sort(descending=True)
    keep = sorted_probs.cumsum(0) - sorted_probs <= top_p
    out = torch.zeros_like(probs).scatter(0, order, sorted_probs * keep)
    return out / out.sum()


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, float]:
    """Pearson's statistic of ``counts`` against ``probs`` (tokens expected < 5 times pooled, and a
    draw where probs is 0 counts as infinitely unlikely) and its 0.9995 quantile (Wilson-Hilferty).
    # counts, probs: (V,) -> (statistic, quantile)"""
    n = counts.sum()
    if bool((counts[probs == 0] > 0).any()):
        return math.inf, 0.0
    expected = probs * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    obs, exp = obs[exp > 0], exp[exp > 0]
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = obs.numel() - 1
    z = 3.29  # the standard normal's 0.9995 quantile
    return stat, df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _draw_counts(engine: Engine, hidden, top_p: float | None, seed: int = 0, draws: int = DRAWS) -> torch.Tensor:
    """Counts of DRAWS tokens drawn as ``Engine.next_token`` draws them, the head's candidates and
    tail bound computed once (the hidden state does not change)."""
    gen = torch.Generator().manual_seed(seed)
    logits, idx = engine.logits(hidden, hire=True)
    tail = engine.tail(hidden, logits, idx)
    counts = torch.zeros(VOCAB)
    for _ in range(draws):
        counts[int(sample(logits, idx, 1.0, None, top_p, gen, tail, engine.sampling_stats))] += 1
    return counts


@pytest.mark.parametrize("top_p", [None, 0.9])
def test_next_token_is_sample_over_the_heads_logits_and_tail(top_p, always_reject):
    engine = _engine()
    hidden = engine.prefill(PROMPT)
    logits, idx = engine.logits(hidden, hire=True)
    tail = engine.tail(hidden, logits, idx)
    a, b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for _ in range(20):
        assert int(engine.next_token(hidden, True, 1.0, None, top_p, a)) == int(sample(logits, idx, 1.0, None, top_p, b, tail))


@pytest.fixture
def always_reject(monkeypatch):
    """Rejection sampling however loose the bound (no dense head in its place)."""
    monkeypatch.setattr(sampling, "TAIL_DENSE_SHARE", 1.0)


@pytest.mark.parametrize("top_p", [None, 0.9])
def test_temperature_and_top_p_draws_match_dense_sampling(top_p, always_reject):
    engine = _engine()
    hidden = engine.prefill(PROMPT)
    dense = engine.logits(hidden, hire=False)[0][0]
    logits, idx = engine.logits(hidden, hire=True)
    probs = _nucleus_probs(dense, top_p)
    # the candidates hold little of the mass: sampling among them alone is far from the law
    assert float(dense.softmax(-1)[idx[0]].sum()) < 0.5
    draws = DRAWS if top_p is None else DRAWS // 2  # a nucleus costs more (it grows past the candidates)
    stat, quantile = _chi_square(_draw_counts(engine, hidden, top_p, draws=draws), probs)
    summary = engine.sampling_stats.summary()
    assert summary["violations"] == 0, summary  # the bound held: the law is exact, so the test must pass
    assert stat < quantile, (stat, quantile, summary)
    if top_p is None:
        assert summary["tail_tokens"] > draws // 2
    else:  # every nucleus settled exactly (growing past the candidates) or by the dense head
        assert summary["nucleus_estimated"] == 0, summary
    engine.sample_tail = False  # the law before: the candidates only
    off, _ = _chi_square(_draw_counts(engine, hidden, top_p, draws=draws), probs)
    assert off > quantile


def test_top_p_nuclei_settled_from_a_tight_bound_match_dense_top_p():
    g = torch.Generator().manual_seed(3)
    vocab = 200
    exact = torch.randn(vocab, generator=g) * 1.5
    exact[40:] -= 12  # a far tail: its bound leaves no doubt where the nucleus ends
    bound = exact + 0.3 * torch.rand(vocab, generator=g)
    idx = (exact + 1.0 * torch.randn(vocab, generator=g)).topk(12).indices.view(1, -1)  # misses some of the best
    probs = _nucleus_probs(exact, 0.9)
    assert bool(probs[~torch.isin(torch.arange(vocab), idx[0])].sum() > 0.1)  # the nucleus reaches past them
    counts = {}
    for tail_on in (True, False):
        stats, gen, counts[tail_on] = SamplingStats(), torch.Generator().manual_seed(0), torch.zeros(vocab)
        tail = _Tail(exact, bound) if tail_on else None
        for _ in range(DRAWS // 2):
            counts[tail_on][int(sample(exact[idx[0]].view(1, -1), idx, 1.0, None, 0.9, gen, tail, stats))] += 1
        if tail_on:
            assert stats.nucleus_exact == DRAWS // 2 and stats.nucleus_grown == DRAWS // 2, stats.summary()
    stat, quantile = _chi_square(counts[True], probs)
    assert stat < quantile
    assert _chi_square(counts[False], probs)[0] > quantile


def test_greedy_and_top_k_never_build_a_tail():
    assert not needs_tail(torch.zeros(1, 4, dtype=torch.long), 0.0, None)
    assert not needs_tail(torch.zeros(1, 4, dtype=torch.long), 1.0, 40)
    assert not needs_tail(None, 1.0, None)  # dense logits: nothing is missing
    assert needs_tail(torch.zeros(1, 4, dtype=torch.long), 0.7, None)
    engine = _engine()
    engine.generate(PROMPT, 4)
    engine.generate(PROMPT, 4, temperature=1.0, top_k=5)
    assert engine.sampling_stats.steps == 0
    engine.generate(PROMPT, 4, temperature=1.0)
    stats = engine.sampling_stats  # a loose bound: the first step probes, DensePolicy skips the rest
    assert stats.steps + stats.skipped == 4 and stats.steps == 1


class _Tail:
    """A TailBound over given exact logits.  # exact, bound: (V,)"""

    def __init__(self, exact: torch.Tensor, bound: torch.Tensor):
        self.exact, self.bound = exact, bound.view(1, -1)

    def rows(self, rows):
        return self.exact[rows]

    def dense(self):
        return self.exact.view(1, -1)


def test_a_loose_bound_draws_from_the_dense_head():
    engine = _engine()
    hidden = engine.prefill(PROMPT)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        engine.next_token(hidden, True, 1.0, None, None, gen)
    stats = engine.sampling_stats
    assert stats.dense == 5 and stats.rows == 0  # tail share ~0.99 here: no proposals


def test_a_bound_that_fails_gives_the_law_min_exp_l_exp_a_and_is_counted(always_reject):
    g = torch.Generator().manual_seed(5)
    vocab = 40
    exact = torch.randn(vocab, generator=g) * 1.5
    bound = exact + torch.rand(vocab, generator=g)  # holds...
    bound[20:25] = exact[20:25] - 1.0  # ...except on five rows, each 1 logit too low
    idx = torch.arange(8).view(1, -1)
    law = torch.minimum(exact, bound)
    law[:8] = exact[:8]  # candidates: exact
    stats, gen, counts = SamplingStats(), torch.Generator().manual_seed(0), torch.zeros(vocab)
    for _ in range(4000):
        counts[int(sample(exact[:8].view(1, -1), idx, 1.0, None, None, gen, _Tail(exact, bound), stats))] += 1
    stat, quantile = _chi_square(counts, law.softmax(0))
    assert stat < quantile
    assert stats.violations > 0 and stats.max_violation == pytest.approx(1.0, abs=1e-5)
    wrong, _ = _chi_square(counts, exact.softmax(0))  # and it is not the softmax: the five rows are short
    assert wrong > quantile


@given(st.integers(0, 10_000), st.sampled_from([0.5, 0.9, 0.99]), st.floats(0.5, 3.0), st.integers(2, 30))
def test_top_p_draws_stay_in_the_dense_nucleus_unless_estimated(seed, top_p, temperature, candidates):
    # whenever the nucleus is settled exactly (or by the dense fallback) the token is in dense top-p's nucleus
    g = torch.Generator().manual_seed(seed)
    vocab = 60
    exact = torch.randn(vocab, generator=g) * 3
    bound = exact + torch.rand(vocab, generator=g) * 2
    order = exact.argsort(descending=True)
    idx = order[:candidates].view(1, -1)  # the proxy's candidates: here the true best
    stats = SamplingStats()
    token = int(sample(exact[idx[0]].view(1, -1), idx, temperature, None, top_p, torch.Generator().manual_seed(seed),
                       _Tail(exact, bound), stats))
    nucleus = _nucleus_probs(exact / temperature, top_p) > 0
    assert stats.violations == 0
    if stats.nucleus_estimated == 0:
        assert nucleus[token]
    assert stats.nucleus_exact + stats.nucleus_estimated + stats.nucleus_dense == 1


@given(st.integers(0, 10_000), st.floats(0.3, 2.0))
def test_rejection_draws_keep_the_support_and_count_rows(seed, temperature):
    sampling_share = sampling.TAIL_DENSE_SHARE
    sampling.TAIL_DENSE_SHARE = 1.0  # (hypothesis runs a test many times: no function-scoped fixture)
    try:
        _rejection_draws(seed, temperature)
    finally:
        sampling.TAIL_DENSE_SHARE = sampling_share


def _rejection_draws(seed, temperature):
    g = torch.Generator().manual_seed(seed)
    exact = torch.randn(30, generator=g)
    bound = exact + 0.5
    idx = torch.tensor([[3, 7, 11]])
    stats = SamplingStats()
    gen = torch.Generator().manual_seed(seed)
    for _ in range(5):
        token = int(sample(exact[idx[0]].view(1, -1), idx, temperature, None, None, gen, _Tail(exact, bound), stats))
        assert 0 <= token < 30
    assert stats.steps == 5 and stats.violations == 0
    assert stats.rows >= stats.tail_tokens + stats.rejections  # every tail proposal computed its row


def test_the_batch_decoder_samples_each_row_past_the_union(always_reject):
    engine = _engine(rank=8)
    decoder = BatchDecoder(engine, 3, dense_above=1.0)
    prompts = [PROMPT, torch.tensor([9, 8, 7])]
    slots = [decoder.acquire() for _ in prompts]
    hidden = torch.cat([decoder.prefill(s, p) for s, p in zip(slots, prompts)])
    logits, idx = decoder.logits(hidden, hire=True)
    dense, _ = decoder.logits(hidden, hire=False)
    for j in range(2):
        gen, counts = torch.Generator().manual_seed(j), torch.zeros(VOCAB)
        tail = decoder.tail(hidden[j : j + 1], logits[j : j + 1], idx[j : j + 1])
        for _ in range(DRAWS // 2):
            counts[int(sample(logits[j : j + 1], idx[j : j + 1], 1.0, None, None, gen, tail,
                              decoder.sampling_stats))] += 1
        stat, quantile = _chi_square(counts, dense[j].softmax(-1))
        assert stat < quantile, (j, stat, quantile)
    assert decoder.sampling_stats.violations == 0


def test_the_scheduler_samples_past_the_candidates():
    from hire.serve.scheduler import Sampling, Scheduler, Sequence

    engine = _engine(rank=8)
    decoder = BatchDecoder(engine, 2, dense_above=1.0)
    scheduler = Scheduler(decoder, hire=True)
    events = []
    seq = Sequence(PROMPT, 6, Sampling(temperature=1.0, seed=3), frozenset(), events.append)
    scheduler.start()
    try:
        scheduler.submit(seq)
        for _ in range(200):
            if events and events[-1][0] == "end":
                break
            time.sleep(0.05)
    finally:
        scheduler.stop()
    assert events[-1][:2] == ("end", "length")
    stats = decoder.sampling_stats  # a loose bound: the first step probes and falls back, the next 5 skip HiRE
    assert stats.steps + stats.skipped == 6 and (stats.steps, stats.dense) == (1, 1), stats.summary()


@pytest.mark.parametrize("native_kernels", [True, False])
def test_one_exact_head_float32_with_its_bias_on_every_path(native_kernels, monkeypatch):
    from hire import native

    if not native_kernels:
        monkeypatch.setattr(native, "usable", lambda w: False)
        monkeypatch.setattr(native, "available", lambda: False)
    engine = _engine(bias=True)
    hidden = engine.prefill(PROMPT)
    base = engine.head.base_layer
    want = hidden.double() @ base.weight.detach().double().T + base.bias.detach().double()  # (1, V)
    dense, none = engine.logits(hidden, hire=False)
    hire, idx = engine.logits(hidden, hire=True)
    rows = BatchDecoder(engine, 2, dense_above=1.0).logits(torch.cat([hidden, hidden]), hire=True)
    for got in (dense, hire, rows[0]):
        assert got.dtype == torch.float32
    assert none is None
    torch.testing.assert_close(dense.double(), want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(hire.double(), want[:, idx[0].clone()], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(rows[0][:1].double(), want[:, rows[1][0].clone()], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(exact_logits(hidden, engine.head.decode_weight, idx[0], base.bias), hire)
    log_p = engine.log_prob(hidden, torch.tensor([7]))
    assert float(log_p) == pytest.approx(float((want[0, 7] - want[0].logsumexp(0)).detach()), abs=1e-4)


def test_proxy_spread_round_trips_and_old_files_recover_it(tmp_path):
    from hire.calibrate import load_head_proxy, save_head_proxy

    weight = torch.randn(64, 16)
    states = torch.randn(200, 16)
    proxy = LowRankProxy.from_weight(weight, 4, states=states).with_optimism(weight, states, 3.0)
    assert proxy.spread is not None and proxy.spread.dtype == torch.float32
    torch.testing.assert_close(proxy.bias.float(), 3.0 * proxy.spread, rtol=1e-3, atol=1e-3)
    save_head_proxy(tmp_path / "new.safetensors", proxy, {"optimism": 3.0})
    torch.testing.assert_close(load_head_proxy(tmp_path / "new.safetensors").spread, proxy.spread)
    old = LowRankProxy(proxy.u, proxy.v, proxy.bias)  # a file written before the spread was kept
    save_head_proxy(tmp_path / "old.safetensors", old, {"optimism": 3.0})
    torch.testing.assert_close(load_head_proxy(tmp_path / "old.safetensors").spread, proxy.spread, rtol=1e-3, atol=1e-3)
    assert proxy.take_rows(torch.tensor([5, 2])).spread.tolist() == proxy.spread[[5, 2]].tolist()
    with pytest.raises(ValueError, match="row spread"):
        LowRankProxy(proxy.u, proxy.v, None, torch.ones(3))


# --- DensePolicy: the dense head where HiRE keeps falling back -------------------------------------


@pytest.mark.parametrize("top_p", [None, 0.9])
@pytest.mark.parametrize("loose", [True, False])
def test_draws_with_the_dense_policy_match_dense_sampling(top_p, loose, monkeypatch):
    """Drawn as generate draws (next_token with a policy), the law is dense sampling's: with a loose
    bound most draws skip HiRE (dense head), with rejection forced every draw probes it."""
    if not loose:
        monkeypatch.setattr(sampling, "TAIL_DENSE_SHARE", 1.0)
    engine = _engine()
    hidden = engine.prefill(PROMPT)
    probs = _nucleus_probs(engine.logits(hidden, hire=False)[0][0], top_p)
    gen, policy, counts = torch.Generator().manual_seed(4), DensePolicy(3), torch.zeros(VOCAB)
    draws = DRAWS if top_p is None else DRAWS // 2
    for _ in range(draws):
        counts[int(engine.next_token(hidden, True, 1.0, None, top_p, gen, policy))] += 1
    stats = engine.sampling_stats
    stat, quantile = _chi_square(counts, probs)
    assert stat < quantile, (stat, quantile, stats.summary())
    assert stats.steps + stats.skipped == draws and stats.violations == 0
    if loose:  # every probe fell back (top-p: grew the nucleus over most rows): 1 probe, 2 skipped steps
        assert stats.steps == -(-draws // 3) and stats.skipped == draws - stats.steps
    elif top_p is None:  # rejection sampling: nothing fell back to the head; few skipped steps (after the
        # rare draw whose rejections read more than half the rows)
        assert stats.fallbacks == 0 and stats.skipped < draws // 100 and stats.tail_tokens > draws // 2


@pytest.mark.parametrize("top_p", [None, 0.9])
def test_a_loose_run_goes_dense_after_its_first_step(top_p):
    engine = _engine()  # tail share ~0.99: every probe falls back to the whole head
    engine.generate(PROMPT, 17, temperature=1.0, top_p=top_p)
    stats = engine.sampling_stats
    assert (stats.steps, stats.skipped) == (3, 14), stats.summary()  # probes at 0, 8, 16, each falling back
    engine.sampling_stats, engine.probe_every = SamplingStats(), 1  # the policy off: every step probes
    engine.generate(PROMPT, 17, temperature=1.0, top_p=top_p)
    assert (engine.sampling_stats.steps, engine.sampling_stats.skipped) == (17, 0)


def test_a_run_whose_candidates_hold_the_mass_stays_on_hire():
    engine = _engine(candidates=64, rank=WIDTH, head_scale=6.0)  # an exact proxy, a peaked head
    engine.generate(PROMPT, 17, temperature=1.0)
    stats = engine.sampling_stats
    assert (stats.steps, stats.skipped, stats.fallbacks) == (17, 0, 0), stats.summary()
    assert stats.tail_share / stats.steps < sampling.TAIL_DENSE_SHARE


def test_greedy_and_top_k_do_no_extra_work_under_the_policy(monkeypatch):
    import hire.engine.engine as engine_module

    engine = _engine()
    runs = {}
    for probe_every in (1, 8):
        engine.probe_every = probe_every
        runs[probe_every] = [engine.generate(PROMPT, 12).token_ids,
                             engine.generate(PROMPT, 12, temperature=1.0, top_k=5, seed=2).token_ids]
    assert runs[1] == runs[8]

    def forbidden(*args, **kwargs):
        raise AssertionError("greedy / top-k built a tail or a dense head")

    monkeypatch.setattr(engine.head, "tail", forbidden)
    monkeypatch.setattr(engine_module, "exact_logits", forbidden)
    engine.sampling_stats = SamplingStats()
    assert engine.generate(PROMPT, 12).token_ids == runs[8][0]
    assert engine.generate(PROMPT, 12, temperature=1.0, top_k=5, seed=2).token_ids == runs[8][1]
    assert engine.sampling_stats == SamplingStats()  # no probe, no skipped step


def test_dense_policy_rejects_a_probe_interval_below_one():
    with pytest.raises(ValueError, match="probe_every must be >= 1"):
        DensePolicy(0)
    policy, stats = DensePolicy(3), SamplingStats()
    for change, dense_after in ((dict(dense=1), True), (dict(nucleus_dense=1), True), (dict(rows=51), True),
                                (dict(rows=50), False), (dict(), False)):
        policy.mark(stats)
        for k, v in change.items():
            setattr(stats, k, getattr(stats, k) + v)
        policy.probed(stats, vocab=100)  # more than half of the rows read counts as falling back
        assert [policy.dense_now() for _ in range(3)] == ([True, True, False] if dense_after else [False] * 3)
