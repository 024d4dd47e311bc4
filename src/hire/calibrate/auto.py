"""Head settings chosen on calibration text, for models without recommended settings.

``HiReConfig()``'s fixed head (rank 64, k' = 256) suits neither a 49k nor a 262k vocabulary, nor
any width: on an unseen 1.5B Qwen2.5 it kept recall@1 at 0.899. Instead the rank and k' are
searched: for each rank on a ladder the activation-aware proxy is checked on each calibration
domain with the proxy fitted on the other domains (``domain_folds``: recall on text of a kind the
fit never saw, as a user's may be), or without domains on the windows held back from the fit, and
the smallest k' reaching both recall targets is kept.

Among those (rank, k') the fastest wins (of those within ``TIME_TIE`` of it, the one reading the
fewest bytes), measured on this machine: the HiRE head's decode-time
call (``HiReLMHead.decode``, what the engine runs per token) and the dense head's
(``exact_logits`` over every row) are timed in one loop, taking turns, on a few held-back hidden
states; medians after a warm-up. A head's time does not follow its bytes (the first pass over the
low-rank factor, the selection and the gather of candidate rows each run at their own GB/s), so
the byte-cheapest setting may be slower than another, or than the dense head. When no setting
beats the dense head by ``MIN_GAIN``, or none reaches the targets below a quarter of the
vocabulary, the head is left dense (HiRE would not pay), and the report says so. The timings are
cached per machine and model (``timing_identity``: CPU, threads, kernel build, the head's weight
and decode form). ``measure=False``, or timing that fails, chooses by bytes read per token instead
(the cheapest, below half the dense head's bytes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from torch import nn

from hire import native
from hire.arch import head_module
from hire.calibrate.proxy_cache import head_fingerprint
from hire.calibrate.states import HeadRows, exact_topk
from hire.config import HeadConfig
from hire.files import atomic_write_json
from hire.layers.head import HiReLMHead, exact_logits, native_rows_for
from hire.paths import cache_dir
from hire.proxies import Cascade, LowRankProxy
from hire.proxies.whiten import Whitening, head_gram, second_moment, whitened
from hire.quant.tensor import QLinear
from hire.system import release_freed_memory, returned_allocations
from hire.topk import rank_counts, topk_ranks

log = logging.getLogger("hire")

TARGET_RECALL_AT_1 = 0.995
TARGET_RECALL_AT_K = 0.99
RANKS = (32, 64, 96, 128, 192, 256, 384)
CANDIDATES = (256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384, 24576, 32768, 49152, 65536)
# the first pass's local top-k (HeadConfig.select_blocks): each rank is also tried with the largest of
# these block counts that divides the vocabulary into blocks of at least MIN_BLOCK_ROWS rows (as the
# recommended settings do: 128 blocks of 384 rows for SmolLM2, 512 of 512 for Gemma-3's 262k)
BLOCKS = (512, 256, 128)
MIN_BLOCK_ROWS = 384

# timing: rounds after the warm-up (each round calls every head once, in turn), in blocks of
# consecutive rounds, the hidden states they cycle through, and how much faster than the dense head
# a HiRE head must be to be chosen (a HiRE head gives up a little recall; a gain inside the rounds'
# noise does not pay for it)
TIMING_ROUNDS = 50
TIMING_WARMUP = 5
TIMING_BLOCKS = 5  # the medians are the quietest block of rounds' (measure_head_times)
TIMING_STATES = 8
MIN_GAIN = 0.02
# settings whose times are within this fraction of the fastest's are taken as equally fast (two runs on a
# shared machine differ by more: a 0.5B's rank 128 / k' 12,288 and rank 192 / k' 6,144 changed places),
# and the one reading the fewest bytes among them is chosen
TIME_TIE = 0.05
FOLD_CHECK = 640  # check states per left-out domain (domain_folds): 3,200 in all at five domains
CHECK_CHUNK = 128  # check states scored at a time (their scores: 78 MB at a 152k vocabulary; 32 at a time took 1.2x as long)
DECODE_DTYPE = torch.float16  # the engine's default (hire.engine.Engine)
TIMINGS_VERSION = 1

Timer = Callable[[dict[str, Callable[[torch.Tensor], object]], torch.Tensor], dict[str, float]]


def _recalls(ranks: torch.Tensor, ladder: list[int], blocks: int = 1) -> torch.Tensor:
    """Per position, recall@1 and recall@k of the proxy's top-c for every c of the ladder, from where
    the true top-k stand in the proxy's order (``hire.topk.topk_ranks``), or with ``blocks``, of its
    local top-c over that many blocks (c / blocks per block) from their ranks within their blocks.
    # ranks: (N, k) -> (N, len(ladder), 2)"""
    limits = torch.tensor([c // blocks for c in ladder])
    inside = (ranks[:, None, :] < limits[None, :, None]).float()  # (N, L, k)
    return torch.stack([inside[..., 0], inside.mean(-1)], -1)


def pair_name(rank: int, candidates: int, blocks: int = 0) -> str:
    """A (rank, k'[, blocks]) setting's name in the timings: ``"64x1024"``, or ``"64x1024/128"`` with
    the first pass's local top-k over 128 blocks."""
    return f"{rank}x{candidates}" + (f"/{blocks}" if blocks else "")


def select_blocks_for(vocab: int, blocks: tuple[int, ...] = BLOCKS) -> int:
    """The block count the local top-k is tried with for a ``vocab``-row head (0: none fits)."""
    return next((b for b in blocks if vocab % b == 0 and vocab // b >= MIN_BLOCK_ROWS), 0)


class Fold(NamedTuple):
    """One check of the proxy: fitted on states whose second moment is ``sigma`` (E[x x^T], float64),
    scored on ``check`` states it was not fitted on."""

    sigma: torch.Tensor  # (D, D)
    check: torch.Tensor  # (N, D)


@returned_allocations()  # its float64 slices of states (29 MB each) go back when freed
def domain_folds(states: torch.Tensor, domains: torch.Tensor,
                 per_domain: int = FOLD_CHECK) -> tuple[list[Fold], torch.Tensor]:
    """Leave-one-domain-out folds: for each calibration domain, the proxy fitted on every other
    domain's states (their second moment, from per-domain sums: no copy of the states) and checked
    on ``per_domain`` of this domain's states, evenly spaced; and the second moment of all states (the
    final fit's). A domain the fit never saw is what every held-out domain of an evaluation is, and
    what a user's text may be: held-back windows of the fitted domains overstate recall there (a
    0.5B Qwen-Coder, rank 192, k' 6,144: 0.992 on held-back windows, 0.975 left-one-domain-out,
    0.979 on C source no calibration text is of). ``domains``: each state's domain id.
    # states: (N, D), domains: (N,) -> folds, sigma (D, D)"""
    rows_of = [(domains == d).nonzero()[:, 0] for d in domains.unique()]
    sums = []  # each domain's sum of x x^T
    for rows in rows_of:
        sums.append(torch.zeros(states.shape[1], states.shape[1], dtype=torch.float64))
        for start in range(0, rows.numel(), 4096):
            x = states[rows[start : start + 4096]].double()
            sums[-1].addmm_(x.t(), x)
    total = sum(sums)
    folds = []
    for rows, own in zip(rows_of, sums):
        pick = rows[torch.linspace(0, rows.numel() - 1, min(per_domain, rows.numel())).round().long()]
        folds.append(Fold((total - own) / (states.shape[0] - rows.numel()), states[pick].float().contiguous()))
    return folds, total / states.shape[0]


# stop scoring a rank's folds once even perfect recall on the states left would leave it short of a
# target: the choice is the same (what is skipped could not have met the targets), made sooner
STOP_HOPELESS = True


@torch.no_grad()
@returned_allocations()  # its loops allocate and free MBs in turn (hire.system)
def choose_head(model: nn.Module, cfg: HeadConfig, fit_states: torch.Tensor | None, check_states: torch.Tensor | None,
                target_recall_at_1: float = TARGET_RECALL_AT_1,
                target_recall_at_k: float = TARGET_RECALL_AT_K, ranks: tuple[int, ...] = RANKS,
                candidates: tuple[int, ...] = CANDIDATES, *, measure: bool = True,
                timer: Timer | None = None, blocks: tuple[int, ...] = BLOCKS,
                folds: tuple[list[Fold], torch.Tensor] | None = None) -> tuple[HeadConfig, dict]:
    """The fastest low-rank head (rank, k') reaching both recall targets on ``check_states``, with a
    proxy fitted on ``fit_states`` (each rank with its smallest k' reaching them), timed on this
    machine against the dense head (``head_timings``); or ``cfg`` with the head turned off when none
    reaches the targets or none beats the dense head by ``MIN_GAIN``. ``folds`` (``domain_folds``:
    the folds and all states' second moment) in place of fit and check states: the recall is over
    every fold's check states, each scored by the proxy fitted without them. Ranks above a quarter
    of the width (half with a 4-bit U: the same bytes) and k' above a quarter of the vocabulary are
    not tried, nor a rank whose U alone reads more than a lower rank's whole head that met the
    targets. Each rank is tried twice: with one top-k' over the vocabulary, and with the local top-k
    over ``select_blocks_for(vocab, blocks)`` blocks (its own smallest k' reaching the targets, a multiple of the block count; a
    faster first pass, usually a larger k'); a 4-bit U only with the local top-k where there are blocks.
    ``measure=False`` (or timing that fails) chooses the cheapest in bytes read per token instead,
    below half the dense head's bytes. ``timer``: what ``head_timings`` times the heads with
    (default ``measure_head_times``; tests pass a deterministic one).
    Returns the head config (``auto`` cleared, so that it is written as chosen) and a report: what
    was tried (with each pair's ``ms`` per token when timed), ``timing`` (the dense head's ms, where
    the timings came from), ``by`` ("time", "bytes", or "recall" when no setting reached the targets),
    ``chosen`` and ``reason``."""
    weight = HeadRows(model)  # float32 rows a slice at a time: never the whole head in float32
    fingerprint = head_fingerprint(model)
    vocab, width = weight.shape
    if folds is None:
        fold_list = [Fold(second_moment(fit_states), check_states)]
        sigma_all = fold_list[0].sigma
        fit_dtype = torch.float64  # the final fit's own proxy: the recall reported is the head's
    else:
        fold_list, sigma_all = folds
        fit_dtype = torch.float32  # one proxy per fold and rank, estimates only: 4x faster
    checks = [f.check for f in fold_list]
    n_check = sum(c.shape[0] for c in checks)
    cap = width // 2 if cfg.rank_bits == 4 else width // 4  # U's bytes at most a quarter of an 8-bit head's
    ranks = sorted(r for r in ranks if r <= cap) or [max(8 if cfg.rank_bits == 4 else 1, cap)]
    ladder = [c for c in candidates if cfg.k <= c <= vocab // 4] or [max(cfg.k, vocab // 4)]
    gram = head_gram(weight)
    counter = native.topk_rank_counts if native.available() else rank_counts  # where each check score stands
    # every fold's check states in one pass over the head (a GGUF head dequantized once, not per fold)
    trues = [t.split(CHECK_CHUNK) for t in exact_topk(weight, torch.cat(checks), cfg.k).split([c.shape[0] for c in checks])]
    release_freed_memory()  # the head's dequantized slices (W^T W, the exact top-k): 300 MB freed into the heap
    tried, met_ranks = [], {}
    whitenings: dict[int, Whitening] = {}  # per fold
    row_bytes = decode_row_bytes(model)
    nblocks = select_blocks_for(vocab, blocks)
    local_ladder = [c for c in ladder if nblocks and c % nblocks == 0]
    for i, rank in enumerate(ranks):
        fewest = min((e["bytes_fraction"] for e in tried if e["candidates"] is not None), default=None)
        proxy_bytes = LowRankProxy.u_nbytes(vocab, rank, cfg.rank_bits) + rank * width * 2  # U and V
        least = (proxy_bytes + ladder[0] * row_bytes) / (vocab * row_bytes)  # at the smallest k'
        if fewest is not None and least >= fewest:  # and so every higher rank (ranks ascend)
            tried += [{"rank": r, "candidates": None, "select_blocks": 0,
                       "skipped": f"U alone reads {100 * least:.1f}% or more of the head's bytes, a lower rank's "
                                  f"whole head {100 * fewest:.1f}%"} for r in ranks[i:]]
            break
        whole, local = torch.zeros(len(ladder), 2), torch.zeros(len(local_ladder), 2)
        seen = scored = 0
        for f, (fold, check, true) in enumerate(zip(fold_list, checks, trues)):
            if f not in whitenings:  # each fold's made once for every rank (0.1 s each; 13 MB at D = 896)
                whitenings[f] = whitened(weight, sigma=fold.sigma, gram=gram)
            proxy = next(LowRankProxy.fit_ranks(weight, [rank], u_bits=cfg.rank_bits, dtype=fit_dtype,
                                                whitening=whitenings[f]))
            # U dequantized once, not per chunk, in float16 (converted a slice of rows at a time by scores):
            # 78 MB at 152k x 256, not 155
            scorer = LowRankProxy(proxy.dense_u().half(), proxy.v)
            del proxy
            release_freed_memory()  # the fit's freed slices: up to 150 MB held in the heap otherwise
            for h, t in zip(check.split(CHECK_CHUNK), true):  # a chunk's scores at a time (GBs at a 152k vocabulary)
                ranks_h, block_ranks = topk_ranks(scorer.scores(h), t, nblocks or 1, counter=counter)
                whole += _recalls(ranks_h, ladder).sum(0)
                if local_ladder:
                    local += _recalls(block_ranks, local_ladder, nblocks).sum(0)
            del scorer
            release_freed_memory()
            seen, scored = seen + check.shape[0], scored + 1
            # the states not scored yet can add at most their count: if even that leaves the largest k'
            # short of a target in every variant, this rank cannot meet them (the same choice, sooner)
            left = n_check - seen
            best = [(acc[-1] + left) / n_check for acc in (whole, local) if acc.shape[0]]
            if STOP_HOPELESS and left and all(b[0] < target_recall_at_1 or b[1] < target_recall_at_k for b in best):
                break
        # a 4-bit U has a native first pass only block-major (LowRankProxy.block_major): with blocks, its
        # one top-k' over the vocabulary (torch's int4 GEMV, then a top-k) is not worth timing
        variants = [] if cfg.rank_bits == 4 and local_ladder else [(0, ladder, whole / seen)]
        if local_ladder:
            variants.append((nblocks, local_ladder, local / seen))
        for nb, steps, rec in variants:
            r1, rk = rec[:, 0].tolist(), rec[:, 1].tolist()
            ok = [i for i in range(len(steps)) if r1[i] >= target_recall_at_1 and rk[i] >= target_recall_at_k]
            entry = {"rank": rank, "candidates": steps[ok[0]] if ok else None, "select_blocks": nb,
                     "recall_at_1": r1[ok[0] if ok else -1], "recall_at_k": rk[ok[0] if ok else -1]}
            if seen < n_check:  # stopped early: the recall of the folds scored
                entry["folds_scored"] = scored
            if ok:  # what the head reads per token: the proxy, then the candidates' exact rows
                entry["bytes_fraction"] = (proxy_bytes + steps[ok[0]] * row_bytes) / (vocab * row_bytes)
                met_ranks[rank] = True
            tried.append(entry)
    whitenings.clear()
    # the met ranks' proxies as the final fit makes them (every state), for timing
    proxies = {}
    if met_ranks:
        fitted = LowRankProxy.fit_ranks(weight, list(met_ranks), u_bits=cfg.rank_bits, sigma=sigma_all, gram=gram,
                                        dtype=torch.float32)
        proxies = dict(zip(met_ranks, fitted))
    del weight
    met = [e for e in tried if e["candidates"] is not None]
    report = {"targets": {"recall_at_1": target_recall_at_1, "recall_at_k": target_recall_at_k},
              "check": "left-out domains" if folds is not None else "held-back windows",
              "folds": len(fold_list), "check_states": n_check, "tried": tried}
    if not met:
        return _dense(cfg, report, "recall",
                      f"no rank in {ranks} reached recall@1 >= {target_recall_at_1} and recall@{cfg.k} >= "
                      f"{target_recall_at_k} with k' <= {ladder[-1]}: the head stays dense")
    timing = None
    if measure:
        try:
            timing = head_timings(model, cfg, [(e["rank"], e["candidates"], proxies[e["rank"]], e["select_blocks"])
                                               for e in met], torch.cat(checks), fingerprint, timer=timer)
        except (RuntimeError, ValueError, OSError, NotImplementedError) as err:
            report["timing_error"] = f"{type(err).__name__}: {err}"
            log.warning("hire: timing the head settings failed (%s); choosing by bytes read instead",
                        report["timing_error"])
    proxies.clear()  # with the decode layouts timing gave them
    if timing is None:
        return _by_bytes(cfg, report, met, ranks, ladder, target_recall_at_1, target_recall_at_k)
    for e in met:
        e["ms"] = timing["pairs"][pair_name(e["rank"], e["candidates"], e["select_blocks"])]
    report["timing"] = {key: value for key, value in timing.items() if key != "pairs"}
    dense_ms = timing["dense_ms"]
    best = min(met, key=lambda e: e["ms"])
    near = [e for e in met if e["ms"] <= best["ms"] * (1 + TIME_TIE) and e["ms"] < dense_ms * (1 - MIN_GAIN)]
    if near:  # as fast as the fastest, within the noise: the fewest bytes
        best = min(near, key=lambda e: e["bytes_fraction"])
    where = f"rank {best['rank']}, k' {best['candidates']}" + (
        f" (local top-k over {best['select_blocks']} blocks)" if best["select_blocks"] else "")
    if best["ms"] >= dense_ms * (1 - MIN_GAIN):
        return _dense(cfg, report, "time",
                      f"the fastest of the {len(met)} settings reaching the recall targets ({where}) took "
                      f"{best['ms']:.3f} ms per token against the dense head's {dense_ms:.3f} ms, not "
                      f"{100 * MIN_GAIN:.0f}% under it, on this machine: the head stays dense")
    report["by"], report["chosen"] = "time", best
    report["reason"] = (f"{where}: {best['ms']:.3f} ms per token against the dense head's {dense_ms:.3f} ms "
                        f"({dense_ms / best['ms']:.2f}x), the fastest of the {len(met)} settings reaching the recall "
                        f"targets on this machine, or within {100 * TIME_TIE:.0f}% of it with fewer bytes read "
                        f"({100 * best['bytes_fraction']:.1f}% of the head's bytes)")
    log.info("hire: head chosen on calibration text: %s (check recall@1 %.4f, recall@k %.4f)", report["reason"],
             best["recall_at_1"], best["recall_at_k"])
    return chosen_head(cfg, best), report


def decode_row_bytes(model: nn.Module) -> float:
    """Bytes the engine reads per row of the LM head: its GGUF codes' (with scales) on a quantized
    model, else a ``DECODE_DTYPE`` row."""
    base = _head_base(model)
    if isinstance(base, QLinear):
        return base.q.row_nbytes()
    return base.weight.shape[1] * torch.finfo(DECODE_DTYPE).bits / 8


def _dense(cfg: HeadConfig, report: dict, by: str, reason: str) -> tuple[HeadConfig, dict]:
    report["by"], report["chosen"], report["reason"] = by, None, reason
    log.warning("hire: %s", reason)
    return chosen_head(cfg, None), report


def _by_bytes(cfg, report, met, ranks, ladder, target_recall_at_1, target_recall_at_k) -> tuple[HeadConfig, dict]:
    """The byte-based choice: the cheapest setting in bytes read per token, below half the dense head's."""
    best = min(met, key=lambda e: e["bytes_fraction"])
    if best["bytes_fraction"] >= 0.5:
        return _dense(cfg, report, "bytes",
                      f"no rank in {ranks} reached recall@1 >= {target_recall_at_1} and recall@{cfg.k} >= "
                      f"{target_recall_at_k} with k' <= {ladder[-1]} at under half the head's bytes: "
                      "the head stays dense")
    report["by"], report["chosen"] = "bytes", best
    report["reason"] = (f"rank {best['rank']}, k' {best['candidates']}: the cheapest of the {len(met)} settings "
                        f"reaching the recall targets in bytes read per token ({100 * best['bytes_fraction']:.1f}% "
                        "of the head's bytes; not timed)")
    log.info("hire: head chosen on calibration text: %s (check recall@1 %.4f, recall@k %.4f)", report["reason"],
             best["recall_at_1"], best["recall_at_k"])
    return chosen_head(cfg, best), report


def chosen_head(cfg: HeadConfig, chosen: dict | None) -> HeadConfig:
    """``cfg`` as ``choose_head`` resolves it: the chosen low-rank (rank, k'), or off for None."""
    if chosen is None:
        return dataclasses.replace(cfg, enabled=False, auto=False)
    return dataclasses.replace(cfg, auto=False, proxy="lowrank", rank=chosen["rank"], candidates=chosen["candidates"],
                               select_blocks=chosen.get("select_blocks", 0), proxy_file="")


# ---- timing -----------------------------------------------------------------------------------------


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _head_base(model: nn.Module) -> nn.Module:
    head = head_module(model)
    return getattr(head, "base_layer", head)


def head_form(model: nn.Module) -> str:
    """How decoding reads the dense head: its GGUF codes (format and layout), or 16-bit rows."""
    base = _head_base(model)
    if isinstance(base, QLinear):
        return f"gguf-{base.q.format}-{base.q.layout}"
    return str(DECODE_DTYPE).removeprefix("torch.")


def timing_identity(model: nn.Module) -> dict:
    """What head timings are valid for: the machine (CPU model, torch threads, the native kernels'
    build: sources, flags and CPU, or eager) and the head (its decode form)."""
    kernels = "eager" if os.environ.get("HIRE_NATIVE", "1") == "0" else native.build_dir().name
    return {"cpu": cpu_name(), "threads": torch.get_num_threads(), "kernels": kernels, "head": head_form(model)}


def timings_path(meta: dict) -> Path:
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir("timings") / f"head-{key}.json"


def load_timings(path: Path, meta: dict) -> dict | None:
    """The cached timings at ``path`` when they were measured for ``meta``; None when there are none.
    A damaged file is ignored with a warning (measured again and rewritten)."""
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
        if saved["meta"] != meta:
            return None
        dense = float(saved["dense_ms"])
        pairs = {str(name): float(ms) for name, ms in saved["pairs"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        log.warning("hire: head timings %s are damaged (%s: %s); measuring again", path, type(err).__name__, err)
        return None
    return {"dense_ms": dense, "pairs": pairs, "measured_at": saved.get("measured_at"), "load": saved.get("load")}


def head_timings(model: nn.Module, cfg: HeadConfig, pairs: list[tuple[int, int, LowRankProxy, int]],
                 states: torch.Tensor, fingerprint: str | None = None, timer: Timer | None = None) -> dict:
    """Median ms per token of the dense head and of a HiRE head for each (rank, k', fitted proxy, blocks) of
    ``pairs``, on this machine: from the cache (``timing_identity`` and the head's weight,
    ``fingerprint`` = proxy_cache.weight_fingerprint when already computed) when it
    holds every pair, else timed (``timer``, default ``measure_head_times``) on ``TIMING_STATES`` of
    ``states`` and cached. Returns {"dense_ms", "pairs": {pair_name: ms}, "source": "cache" or
    "measured", "file", "machine"}."""
    identity = timing_identity(model)
    fingerprint = fingerprint or head_fingerprint(model)
    meta = {**identity, "weight": fingerprint, "rank_bits": cfg.rank_bits,
            "version": TIMINGS_VERSION}
    path = timings_path(meta)
    names = [pair_name(rank, c, nb) for rank, c, _, nb in pairs]
    cached = load_timings(path, meta)
    if cached is not None and all(name in cached["pairs"] for name in names):
        return {"dense_ms": cached["dense_ms"], "pairs": {name: cached["pairs"][name] for name in names},
                "source": "cache", "measured_at": cached["measured_at"], "load": cached["load"], "file": str(path),
                "machine": identity}
    heads = timed_heads(model, cfg, pairs)
    pick = torch.linspace(0, states.shape[0] - 1, min(TIMING_STATES, states.shape[0])).long()
    hidden = states[pick].to(DECODE_DTYPE).contiguous()
    ms = (timer or measure_head_times)(heads, hidden)
    del heads
    timings = {"dense_ms": float(ms["dense"]), "pairs": {name: float(ms[name]) for name in names}}
    measured_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    atomic_write_json(path, {"meta": meta, **timings, "measured_at": measured_at,
                             "rounds": TIMING_ROUNDS, "blocks": TIMING_BLOCKS, "states": hidden.shape[0],
                             "load": _load()})
    log.info("hire: head timings (ms per token) cached in %s: dense %.3f, %s", path, timings["dense_ms"],
             ", ".join(f"{n} {v:.3f}" for n, v in timings["pairs"].items()))
    return {**timings, "source": "measured", "measured_at": measured_at, "load": _load(), "file": str(path),
            "machine": identity}


def _load() -> float | None:
    """The machine's 1-minute load average (this process included), when the system tells it."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def timed_heads(model: nn.Module, cfg: HeadConfig,
                pairs: list[tuple[int, int, LowRankProxy, int]]) -> dict[str, Callable[[torch.Tensor], object]]:
    """One token's head call for each head to time, as the engine makes it: ``"dense"``,
    ``exact_logits`` over every row of the head's decode form; each pair, a HiReLMHead with the
    pair's config (``chosen_head``) and proxy, prepared for decoding, and its ``decode``. A 16-bit
    copy of a float head is made once and shared.  # each callable: h (1, D) -> logits"""
    base = _head_base(model)
    if not isinstance(base, QLinear):  # one 16-bit decode weight for all of them (prepare_decode keeps it as is)
        shell = nn.Linear(base.in_features, base.out_features, bias=False, device="meta")
        shell.weight = nn.Parameter(base.weight.detach().to(DECODE_DTYPE).contiguous(), requires_grad=False)
        shell.bias = base.bias
        base = shell
    dense_weight = base.q if isinstance(base, QLinear) else base.weight.detach()
    use_native = native_rows_for(dense_weight)
    heads = {"dense": lambda h: exact_logits(h, dense_weight, None, base.bias, use_native)}
    for rank, count, proxy, nb in pairs:
        pair_cfg = chosen_head(cfg, {"rank": rank, "candidates": count, "select_blocks": nb})
        # hire.patch.build_head_selector's low-rank selector, on the proxy already fitted
        head = HiReLMHead(base, pair_cfg, Cascade([proxy], [count], pair_cfg.select_blocks))
        head.prepare_decode(DECODE_DTYPE)
        release_freed_memory()  # packing leaves ~10x U's bytes of freed heap blocks behind (hire.system)
        heads[pair_name(rank, count, nb)] = head.decode
    return heads


def measure_head_times(heads: dict[str, Callable[[torch.Tensor], object]], hidden: torch.Tensor, *,
                       rounds: int | None = None, warmup: int | None = None, blocks: int | None = None,
                       clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median ms of one call of each head, timed in turns in one loop (A B A B ..., the order
    rotated every round so none always follows the same one), on one hidden state per round
    (``hidden``'s rows in turn), after ``warmup`` untimed rounds (defaults ``TIMING_ROUNDS``,
    ``TIMING_WARMUP``, ``TIMING_BLOCKS``).
    The rounds fall into ``blocks`` runs of consecutive rounds; the medians are those of the quietest
    run (the least total time): on a shared machine another process's burst slows every head of the
    rounds it lands on, and a head with several threaded passes (HiRE's) more than one with a single
    one, so a burst would decide the choice if all rounds were pooled.  # hidden: (N, D) -> {name: ms}"""
    rounds = TIMING_ROUNDS if rounds is None else rounds
    warmup = TIMING_WARMUP if warmup is None else warmup
    blocks = TIMING_BLOCKS if blocks is None else blocks
    if rounds < 1 or blocks < 1 or not heads:
        raise ValueError(f"timing needs at least one round, one block and one head, got {rounds} rounds, "
                         f"{blocks} blocks, {len(heads)} heads")
    blocks = min(blocks, rounds)
    names = list(heads)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(warmup + rounds):
        h = hidden[r % hidden.shape[0]].unsqueeze(0)
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            start = clock()
            heads[name](h)
            elapsed = clock() - start
            if r >= warmup:
                samples[name].append(elapsed)
    bounds = [rounds * b // blocks for b in range(blocks + 1)]
    medians = [{name: 1e3 * statistics.median(samples[name][lo:hi]) for name in names}
               for lo, hi in zip(bounds, bounds[1:])]
    return min(medians, key=lambda block: sum(block.values()))
