import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from hire.proxies import Cascade, ExactProxy, LowRankProxy, QuantizedMatrix, QuantizedProxy
from hire.topk import recall_at_k


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - approx).pow(2).sum()))


@given(st.sampled_from([4, 8]), st.integers(1, 20), st.integers(1, 70), st.sampled_from([1, 8, 16, 64]), st.integers(0, 999))
def test_quantization_error_within_half_a_step(bits, n, d, group, seed):
    torch.manual_seed(seed)
    w = torch.randn(n, d)
    q = QuantizedMatrix.from_weight(w, bits, group)
    deq = q.dequantize()
    assert deq.shape == (n, d)
    g = q.group_size
    pad = q.packed.shape[1] * (2 if bits == 4 else 1) - d
    step = q.scales.float().repeat_interleave(g, dim=1)[:, : d + pad][:, :d]
    assert bool(((w - deq).abs() <= step / 2 + 1e-3 * step + 1e-6).all())


@pytest.mark.parametrize("bits,floor_db", [(8, 38.0), (4, 16.0)])
def test_quantized_scores_sqnr(bits, floor_db):
    w, x = torch.randn(512, 128), torch.randn(16, 128)
    proxy = QuantizedProxy.from_weight(w, bits, 32)
    assert sqnr_db(x @ w.t(), proxy.scores(x)) > floor_db


