"""hire.engine.logprobs: log-probabilities over the whole vocabulary from a dense step (exact) or a
HiRE step (exact candidates, the normaliser's tail from the proxy), against log_softmax."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hire.engine.logprobs import MAX_TOP, token_logprobs


@settings(max_examples=60, deadline=None)
@given(vocab=st.integers(2, 300), keep=st.floats(0.05, 1.0), top=st.integers(0, MAX_TOP), seed=st.integers(0, 2**16),
       scale=st.sampled_from([0.1, 1.0, 10.0, 50.0]))
def test_with_an_exact_proxy_every_step_is_log_softmax(vocab, keep, top, seed, scale):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, vocab, generator=g) * scale
    want = torch.log_softmax(logits.double(), -1)[0]
    m = max(1, int(keep * vocab))
    idx = torch.randperm(vocab, generator=g)[:m].sort().values[None]  # candidates in vocabulary order
    token = int(torch.randint(0, vocab, (1,), generator=g))
    exact_rows: list[int] = []

    def exact_row(t: int) -> float:
        exact_rows.append(t)
        return float(logits[0, t])

    dense = token_logprobs(logits, None, token, top)
    hire = token_logprobs(logits.gather(1, idx), idx, token, top, tail_scores=lambda: logits, exact_row=exact_row)
    for got in (dense, hire):
        assert got.logprob == pytest.approx(float(want[token]), abs=1e-4)
    assert dense.tail_share == 0.0
    assert hire.tail_share == pytest.approx(float(want[[i for i in range(vocab) if i not in set(idx[0].tolist())]]
                                                  .exp().sum()) if m < vocab else 0.0, abs=1e-5)
    assert exact_rows == ([] if token in set(idx[0].tolist()) else [token])  # a token past the candidates: its own row
    best = torch.topk(want, min(top, vocab))
    assert [t for t, _ in dense.top] == best.indices.tolist() or torch.allclose(
        torch.tensor([lp for _, lp in dense.top]).double(), best.values, atol=1e-5)  # ties may swap ids
    for t, lp in dense.top:
        assert lp == pytest.approx(float(want[t]), abs=1e-4)
    for t, lp in hire.top:  # the candidates' best, never a tail row
        assert t in set(idx[0].tolist()) and lp == pytest.approx(float(want[t]), abs=1e-4)


def test_a_proxy_that_underrates_the_tail_shows_in_the_tail_share():
    logits = torch.tensor([[5.0, 4.0, 1.0, 1.0, 1.0]])
    idx = torch.tensor([[0, 1]])
    low = token_logprobs(logits[:, :2], idx, 0, 2, tail_scores=lambda: logits - 20)
    exact = token_logprobs(logits[:, :2], idx, 0, 2, tail_scores=lambda: logits)
    assert low.tail_share < 1e-8 < exact.tail_share
    assert low.logprob > exact.logprob  # a smaller normaliser: the candidates' logprobs rise
    assert exact.logprob == pytest.approx(float(torch.log_softmax(logits, -1)[0, 0]), abs=1e-6)


def test_bad_requests_are_named():
    logits = torch.zeros(1, 4)
    with pytest.raises(ValueError, match="top must be in"):
        token_logprobs(logits, None, 0, MAX_TOP + 1)
    with pytest.raises(ValueError, match="needs the proxy's scores"):
        token_logprobs(logits[:, :2], torch.tensor([[0, 1]]), 0, 1)
    with pytest.raises(ValueError, match="not among the candidates"):
        token_logprobs(logits[:, :2], torch.tensor([[0, 1]]), 3, 1, tail_scores=lambda: logits)


def test_the_proxy_s_tail_mass_counts_its_error_s_variance():
    """A low-rank proxy's error on Gaussian states is Gaussian with each row's spread: exp(score) alone
    underrates the tail's mass (Jensen), exp(score + spread^2 / 2) is its expectation. The candidates
    are the proxy's best, as HiRE picks them (the exact top-k would leave a tail of rows selected for
    low errors)."""
    from test_sampling import _engine

    engine = _engine(rank=8, candidates=16, head_scale=3.0)
    head, weight = engine.head, engine.head_weight.float()
    proxy = head.selector.proxies[0]
    g = torch.Generator().manual_seed(5)
    ratios_corrected, ratios_plain = [], []
    for _ in range(300):
        h = torch.randn(1, weight.shape[1], generator=g)
        exact = h @ weight.T
        plain = proxy.decode_scores(h, bias=False).float()[0]
        idx = plain.topk(16).indices.sort().values[None]
        tail = torch.ones(weight.shape[0], dtype=torch.bool)
        tail[idx[0]] = False
        mass = head.log_mass(h, exact.gather(1, idx), idx)[0]
        true = torch.logsumexp(exact[0, tail], 0)
        ratios_corrected.append(float(torch.logsumexp(mass[tail], 0) - true))
        ratios_plain.append(float(torch.logsumexp(plain[tail], 0) - true))
    corrected, plain_mean = sum(ratios_corrected) / 300, sum(ratios_plain) / 300
    assert plain_mean < -0.1  # the score alone: too little mass
    assert abs(corrected) < abs(plain_mean) / 3
