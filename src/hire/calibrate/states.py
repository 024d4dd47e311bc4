"""Real inputs of the LM head, and how well a selector's candidates cover their exact top-k."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from hire.arch import head_module
from hire.config import HeadConfig
from hire.topk import recall_at_k


@torch.no_grad()
def collect_head_states(model: nn.Module, windows: torch.Tensor, progress: bool = True, max_states: int | None = None):
    """Inputs of the LM head over token windows (a dense forward pass each).

    # windows: (W, T) -> states: (W * T, D)
    """
    head = head_module(model)
    captured: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda mod, args, out: captured.append(args[0].detach().reshape(-1, args[0].shape[-1])))
    try:
        for window in tqdm(windows, desc="calibration states", disable=not progress, leave=False):
            model(window.unsqueeze(0), use_cache=False)
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
