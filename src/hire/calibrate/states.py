"""Real inputs of the LM head, and how well a selector's candidates cover their exact top-k."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from hire.arch import head_module
from hire.config import HeadConfig
from hire.topk import merge_topk, recall_at_k


STATE_BATCH = 4  # windows per forward pass: a GGUF model's codes are dequantized once per pass, and
# larger products run faster (Qwen2.5 0.5B in its codes, bfloat16, 8 windows of 512 tokens: 14.1-15.5 s
# one at a time, 11.3-11.8 s four at a time; the states are the same)


class _HeadReached(Exception):
    """Raised by collect_head_states' hook: the head's input is all it needs of a forward pass."""


@torch.no_grad()
def collect_head_states(model: nn.Module, windows: torch.Tensor, progress: bool = True, max_states: int | None = None,
                        bfloat16: bool = False, batch: int = STATE_BATCH):
    """Inputs of the LM head over token windows (a dense forward pass each, stopped at the head: its
    logits, a (T, V) float32 tensor, 311 MB for 512 tokens of a 152k vocabulary, are not computed).
    ``bfloat16``: the passes' matrix products in bfloat16 (torch.autocast; the states differ from
    float32's by ~1 % of their norm), for a CPU that multiplies bfloat16 in hardware
    (``hire.system.native_bfloat16``). The states are float32 either way.

    # windows: (W, T) -> states: (W * T, D)
    """
    head = head_module(model)
    captured: list[torch.Tensor] = []

    def capture(mod, args):
        captured.append(args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32, copy=True))
        raise _HeadReached

    hook = head.register_forward_pre_hook(capture)
    try:
        with tqdm(total=len(windows), desc="calibration states", disable=not progress, leave=False) as bar:
            for group in windows.split(max(1, batch)):
                try:
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bfloat16):
                        model(group, use_cache=False)
                except _HeadReached:
                    pass
                bar.update(len(group))
    finally:
        hook.remove()
    states = torch.cat(captured)
    return states if max_states is None else states[:max_states]


def head_base(model: nn.Module) -> nn.Module:
    """The LM head module, the original while patched."""
    head = head_module(model)
    return getattr(head, "base_layer", head)


def head_weight(model: nn.Module) -> torch.Tensor:
    """The LM head's weight (V, D), the original's while patched."""
    return head_base(model).weight.detach()


class HeadRows:
    """The LM head's weight (V, D) as float32 rows, a slice at a time (``rows[start:stop]``): a GGUF
    head's codes are dequantized slice by slice, never whole (a 1.5B model's head is 0.9 GB in
    float32); what fitting and checking the head's proxy read it through."""

    def __init__(self, model: nn.Module):
        base = head_base(model)
        q = getattr(base, "q", None)  # a QLinear (hire.quant.tensor): the codes
        if q is not None and q.layout != "rows":
            q = None  # a column-major layout dequantizes whole anyway: once, below
        self._q = q
        self._weight = None if q is not None else base.weight.detach()
        self.shape = tuple(q.shape) if q is not None else tuple(self._weight.shape)

    def __getitem__(self, rows: slice) -> torch.Tensor:
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError(f"HeadRows reads a contiguous slice of rows, got {rows!r}")
        if self._q is not None:
            return self._q.dequantize(rows)
        return self._weight[rows].float()


def exact_topk(rows: HeadRows | torch.Tensor, states: torch.Tensor, k: int, block: int = 4096) -> torch.Tensor:
    """The exact top-k rows of ``rows`` for each of ``states``, reading ``block`` rows at a time (the
    states' logits over the whole vocabulary are never held at once).
    # rows: (V, D), states: (N, D) -> (N, k) int64, by logit descending"""
    best, states = None, states.float()
    for start in range(0, rows.shape[0], block):
        logits = states @ rows[start : start + block].float().t()  # (N, block)
        v, i = logits.topk(min(k, logits.shape[1]), dim=-1)
        best = merge_topk(best, v, i + start, k)
    return best[1]


def needs_states(cfg: HeadConfig) -> bool:
    """True when the head proxy is fitted to real hidden states (``lowrank``, ``cascade``)."""
    return cfg.enabled and cfg.proxy in ("lowrank", "cascade")


@torch.no_grad()
def head_recall(weight: torch.Tensor, selector, states: torch.Tensor, k: int, chunk: int = 512) -> tuple[float, float]:
    """Recall@1 and recall@k of ``selector``'s candidates against the exact top-k of ``weight``
    over head inputs ``states`` (N, D)."""
    r1, rk = [], []
    for h in states.split(chunk):
        true = torch.nn.functional.linear(h, weight.to(h.dtype)).topk(k, dim=-1).indices
        idx = selector.select(h)
        r1.append(recall_at_k(true[:, :1], idx))
        rk.append(recall_at_k(true, idx))
    return torch.cat(r1).mean().item(), torch.cat(rk).mean().item()
