"""The low-rank head proxy: fitted (and trained) once per model, config and calibration data, saved
atomically, and found again in the cache by what it was fitted for."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from hire.calibrate.states import HeadRows, collect_head_states, head_base, head_weight, needs_states
from hire.calibrate.train import train_lowrank_proxy
from hire.config import HeadConfig
from hire.files import atomic_path
from hire.paths import cache_dir
from hire.proxies import LowRankProxy
from hire.quant.tensor import QLinear
from hire.system import returned_allocations

log = logging.getLogger("hire")


def fit_head_proxy(model: nn.Module, cfg: HeadConfig, states: torch.Tensor) -> LowRankProxy:
    """Activation-aware low-rank proxy of the LM head, for ``lowrank`` and ``cascade`` heads."""
    return LowRankProxy.from_weight(HeadRows(model), cfg.rank, states=states, u_bits=cfg.rank_bits)


@returned_allocations()  # the head read a slice at a time (hire.system)
def fit_and_train(model: nn.Module, cfg: HeadConfig, states: torch.Tensor, progress: bool = True):
    """The activation-aware fit, then ``cfg.train_steps`` of recall training when asked, then the
    rows' optimism bias (``cfg.optimism``, LowRankProxy.with_optimism) for the final factors, which
    also keeps each row's error spread (exact sampling's tail bound, hire.engine.sampling).
    Returns the proxy and the training log (None without training)."""
    proxy, log = fit_head_proxy(model, cfg, states), None
    if cfg.train_steps:
        proxy, log = train_lowrank_proxy(head_weight(model), proxy, states, cfg.train_steps, progress=progress)
    if cfg.optimism:
        proxy = proxy.with_optimism(HeadRows(model), states, cfg.optimism)
    return proxy, log


FINGERPRINT_SAMPLES = 65536  # about this many values of a weight are hashed


def weight_fingerprint(weight: torch.Tensor) -> str:
    """A cheap identity of a weight: shape and a hash of a strided sample of its values."""
    flat = weight.detach().reshape(-1)
    sample = flat[:: max(1, flat.numel() // FINGERPRINT_SAMPLES)].float().numpy().tobytes()
    return hashlib.sha256(f"{tuple(weight.shape)}".encode() + sample).hexdigest()[:16]


FINGERPRINT_ROWS = 4096  # rows of a quantized head dequantized at a time by head_fingerprint


@returned_allocations()  # the head dequantized a block at a time (hire.system)
def head_fingerprint(model: nn.Module) -> str:
    """``weight_fingerprint`` of the LM head's weight, the same string, without the whole float32
    head in memory when it is in GGUF codes (a QLinear's weight dequantizes every row: 0.9 GB for a
    1.5B's head, just to take FINGERPRINT_SAMPLES values of it): its rows are dequantized a block at a time and
    only the sampled values kept."""
    base = head_base(model)
    if not isinstance(base, QLinear):
        return weight_fingerprint(head_weight(model))
    rows, cols = base.q.shape
    step = max(1, rows * cols // FINGERPRINT_SAMPLES)
    parts = []
    for r0 in range(0, rows, FINGERPRINT_ROWS):
        r1 = min(rows, r0 + FINGERPRINT_ROWS)
        flat = base.q.dequantize(slice(r0, r1)).reshape(-1)
        first = (-(r0 * cols)) % step  # the first sampled flat index at or after r0 * cols, from this block's start
        parts.append(flat[first::step].clone())  # not a view: it would keep the whole block alive
    sample = torch.cat(parts).float().numpy().tobytes()
    return hashlib.sha256(f"{(rows, cols)}".encode() + sample).hexdigest()[:16]


def proxy_meta(model: nn.Module | None, cfg: HeadConfig, fingerprint: str | None = None) -> dict:
    """What a saved low-rank head proxy must match to be used for ``model`` under ``cfg``.
    ``fingerprint``: the head's ``head_fingerprint`` taken before (a server's, before its engine
    converted the model), in place of ``model``."""
    return {"weight": fingerprint or head_fingerprint(model), "rank": cfg.rank, "rank_bits": cfg.rank_bits,
            "optimism": cfg.optimism}


META_DEFAULTS = {"optimism": 0.0}  # what a proxy file written before the field existed was fitted with


def save_head_proxy(path: str | Path, proxy: LowRankProxy, meta: dict) -> None:
    """Write atomically (hire.files.atomic_path): a half-written file is never read."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in proxy.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"hire": json.dumps(meta, sort_keys=True)})


def load_head_proxy(path: str | Path, expect: dict | None = None) -> LowRankProxy:
    """Load a saved proxy; raise ValueError if it is corrupt or was fitted for something else."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"head proxy file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["hire"])
            state = {k: f.get_tensor(k) for k in f.keys()}
        proxy = LowRankProxy.from_state(state)
    except Exception as err:
        raise ValueError(f"head proxy file {path} is corrupt ({type(err).__name__}: {err}); delete it to refit") from err
    for key, value in (expect or {}).items():
        if meta.get(key, META_DEFAULTS.get(key)) != value:
            raise ValueError(f"head proxy file {path} was fitted for {key}={meta.get(key)!r}, not {value!r}; refit it")
    optimism = meta.get("optimism", META_DEFAULTS["optimism"])
    if proxy.spread is None and proxy.bias is not None and optimism:
        # written before the spread was kept: its bias is optimism x spread (LowRankProxy.with_optimism),
        # to float16 rounding, which a margin of several spreads absorbs
        proxy = proxy.with_spread(proxy.bias.float() / optimism)
    return proxy


def cached_head_proxy(model: nn.Module, cfg: HeadConfig, windows: torch.Tensor, progress: bool = True,
                      fit: bool = True, states: Callable[[], torch.Tensor] | None = None, states_dtype: str = "float32"):
    """The low-rank head proxy for ``cfg``: loaded from ``cfg.proxy_file`` when the config names
    one, else from the cache, else fitted (and trained, with ``cfg.train_steps``) on ``windows``
    and cached (``fit=False``: None instead of fitting). ``states``: gives the head's inputs over
    ``windows`` when the fit needs them (default: collected here); ``states_dtype``: what they are
    computed in (resolve_auto_head's), part of the cache key.

    Returns None when the head config needs no fitted proxy.
    """
    if not needs_states(cfg):
        return None
    if cfg.proxy_file:
        return load_head_proxy(cfg.proxy_file, expect=proxy_meta(model, cfg))
    meta = {**proxy_meta(model, cfg), "windows": hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16]}
    if cfg.train_steps:
        meta["train_steps"] = cfg.train_steps
    if states_dtype != "float32":
        meta["states"] = states_dtype
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir("proxies") / f"head-lowrank-{key}.safetensors"
    if path.is_file():
        try:
            return load_head_proxy(path, expect=meta)
        except ValueError as err:
            log.warning("%s; refitting", err)
    if not fit:
        return None
    fit_states = states() if states is not None else collect_head_states(model, windows, progress=progress,
                                                                         bfloat16=states_dtype == "bfloat16")
    proxy, _ = fit_and_train(model, cfg, fit_states, progress=progress)
    save_head_proxy(path, proxy, meta)
    return proxy
