"""The head's decode path as it runs fast: the block-major first pass (pack_lowrank_blocks +
lowrank_select: z = V x, every row's low-rank score and each block's best rows in one call, rows
ascending) against its eager meaning (hire.proxies.lowrank.reference_block_select) on every SIMD build
the machine has, ties and NaN scores included; the batched pass (one read of U for B tokens, and their
union); and the head and batch decoder that use them."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hire import native
from hire.config import FFNConfig, HeadConfig, HiReConfig
from hire.engine import Engine
from hire.engine.batch import BatchDecoder
from hire.proxies import Cascade, LowRankProxy
from hire.topk import local_topk
from hire.proxies.lowrank import block_select, pack_blocks, reference_block_select
from test_native_checks import library  # noqa: F401 (the builds fixture: ops below)
from tiny_models import make

BUILT = native.available()
needs_kernels = pytest.mark.skipif(not BUILT, reason=f"native kernels: {native.unavailable_reason()}")


@pytest.fixture
def ops(library):
    """torch.ops namespace of the default build or of a SIMD variant (test_native_checks' builds)."""
    return library[0]


def _case(seed, blocks, stripe, rank, width, batch, kind, bits=8):
    """Codes, scales, bias, V and x; ``kind``: "random" (no ties), "ties" (a few code and scale values:
    many equal scores), "nan" (some NaN row scales); ``bits`` 4: codes in [-8, 7]."""
    g = torch.Generator().manual_seed(seed)
    rows = blocks * stripe
    top = 127 if bits == 8 else 7
    if kind == "ties":
        codes = torch.randint(-1, 2, (rows, rank), generator=g, dtype=torch.int8)
        scales = torch.full((rows,), 0.5)
        bias = None
    else:
        codes = torch.randint(-top, top + 1, (rows, rank), generator=g, dtype=torch.int8)
        if bits == 4:
            codes[torch.rand(rows, rank, generator=g) < 0.05] = -8  # the nibble's lowest value
        scales = torch.rand(rows, generator=g) / 100 + 1e-4
        # a row bias (the proxy's optimism) as large as the scores, so that it changes the choice
        bias = (torch.rand(rows, generator=g) * scales * top * 40 * rank ** 0.5).half() if seed % 2 else None
    if kind == "nan":
        scales[torch.rand(rows, generator=g) < 0.3] = float("nan")
    v = torch.randn(rank, width, generator=g).half()
    x = torch.randn(batch, width, generator=g).half()
    return codes, scales, bias, v, x


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1), blocks=st.sampled_from([16, 32, 48, 128]), tiles=st.integers(1, 10),
       short=st.sampled_from([0, 0, 1, 5, 15]), rank=st.sampled_from([4, 16, 24, 40, 64]), width=st.integers(1, 70),
       batch=st.integers(1, 10), share=st.floats(0.0, 1.0), kind=st.sampled_from(["random", "ties", "nan"]),
       bits=st.sampled_from([8, 4]))
def test_block_select_is_the_reference_set(ops, seed, blocks, tiles, short, rank, width, batch, share, kind, bits):
    """Exactly the reference's rows (score descending, then the lower row; NaN after every real score),
    ascending, for every activation of the batch, and their union; blocks of any row count (``short``
    rows less than a multiple of 16: the pack pads them, and padding is never picked, NaN rows or not);
    8-bit codes and 4-bit ones (two to a byte, rank in 8s)."""
    stripe = 16 * tiles - short
    per = max(1, min(stripe, round(share * stripe)))
    rank = max(rank, 8) if bits == 4 else rank
    codes, scales, bias, v, x = _case(seed, blocks, stripe, rank, width, batch, kind, bits)
    pack = pack_blocks(codes, scales, bias, blocks, ops=ops, bits=bits)
    rows, union = block_select(x, v, pack, per, with_union=True, ops=ops)
    want = reference_block_select(x, v, codes, scales, blocks, per, bias)
    assert rows.shape == (batch, blocks * per) and rows.dtype == torch.int64
    assert torch.equal(rows, want)
    assert torch.equal(union, torch.unique(want))
    alone, none = block_select(x[:1], v, pack, per, ops=ops)
    assert none is None and torch.equal(alone, want[:1])  # the same rows without the batch


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1), n_pos=st.integers(1, 4), blocks=st.sampled_from([1, 3, 16]),
       per=st.integers(1, 40), k=st.sampled_from([1, 5, 16, 17, 50, 64, 65, 100]), ties=st.booleans())
