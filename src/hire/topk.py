"""Pure tensor functions for approximate top-k: selection from proxy scores, exact rescoring of
a candidate set, and recall. No modules, no model knowledge."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def check_k(k: int, n: int, what: str = "k") -> None:
    """Raise a clear error unless 1 <= k <= n."""
    if not isinstance(k, int) or isinstance(k, bool):
        raise TypeError(f"{what} must be an int, got {type(k).__name__}")
    if k <= 0:
        raise ValueError(f"{what} must be >= 1, got {k}")
    if k > n:
        raise ValueError(f"{what}={k} exceeds the number of rows n={n}; use {what} <= {n}")


def approx_topk(proxy_scores: torch.Tensor, candidates: int) -> torch.Tensor:
    """Indices of the ``candidates`` best rows by proxy score (the over-selected set S, |S| = k').

    # proxy_scores: (N, n) -> idx: (N, k')
    """
    check_k(candidates, proxy_scores.shape[-1], "candidates (k')")
    return proxy_scores.topk(candidates, dim=-1, sorted=False).indices


def check_blocks(k: int, n: int, blocks: int) -> None:
    """Raise a ValueError unless ``local_topk`` can keep k of n rows in ``blocks`` blocks."""
    check_k(k, n)
    if blocks < 1 or k % blocks or n % blocks:
        raise ValueError(
            f"local top-k needs blocks >= 1 dividing both k={k} and n={n}, got blocks={blocks}; "
            f"valid choices: {[b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if not k % b and not n % b]}"
        )


def local_topk(scores: torch.Tensor, k: int, blocks: int) -> torch.Tensor:
    """Approximate top-k without a global sort: the n rows are dealt into ``blocks`` interleaved
    blocks (block b holds rows b, b + blocks, b + 2 * blocks, ...) and each keeps its own best
    k / blocks: DA-TOP-k's local shares, on one device. Interleaving matters because vocabularies
    cluster related tokens in neighbouring ids; contiguous blocks would crowd the true top-k into a
    few blocks. A true top-k row is missed only when more than k / blocks better rows share its
    block. Many small selections are several times faster than one large top-k on CPU. A NaN
    score counts as -inf, so it is never kept over a real score (torch.topk alone keeps NaN first;
    the native lowrank_block_topk puts NaN last too).

    # scores: (N, n) -> idx: (N, k)
    """
    n = scores.shape[-1]
    check_blocks(k, n, blocks)
    scores = scores.masked_fill(scores.isnan(), float("-inf"))
    local = scores.reshape(-1, n // blocks, blocks).topk(k // blocks, dim=1, sorted=False).indices  # (N, k/B, B)
    return (local * blocks + torch.arange(blocks, device=scores.device)).reshape(scores.shape[0], k)


def statistical_threshold(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Spark Transformer's statistical top-k threshold: mean + std * inv_Phi(1 - k/n) per row, so
    that about k of n Gaussian scores lie above it. One pass for the moments, no sort.

    # scores: (N, n) -> threshold: (N, 1) float32
    """
    from statistics import NormalDist

    n = scores.shape[-1]
    check_k(k, n)
    f = scores.float()
    if k == n:
        return torch.full((f.shape[0], 1), float("-inf"))
    z = NormalDist().inv_cdf(1.0 - k / n)
    return f.mean(-1, keepdim=True) + f.std(-1, keepdim=True) * z


def statistical_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Rows at or above the statistical threshold: about k per row when the scores are Gaussian,
    any number otherwise (recall and count are what ``benchmarks/topk_selectors.py`` measures).

    # scores: (N, n) -> mask: (N, n) bool
    """
    return scores.float() >= statistical_threshold(scores, k)


def rescore(weight: torch.Tensor, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Exact scores of the candidate rows only: reads |S| rows of ``weight``.

    # weight: (n, D), x: (N, D), idx: (N, k') -> (N, k')
    """
    if x.dim() != 2 or idx.dim() != 2 or idx.shape[0] != x.shape[0]:
        raise ValueError(f"rescore wants x (N, D) and idx (N, k'), got {tuple(x.shape)} and {tuple(idx.shape)}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight width {weight.shape[1]} does not match x width {x.shape[1]}")
    if x.shape[0] == 1:  # decode: one gather of k' contiguous rows, one small GEMV
        rows = weight.index_select(0, idx[0])  # (k', D)
        return torch.nn.functional.linear(x.to(rows.dtype), rows).to(x.dtype)
    if x.shape[0] * idx.shape[1] > weight.shape[0]:  # a batch touching every row anyway: one GEMM
        return torch.nn.functional.linear(x.to(weight.dtype), weight).gather(-1, idx).to(x.dtype)
    rows = weight[idx]  # (N, k', D)
    return torch.einsum("nkd,nd->nk", rows, x.to(rows.dtype)).to(x.dtype)


def select_topk(candidate_scores: torch.Tensor, candidate_idx: torch.Tensor, k: int):
    """The final top-k among exactly scored candidates, as (values, row indices), sorted descending.

    # candidate_scores: (N, k'), candidate_idx: (N, k') -> values: (N, k), idx: (N, k)
    """
    check_k(k, candidate_scores.shape[-1], "k")
    values, pos = candidate_scores.topk(k, dim=-1)
    return values, candidate_idx.gather(-1, pos)


def scatter_scores(n: int, idx: torch.Tensor, values: torch.Tensor, fill: float = float("-inf")) -> torch.Tensor:
    """A full (N, n) score tensor holding ``values`` at ``idx`` and ``fill`` elsewhere.

    # idx, values: (N, m) -> (N, n)
    """
    out = values.new_full((values.shape[0], n), fill)
    return out.scatter_(-1, idx, values)


def recall_at_k(true_idx: torch.Tensor, approx_idx: torch.Tensor) -> torch.Tensor:
    """Per row, the fraction of the true top-k rows that the approximate set contains.

    # true_idx: (N, k), approx_idx: (N, m) -> (N,)
    """
    ordered = approx_idx.sort(dim=-1).values  # membership by binary search: (N, m) memory, not (N, k, m)
    at = torch.searchsorted(ordered, true_idx.contiguous()).clamp_(max=ordered.shape[-1] - 1)
    hits = ordered.gather(-1, at) == true_idx  # (N, k)
    return hits.float().mean(-1)


def merge_topk(best: tuple[torch.Tensor, torch.Tensor] | None, values: torch.Tensor, idx: torch.Tensor,
               k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The running top-k of a scan over slices of the rows: ``best`` (values, row ids) so far (None at
    the first slice) merged with a slice's ``values`` and their row ids ``idx``; sorted descending.
    # best: (N, <=k) each, values/idx: (N, m) -> (N, min(k, ...)) each"""
    if best is not None:
        values, idx = torch.cat([best[0], values], -1), torch.cat([best[1], idx], -1)
    top, pos = values.topk(min(k, values.shape[-1]), dim=-1)
    return top, idx.gather(-1, pos)


def rank_counts(scores: torch.Tensor, ref: torch.Tensor, blocks: int) -> torch.Tensor:
    """``topk_ranks``' counts in torch: per position, block (row % blocks) and j in [0, k], how many
    rows have exactly j of the position's k ``ref`` scores (ascending, no NaN) below their own, every
    score placed by a binary search over k. ``hire.native.topk_rank_counts`` gives the same for j >= 1
    (j = 0 is never read) in one native pass.  # scores: (N, n) float32, ref: (N, k) -> (N, blocks, k + 1) int64"""
    (n_pos, n), k, dev = scores.shape, ref.shape[1], scores.device
    bins = n_pos * blocks * (k + 1)
    key = torch.searchsorted(ref, scores, out_int32=bins <= 2**31 - 1)  # (N, n) in [0, k]: a (position, block, j) bin
    key.add_((torch.arange(n, device=dev, dtype=key.dtype) % blocks) * (k + 1))
    key.add_(torch.arange(n_pos, device=dev, dtype=key.dtype)[:, None] * (blocks * (k + 1)))
    return torch.bincount(key.view(-1), minlength=bins).view(n_pos, blocks, k + 1)


def topk_ranks(scores: torch.Tensor, idx: torch.Tensor, blocks: int = 1,
               counter: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] = rank_counts,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Where rows ``idx`` stand in ``scores``' descending order: how many rows score strictly higher
    (0 = the best), and how many rows of the same interleaved block do (``local_topk``'s ``blocks``
    blocks: row i is in block i % blocks). A row is among ``torch.topk(scores, c)`` exactly when its
    rank is below c, and among ``local_topk(scores, c, blocks)`` when its block rank is below
    c / blocks (ties apart), so one call gives the recall of every c at once, without a sort: each
    score is placed among the k scores of ``idx`` and counted per block (``counter``: ``rank_counts``,
    or ``hire.native.topk_rank_counts``, which places only the scores above the lowest of the k, from a
    caller above this floor where the kernels are built). NaN counts as -inf, as in ``local_topk``.
    # scores: (N, n), idx: (N, k) -> ranks, block ranks: (N, k) int64 each"""
    n_pos, n = scores.shape
    if blocks < 1 or n % blocks:
        raise ValueError(f"blocks={blocks} must be >= 1 and divide the number of rows n={n}")
    scores = scores.float()
    if scores.isnan().any():
        scores = scores.masked_fill(scores.isnan(), float("-inf"))
    k, dev = idx.shape[1], scores.device
    ref, order = scores.gather(1, idx).sort(dim=1)  # (N, k) ascending
    # a row beats ref[p] exactly when at least p + 1 of the k scores are below its own
    counts = counter(scores.contiguous(), ref.contiguous(), blocks)  # (position, block, how many below); j = 0 unused
    at_least = torch.arange(1, k + 1, device=dev).expand(n_pos, k)  # (N, k): ref[p] needs p + 1 below
    whole = counts.sum(1).flip(-1).cumsum(-1).flip(-1)  # (N, k + 1): rows with at least j of the k below
    ranks = whole.gather(1, at_least)
    above = counts.flip(-1).cumsum(-1).flip(-1)  # (N, B, k + 1), per block
    block = (idx.gather(1, order) % blocks)[..., None].expand(-1, -1, k + 1)  # (N, k, k + 1)
    block_ranks = above.gather(1, block).gather(2, at_least[..., None])[..., 0]
    unsort = torch.empty_like(order).scatter_(1, order, torch.arange(k, device=dev).expand(n_pos, k))
    return ranks.gather(1, unsort), block_ranks.gather(1, unsort)


def mask_recall(true_mask: torch.Tensor, approx_mask: torch.Tensor) -> torch.Tensor:
    """Recall with sets given as boolean masks over the n rows.

    # true_mask, approx_mask: (N, n) bool -> (N,)
    """
    hit = (true_mask & approx_mask).sum(-1).float()
    return hit / true_mask.sum(-1).clamp_min(1).float()


def group_scores(scores: torch.Tensor, group_size: int, aggregate: str = "sum") -> torch.Tensor:
    """Scores of contiguous groups of ``group_size`` rows.

    # scores: (N, n) -> (N, n // group_size)
    """
    n = scores.shape[-1]
    if group_size < 1 or n % group_size:
        raise ValueError(f"group_size {group_size} must divide the number of rows {n}")
    grouped = scores.reshape(*scores.shape[:-1], n // group_size, group_size)
    if aggregate == "sum":
        return grouped.sum(-1)
    if aggregate == "max":
        return grouped.amax(-1)
    raise ValueError(f"aggregate must be 'sum' or 'max', got {aggregate!r}")


def expand_groups(group_idx: torch.Tensor, group_size: int) -> torch.Tensor:
    """Row indices of whole groups, each group's rows contiguous.

    # group_idx: (N, g) -> (N, g * group_size)
    """
    offsets = torch.arange(group_size, device=group_idx.device)
    return (group_idx.unsqueeze(-1) * group_size + offsets).reshape(group_idx.shape[0], -1)


def idx_to_mask(idx: torch.Tensor, n: int) -> torch.Tensor:
    """# idx: (N, m) -> (N, n) bool"""
    mask = torch.zeros(idx.shape[0], n, dtype=torch.bool, device=idx.device)
    return mask.scatter_(-1, idx, True)


def count_for_density(n: int, density: float, group_size: int = 1) -> int:
    """Number of groups that keeps ``density`` of n rows (at least one group)."""
    if n % group_size:
        raise ValueError(f"group_size {group_size} must divide the number of rows {n}")
    groups = n // group_size
    return max(1, min(groups, round(density * groups)))


def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows [start, end) of rank ``rank`` when n rows are split evenly over ``world`` ranks."""
    if n % world:
        raise ValueError(f"{n} rows do not split evenly over {world} ranks")
    size = n // world
    return rank * size, (rank + 1) * size


def split_count(count: int, rank: int, world: int) -> int:
    """Rank ``rank``'s share of ``count`` selections: the shares differ by at most one and sum to count."""
    return count // world + (1 if rank < count % world else 0)


def ceil_count(count: int, factor: float, limit: int) -> int:
    return max(count, min(limit, math.ceil(count * factor)))


def order_keys(values: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """int64 keys that put ``values`` in the selection order: larger values first, equal values by
    ascending ``index`` (default: the column). Values compare as float32 bit patterns, the native
    kernels' ``order_key``: a positive NaN above +inf, -0 below +0. One key per value makes every
    ``topk`` over them exact and deterministic, ties included.

    # values: (..., n) float, index: (..., n) int in [-1, 2**32 - 2] -> (..., n) int64
    """
    bits = values.float().contiguous().view(torch.int32)
    # a negative float's bits order backwards: flip them below the sign so that int32 order is float order
    key = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)
    if index is None:
        index = torch.arange(values.shape[-1], device=values.device)
    return (key << 32) | (0xFFFFFFFE - index.to(torch.int64))  # a lower index is a larger low word


def ranked_topk(values: torch.Tensor, k: int, index: torch.Tensor | None = None):
    """The ``k`` best of ``values`` in the selection order (``order_keys``), descending, as
    (values, positions). ``torch.topk`` with its tie order defined.

    # values: (..., n) -> values (..., k), positions (..., k)
    """
    pos = order_keys(values, index).topk(k, dim=-1).indices
    return values.gather(-1, pos), pos


def select_neurons(estimates: torch.Tensor, count: int, group_size: int = 1, aggregate: str = "sum") -> torch.Tensor:
    """The FFN selection rule, the one every path runs (the eager HiReFFN, its oversampled second
    pass, tensor parallel, TopKMLP): the ``count`` best groups of ``group_size`` contiguous neurons,
    a group scored by the ``aggregate`` ("sum" or "max") of its estimates in float32, equal scores
    taking the lowest group first (``order_keys``); returned as neuron indices in ascending order.
    The native kernels (ffn_decode, int4_ffn, the decode step) implement it for single neurons in C++
    and are tested against this.

    # estimates: (I,) -> (count * group_size,);  (N, I) -> (N, count * group_size)
    """
    n = estimates.shape[-1]
    if group_size < 1 or n % group_size:
        raise ValueError(f"group_size {group_size} must divide the number of neurons {n}")
    if not isinstance(count, int) or not 1 <= count <= n // group_size:
        raise ValueError(f"count must be an int in [1, {n // group_size}] (groups of {group_size}), got {count!r}")
    scores = estimates.float()
    if group_size > 1:
        scores = group_scores(scores, group_size, aggregate)
    top = order_keys(scores).topk(count, dim=-1, sorted=False).indices.sort(dim=-1).values  # groups, ascending
    if group_size == 1:
        return top
    return expand_groups(top.reshape(-1, count), group_size).reshape(*top.shape[:-1], count * group_size)
