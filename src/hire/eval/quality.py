"""`hire eval`: what HiRE costs in quality and saves in bytes, on a real model and real text.

Perplexity (teacher forcing, each window scored from its second token) uses the dense LM head in
both columns, because a normalised softmax needs every logit; the HiRE column runs every FFN
the way HiRE decodes (``mode="always"``): a second forward pass per window, which a model whose
FFNs stay dense (GGUF codes, or a head-only config) does not need, its states being the dense ones.
The head is read in slices of rows, never as a window's whole (T, V) logits. Greedy agreement
compares the next-token argmax of the full HiRE model (HiRE FFN + HiRE head) with the dense model's
at every evaluated position.
For a model trained with top-k FFNs (``config.hire_topk``) the "dense" column is that model as
trained: every neuron computed, its exact top-k kept (``reference`` in the result says which).
"""

from __future__ import annotations

import math
from pathlib import Path
import time
from typing import NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

from hire.calibrate.states import STATE_BATCH, HeadRows, collect_head_states, head_base
from hire.calibrate.prepare import load_for_decode
from hire.config import HiReConfig
from hire.data import CALIBRATION_WINDOWS, UNSEEN_DOMAINS, load_corpus, load_domains, read_text, token_windows
from hire.eval.bytes import bytes_per_token
from hire.layers.head import LogitMap
from hire.patch import hire_layers, set_mode, sparsify_, unsparsify_
from hire.system import release_freed_memory, returned_allocations
from hire.topk import merge_topk, recall_at_k


SELECT_CHUNK = 64  # positions the HiRE head's selector takes at a time (eager scores: (64, V) float32; native: U read once a chunk)
HEAD_ROWS = 16384  # rows of the dense head read at a time ((T, 16384) float32 logits: 33 MB for 512 tokens)


class _Pass(NamedTuple):
    nll: float  # summed NLL of the window's tokens 1..T-1
    top: torch.Tensor  # (T, k): the dense head's top-k, by logit descending
    cand: torch.Tensor | None  # (T, k'): the HiRE head's candidates, or None without one
    hire_arg: torch.Tensor | None  # (T,): the HiRE head's argmax (its candidates' exact logits), or None


