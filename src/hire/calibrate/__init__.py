"""Fitting data-aware proxies from real hidden states (``states``), training them (``train``), and
saving / loading / caching them (``proxy_cache``)."""

from hire.calibrate.proxy_cache import (
    cached_head_proxy,
    fit_and_train,
    fit_head_proxy,
    load_head_proxy,
    proxy_meta,
    save_head_proxy,
    weight_fingerprint,
)
from hire.calibrate.states import collect_head_states, head_recall, head_weight, needs_states

__all__ = [
    "cached_head_proxy", "collect_head_states", "fit_and_train", "fit_head_proxy", "head_recall", "head_weight",
    "load_head_proxy", "needs_states", "proxy_meta", "save_head_proxy", "weight_fingerprint",
]