def test_quantized_rows_match_full_scores():
    w, x = torch.randn(200, 40), torch.randn(3, 40)
    proxy = QuantizedProxy.from_weight(w, 4, 16)
    idx = torch.randint(0, 200, (3, 17))
    torch.testing.assert_close(proxy.scores_rows(x, idx), proxy.scores(x).gather(-1, idx), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(proxy.scores_rows(x[:1], idx[:1]), proxy.scores(x[:1]).gather(-1, idx[:1]), rtol=1e-5, atol=1e-5)


def test_bytes_are_what_a_kernel_streams():
    w = torch.randn(1000, 128)
    q4, q8 = QuantizedProxy.from_weight(w, 4, 64), QuantizedProxy.from_weight(w, 8, 64)
    assert q4.nbytes() == 1000 * (64 + 2 * 2)  # 128 nibbles + 2 fp16 scales per row
    assert q8.nbytes() == 1000 * (128 + 2 * 2)
    assert ExactProxy(w).nbytes() == 1000 * 128 * 2
    lr = LowRankProxy.from_weight(w, 16)
    assert lr.nbytes() == 1000 * 16 * 2 + 16 * 128 * 2


def test_full_rank_lowrank_reproduces_weight():
    w, x = torch.randn(300, 32), torch.randn(8, 32)
    lr = LowRankProxy.from_weight(w, 32)
    assert sqnr_db(x @ w.t(), lr.scores(x)) > 60  # fp16 factors


def test_activation_aware_fit_beats_plain_svd_on_real_like_states():
    torch.manual_seed(1)
    d, n, r = 64, 2000, 8
    w = torch.randn(n, d)
    mix = torch.randn(d, d) * torch.logspace(0, -3, d)  # states live in a few directions
    states = torch.randn(4000, d) @ mix.t()
    test = torch.randn(500, d) @ mix.t()
    true = (test @ w.t()).topk(10, dim=-1).indices
    plain = LowRankProxy.from_weight(w, r)
    aware = LowRankProxy.from_weight(w, r, states=states)
    rec = lambda p: recall_at_k(true, p.scores(test).topk(100, dim=-1).indices).mean().item()
    assert rec(aware) > rec(plain) + 0.2
    assert rec(aware) > 0.95


def test_lowrank_bad_inputs():
    w = torch.randn(50, 16)
    with pytest.raises(ValueError, match="rank 17"):
        LowRankProxy.from_weight(w, 17)
    with pytest.raises(ValueError, match="rank 0"):
        LowRankProxy.from_weight(w, 0)
    with pytest.raises(ValueError, match="calibration states must be"):
        LowRankProxy.from_weight(w, 4, states=torch.randn(100, 8))
    with pytest.raises(ValueError, match="at least 16 calibration states"):
        LowRankProxy.from_weight(w, 4, states=torch.randn(5, 16))


@pytest.mark.parametrize("u_bits", [8, 16])
def test_state_round_trip(u_bits):
    w, x = torch.randn(100, 24), torch.randn(2, 24)
    lr = LowRankProxy.from_weight(w, 6, states=torch.randn(200, 24), u_bits=u_bits)
    back = LowRankProxy.from_state(lr.state_dict())
    assert torch.equal(lr.scores(x), back.scores(x))
    q = QuantizedProxy.from_weight(w, 4, 8)
    assert torch.equal(QuantizedProxy.from_state(q.state_dict()).scores(x), q.scores(x))


def test_optimism_adds_each_rows_error_spread():
    """with_optimism(c): score_i + c * sqrt(r_i Sigma r_i^T), r_i = W_i - U_i V and Sigma = E[x x^T];
    every path (scores, scores_rows, decode, take_rows, a saved proxy) adds the same bias."""
    g = torch.Generator().manual_seed(0)
    w, states, x = torch.randn(96, 24, generator=g), torch.randn(300, 24, generator=g), torch.randn(3, 24, generator=g)
    lr = LowRankProxy.from_weight(w, 6, states=states, u_bits=8)
    opt = lr.with_optimism(w, states, 2.0)
    resid = w.double() - lr.dense_u().double() @ lr.v.double()
    spread = (resid @ states.double().t()).pow(2).mean(-1).sqrt()  # the row's RMS error over the states
    torch.testing.assert_close(opt.bias.double(), (2 * spread).to(torch.float16).double())
    torch.testing.assert_close(opt.scores(x), lr.scores(x) + opt.bias.float())
    idx = torch.tensor([[5, 1, 90], [0, 0, 7], [95, 3, 4]])
    torch.testing.assert_close(opt.scores_rows(x, idx), opt.scores(x).gather(1, idx))
    rows = torch.tensor([3, 50, 7])
    torch.testing.assert_close(opt.take_rows(rows).scores(x), opt.scores(x)[:, rows])
    assert torch.equal(LowRankProxy.from_state(opt.state_dict()).scores(x), opt.scores(x))
    opt.prepare_decode(torch.float32)
    torch.testing.assert_close(opt.decode_scores(x[:1]), opt.scores(x[:1]), rtol=0.02, atol=0.05)  # int8 z
    assert opt.nbytes() == lr.nbytes() + 96 * 2
    assert lr.with_optimism(w, states, 0).bias is None
    with pytest.raises(ValueError, match="optimism must be >= 0"):
        lr.with_optimism(w, states, -1)


def test_cascade_refines_survivors_and_counts_bytes():
    w, x = torch.randn(4096, 64), torch.randn(1, 64)
    lr = LowRankProxy.from_weight(w, 16, u_bits=8)
    q4 = QuantizedProxy.from_weight(w, 4, 32)
    cascade = Cascade([lr, q4], [1024, 64])
    idx = cascade.select(x)
    assert idx.shape == (1, 64)
    assert set(idx[0].tolist()) <= set(lr.scores(x).topk(1024).indices[0].tolist())
    assert cascade.nbytes() == lr.nbytes() + q4.nbytes(1024)
    batch = torch.cat([x, torch.randn(40, 64)])  # the batched path scores everything once
    assert torch.equal(cascade.select(batch)[0].sort().values, idx[0].sort().values)


def test_cascade_bad_keep():
    w = torch.randn(100, 8)
    with pytest.raises(ValueError, match="stage 1 keep"):
        Cascade([ExactProxy(w), ExactProxy(w)], [10, 20])


@given(width=st.integers(1, 80), n=st.sampled_from([7, 33, 320]), seed=st.integers(0, 50))
def test_decode_gemv_is_right_and_repeatable_at_any_width(width, n, seed):
    """torch's fused int8 GEMV returns garbage below/between multiples of 16 columns (a rank-4 or
    rank-8 low-rank proxy hit it): QuantizedGEMV must give the dequantized product at every width."""
    from hire.proxies.kernels import QuantizedGEMV

    torch.manual_seed(seed)
    m = QuantizedMatrix.from_weight(torch.randn(n, width), bits=8, group_size=width)
    gemv = QuantizedGEMV(m, torch.float32)
    x = torch.randn(1, width)
    ref = x @ m.dequantize(dtype=torch.float32).t()
    out = gemv(x)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
    assert torch.equal(out, gemv(x))


@pytest.mark.parametrize("u_bits", [4, 8, 16])
def test_fit_ranks_is_each_ranks_whitened_svd(u_bits, monkeypatch):
    """One eigendecomposition serves every rank: each rank's U V is the best rank-r fit of W under the
    states' second moment (the whitened SVD written out in full here), whatever other ranks are fitted
    with it, with W read a few rows at a time. 4-bit codes: U's columns of one size (their size in V)."""
    from hire.proxies import lowrank, whiten

    monkeypatch.setattr(lowrank, "FIT_ROWS", 37)
    monkeypatch.setattr(whiten, "FIT_ROWS", 37)  # several slices, the last one short
    g = torch.Generator().manual_seed(3)
    w = torch.randn(200, 24, generator=g)
    states = torch.randn(300, 24, generator=g) @ torch.randn(24, 24, generator=g)
    s = states.double()
    sigma = s.t() @ s / s.shape[0]
    chol = torch.linalg.cholesky(sigma + 1e-4 * sigma.diagonal().mean() * torch.eye(24, dtype=torch.float64))
    a = w.double() @ chol
    _, vecs = torch.linalg.eigh(a.t() @ a)
    ranks = [4, 16, 9]
    fitted = list(LowRankProxy.fit_ranks(w, ranks, states, u_bits=u_bits))
    for rank, proxy in zip(ranks, fitted):
        q = vecs[:, -rank:].flip(-1)
        want = (a @ q) @ (q.t() @ torch.linalg.inv(chol))  # U V = W L Q Q^T L^-1
        got = proxy.dense_u().double() @ proxy.v.double()
        tol = {4: 0.15, 8: 0.02, 16: 2e-3}[u_bits]
        assert (got - want).abs().max() <= tol * want.abs().max()
        if u_bits == 4:
            size = proxy.dense_u().square().mean(0).sqrt()
            assert (size.max() / size.min()) < 1.5  # equal before rounding to 15 levels a row
            assert (proxy.u.codes(proxy.u.packed).abs().amax(1) == 7).all()  # every row uses its range
        alone = LowRankProxy.from_weight(w, rank, states, u_bits=u_bits)
        assert torch.equal(alone.dense_u(), proxy.dense_u()) and torch.equal(alone.v, proxy.v)
        assert proxy.nbytes() == LowRankProxy.u_nbytes(200, rank, u_bits) + proxy.v.numel() * 2
        # from the states' second moment (and W^T W given) the same proxy; float32 products nearly so
        same = next(LowRankProxy.fit_ranks(w, [rank], sigma=whiten.second_moment(states), u_bits=u_bits,
                                           gram=whiten.head_gram(w)))
        assert torch.equal(same.dense_u(), proxy.dense_u()) and torch.equal(same.v, proxy.v)
        # and from the decomposition made once (hire.calibrate.auto: one per fold for every rank)
        made = whiten.whitened(w, sigma=whiten.second_moment(states), gram=whiten.head_gram(w))
        via = next(LowRankProxy.fit_ranks(w, [rank], u_bits=u_bits, whitening=made))
        assert torch.equal(via.dense_u(), proxy.dense_u()) and torch.equal(via.v, proxy.v)
        single = next(LowRankProxy.fit_ranks(w, [rank], states, u_bits=u_bits, dtype=torch.float32))
        assert (single.dense_u().double() @ single.v.double() - got).abs().max() <= tol * want.abs().max()
    with pytest.raises(ValueError, match="rank 25 must be between 1"):
        LowRankProxy.fit_ranks(w, [4, 25], states)
    with pytest.raises(ValueError, match="not with them"):
        LowRankProxy.fit_ranks(w, [4], states, whitening=made)
    with pytest.raises(ValueError, match="whitening is of width 24, the weight's is 23"):
        LowRankProxy.fit_ranks(w[:, :23], [4], whitening=made)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("width,group", [(9, 9), (9, 4), (16, 64), (24, 16), (7, 2)])
def test_quantized_matrix_bytes_are_known_before_it_is_made(bits, width, group):
    m = QuantizedMatrix.from_weight(torch.randn(5, width), bits=bits, group_size=group)
    assert QuantizedMatrix.nbytes_for(5, width, bits, group) == m.nbytes()