def _states(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """The head's inputs over windows as the model is set (``set_mode``), ``STATE_BATCH`` windows a
    forward pass (the head's pass stays one window at a time: over four, its candidates' (4T, k')
    indices and logits and their temporaries raised a first run's peak from 1.71 to 2.04 GB on
    Qwen2.5 0.5B).  # windows: (W, T) -> (W, T, D)"""
    return collect_head_states(model, windows, progress=False).view(*windows.shape, -1)


@returned_allocations()  # MB-sized slices allocated and freed in turn (hire.system)
def _head_pass(model: nn.Module, states: torch.Tensor, window: torch.Tensor, head, k: int) -> _Pass:
    """One window's pass from the head's inputs on (``_states``): the dense head ``HEAD_ROWS`` rows at
    a time (a GGUF head dequantized once per window), never the whole window's (T, V) logits (with
    their log-softmax, 0.6 GB for 512 tokens of a 152k vocabulary): each slice's logits update every
    position's running log-sum-exp, its target's logit, its running top-k and its HiRE candidates'
    exact logits.  # states: (T, D), window: (T,)"""
    n_pos, states = states.shape[0], states.float()
    # the candidates as decoding selects them (the native first pass, SELECT_CHUNK tokens a call, where it runs)
    cand = None if head is None else torch.cat([head.selector.decode_select_batch(h) for h in states.split(SELECT_CHUNK)])
    rows, bias = HeadRows(model), head_base(model).bias
    logit_map = LogitMap.of(model)  # as the model's forward does after its head (Gemma 2's cap, Granite's divisor)
    targets = window[1:]  # position t predicts token t + 1; the last position has none
    at = torch.arange(targets.shape[0])
    peak = torch.full((n_pos,), float("-inf"))
    mass = torch.zeros(n_pos)
    target_logit = torch.zeros(targets.shape[0])
    top = None
    cand_logits = None if cand is None else torch.empty(cand.numel())
    if cand is not None:  # the (position, candidate) pairs grouped by the slice of rows that holds them
        flat = cand.reshape(-1)
        slice_of = torch.div(flat, HEAD_ROWS, rounding_mode="floor")
        order = torch.argsort(slice_of, stable=True)
        bounds = [0, *torch.bincount(slice_of, minlength=-(-rows.shape[0] // HEAD_ROWS)).cumsum(0).tolist()]
        del slice_of
    for start in range(0, rows.shape[0], HEAD_ROWS):
        logits = states @ rows[start : start + HEAD_ROWS].t()  # (T, c)
        stop = start + logits.shape[1]
        if bias is not None:
            logits += bias[start:stop].float()
        if logit_map is not None:
            logits = logit_map(logits)
        high = torch.maximum(peak, logits.amax(-1))
        mass = mass * torch.exp(peak - high) + torch.exp(logits - high[:, None]).sum(-1)
        peak = high
        here = (targets >= start) & (targets < stop)
        target_logit[here] = logits[at[here], targets[here] - start]
        v, i = logits.topk(min(k, logits.shape[1]), dim=-1)
        top = merge_topk(top, v, i + start, k)
        if cand is not None:
            pick = order[bounds[start // HEAD_ROWS] : bounds[start // HEAD_ROWS + 1]]  # flat (position, j) pairs
            cand_logits[pick] = logits[torch.div(pick, cand.shape[1], rounding_mode="floor"), flat[pick] - start]
        del logits
    nll = float((peak[:-1] + mass[:-1].log() - target_logit).sum())  # log-sum-exp minus the target's logit
    if cand is None:
        return _Pass(nll, top[1], None, None)
    cand_logits = cand_logits.view(cand.shape)
    return _Pass(nll, top[1], cand, cand.gather(-1, cand_logits.argmax(-1, keepdim=True))[:, 0])
def _nll(logits: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    # logits: (T, V), window: (T,) -> summed NLL of tokens 1..T-1
    return torch.nn.functional.cross_entropy(logits[:-1], window[1:], reduction="sum")


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, progress: bool = False) -> float:
    """Perplexity of ``model`` as it is (patched or not, in whatever mode) over ``windows`` (W, T),
    each window scored from its second token."""
    nll, tokens = 0.0, 0
    for window in tqdm(windows, desc="perplexity", disable=not progress, leave=False):
        nll += float(_nll(model(window.unsqueeze(0), use_cache=False).logits[0].float(), window))
        tokens += window.shape[0] - 1
    return math.exp(nll / tokens)


def _reference_name(model: nn.Module) -> str:
    """What the "dense" column computes: the dense model, or a trained top-k model's exact top-k."""
    topk = getattr(model.config, "hire_topk", None)
    if topk:
        return f"exact top-k FFN (density {topk['density']}, groups of {topk['group_size']})"
    return "dense"


@torch.no_grad()
def evaluate(
    model: nn.Module,
    windows: torch.Tensor,
    config: HiReConfig,
    *,
    head_proxy=None,
    head_states: torch.Tensor | None = None,
    progress: bool = True,
) -> dict:
    """Patch ``model`` with ``config``, measure on ``windows`` (W, T), restore the model.

    Returns a flat dict (the JSON of ``hire eval``)."""
    start = time.time()
    sparsify_(model, config, head_proxy=head_proxy, head_states=head_states)
    release_freed_memory()  # what loading and calibrating freed: the windows start from what is live
    head, ffns = hire_layers(model)
    k = config.head.k
    sums = dict(nll_dense=0.0, nll_hire=0.0, tokens=0, r1=0.0, rk=0.0, head_agree=0, agree=0, positions=0)
    try:
        for f in ffns:
            f.reset_recall()
            f.track_recall = True
        with tqdm(total=len(windows), desc="eval windows", disable=not progress) as bar:
            for group in windows.split(STATE_BATCH):
                set_mode(model, head="dense", ffn="dense")
                dense_states = _states(model, group)
                if ffns:  # the HiRE FFNs change every later hidden state: a second pass
                    set_mode(model, head="dense", ffn="always")
                    full_states = _states(model, group)
                for j, window in enumerate(group):
                    dense = _head_pass(model, dense_states[j], window, head, k)
                    sums["nll_dense"] += dense.nll
                    sums["tokens"] += window.shape[0] - 1
                    dense_arg = dense.top[:, 0]
                    if head is not None:
                        sums["r1"] += float(recall_at_k(dense.top[:, :1], dense.cand).sum())
                        sums["rk"] += float(recall_at_k(dense.top, dense.cand).sum())
                        sums["head_agree"] += int((dense.hire_arg == dense_arg).sum())
                    if ffns:
                        full = _head_pass(model, full_states[j], window, head, k)
                        sums["nll_hire"] += full.nll
                        full_arg = full.hire_arg if head is not None else full.top[:, 0]
                    else:  # only the head differs: the pass above computed every state the HiRE model would
                        sums["nll_hire"] = sums["nll_dense"]
                        full_arg = dense.hire_arg if head is not None else dense_arg
                    sums["agree"] += int((full_arg == dense_arg).sum())
                    sums["positions"] += window.shape[0]
                    bar.update(1)
        ffn_recall = [f.recall() for f in ffns]
        nbytes = bytes_per_token(model)
    finally:
        for f in ffns:
            f.track_recall = False
        set_mode(model, head="decode", ffn="decode")
        unsparsify_(model)
    positions = sums["positions"]
    dense_b, hire_b = nbytes["dense"], nbytes["hire"]
    result = {
        "model": getattr(model.config, "name_or_path", "") or model.config.model_type,
        "architecture": model.config.model_type,
        "reference": _reference_name(model),
        "config": config.to_dict(),
        "windows": int(windows.shape[0]),
        "seq_len": int(windows.shape[1]),
        "positions": positions,
        "ppl_dense": math.exp(sums["nll_dense"] / sums["tokens"]),
        "ppl_hire": math.exp(sums["nll_hire"] / sums["tokens"]),
        "greedy_agreement": sums["agree"] / positions,
        "head_recall_at_1": sums["r1"] / positions if head is not None else None,
        "head_recall_at_k": sums["rk"] / positions if head is not None else None,
        "head_greedy_agreement": sums["head_agree"] / positions if head is not None else None,
        "ffn_recall": sum(ffn_recall) / len(ffn_recall) if ffns else None,
        "ffn_recall_per_layer": ffn_recall,
        "bytes_per_token_dense": dense_b["total"],
        "bytes_per_token_hire": hire_b["total"],
        "head_bytes_fraction": hire_b["head"] / dense_b["head"],
        "head_bytes_fraction_16bit": hire_b["head"] / dense_b["head_16bit"],
        "ffn_bytes_fraction": hire_b["ffn"] / dense_b["ffn"] if dense_b["ffn"] else None,
        "bytes_dense": dense_b,
        "bytes_hire": hire_b,
        "seconds": time.time() - start,
    }
    result["ppl_increase"] = result["ppl_hire"] / result["ppl_dense"] - 1
    result["ideal_speedup"] = dense_b["total"] / hire_b["total"]
    return result


WORST = {"ppl_increase": max, "greedy_agreement": min, "head_recall_at_1": min, "head_recall_at_k": min,
         "head_greedy_agreement": min, "ffn_recall": min, "head_bytes_fraction": max, "head_bytes_fraction_16bit": max}  # what "worst" means for each per-domain figure


def evaluate_model(model_name: str, config: HiReConfig, *, windows: int = 8, seq_len: int = 512,
                   calib_windows: int = CALIBRATION_WINDOWS, progress: bool = True, quantized: bool = True,
                   texts: list[str | Path] | None = None, domains: bool = False) -> dict:
    """`hire eval`: load ``model_name`` with the head proxy ``config`` needs, then :func:`evaluate` on
    ``windows`` windows of ``seq_len`` tokens of the corpus's evaluation split, or of each of
    ``texts`` (files, directories or JSONL: ``hire.data.read_text``; several give per-domain results
    and the worst of each figure). ``quantized``: a GGUF model runs in its block codes with
    ``quantized_config(config)`` (HiRE head only), as hire bench and hire generate run it; else
    dequantized to float32 with ``config`` as given. ``domains``: the held-out side of
    ``hire.data.load_domains`` (prose, python, docs, and the unseen c, english-chat, languages) as
    the texts. An ``auto`` head is chosen on calibration text first (``prepare_model``); the result's
    ``config`` is the one measured and ``auto`` the choice's report."""
    sources = {str(p): read_text(p) for p in texts or []}  # read (and refused) before the model loads
    prepared = load_for_decode(model_name, config, quantized=quantized, seq_len=seq_len, calib_windows=calib_windows,
                               progress=progress)
    model, tokenizer, head_proxy, config = prepared.model, prepared.tokenizer, prepared.head_proxy, prepared.config
    quantized = prepared.quantized
    if domains:
        sources.update(load_domains(tokenizer)["held_out"])
    if not sources:
        sources = {"corpus evaluation split": load_corpus().text("evaluation")}
    results = {}
    for name, text in sources.items():
        held = token_windows(tokenizer, text, seq_len, windows, source=name, spread=bool(texts) or domains)
        results[name] = evaluate(model, held, config, head_proxy=head_proxy, progress=progress)
        results[name].update(model=model_name, weights="gguf" if quantized else "float32", text=name)
    if prepared.auto is not None:
        for r in results.values():
            r["auto"] = prepared.auto
    if len(results) == 1:
        return next(iter(results.values()))
    worst = {key: pick(r[key] for r in results.values() if r[key] is not None) if any(
        r[key] is not None for r in results.values()) else None for key, pick in WORST.items()}
    first = next(iter(results.values()))
    out = {"model": model_name, "weights": first["weights"], "config": first["config"], "domains": results,
           "worst": worst, "unseen": [name for name in UNSEEN_DOMAINS if domains and name in results]}
    if prepared.auto is not None:
        out["auto"] = prepared.auto
    return out
