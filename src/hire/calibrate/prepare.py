"""A model ready for HiRE: loaded, with the fitted head proxy its config needs (from the cache
when it was fitted before). What every measuring command (eval, bench, generate, --tp) starts with."""

from __future__ import annotations

from typing import NamedTuple

from torch import nn

from hire.calibrate import cached_head_proxy, needs_states
from hire.config import HiReConfig
from hire.data import load_corpus, token_windows
from hire.models import load_model


class Prepared(NamedTuple):
    model: nn.Module
    tokenizer: object
    head_proxy: object | None  # a LowRankProxy when the head config needs one, else None


def prepare_model(model_name: str, config: HiReConfig | None, *, seq_len: int = 512, calib_windows: int = 16,
                  progress: bool = True, quantized: bool = False) -> Prepared:
    """Load ``model_name`` and fetch (or fit on ``calib_windows`` calibration windows of ``seq_len``
    tokens, and cache) the low-rank head proxy ``config`` needs. ``config=None``: the model alone."""
    model, tokenizer = load_model(model_name, quantized=quantized)
    head_proxy = None
    if config is not None and needs_states(config.head):
        calib = token_windows(tokenizer, load_corpus().text("calibration"), seq_len, calib_windows)
        head_proxy = cached_head_proxy(model, config.head, calib, progress=progress)
    return Prepared(model, tokenizer, head_proxy)
