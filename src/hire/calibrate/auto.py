"""Head settings chosen on calibration text, for models without recommended settings.

``HiReConfig()``'s fixed head (rank 64, k' = 256) suits neither a 49k nor a 262k vocabulary, nor
any width: on an unseen 1.5B Qwen2.5 it kept recall@1 at 0.899. Instead the rank and k' are
searched: for each rank on a ladder the activation-aware proxy is fitted on most calibration
windows and checked on the windows held back (whole windows, so the check is on positions the fit
never saw), and the smallest k' reaching both recall targets is kept; the cheapest (rank, k') in
bytes read per token wins. When none reaches the targets below a quarter of the vocabulary the
head is left dense (HiRE would not pay), and the report says so.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from hire.calibrate.states import head_weight
from hire.config import HeadConfig
from hire.proxies import LowRankProxy
from hire.topk import recall_at_k

log = logging.getLogger("hire")

TARGET_RECALL_AT_1 = 0.995
TARGET_RECALL_AT_K = 0.99
RANKS = (32, 64, 96, 128, 192, 256)
CANDIDATES = (256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384, 24576, 32768, 49152, 65536)


@torch.no_grad()
def _recalls(scores: torch.Tensor, true: torch.Tensor, ladder: list[int]) -> torch.Tensor:
    """Per position, recall@1 and recall@k of the proxy's top-c for every c of the ladder (one sort).
    # scores: (N, V), true: (N, k) -> (N, len(ladder), 2)"""
    order = scores.topk(ladder[-1], dim=-1).indices
    return torch.stack([torch.stack([recall_at_k(true[:, :1], order[:, :c]), recall_at_k(true, order[:, :c])], -1)
                        for c in ladder], 1)


@torch.no_grad()
def choose_head(model: nn.Module, cfg: HeadConfig, fit_states: torch.Tensor, check_states: torch.Tensor,
                target_recall_at_1: float = TARGET_RECALL_AT_1,
                target_recall_at_k: float = TARGET_RECALL_AT_K, ranks: tuple[int, ...] = RANKS,
                candidates: tuple[int, ...] = CANDIDATES) -> tuple[HeadConfig, dict]:
    """The cheapest low-rank head (rank, k') reaching both recall targets on ``check_states``, with a
    proxy fitted on ``fit_states``; or ``cfg`` with the head turned off when none does. Ranks above a
    quarter of the width and k' above a quarter of the vocabulary are not tried.
    Returns the head config (``auto`` cleared, so that it is written as chosen) and a report."""
    weight = head_weight(model).float()
    vocab, width = weight.shape
    ranks = [r for r in ranks if r <= width // 4] or [max(1, width // 4)]
    ladder = [c for c in candidates if cfg.k <= c <= vocab // 4] or [max(cfg.k, vocab // 4)]
    chunks = check_states.split(256)
    true = [(h @ weight.t()).topk(cfg.k, dim=-1).indices for h in chunks]
    tried, best = [], None
    for rank in ranks:
        proxy = LowRankProxy.from_weight(weight, rank, states=fit_states, u_bits=cfg.rank_bits)
        recall = torch.cat([_recalls(proxy.scores(h).float(), t, ladder) for h, t in zip(chunks, true)]).mean(0)
        r1, rk = recall[:, 0].tolist(), recall[:, 1].tolist()
        ok = [i for i in range(len(ladder)) if r1[i] >= target_recall_at_1 and rk[i] >= target_recall_at_k]
        entry = {"rank": rank, "candidates": ladder[ok[0]] if ok else None,
                 "recall_at_1": r1[ok[0] if ok else -1], "recall_at_k": rk[ok[0] if ok else -1]}
        if ok:  # what the head reads per token: the proxy, then the candidates' exact rows in 16 bits
            entry["bytes_fraction"] = (proxy.nbytes() + ladder[ok[0]] * width * 2) / (vocab * width * 2)
            if best is None or entry["bytes_fraction"] < best["bytes_fraction"]:
                best = entry
        tried.append(entry)
    report = {"targets": {"recall_at_1": target_recall_at_1, "recall_at_k": target_recall_at_k},
              "fit_states": fit_states.shape[0], "check_states": check_states.shape[0], "tried": tried}
    if best is None or best["bytes_fraction"] >= 0.5:
        report["chosen"] = None
        report["reason"] = (f"no rank in {ranks} reached recall@1 >= {target_recall_at_1} and recall@{cfg.k} >= "
                            f"{target_recall_at_k} with k' <= {ladder[-1]} at under half the head's bytes: "
                            "the head stays dense")
        log.warning("hire: %s", report["reason"])
        return chosen_head(cfg, None), report
    report["chosen"] = best
    head = chosen_head(cfg, best)
    log.info("hire: head chosen on calibration text: rank %d, k' %d (%.1f%% of the head's bytes; check recall@1 "
             "%.4f, recall@k %.4f)", best["rank"], best["candidates"], 100 * best["bytes_fraction"],
             best["recall_at_1"], best["recall_at_k"])
    return head, report


def chosen_head(cfg: HeadConfig, chosen: dict | None) -> HeadConfig:
    """``cfg`` as ``choose_head`` resolves it: the chosen low-rank (rank, k'), or off for None."""
    if chosen is None:
        return dataclasses.replace(cfg, enabled=False, auto=False)
    return dataclasses.replace(cfg, auto=False, proxy="lowrank", rank=chosen["rank"], candidates=chosen["candidates"],
                               select_blocks=0, proxy_file="")
