"""TopKMLP: a gated FFN that *is* top-k — what a model trained for sparsity computes.

A model trained (``hire train``) or fine-tuned (``hire sparsify-train``) with top-k activations
only means what it learned when it runs the same selection: for each token the ``density``
fraction of neurons (in groups of ``group_size`` contiguous neurons, a group scored by the sum of
its |activations|) with the largest |act(gate) * up| is kept and the rest are zero. This module
is that exact computation (it reads every weight), the reference that HiRE's proxy-selected decode
is measured against. Its selection rule is HiReFFN's (same counts, same group scores), so HiRE
with an exact proxy and this module compute the same thing.

The model's ``config.hire_topk = {"density": d, "group_size": g}`` (plus ``layer_density``, one
per layer, when they differ) records it; :func:`hire.load_model`
re-applies it when it loads such a directory (plain transformers would load the dense model).
"""

from __future__ import annotations

import torch
from torch import nn

from hire.arch import arch_spec, decoder_layers
from hire.topk import count_for_density, idx_to_mask, select_neurons


def check_topk(neurons: int, density: float, group_size: int) -> None:
    """Validate a top-k FFN setting against an FFN width; raise ValueError naming the fix."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"FFN density must be in (0, 1], got {density}")
    if group_size < 1 or neurons % group_size:
        raise ValueError(
            f"FFN group size {group_size} must be >= 1 and divide the FFN width {neurons}; choose a divisor of {neurons}"
        )


class TopKMLP(nn.Module):
    """A gated MLP (``gate_proj``, ``up_proj``, ``down_proj``, ``act_fn``, as in Llama/Gemma/Qwen)
    whose hidden activation keeps only its top ``density`` fraction per token.

    It holds the original MLP's own Linear modules, so HiRE's patching, the engine and state dicts
    see the usual names. Gradients flow through the kept activations only.
    """

    def __init__(self, mlp: nn.Module, density: float, group_size: int = 1):
        super().__init__()
        for name in ("gate_proj", "up_proj", "down_proj", "act_fn"):
            if not hasattr(mlp, name):
                raise ValueError(f"top-k FFNs need a gated MLP with {name!r}; {type(mlp).__name__} has none")
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn
        self.neurons = mlp.gate_proj.out_features
        check_topk(self.neurons, density, group_size)
        self.group_size = group_size
        self.set_density(density)

    def set_density(self, density: float) -> None:
        """Change the kept fraction (training anneals it from 1 to the target)."""
        check_topk(self.neurons, density, self.group_size)
        self.density = density
        self.keep_groups = count_for_density(self.neurons, density, self.group_size)

    def mask(self, a: torch.Tensor) -> torch.Tensor:
        """Which activations are kept. # a: (..., I) -> bool (..., I)"""
        groups = self.neurons // self.group_size
        if self.keep_groups == groups:
            return torch.ones_like(a, dtype=torch.bool)
        flat = a.detach().reshape(-1, self.neurons).abs()
        keep = select_neurons(flat, self.keep_groups, self.group_size, "sum")  # HiReFFN's rule, on exact values
        return idx_to_mask(keep, self.neurons).view(a.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act_fn(self.gate_proj(x)) * self.up_proj(x)  # (..., I)
        if self.keep_groups < self.neurons // self.group_size:
            a = a * self.mask(a)
        return self.down_proj(a)

    def extra_repr(self) -> str:
        return f"density={self.density}, keep={self.keep_groups * self.group_size}/{self.neurons}, group_size={self.group_size}"


def apply_topk_(model: nn.Module, density: float | list[float], group_size: int = 1) -> nn.Module:
    """Make every FFN of ``model`` a TopKMLP (in place) and record it in ``model.config.hire_topk``.
    ``density`` is one fraction for all layers or a list with one per decoder layer.

    Validates against every layer before changing any. Returns the model.
    """
    spec = arch_spec(model)
    if spec.ffn != "gated":
        raise ValueError(f"top-k FFNs are implemented for gated MLPs; {model.config.model_type!r} has a {spec.ffn} MLP")
    layers = decoder_layers(model)
    per_layer = list(density) if isinstance(density, (list, tuple)) else [density] * len(layers)
    if len(per_layer) != len(layers):
        raise ValueError(f"{len(per_layer)} per-layer FFN densities for a model with {len(layers)} decoder layers")
    for layer, d in zip(layers, per_layer):
        mlp = getattr(layer, spec.mlp)
        check_topk(getattr(mlp, "neurons", None) or mlp.gate_proj.out_features, d, group_size)
    for layer, d in zip(layers, per_layer):
        mlp = getattr(layer, spec.mlp)
        if isinstance(mlp, TopKMLP):
            mlp.group_size = group_size
            mlp.set_density(d)
        else:
            setattr(layer, spec.mlp, TopKMLP(mlp, d, group_size))
    uniform = len(set(per_layer)) == 1
    mean = per_layer[0] if uniform else sum(per_layer) / len(per_layer)
    record = {"density": float(mean), "group_size": int(group_size)}
    if not uniform:
        record["layer_density"] = [float(d) for d in per_layer]
    model.config.hire_topk = record
    return model


def topk_mlps(model: nn.Module) -> list[TopKMLP]:
    return [m for m in model.modules() if isinstance(m, TopKMLP)]


def apply_saved_topk_(model: nn.Module) -> nn.Module:
    """Re-apply the top-k FFNs a saved model was trained with (``config.hire_topk``), if any."""
    saved = getattr(model.config, "hire_topk", None)
    if not saved:
        return model
    if not isinstance(saved, dict) or not {"density", "group_size"} <= set(saved) <= {"density", "group_size", "layer_density"}:
        raise ValueError(f"config.hire_topk must be {{'density': d, 'group_size': g[, 'layer_density': [...]]}}, got {saved!r}")
    density = [float(d) for d in saved["layer_density"]] if "layer_density" in saved else float(saved["density"])
    return apply_topk_(model, density, int(saved["group_size"]))
