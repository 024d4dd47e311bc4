"""Sampling on device tensors (no .item(), no host round trip), over a candidate set or all logits."""

from __future__ import annotations

import torch


def sample(
    logits: torch.Tensor,
    idx: torch.Tensor | None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token id as a (1,) tensor. ``idx`` maps candidate positions to token ids (None: identity).

    Greedy for temperature 0; else softmax(logits / T) restricted to the top_k and the top_p
    nucleus, sampled with the exponential-race trick (argmax of p / Exp(1)), which needs no sort
    of the full vocabulary and no synchronisation.
    # logits: (1, m), idx: (1, m) or None -> (1,)
    """
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