def test_topk_rank_counts_on_every_build(ops, seed, n_pos, blocks, per, k, ties):
    """topk_ranks' counts (per position, block and how many of the k ref scores lie below a row's own)
    by their definition, on each SIMD build: k up to 64 (the k scores held in registers) and above,
    ties, signed zeros, -inf and NaN scores (as -inf), ref holding -inf."""
    n = blocks * per
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(n_pos, n, generator=g) * 2
    if ties:
        scores = scores.round()
        scores[scores == 0] = -0.0
    special = torch.rand(n_pos, n, generator=g)
    scores[special < 0.05] = float("-inf")
    scores[special > 0.97] = float("nan")
    s = scores.masked_fill(scores.isnan(), float("-inf"))
    ref = s[:, torch.randint(0, n, (k,), generator=g)].sort(dim=1).values.contiguous()  # (N, k), may repeat
    below = (ref[:, None, :] < s[:, :, None]).sum(-1)  # (N, n)
    key = torch.arange(n_pos)[:, None] * (blocks * (k + 1)) + (torch.arange(n) % blocks) * (k + 1) + below
    want = torch.bincount(key[below > 0], minlength=n_pos * blocks * (k + 1)).view(n_pos, blocks, k + 1)
    assert torch.equal(native.topk_rank_counts(scores, ref, blocks, ops=ops), want)


@needs_kernels
def test_block_select_picks_per_rows_from_every_block():
    codes, scales, bias, v, x = _case(1, 64, 64, 64, 96, 3, "random")
    pack = pack_blocks(codes, scales, bias, 64)
    rows, _ = block_select(x, v, pack, 8)
    for r in rows:
        assert (r[1:] > r[:-1]).all()  # ascending, no repeats
        assert ((r % 64).bincount(minlength=64) == 8).all()


@needs_kernels
def test_block_select_refuses_bad_input():
    codes = torch.zeros(256, 16, dtype=torch.int8)
    with pytest.raises(ValueError, match="equal blocks; 24 blocks do not"):
        pack_blocks(codes, torch.ones(256), None, 24)
    with pytest.raises(RuntimeError, match="scales: float32, one per row"):
        pack_blocks(codes, torch.ones(255), None, 16)
    pack = pack_blocks(codes, torch.ones(256), None, 16)
    v = torch.zeros(16, 8)
    with pytest.raises(RuntimeError, match=r"x must be \(B, 8\)"):
        block_select(torch.zeros(1, 9), v, pack, 2)
    with pytest.raises(RuntimeError, match=r"v must be a contiguous .* \(16, D\)"):
        block_select(torch.zeros(1, 8), torch.zeros(15, 8), pack, 2)
    with pytest.raises(ValueError, match=r"per must be in \[1, 16\]"):
        block_select(torch.zeros(1, 8), v, pack, 17)
    padded = pack_blocks(codes, torch.ones(256), None, 32)  # 8 rows a block, padded to 16
    assert padded.codes.shape[:2] == (32, 1) and padded.rows == 256
    with pytest.raises(ValueError, match=r"per must be in \[1, 8\]"):
        block_select(torch.zeros(1, 8), v, padded, 9)
    with pytest.raises(RuntimeError, match="pack_lowrank_blocks"):
        block_select(torch.zeros(1, 8), v, pack._replace(codes=native.pack_lowrank(codes)), 2)
    with pytest.raises(RuntimeError, match=r"rank in multiples of 8 \(4-bit codes\)"):
        pack_blocks(torch.zeros(256, 12, dtype=torch.int8), torch.ones(256), None, 16, bits=4)
    with pytest.raises(RuntimeError, match=r"4-bit codes must lie in \[-8, 7\]"):
        pack_blocks(torch.full((256, 16), 8, dtype=torch.int8), torch.ones(256), None, 16, bits=4)
    with pytest.raises(RuntimeError, match="bits must be 8 or 4"):
        pack_blocks(codes, torch.ones(256), None, 16, bits=2)


