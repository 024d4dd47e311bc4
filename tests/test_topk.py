import math
import statistics

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from hire.proxies import Cascade, ExactProxy, QuantizedProxy
from hire.topk import (
    approx_topk,
    check_k,
    count_for_density,
    expand_groups,
    group_scores,
    idx_to_mask,
    local_topk,
    mask_recall,
    recall_at_k,
    rescore,
    scatter_scores,
    select_topk,
    statistical_threshold,
    statistical_topk,
    topk_ranks,
)

shapes = st.tuples(st.integers(1, 4), st.integers(2, 300), st.integers(1, 48))  # (N, n, D)


def _data(seed, n_tokens, n, d):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(n_tokens, d, generator=g)


@given(shapes, st.integers(0, 2**31 - 1), st.data())
def test_exact_proxy_gives_exact_topk_set(shape, seed, data):
    n_tokens, n, d = shape
    w, x = _data(seed, n_tokens, n, d)
    k = data.draw(st.integers(1, n))
    got = Cascade([ExactProxy(w)], [k]).select(x)
    want = torch.topk(x @ w.t(), k, dim=-1).indices
    assert torch.equal(got.sort(-1).values, want.sort(-1).values)
    values, idx = select_topk(rescore(w, x, got), got, k)
    torch.testing.assert_close(values, torch.topk(x @ w.t(), k, dim=-1).values)


@given(shapes, st.integers(0, 2**31 - 1))
def test_k_equal_n_reproduces_dense_scores(shape, seed):
    n_tokens, n, d = shape
    w, x = _data(seed, n_tokens, n, d)
    idx = Cascade([QuantizedProxy.from_weight(w, 4, 16)], [n]).select(x)
    full = scatter_scores(n, idx, rescore(w, x, idx))
    dense = torch.nn.functional.linear(x, w)
    # equal up to float32 rounding: BLAS may block a permuted set of rows differently
    torch.testing.assert_close(full, dense, rtol=2e-6, atol=2e-6)
    assert torch.equal(full.argmax(-1), dense.argmax(-1))


