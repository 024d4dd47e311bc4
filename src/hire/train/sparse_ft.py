"""`hire sparsify-train`: bring a pretrained model's FFNs to a low top-k density, layer by layer.

Training-free top-k stops early (SmolLM2-135M: exact top-30 % of activations costs +22 %
perplexity). Here each FFN becomes a :class:`~hire.layers.TopKMLP` and is trained to reproduce the
dense FFN's output on real inputs, one layer at a time, which costs a few CPU minutes instead of an
end-to-end training run:

1. calibration windows go through the embedding; then for each decoder layer in order,
2. the layer runs with its dense FFN on the current hidden states; the FFN's inputs X and dense
   outputs Y are captured;
3. the top-k FFN (initialised from the dense weights) is trained with Adam on minibatches of (X, Y)
   to minimise ||topk_ffn(X) - Y||^2 / ||Y||^2, gradients flowing through the kept neurons;
4. the layer runs again with the trained top-k FFN, and its outputs are the next layer's inputs
   (sequential: each layer learns on the inputs the sparse model will really give it).

A tenth of the calibration tokens is held out per layer to report the relative error before and
after training. The result is a Hugging Face directory whose config records ``hire_topk``
(:func:`hire.load_model` re-applies it) and a ``hire_config.json`` for HiRE decoding.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from hire.arch import arch_spec, decoder_layers
from hire.config import FFNConfig, check_field_types, config_from_dict, config_to_dict, setting
from hire.data import load_corpus, token_windows
from hire.errors import ConfigError, OverwriteError
from hire.eval import perplexity
from hire.files import atomic_dir, refuse_overwrite
from hire.layers.topk_ffn import TopKMLP, apply_topk_, check_topk
from hire.models import load_model
from hire.plots import save_lines
from hire.recommended import recommended_config
from hire.tune import allocate_mean_density, topk_sensitivity


@dataclass(frozen=True)
class SparseFTConfig:
    """Layer-wise sparse fine-tuning. Frozen: change it with ``dataclasses.replace``."""

    density: float = setting(0.2, "FFN neurons kept per token, in (0, 1]")
    group_size: int = setting(1, "contiguous neurons selected together")
    steps: int = setting(200, "Adam steps per layer")
    batch: int = setting(512, "tokens per step")
    lr: float = setting(1e-3, "Adam learning rate, cosine-decayed to 10%")
    seed: int = setting(0, "seed of the minibatches and the held-out split")
    layer_density: tuple[float, ...] = ()  # one per decoder layer (hire tune's allocation); empty = density

    def __post_init__(self) -> None:
        check_field_types(self)
        if not 0.0 < self.density <= 1.0:
            raise ConfigError(f"density must be in (0, 1], got {self.density}")
        bad = [d for d in self.layer_density if not 0.0 < d <= 1.0]
        if bad:
            raise ConfigError(f"layer densities must be in (0, 1], got {bad}")
        if self.steps < 0 or self.batch < 1 or self.lr <= 0:
            raise ConfigError(f"need steps >= 0, batch >= 1, lr > 0; got {self.steps}, {self.batch}, {self.lr}")

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: Any) -> "SparseFTConfig":
        return config_from_dict(cls, data, what="a sparse fine-tuning config")


class _Stop(Exception):
    pass


@torch.no_grad()
def _layer_inputs(model: nn.Module, windows: torch.Tensor):
    """The first decoder layer's hidden states and the keyword arguments the model passes every
    layer (rotary cos/sin, causal mask), captured from the model's own forward."""
    captured = {}

    def grab(module, args, kwargs):
        captured["h"] = args[0] if args else kwargs.pop("hidden_states")
        captured["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _Stop

    hook = decoder_layers(model)[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(input_ids=windows, use_cache=False)
    except _Stop:
        pass
    finally:
        hook.remove()
    return captured["h"], captured["kwargs"]


def _rel_error(mlp: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 4096) -> float:
    with torch.no_grad():
        num = sum(float((mlp(xc) - yc).pow(2).sum()) for xc, yc in zip(x.split(chunk), y.split(chunk)))
        return num / float(y.pow(2).sum())


def sparse_finetune(model: nn.Module, windows: torch.Tensor, cfg: SparseFTConfig, progress: bool = True) -> dict:
    """Make every FFN of ``model`` a trained TopKMLP (in place). ``windows``: (W, T) token ids.

    Returns per-layer relative errors on held-out calibration tokens before and after training.
    """
    spec = arch_spec(model)
    if spec.ffn != "gated":
        raise ValueError(f"sparse fine-tuning is implemented for gated MLPs; {model.config.model_type!r} has a {spec.ffn} MLP")
    layers = decoder_layers(model)
    width = getattr(layers[0], spec.mlp).gate_proj.out_features
    if cfg.layer_density and len(cfg.layer_density) != len(layers):
        raise ValueError(f"{len(cfg.layer_density)} layer densities for a model with {len(layers)} decoder layers")
    densities = list(cfg.layer_density) or [cfg.density] * len(layers)
    for d in densities:
        check_topk(width, d, cfg.group_size)
    model.eval()
    h, kwargs = _layer_inputs(model, windows)
    log = {"layer": [], "rel_error_before": [], "rel_error_after": [], "loss_first": [], "loss_last": [], "seconds": [],
           "input_rms": []}
    gen = torch.Generator().manual_seed(cfg.seed)
    mean = sum(densities) / len(densities)
    bar = tqdm(total=len(layers) * max(1, cfg.steps), desc=f"sparse fine-tuning to density {mean:.3g}",
               disable=not progress)
    for index, layer in enumerate(layers):
        t0 = time.perf_counter()
        dense = getattr(layer, spec.mlp)
        if isinstance(dense, TopKMLP):
            raise ValueError("the model already has top-k FFNs; load the dense model to fine-tune it")
        xs = []
        hook = dense.register_forward_hook(lambda m, a, o: xs.append(a[0].detach()))
        with torch.no_grad():
            layer(h, **kwargs)
        hook.remove()
        x = xs[0].reshape(-1, xs[0].shape[-1])
        with torch.no_grad():
            y = torch.cat([dense(xc) for xc in x.split(4096)])
        n_hold = max(1, x.shape[0] // 10)
        perm = torch.randperm(x.shape[0], generator=gen)
        hold, fit = perm[:n_hold], perm[n_hold:]
        sparse = TopKMLP(copy.deepcopy(dense), densities[index], cfg.group_size)  # the dense original stays until the swap
        before = _rel_error(sparse, x[hold], y[hold])
        params = [sparse.gate_proj.weight, sparse.up_proj.weight, sparse.down_proj.weight]
        for p in sparse.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=cfg.lr)
        scale = float(y[fit].pow(2).mean())
        losses = []
        for step in range(cfg.steps):
            for group in opt.param_groups:  # cosine decay to 10 %
                group["lr"] = cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / cfg.steps)))
            idx = fit[torch.randint(0, fit.numel(), (min(cfg.batch, fit.numel()),), generator=gen)]
            loss = (sparse(x[idx]) - y[idx]).pow(2).mean() / scale
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(layer=index, loss=f"{loss.item():.4f}")
        if not cfg.steps:
            bar.update(1)
        for p in sparse.parameters():
            p.requires_grad_(False)
        after = _rel_error(sparse, x[hold], y[hold])
        setattr(layer, spec.mlp, sparse)
        with torch.no_grad():
            h = layer(h, **kwargs)
            h = h[0] if isinstance(h, tuple) else h
        log["layer"].append(index)
        log.setdefault("density", []).append(densities[index])
        log["input_rms"].append(float(x.pow(2).mean().sqrt()))
        log["rel_error_before"].append(before)
        log["rel_error_after"].append(after)
        log["loss_first"].append(losses[0] if losses else None)
        log["loss_last"].append(losses[-1] if losses else None)
        log["seconds"].append(time.perf_counter() - t0)
    bar.close()
    apply_topk_(model, densities, cfg.group_size)  # records config.hire_topk (the FFNs are already top-k)
    log["config"] = cfg.to_dict()
    return log


