"""sparsify_ / unsparsify_: swap a transformers model's LM head and FFNs for HiRE layers in place.

Where each architecture keeps its head, decoder layers and FFN is ``hire.arch``'s table. The
originals are kept as ``base_layer`` so ``unsparsify_`` restores them exactly.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from hire.arch import ArchSpec, FFNWeights, arch_spec, decoder_layers, ffn_weights, head_module, mlp_module
from hire.config import FFNConfig, HeadConfig, HiReConfig
from hire.layers import HiReFFN, HiReLMHead
from hire.layers.head import MODES, LogitMap
from hire.proxies import Cascade, ExactProxy, LowRankProxy, QuantizedProxy
from hire.quant.tensor import QLinear
from hire.topk import check_k


def _ffn_proxy(weights: FFNWeights, proxy: str, group_size: int):
    w = weights.w_in if not weights.gated else torch.cat([weights.w_in, weights.w_up])  # (I or 2I, D)
    if proxy == "exact":
        return ExactProxy(w.detach())
    return QuantizedProxy.from_weight(w, bits=4 if proxy == "int4" else 8, group_size=group_size)


def build_head_selector(
    weight: torch.Tensor, cfg: HeadConfig, head_states: torch.Tensor | None = None, lowrank: LowRankProxy | None = None
) -> Cascade:
    """The candidate selector for an LM head weight (V, D) under ``cfg``."""
    if cfg.auto:
        raise ValueError("the head config says auto: its rank and k' are chosen on calibration text first, with "
                         "hire.calibrate.prepare.resolve_auto_head(model, config, windows) (hire.prepare_model and "
                         "every command do this)")
    vocab, width = weight.shape
    check_k(cfg.k, vocab, "head k")
    check_k(cfg.candidates, vocab, "head candidates (k')")
    if cfg.proxy in ("int4", "int8"):
        return Cascade([QuantizedProxy.from_weight(weight, 4 if cfg.proxy == "int4" else 8, cfg.group_size)], [cfg.candidates], cfg.select_blocks)
    if cfg.rank > width:
        raise ValueError(f"head rank {cfg.rank} is above the hidden width {width}; use --head-rank <= {width}")
    if lowrank is None:
        if head_states is None:
            raise ValueError(
                f"the {cfg.proxy!r} head proxy is fitted to real hidden states: pass head_states= "
                "(hire.calibrate.collect_head_states) or a fitted head_proxy="
            )
        lowrank = LowRankProxy.from_weight(weight, cfg.rank, states=head_states, u_bits=cfg.rank_bits)
    if lowrank.shape != (vocab, width) or lowrank.rank != cfg.rank:
        raise ValueError(
            f"the fitted low-rank head proxy is {lowrank.shape} rank {lowrank.rank}, but the model's head is "
            f"({vocab}, {width}) and the config asks rank {cfg.rank}: refit it for this model and config"
        )
    if cfg.proxy == "lowrank":
        return Cascade([lowrank], [cfg.candidates], cfg.select_blocks)
    check_k(cfg.stage_candidates, vocab, "head stage_candidates")
    second = QuantizedProxy.from_weight(weight, cfg.bits, cfg.group_size)
    return Cascade([lowrank, second], [cfg.stage_candidates, cfg.candidates], cfg.select_blocks)


def _ffn_swap(spec: ArchSpec, layer: nn.Module, hire_ffn: HiReFFN):
    def swap():
        if spec.ffn == "inline":
            layer.fc1, layer.activation_fn, layer.fc2 = hire_ffn, nn.Identity(), nn.Identity()
        else:
            setattr(layer, spec.mlp, hire_ffn)

    return swap


@torch.no_grad()
def sparsify_(
    model: nn.Module,
    config: HiReConfig | None = None,
    *,
    head_states: torch.Tensor | None = None,
    head_proxy: LowRankProxy | None = None,
) -> nn.Module:
    """Patch ``model`` in place: HiReLMHead on the LM head, HiReFFN on every FFN. Returns ``model``.

    ``head_states`` (N, D) are real inputs of the LM head for fitting a low-rank proxy
    (``lowrank``/``cascade``); alternatively pass an already fitted ``head_proxy``.
    """
    config = config or HiReConfig()
    spec = arch_spec(model)
    if getattr(model, "hire_config", None) is not None:
        raise ValueError("model is already sparsified; call hire.unsparsify_(model) first")
    swaps = []  # everything is built (and validated) before the first module is swapped
    if config.head.enabled:
        head = _hire_head(model, spec, config.head, head_states, head_proxy)
        swaps.append(lambda: model.set_submodule(spec.head, head))
    if config.ffn.enabled:
        layers = decoder_layers(model)
        if any(isinstance(m, QLinear) for layer in layers for m in mlp_module(spec, layer).modules()):
            raise ValueError("the FFNs of this model are in GGUF block codes (hire.quant), and a HiRE FFN over them is "
                             "not built yet: disable it (--no-ffn / FFNConfig(enabled=False), or "
                             "hire.recommended.quantized_config) or load the model dequantized (--dequantized)")
        per_layer = config.ffn.layer_density
        if per_layer and len(per_layer) != len(layers):
            raise ValueError(
                f"the config has {len(per_layer)} per-layer FFN densities but the model has {len(layers)} decoder "
                "layers: it was tuned for another model; re-tune it (hire tune) or clear ffn.layer_density"
            )
        for i, layer in enumerate(layers):
            base = mlp_module(spec, layer)
            weights = ffn_weights(spec, base)
            proxy = _ffn_proxy(weights, config.ffn.proxy, config.ffn.bits_group_size)
            cfg = replace(config.ffn, density=per_layer[i], layer_density=()) if per_layer else config.ffn
            swaps.append(_ffn_swap(spec, layer, HiReFFN(base, weights, cfg, proxy)))
    for swap in swaps:
        swap()
    model.hire_config = config
    return model


def _hire_head(model: nn.Module, spec: ArchSpec, cfg: HeadConfig, head_states: torch.Tensor | None,
               head_proxy: LowRankProxy | None) -> HiReLMHead:
    base = model.get_submodule(spec.head)
    if not isinstance(base, (nn.Linear, QLinear)):
        raise ValueError(f"{spec.head} is a {type(base).__name__}, expected nn.Linear")
    if isinstance(base, QLinear) and head_proxy is not None and cfg.proxy == "lowrank":
        weight = torch.empty(base.q.shape, device="meta")  # only its shape is read: no dequantized copy
    else:
        weight = base.weight.detach()
    selector = build_head_selector(weight, cfg, head_states, head_proxy)
    # Gemma 2 soft-caps its logits after the head, Granite divides them: the decode paths map the
    # candidates' exact logits likewise; in the model's own forward (which maps what the head returns)
    # a skipped row's -inf comes out as -cap (Gemma 2), below any candidate's logit
    return HiReLMHead(base, cfg, selector, logit_map=LogitMap.of(model))


@torch.no_grad()
def sparsify_head_(model: nn.Module, head: HeadConfig, *, head_states: torch.Tensor | None = None,
                   head_proxy: LowRankProxy | None = None) -> HiReLMHead:
    """A HiReLMHead under ``head`` on the LM head of ``model`` whose head is dense: not sparsified,
    or sparsified with its head off (a server that switches to HiRE once its head proxy is fitted,
    hire.serve.background). Its FFNs stay as they are; ``model.hire_config`` gets ``head``, so that
    ``unsparsify_`` restores everything. Returns the new head."""
    if not head.enabled:
        raise ValueError("the head config is disabled: nothing to patch")
    config = getattr(model, "hire_config", None)
    if config is not None and config.head.enabled:
        raise ValueError("the model's LM head is a HiRE head already")
    spec = arch_spec(model)
    layer = _hire_head(model, spec, head, head_states, head_proxy)
    model.set_submodule(spec.head, layer)
    model.hire_config = (replace(config, head=head) if config is not None
                         else HiReConfig(head=head, ffn=FFNConfig(enabled=False)))
    return layer


def unsparsify_(model: nn.Module) -> nn.Module:
    """Restore the original modules; the state_dict is then identical to before ``sparsify_``."""
    spec = arch_spec(model)
    if getattr(model, "hire_config", None) is None:
        raise ValueError("model is not sparsified (hire.sparsify_ was not applied)")
    head = head_module(model)
    if isinstance(head, HiReLMHead):
        model.set_submodule(spec.head, head.base_layer)
    for layer in decoder_layers(model):
        if spec.ffn == "inline" and isinstance(layer.fc1, HiReFFN):
            base = layer.fc1.base_layer
            layer.fc1, layer.activation_fn, layer.fc2 = base.fc1, base.act, base.fc2
        elif isinstance(getattr(layer, spec.mlp, None), HiReFFN):
            setattr(layer, spec.mlp, getattr(layer, spec.mlp).base_layer)
    del model.hire_config
    return model


def hire_layers(model: nn.Module) -> tuple[HiReLMHead | None, list[HiReFFN]]:
    head = next((m for m in model.modules() if isinstance(m, HiReLMHead)), None)
    return head, [m for m in model.modules() if isinstance(m, HiReFFN)]


def set_mode(model: nn.Module, head: str | None = None, ffn: str | None = None) -> None:
    """Switch the HiRE layers between "decode" (HiRE for one-token steps), "always" and "dense"."""
    for mode in (head, ffn):
        if mode is not None and mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    head_layer, ffns = hire_layers(model)
    if head is not None and head_layer is not None:
        head_layer.mode = head
    for f in ffns if ffn is not None else []:
        f.mode = ffn