@given(shapes, st.integers(0, 2**31 - 1), st.data())
def test_recall_never_falls_as_candidates_grow(shape, seed, data):
    n_tokens, n, d = shape
    w, x = _data(seed, n_tokens, n, d)
    k = data.draw(st.integers(1, n))
    proxy = QuantizedProxy.from_weight(w, 4, 8)
    true = torch.topk(x @ w.t(), k, dim=-1).indices
    recalls = [recall_at_k(true, approx_topk(proxy.scores(x), kp)).mean().item() for kp in range(k, n + 1, max(1, n // 7))]
    recalls.append(recall_at_k(true, approx_topk(proxy.scores(x), n)).mean().item())
    assert all(a <= b + 1e-9 for a, b in zip(recalls, recalls[1:]))
    assert recalls[-1] == 1.0


@given(st.integers(1, 6), st.integers(1, 8), st.integers(0, 1000))
def test_group_selection_takes_whole_contiguous_groups(groups, size, seed):
    torch.manual_seed(seed)
    scores = torch.rand(3, groups * size)
    g = group_scores(scores, size, "sum")
    torch.testing.assert_close(g, scores.reshape(3, groups, size).sum(-1))
    keep = g.topk(max(1, groups // 2), dim=-1).indices
    rows = expand_groups(keep, size)
    assert rows.shape == (3, keep.shape[1] * size)
    assert torch.equal(rows.reshape(3, -1, size) // size, keep.unsqueeze(-1).expand(-1, -1, size))


def test_recall_at_k_counts_hits():
    true = torch.tensor([[1, 2, 3, 4]])
    assert recall_at_k(true, torch.tensor([[4, 9, 1, 7]])).item() == 0.5


@pytest.mark.parametrize("k,n", [(0, 5), (-1, 5), (6, 5)])
def test_bad_k_is_a_clear_error(k, n):
    with pytest.raises(ValueError, match="k"):
        check_k(k, n)


def test_candidates_above_rows_error_names_the_fix():
    with pytest.raises(ValueError, match="exceeds the number of rows n=10"):
        approx_topk(torch.randn(2, 10), 11)


def test_rescore_rejects_wrong_shapes():
    with pytest.raises(ValueError, match="width"):
        rescore(torch.randn(10, 4), torch.randn(1, 5), torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="rescore wants"):
        rescore(torch.randn(10, 4), torch.randn(4), torch.zeros(1, 2, dtype=torch.long))


def test_count_for_density():
    assert count_for_density(100, 0.5) == 50
    assert count_for_density(100, 0.001) == 1
    assert count_for_density(128, 0.5, group_size=16) == 4
    with pytest.raises(ValueError, match="divide"):
        count_for_density(100, 0.5, group_size=3)


@given(st.integers(0, 2**31 - 1), st.integers(1, 3), st.sampled_from([(64, 8, 4), (96, 12, 3), (128, 32, 8), (40, 40, 5)]))
def test_local_topk_keeps_each_blocks_best(seed, n_tokens, case):
    n, k, blocks = case
    scores = torch.randn(n_tokens, n, generator=torch.Generator().manual_seed(seed))
    idx = local_topk(scores, k, blocks)
    assert idx.shape == (n_tokens, k)
    for row in range(n_tokens):
        got = set(idx[row].tolist())
        assert len(got) == k
        for b in range(blocks):  # block b: rows b, b + blocks, ...
            block = scores[row, b::blocks]
            want = {b + blocks * i for i in block.topk(k // blocks).indices.tolist()}
            assert {i for i in got if i % blocks == b} == want


@given(st.integers(0, 2**31 - 1), st.integers(1, 40))
def test_local_topk_with_one_block_is_exact_topk(seed, k):
    scores = torch.randn(2, 40, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(local_topk(scores, k, 1).sort(-1).values, scores.topk(k).indices.sort(-1).values)


def test_local_topk_refuses_blocks_that_do_not_divide():
    with pytest.raises(ValueError, match="blocks >= 1 dividing both k=8 and n=60"):
        local_topk(torch.randn(1, 60), 8, 16)
    with pytest.raises(ValueError, match="valid choices"):
        local_topk(torch.randn(1, 64), 6, 4)


def test_cascade_with_local_first_pass():
    w, x = _data(0, 3, 256, 16)
    exact = Cascade([ExactProxy(w)], [32], blocks=8).select(x)
    assert torch.equal(exact.sort(-1).values, local_topk(x @ w.t(), 32, 8).sort(-1).values)
    with pytest.raises(ValueError, match="dividing"):
        Cascade([ExactProxy(w)], [30], blocks=8)


def _count_sd(n: int, frac: float) -> float:
    """Standard deviation of the count a Gaussian threshold keeps, relative to k = frac * n: binomial
    noise of the sample plus the threshold's own error (mean and std estimated from the n scores,
    Var(t) ~ (1 + z^2/2) / n), moved into a count by the density at the threshold. It treats the two
    as independent, which overstates the spread about 2x (measured over 600 rows: 0.021 vs 0.038 at
    frac 0.05, 0.004 vs 0.009 at 0.5)."""
    z = statistics.NormalDist().inv_cdf(1 - frac)
    density = math.exp(-z * z / 2) / math.sqrt(2 * math.pi)
    k = frac * n
    return math.sqrt(k * (1 - frac) + (n * density) ** 2 * (1 + z * z / 2) / n) / k


@given(st.integers(0, 2**31 - 1), st.sampled_from([0.05, 0.1, 0.3, 0.5]))
def test_statistical_topk_keeps_about_k_of_gaussian_scores(seed, frac):
    n = 20000
    scores = torch.randn(4, n, generator=torch.Generator().manual_seed(seed)) * 3 + 1
    k = int(frac * n)
    mask = statistical_topk(scores, k)
    counts = mask.sum(-1).float()
    # 4 (overstated) standard deviations, ~8 real ones: a fixed 8 % failed about once in 300 seeds at
    # frac 0.05 (a random CI failure), while a wrong threshold misses k by far more than this
    tolerance = 4 * _count_sd(n, frac)
    assert ((counts - k).abs() / k < tolerance).all(), (counts, tolerance)
    thr = statistical_threshold(scores, k)
    assert torch.equal(mask, scores >= thr)  # a threshold: everything kept beats everything dropped
    exact = idx_to_mask(scores.topk(k).indices, n)
    assert mask_recall(exact, mask).min() > 1 - tolerance  # kept rows are the best ones: recall = min(count, k) / k


def test_statistical_topk_with_k_equal_n_keeps_everything():
    scores = torch.randn(2, 50)
    assert statistical_topk(scores, 50).all()
    with pytest.raises(ValueError):
        statistical_topk(scores, 0)


# --- the FFN selection rule: one function (select_neurons) every path runs -------------------------
from dataclasses import replace  # noqa: E402

from torch.nn import functional as F  # noqa: E402

from hire import native  # noqa: E402
from hire.config import FFNConfig, HeadConfig, HiReConfig  # noqa: E402
from hire.layers import TopKMLP  # noqa: E402
from hire.patch import hire_layers, sparsify_  # noqa: E402
from hire.topk import order_keys, ranked_topk, select_neurons  # noqa: E402
from tiny_models import make  # noqa: E402

needs_kernels = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.unavailable_reason()}")
# estimates on a coarse grid tie often; hypothesis also tries the all-equal and all-distinct extremes
tie_heavy = st.lists(st.integers(0, 4), min_size=1, max_size=64).map(lambda v: torch.tensor(v, dtype=torch.float32))


def _obeys_the_rule(est: torch.Tensor, chosen: torch.Tensor) -> bool:
    """Every chosen value beats every other, or equals it from a lower index."""
    mask = torch.zeros(est.numel(), dtype=torch.bool)
    mask[chosen] = True
    i, j = torch.nonzero(mask).flatten(), torch.nonzero(~mask).flatten()
    if not i.numel() or not j.numel():
        return True
    vi, vj = est[i].unsqueeze(1), est[j].unsqueeze(0)
    return bool(((vi > vj) | ((vi == vj) & (i.unsqueeze(1) < j.unsqueeze(0)))).all())


@given(tie_heavy, st.data())
def test_select_neurons_takes_torch_topks_values_ties_by_lowest_index(est, data):
    count = data.draw(st.integers(1, est.numel()))
    got = select_neurons(est, count)
    assert got.shape == (count,) and torch.equal(got, got.sort().values)  # ascending, no repeats
    assert got.unique().numel() == count
    assert torch.equal(est[got].sort().values, est.topk(count).values.sort().values)  # the same values as torch.topk
    assert _obeys_the_rule(est, got)


@given(st.integers(1, 8), st.integers(1, 4), st.sampled_from(["sum", "max"]), st.integers(0, 2**31 - 1), st.data())
def test_select_neurons_in_groups_takes_whole_groups_by_their_rule(groups, size, aggregate, seed, data):
    g = torch.Generator().manual_seed(seed)
    est = torch.randint(0, 3, (groups * size,), generator=g).float()
    count = data.draw(st.integers(1, groups))
    got = select_neurons(est, count, size, aggregate)
    scores = group_scores(est.unsqueeze(0), size, aggregate)[0]
    chosen = got.view(count, size)
    assert torch.equal(chosen, chosen[:, :1] + torch.arange(size))  # whole contiguous groups
    assert torch.equal(chosen[:, 0] % size, torch.zeros(count, dtype=torch.long))
    assert torch.equal(chosen[:, 0] // size, select_neurons(scores, count))  # the same rule over group scores
    assert _obeys_the_rule(scores, chosen[:, 0] // size)


@given(st.integers(1, 5), st.integers(1, 40), st.integers(0, 2**31 - 1), st.data())
def test_select_neurons_on_a_batch_selects_each_row(rows, n, seed, data):
    est = torch.randint(0, 4, (rows, n), generator=torch.Generator().manual_seed(seed)).float()
    count = data.draw(st.integers(1, n))
    got = select_neurons(est, count)
    assert torch.equal(got, torch.stack([select_neurons(r, count) for r in est]))


def test_select_neurons_orders_as_the_kernels_key_floats():
    """NaN ranks above +inf and -0 below +0 (native order_key); the rule compares in float32."""
    est = torch.tensor([1.0, float("nan"), float("inf"), -0.0, 0.0, -1.0])
    assert select_neurons(est, 1).tolist() == [1]
    assert select_neurons(est, 2).tolist() == [1, 2]
    assert select_neurons(est, 4).tolist() == [0, 1, 2, 4]
    assert select_neurons(est.half(), 4).tolist() == [0, 1, 2, 4]
    keys = order_keys(torch.tensor([-2.0, -1.0, -0.0, 0.0, 1e-30, 1.0, float("inf")]))
    assert torch.equal(keys, keys.sort().values) and keys.unique().numel() == keys.numel()


def test_select_neurons_refuses_bad_counts_and_groups():
    with pytest.raises(ValueError, match=r"count must be an int in \[1, 4\]"):
        select_neurons(torch.zeros(8), 5, 2)
    with pytest.raises(ValueError, match="group_size 3 must divide the number of neurons 8"):
        select_neurons(torch.zeros(8), 1, 3)


@given(tie_heavy, st.data())
def test_ranked_topk_is_torch_topk_with_its_ties_ordered(values, data):
    k = data.draw(st.integers(1, values.numel()))
    got, pos = ranked_topk(values, k)
    assert torch.equal(got, values.topk(k).values)  # the same values, descending
    assert torch.equal(values[pos], got)
    assert torch.equal(pos.sort().values, select_neurons(values, k))


@given(st.integers(0, 2**31 - 1), st.sampled_from([1, 2, 4]), st.sampled_from([1.0, 1.5]))
def test_hireffn_every_eager_path_selects_by_the_rule(seed, group, oversample):
    """forward_sparse, forward_masked, the decode plan's eager path and TopKMLP all pick what
    select_neurons picks, on a model whose weights repeat so that estimates tie."""
    model = make("llama", seed=seed % 1000)
    with torch.no_grad():  # neurons 2i and 2i+1 get the same gate and up rows: equal estimates and activations
        for layer in model.model.layers:
            for proj in (layer.mlp.gate_proj, layer.mlp.up_proj):
                proj.weight[1::2] = proj.weight[0::2]
    cfg = FFNConfig(density=0.5, group_size=group, oversample=oversample, proxy="exact")
    sparsify_(model, HiReConfig(head=HeadConfig(enabled=False), ffn=cfg))
    x = torch.randn(3, model.config.hidden_size, generator=torch.Generator().manual_seed(seed))
    for ffn in hire_layers(model)[1]:
        w = ffn.weights
        a = w.activations(x)  # (3, I) exact
        cand = select_neurons(ffn.estimate(x), ffn.candidate_groups, group)  # (3, c)
        masked = a.abs().masked_fill(~idx_to_mask(cand, w.neurons), float("-inf"))
        keep = select_neurons(masked, ffn.keep_groups, group)  # (3, kept)
        want = torch.stack([w.project(a[i : i + 1, keep[i]], keep[i])[0] for i in range(3)])
        torch.testing.assert_close(ffn.forward_masked(x), want, rtol=1e-5, atol=1e-5)
        for i in range(3):
            torch.testing.assert_close(ffn.forward_sparse(x[i : i + 1])[0], want[i], rtol=1e-5, atol=1e-5)
        ffn.prepare_decode(torch.float32)
        plan = replace(ffn.decode_plan(), fuse=False, native_act=None)  # the eager decode path
        est = plan.estimates(x[:1])
        cand = select_neurons(est[0], ffn.candidate_groups, group)
        act = plan.activations(x[:1], cand)
        kept = cand[select_neurons(act.abs(), ffn.keep_groups, group)]
        assert torch.equal(plan.keep_best(act, cand)[1], kept)
        want = native.reference_rows_axpy(plan.out_rows, kept, act[torch.searchsorted(cand, kept)]).view(1, -1)
        torch.testing.assert_close(plan.decode(x[:1]), want, rtol=1e-5, atol=1e-5)
    mlp = TopKMLP(make("llama", seed=1).model.layers[0].mlp, 0.5, group)
    acts = torch.randint(-2, 3, (4, mlp.neurons)).float()  # ties
    want = idx_to_mask(select_neurons(acts.abs(), mlp.keep_groups, group, "sum"), mlp.neurons)
    assert torch.equal(mlp.mask(acts), want)


# --- the C++ kernels against the rule (ties included; the kernels select single neurons) ------------
@needs_kernels
@given(st.integers(0, 2**31 - 1), st.booleans(), st.data())
def test_ffn_decode_kernel_selects_by_the_rule(seed, gated, data):
    """native.ffn_decode and, through the same hire_native::select_top, the decode step's one-token
    and batched FFNs: estimates on a coarse grid, so the threshold usually falls among equal ones."""
    g = torch.Generator().manual_seed(seed)
    neurons, d, parts = data.draw(st.integers(1, 80)), 8, 2 if gated else 1
    count = data.draw(st.integers(1, neurons))
    rows = torch.randn(neurons, (parts + 1) * d, generator=g)
    scores = torch.randint(-3, 4, (1, parts * neurons), generator=g).float()
    x = torch.randn(1, d, generator=g)
    s = scores.view(parts, neurons)
    est = (F.relu(s[0]) * s[1]).abs() if gated else F.relu(s[0]).abs()
    want = native.reference_ffn_rows(x, rows, select_neurons(est, count), "relu", parts)
    torch.testing.assert_close(native.ffn_decode(scores, x, rows, count, "relu", gated), want, rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("parts", [1, 2])
def test_int4_ffn_kernel_selects_by_the_rule_ties_included(parts):
    """int4_ffn selects with its own threaded code (native/int4.cpp): proxy rows repeated four times
    give four equal estimates each (exact integer sums times one scale), the output rows all differ."""
    from hire.proxies.quantized_matrix import QuantizedMatrix

    tied_at_threshold = 0
    for seed, (neurons, d, keep) in enumerate([(64, 64, 30), (300, 128, 150), (1536, 128, 922), (96, 64, 1)]):
        g = torch.Generator().manual_seed(seed)
        base = torch.randn(parts * neurons // 4, d, generator=g)
        matrix = QuantizedMatrix.from_weight(base.repeat_interleave(4, dim=0), bits=4, group_size=64)
        rows = torch.randn(neurons, (parts + 1) * d, generator=g).half()
        x = torch.randn(1, d, generator=g)
        for act in ("silu", "relu"):
            est = native.reference_int4_estimates(x, matrix.packed, matrix.scales, 64, parts, act)
            top = est.sort(descending=True).values
            tied_at_threshold += keep < neurons and bool(top[keep - 1] == top[keep])
            got = native.int4_ffn(x, rows, matrix.packed, matrix.scales, 64, keep, act, parts)
            want = native.reference_ffn_rows(x, rows, select_neurons(est, keep), act, parts)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * max(want.abs().max().item(), 1.0))
    assert tied_at_threshold >= 4  # the ties the test is about did occur


@given(st.integers(1, 4), st.integers(1, 6), st.integers(1, 40), st.integers(0, 2**31 - 1), st.data())
def test_topk_ranks_give_the_recall_of_every_topk_and_local_topk(n_tokens, blocks, per, seed, data):
    """A row is in the top-c exactly when fewer than c rows beat it, and in the local top-c when fewer
    than c / blocks rows of its block do: the recall of every c from one call, as recall_at_k of
    torch.topk and local_topk measures it (random floats: no ties; a NaN is never kept)."""
    n = blocks * per
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(n_tokens, n, generator=g)
    if data.draw(st.booleans()):
        scores[0, data.draw(st.integers(0, n - 1))] = float("nan")
    k = data.draw(st.integers(1, n))
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(n_tokens)])
    ranks, block_ranks = topk_ranks(scores, idx, blocks)
    assert torch.equal(ranks, topk_ranks(scores, idx)[0])
    for c in range(1, n + 1):
        want = recall_at_k(idx, scores.masked_fill(scores.isnan(), float("-inf")).topk(c).indices)
        assert torch.equal((ranks < c).float().mean(-1), want)
    for c in range(blocks, n + 1, blocks):
        assert torch.equal((block_ranks < c // blocks).float().mean(-1), recall_at_k(idx, local_topk(scores, c, blocks)))
    with pytest.raises(ValueError, match="blocks=7 must be >= 1 and divide"):
        topk_ranks(torch.randn(1, 30), torch.zeros(1, 2, dtype=torch.long), 7)


@given(st.integers(1, 4), st.integers(1, 6), st.integers(1, 40), st.integers(0, 2**31 - 1), st.data())
def test_topk_ranks_count_the_rows_strictly_above_ties_and_signed_zeros_included(n_tokens, blocks, per, seed, data):
    """The ranks by their definition, on scores with many equal values (rounded), -0.0 beside 0.0,
    -inf and NaN (as -inf): a row's rank counts the rows scoring strictly higher, its block rank
    those of its own block."""
    n = blocks * per
    g = torch.Generator().manual_seed(seed)
    scores = (torch.randn(n_tokens, n, generator=g) * data.draw(st.sampled_from([0.5, 2.0]))).round()
    scores[scores == 0] = torch.tensor([0.0, -0.0])[torch.randint(0, 2, (int((scores == 0).sum()),), generator=g)]
    special = torch.rand(n_tokens, n, generator=g)
    scores[special < 0.05] = float("-inf")
    scores[special > 0.97] = float("nan")
    k = data.draw(st.integers(1, n))
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(n_tokens)])
    s = scores.masked_fill(scores.isnan(), float("-inf"))
    higher = s[:, None, :] > s.gather(1, idx)[:, :, None]  # (N, k, n)
    same_block = (torch.arange(n) % blocks)[None, None, :] == (idx % blocks)[:, :, None]
    paths = [topk_ranks(scores, idx, blocks)]  # torch's counts, then the kernel's where it is built
    if native.available():
        paths.append(topk_ranks(scores, idx, blocks, counter=native.topk_rank_counts))
    for ranks, block_ranks in paths:
        assert torch.equal(ranks, higher.sum(-1))
        assert torch.equal(block_ranks, (higher & same_block).sum(-1))