EXPORT_MARKER = "sparse_ft.json"  # the report in every directory sparsify_train writes


def sparsify_train(
    model_name: str,
    cfg: SparseFTConfig,
    out: str | Path,
    *,
    windows: int = 64,
    seq_len: int = 256,
    eval_windows: int = 8,
    eval_seq_len: int = 512,
    oversample: float = 2.0,
    allocate_densities: tuple[float, ...] | None = None,
    sensitivity_windows: int = 2,
    plot: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """`hire sparsify-train`: :func:`sparse_finetune` ``model_name`` on ``windows`` calibration
    windows of ``seq_len`` tokens, with held-out perplexity (``eval_windows`` x ``eval_seq_len``)
    dense / top-k training-free / top-k fine-tuned, and export a Hugging Face directory ``out``
    (``config.hire_topk``, ``hire_config.json`` whose FFN over-selects ``oversample`` x, and this
    report as ``sparse_ft.json``), written whole or not at all.

    ``allocate_densities``: candidate densities for per-layer densities averaging ``cfg.density``,
    allocated by each layer's output-KL sensitivity to exact top-k on ``sensitivity_windows``
    windows, instead of one density everywhere. An existing ``out`` is replaced only with
    ``force``, and only when it is a directory this function wrote (it holds sparse_ft.json).
    Returns the report; its ``layers`` entry holds the per-layer log.
    """

    out = Path(out)
    if out.exists():
        refuse_overwrite(out, force, "--out")
        if not (out / EXPORT_MARKER).is_file():  # --force replaces our own export, never a user's directory
            raise OverwriteError(f"{out} exists and is not a directory hire sparsify-train wrote (no {EXPORT_MARKER}); "
                                 "--force does not replace it: choose another --out")
    if plot:
        refuse_overwrite(plot, force, "--plot")
    FFNConfig(density=cfg.density, group_size=cfg.group_size, oversample=oversample)  # the written config must be valid
    grid = None
    if allocate_densities is not None:
        grid = tuple(sorted(set(allocate_densities) | {cfg.density}))
        if any(not 0 < d <= 1 for d in grid):
            raise ValueError(f"--allocate-densities must be in (0, 1], got {allocate_densities}")

    model, tokenizer = load_model(model_name)
    corpus = load_corpus()
    calib = token_windows(tokenizer, corpus.text("calibration"), seq_len, windows)
    held = token_windows(tokenizer, corpus.text("evaluation"), eval_seq_len, eval_windows)
    result = {"model": model_name, "calibration_tokens": calib.numel(), "held_out_tokens": held.numel()}
    if grid is not None:

        kl = topk_sensitivity(model, calib[:sensitivity_windows], grid, progress=progress)
        cfg = dataclasses.replace(cfg, layer_density=tuple(allocate_mean_density(kl, grid, cfg.density)))
        result["allocation"] = {"densities": grid, "kl": kl, "layer_density": cfg.layer_density}
    result["config"] = dataclasses.asdict(cfg)
    result["ppl_dense"] = perplexity(model, held, progress=progress)
    free = apply_topk_(copy.deepcopy(model), list(cfg.layer_density) or cfg.density, cfg.group_size)
    result["mean_density"] = free.config.hire_topk["density"]
    result["ppl_topk_training_free"] = perplexity(free, held, progress=progress)
    del free
    start = time.time()
    log = sparse_finetune(model, calib, cfg, progress=progress)
    result["seconds"] = time.time() - start
    result["ppl_topk_finetuned"] = perplexity(model, held, progress=progress)
    result["ppl_increase"] = result["ppl_topk_finetuned"] / result["ppl_dense"] - 1
    result["ppl_increase_training_free"] = result["ppl_topk_training_free"] / result["ppl_dense"] - 1
    result["layers"] = log
    result["out"] = str(out)
    result["hire_config"] = str(out / "hire_config.json")

    base = recommended_config(model_name)
    hire_config = dataclasses.replace(base, ffn=dataclasses.replace(
        base.ffn, enabled=True, density=result["mean_density"], layer_density=tuple(cfg.layer_density),
        group_size=cfg.group_size, oversample=oversample))
    with atomic_dir(out, replace=force) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        hire_config.save(tmp / "hire_config.json")
        (tmp / EXPORT_MARKER).write_text(json.dumps(result, indent=2) + "\n")
    if plot:
        save_lines(plot, [
            {"x": log["layer"], "y": log["rel_error_before"], "label": "top-k, training-free", "style": {"marker": "o", "ms": 3}},
            {"x": log["layer"], "y": log["rel_error_after"], "label": "top-k, fine-tuned", "style": {"marker": "o", "ms": 3}},
        ], xlabel="decoder layer", ylabel="held-out ||y - y_dense||^2 / ||y_dense||^2", logy=True, size=(6.5, 3.5),
            title=f"{model_name}: top-{100 * result['mean_density']:.3g}% FFNs, layer-wise fine-tuning")
        result["plot"] = str(plot)
    return result