@needs_kernels
def test_lowrank_decode_takes_the_block_pass_and_keeps_local_topk_set():
    """LowRankProxy.decode_local_topk on its block-major pack: the set local_topk keeps on the same
    quantized scores (the old row-major kernel's set), ascending; the batch form gives each row's."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(4096, 64, generator=g)
    proxy = LowRankProxy.from_weight(weight, 16, u_bits=8)
    proxy.prepare_decode(torch.float16)
    assert proxy.block_pack(64) is not None and proxy.block_pack(100) is None
    x = torch.randn(3, 64, generator=g).half()
    got = proxy.decode_local_topk(x[:1], 512, 64)
    want = reference_block_select(x[:1], proxy._v, proxy._u.codes, proxy._u.row_scales, 64, 8)
    assert torch.equal(got, want)
    rows, union = proxy.decode_local_topk_batch(x, 512, 64)
    assert torch.equal(rows[:1], got) and torch.equal(union, torch.unique(rows))


@needs_kernels
def test_four_bit_factor_takes_the_block_pass():
    """A 4-bit U (one scale per row) decodes on the block-major kernel: the reference's set on its own
    codes and scales, from the proxy (Cascade, engine) as from the op; a rank not in 8s stays eager."""
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(4096, 64, generator=g)
    proxy = LowRankProxy.from_weight(weight, 16, u_bits=4)
    assert proxy.block_pack(64) is None  # not before prepare_decode
    proxy.prepare_decode(torch.float16)
    assert proxy.packed is None and proxy.block_major(64) and proxy.fused_first_pass(64)
    assert proxy.first_pass_kernel(64) == "lowrank_select"
    x = torch.randn(3, 64, generator=g).half()
    codes = proxy.u.codes(proxy.u.packed)
    assert codes.abs().max() <= 7
    got = proxy.decode_local_topk(x[:1], 512, 64)
    want = reference_block_select(x[:1], proxy._v, codes, proxy.u.scales[:, 0].float(), 64, 8)
    assert torch.equal(got, want)
    rows, union = proxy.decode_local_topk_batch(x, 512, 64)
    assert torch.equal(rows[:1], got) and torch.equal(union, torch.unique(rows))
    odd = LowRankProxy.from_weight(weight, 12, u_bits=4)
    odd.prepare_decode(torch.float16)
    assert not odd.fused_first_pass(64) and odd.block_pack(64) is None
    eager = LowRankProxy.from_weight(weight, 16, u_bits=4)
    with native.disabled():  # prepared without the kernels: the eager scores, the same local top-k set
        eager.prepare_decode(torch.float16)
    assert not eager.fused_first_pass(64)
    selector = Cascade([eager], [512], blocks=64)
    rows = selector.decode_select(x[:1])
    assert torch.equal(rows.sort().values, local_topk(eager.decode_scores(x[:1]), 512, 64).sort().values)


@needs_kernels
def test_a_batch_is_selected_as_decoding_selects_each_token():
    """Cascade.decode_select_batch (hire eval's candidates): a one-stage low-rank selector with blocks
    prepares itself and gives each token what decode_select gives it alone; any other selector, select()."""
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(4096, 64, generator=g)
    x = torch.randn(5, 64, generator=g)
    for bits in (4, 8):
        selector = Cascade([LowRankProxy.from_weight(weight, 16, u_bits=bits)], [512], blocks=64)
        assert selector.proxies[0].decode_v is None
        got = selector.decode_select_batch(x)
        assert selector.proxies[0].block_pack(64) is not None  # prepared for decoding by the call
        for j in range(5):
            assert torch.equal(got[j], selector.decode_select(x[j : j + 1])[0]), (bits, j)
    plain = Cascade([LowRankProxy.from_weight(weight, 16, u_bits=8)], [512], blocks=0)
    assert torch.equal(plain.decode_select_batch(x), plain.select(x))


def _engine(seed=0):
    from hire.calibrate import fit_head_proxy

    model = make("llama", seed=seed)  # vocabulary 384: 24 blocks of 16 rows
    head = HeadConfig(k=4, candidates=96, proxy="lowrank", rank=16, rank_bits=8, select_blocks=24)
    config = HiReConfig(head=head, ffn=FFNConfig(enabled=False))
    proxy = fit_head_proxy(model, head, torch.randn(400, model.config.hidden_size, generator=torch.Generator().manual_seed(seed)))
    return Engine(model, config, head_proxy=proxy, dtype=torch.float16, max_seq_len=32)


@needs_kernels
def test_the_head_decodes_its_block_selection_and_the_batch_its_union():
    engine = _engine()
    head = engine.head
    first = head.selector.proxies[0]
    assert isinstance(first, LowRankProxy) and first.block_pack(24) is not None  # made by prepare_decode
    h = torch.randn(4, engine.hidden, generator=torch.Generator().manual_seed(1)).half()
    rows = [head.decode(h[j : j + 1])[1][0] for j in range(4)]
    for j, r in enumerate(rows):
        want = reference_block_select(h[j : j + 1], first._v, first._u.codes, first._u.row_scales, 24,
                                      head.selector.keep[0] // 24, first.bias)[0]
        assert torch.equal(r, want)
    union, count = head.select_union(h)
    assert count == rows[0].numel() and torch.equal(union, torch.unique(torch.cat(rows)))
    decoder = BatchDecoder(engine, 4, dense_above=1.0)
    logits, idx = decoder.logits(h, hire=True)
    assert torch.equal(idx[0], union) and logits.shape == (4, union.numel())
    dense, _ = decoder.logits(h, hire=False)
    torch.testing.assert_close(logits, dense[:, union], rtol=1e-5, atol=1e-5)
