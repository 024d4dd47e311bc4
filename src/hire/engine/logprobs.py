"""Log-probabilities of a decode step's token and its most likely alternatives, normalised over the
whole vocabulary (the server's ``logprobs``).

A dense step has every exact logit: the log-probabilities are exact. A HiRE step has the exact
logits of its candidates only. The normaliser's tail, the rows outside them, comes from the head's
first-pass proxy: each tail row's proxy score stands in for its logit (no optimism margin,
``Cascade.decode_bound`` with margin 0), so log Z = logaddexp(logsumexp of the exact candidate
logits, logsumexp of the tail's proxy scores). Where the candidates hold nearly all the mass the
tail changes log Z little, and its error less; ``tail_share`` reports the share the estimate gives
the tail. A token outside the candidates (a temperature draw from the tail) gets its own exact
logit. The alternatives are the candidates' best: a tail row is never listed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

MAX_TOP = 20  # OpenAI's bound on top_logprobs


@dataclass
class TokenLogprobs:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first
    tail_share: float = 0.0  # the estimated probability outside the exact rows (0 on a dense step)


def token_logprobs(logits: torch.Tensor, idx: torch.Tensor | None, token: int, top: int, *,
                   tail_scores: Callable[[], torch.Tensor] | None = None,
                   exact_row: Callable[[int], float] | None = None) -> TokenLogprobs:
    """``token``'s log-probability and the ``top`` most likely tokens' from one step's ``logits``
    over ``idx`` (None: the whole vocabulary, exact). With ``idx``: ``tail_scores()`` gives every
    vocabulary row's proxy score (1, V), of which the rows outside ``idx`` form the normaliser's
    tail; ``exact_row(token)`` the exact logit of a token outside ``idx``.
    # logits: (1, m), idx: (1, m) or None"""
    if not 0 <= top <= MAX_TOP:
        raise ValueError(f"top must be in [0, {MAX_TOP}], got {top}")
    row = logits.reshape(-1).float()
    head_lse = torch.logsumexp(row, 0)
    tail_share = 0.0
    if idx is None:
        lse = head_lse
        ids = None
        value = row[token]
    else:
        ids = idx.reshape(-1)
        if tail_scores is None:
            raise ValueError("a step over candidates needs the proxy's scores for the normaliser's tail")
        scores = tail_scores().reshape(-1).float().clone()
        scores[ids] = float("-inf")
        tail_lse = torch.logsumexp(scores, 0)
        lse = torch.logaddexp(head_lse, tail_lse)
        tail_share = float(torch.exp(tail_lse - lse))
        where = (ids == token).nonzero()
        if where.numel():
            value = row[int(where[0, 0])]
        elif exact_row is not None:
            value = torch.tensor(exact_row(token))
        else:
            raise ValueError(f"token {token} is not among the candidates and no exact row was given")
    best = torch.topk(row, min(top, row.numel())) if top else None
    alternatives = [] if best is None else [
        (int(i if ids is None else ids[i]), float(v - lse)) for v, i in zip(best.values, best.indices)]
    return TokenLogprobs(token, float(value - lse), alternatives, tail_share)
