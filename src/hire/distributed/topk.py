"""Top-k over rows sharded across ranks: the exact global top-k (local top-k, one small gather of
(value, index) pairs, a merge) and DA-TOP-k's local shares (no collective)."""

from __future__ import annotations

import torch

from hire.distributed.comm import Comm
from hire.topk import order_keys, shard_range, split_count  # noqa: F401  (the sharding arithmetic is pure; re-exported)


def global_topk(values: torch.Tensor, index: int | torch.Tensor, k: int, comm: Comm,
                kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact top-k over all ranks' rows, on every rank: each rank takes its exact local top-k,
    one all-gather exchanges up to k (value, global index) pairs per rank (8 bytes a pair), every rank
    merges them the same way. Equals ``hire.topk.ranked_topk`` over all ranks' rows concatenated:
    ``torch.topk``'s set, equal values taking the lowest global row first (the selection rule's order).

    ``index``: the global row of each column of ``values`` (N, n), or the global row of column 0
    when this rank's rows are an even, contiguous shard (every rank then holds n rows and sends
    min(k, n) pairs). With explicit indices the ranks may hold different numbers of rows: each
    sends k pairs, padded with -inf.
    # values: (N, n) -> values (N, k) descending, global idx (N, k)
    """
    N, n = values.shape
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    size = min(k, n) if isinstance(index, int) else k  # the message, the same on every rank
    rows = torch.arange(n) + index if isinstance(index, int) else index  # global rows (n,) or (N, n)
    pos = order_keys(values, rows.expand(N, n)).topk(min(k, n), dim=-1).indices  # (N, <=k)
    vals, idx = values.float().gather(-1, pos), rows.expand(N, n).gather(-1, pos)
    if vals.shape[-1] < size:  # pad to the common message size
        pad = size - vals.shape[-1]
        vals = torch.cat([vals, vals.new_full((N, pad), float("-inf"))], dim=-1)
        idx = torch.cat([idx, idx.new_full((N, pad), -1)], dim=-1)
    pairs = torch.cat([vals, idx.to(torch.int32).view(torch.float32)], dim=-1)  # (N, 2 size): values, ids' bits
    everyone = comm.all_gather(pairs, kind)  # (P, N, 2 size)
    all_vals = everyone[..., :size].permute(1, 0, 2).reshape(N, -1)  # (N, P*size)
    all_idx = everyone[..., size:].contiguous().view(torch.int32).permute(1, 0, 2).reshape(N, -1)
    top = order_keys(all_vals, all_idx).topk(k, dim=-1).indices  # the same order as each rank's local pick
    return all_vals.gather(-1, top).to(values.dtype), all_idx.gather(-1, top).long()


def owned(global_idx: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """This rank's rows among ``global_idx``, as local indices.  # global_idx: (k,) -> (m,)"""
    mine = global_idx[(global_idx >= start) & (global_idx < end)]
    return mine - start
