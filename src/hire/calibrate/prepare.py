"""A model ready for HiRE: loaded, with the fitted head proxy its config needs (from the cache
when it was fitted before). What every measuring command (eval, bench, generate, --tp) starts with."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Callable, NamedTuple

import torch
from torch import nn

from hire.calibrate.auto import (RANKS, TARGET_RECALL_AT_1, TARGET_RECALL_AT_K, choose_head, chosen_head, domain_folds,
                                 timing_identity)
from hire.calibrate.proxy_cache import cached_head_proxy, head_fingerprint
from hire.calibrate.states import collect_head_states, needs_states
from hire.config import HiReConfig
from hire.data import CALIBRATION_WINDOWS, calibration_windows
from hire.files import atomic_path
from hire.models import load_model
from hire.models.load import gguf_source
from hire.paths import cache_dir
from hire.quant.load import check_act_bits, set_act_bits
from hire.quant.tensor import ACT_BITS
from hire.recommended import quantized_config
from hire.system import native_bfloat16, release_freed_memory


class Prepared(NamedTuple):
    model: nn.Module
    tokenizer: object
    head_proxy: object | None  # a LowRankProxy when the head config needs one, else None
    config: HiReConfig | None  # the config given, with an ``auto`` head resolved to what was chosen
    auto: dict | None = None  # hire.calibrate.auto.choose_head's report when the head was chosen
    quantized: bool = False  # the model runs in its GGUF block codes (load_for_decode)
    # fit=False and the head's choice or proxy not cached: why the head was left dense (config's head off)
    pending: str | None = None


def resolve_auto_head(model: nn.Module, config: HiReConfig, windows: torch.Tensor,
                      progress: bool = True, measure: bool = True, fit: bool = True,
                      states: Callable[[], torch.Tensor] | None = None,
                      domains: torch.Tensor | None = None,
                      states_dtype: str = "float32") -> tuple[HiReConfig, dict] | None:
    """``config`` with its ``auto`` head chosen (hire.calibrate.auto.choose_head) on ``windows``: with
    ``domains`` (each window's domain, two or more of them) the proxy is checked on each domain fitted
    on the others (hire.calibrate.auto.domain_folds), else fitted on three windows in four and checked
    on the fourth; the fastest setting on this
    machine wins (``measure=False``: the cheapest in bytes). The choice is cached by weight, windows,
    targets and, as it was timed, the machine and the head's decode form (a JSON file beside the
    fitted proxies; the head timings have their own cache, hire.calibrate.auto.head_timings).
    ``fit=False``: None instead of choosing when the choice is not cached. ``states``: gives the head's
    inputs over all ``windows`` (W * T, D) when they are needed (``prepare_model`` shares them with
    the proxy's fit); default: collected here. ``states_dtype``: what those states were computed in
    ("bfloat16": collect_head_states' bfloat16 passes), part of the cache key."""
    if windows.shape[0] < 4:
        raise ValueError(f"choosing the head (auto) needs at least 4 calibration windows, got {windows.shape[0]}; "
                         "raise --calib-windows")
    head = config.head
    meta = {"weight": head_fingerprint(model), "k": head.k, "rank_bits": head.rank_bits,
            "windows": hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16],
            "targets": [TARGET_RECALL_AT_1, TARGET_RECALL_AT_K], "version": 3, "ranks": list(RANKS),
            "domains": None if domains is None else domains.tolist(),
            "by": timing_identity(model) if measure else "bytes"}
    if states_dtype != "float32":  # (float32 states keep the keys they always had)
        meta["states"] = states_dtype
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir("proxies") / f"head-auto-{key}.json"
    report = None
    if path.is_file():
        try:
            report = json.loads(path.read_text())
            head = chosen_head(head, report["chosen"])
        except (ValueError, KeyError, TypeError):
            report = None  # a damaged cache entry is chosen again and rewritten
    if report is None and not fit:
        return None
    if report is None:
        every = states() if states is not None else collect_head_states(model, windows, progress=progress,
                                                                        bfloat16=states_dtype == "bfloat16")
        if domains is not None and domains.unique().numel() > 1:
            per_state = domains.repeat_interleave(windows.shape[1])
            head, report = choose_head(model, config.head, None, None, measure=measure,
                                       folds=domain_folds(every, per_state))
        else:
            check = torch.arange(windows.shape[0]) % 4 == 3
            every = every.view(windows.shape[0], windows.shape[1], -1)
            fit_states, check_states = (every[rows].reshape(-1, every.shape[-1]) for rows in (~check, check))
            head, report = choose_head(model, config.head, fit_states, check_states, measure=measure)
        del every
        if "timing_error" not in report:  # a choice by bytes because timing failed is made again next time
            with atomic_path(path) as tmp:
                tmp.write_text(json.dumps(report, indent=1))
    return dataclasses.replace(config, head=head), report


def prepare_model(model_name: str, config: HiReConfig | None, *, seq_len: int = 512,
                  calib_windows: int = CALIBRATION_WINDOWS, progress: bool = True, quantized: bool = False,
                  fit: bool = True) -> Prepared:
    """Load ``model_name``; choose its head when ``config.head.auto`` (``resolve_auto_head``); fetch
    (or fit on ``calib_windows`` windows of ``seq_len`` tokens of ``hire.data.calibration_windows``,
    and cache) the low-rank head proxy the config needs. ``config=None``: the model alone.
    ``fit=False``: nothing is fitted or chosen (minutes on a first run); where the cache lacks the
    choice or the proxy, the config's head is turned off and ``Prepared.pending`` says why."""
    model, tokenizer = load_model(model_name, quantized=quantized)
    head_proxy = auto = None
    if config is not None and config.head.enabled and (config.head.auto or needs_states(config.head)):
        calib, calib_domains = calibration_windows(tokenizer, seq_len, calib_windows, with_domains=True)
        collected: list[torch.Tensor] = []
        # a model the project has no settings for, in its codes: its first run's forward passes in
        # bfloat16 where the CPU multiplies it natively (Qwen2.5 0.5B, AVX512_BF16: 1.3-1.6x)
        dtype = "bfloat16" if quantized and config.head.auto and native_bfloat16() else "float32"

        def states() -> torch.Tensor:  # the head's inputs over ``calib``: one pass, for the choice and the fit
            if not collected:
                collected.append(collect_head_states(model, calib, progress=progress, bfloat16=dtype == "bfloat16"))
                release_freed_memory()  # the forward passes' freed intermediates (hire.system)
            return collected[0]

        if config.head.auto:
            resolved = resolve_auto_head(model, config, calib, progress=progress, fit=fit, states=states,
                                         domains=calib_domains, states_dtype=dtype)
            if resolved is None:
                return Prepared(model, tokenizer, None, _head_off(config), None,
                                pending="the head's settings are not chosen for this model yet")
            config, auto = resolved
        if needs_states(config.head):
            head_proxy = cached_head_proxy(model, config.head, calib, progress=progress, fit=fit, states=states,
                                           states_dtype=dtype)
            if head_proxy is None:
                return Prepared(model, tokenizer, None, _head_off(config), auto,
                                pending="the head's proxy is not fitted for this model yet")
    return Prepared(model, tokenizer, head_proxy, config, auto)


def _head_off(config: HiReConfig) -> HiReConfig:
    return dataclasses.replace(config, head=dataclasses.replace(config.head, enabled=False, auto=False))


def load_for_decode(model_name: str, config: HiReConfig | None, *, quantized: bool = True, seq_len: int = 512,
                    calib_windows: int = CALIBRATION_WINDOWS, progress: bool = True, fit: bool = True,
                    act_bits: int = ACT_BITS) -> Prepared:
    """What ``hire bench``, ``eval``, ``generate`` and ``serve`` start with: ``prepare_model`` with a
    GGUF model (a built-in name or a .gguf path) in its block codes when ``quantized``, ``config``
    then adapted by ``quantized_config`` (the HiRE head only, its exact rows read in the codes);
    otherwise, and for a Hugging Face directory, the float model and ``config`` as given.
    ``Prepared.quantized`` says which ran; ``Prepared.config`` is the config to decode with.
    ``fit``: as ``prepare_model``'s. ``act_bits``: the width of the activations in the codes' one-token
    products (``hire.quant.set_act_bits``; 16 or 8), set after the head is prepared."""
    check_act_bits(act_bits)
    quantized = quantized and gguf_source(model_name) is not None
    if quantized and config is not None:
        config = quantized_config(config)
    prepared = prepare_model(model_name, config, seq_len=seq_len, calib_windows=calib_windows, progress=progress,
                             quantized=quantized, fit=fit)
    if quantized:
        set_act_bits(prepared.model, act_bits)
    return Prepared(prepared.model, prepared.tokenizer, prepared.head_proxy, prepared.config, prepared.auto, quantized,
                    prepared.pending)
