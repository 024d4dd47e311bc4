"""Autotuning the FFN: per-layer densities that read the fewest bytes within a perplexity budget.

Layers differ in how much sparsity they tolerate. The tuner measures it where it matters, at the
model's output:

1. sensitivity: for every layer l and candidate density d, only layer l runs HiRE (its proxy,
   its selection) and the mean KL(dense || sparse) of the next-token distribution over calibration
   tokens is recorded, together with the FFN bytes that layer reads per token at d;
2. allocation (a multiple-choice knapsack, solved by its Lagrangian): for a price lambda each
   layer takes the density minimising bytes(l, d) / dense bytes(l) + lambda * KL(l, d);
3. lambda is bisected on the *real* calibration perplexity of the whole allocation (the per-layer
   KLs are not exactly additive), keeping the cheapest allocation within the budget;
4. the best uniform density within the same budget is found on the same windows, and the result
   says which reads fewer bytes. (An earlier version chose densities from each layer's own output
   error; it lost to uniform 0.6 on SmolLM2 and was dropped.)

The head is left as configured (its proxy is tuned by hire calibrate). Tune on calibration text and
check the written config on held-out text with ``hire eval``.
"""

from __future__ import annotations

import math
from pathlib import Path
from dataclasses import dataclass, field, replace

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from hire.config import FFNConfig, HeadConfig, HiReConfig
from hire.data import calibration_windows, read_text, token_windows
from hire.eval.quality import perplexity
from hire.files import refuse_overwrite
from hire.models import load_model
from hire.patch import hire_layers, set_mode, sparsify_, unsparsify_

DENSITIES = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@dataclass
class TuneResult:
    config: HiReConfig  # the input config with ffn.layer_density set (or the uniform density, if it won)
    ppl_dense: float
    ppl_hire: float
    ffn_bytes: int  # per token, the chosen config
    ffn_bytes_dense: int
    densities: tuple[float, ...]
    kl: list[list[float]]  # (layers, densities) mean KL with only that layer sparse
    layer_bytes: list[list[int]]  # (layers, densities) FFN bytes per token
    tuned: dict  # the best per-layer allocation: layer_density, ppl_increase, ffn_bytes
    uniform: dict | None  # the best uniform density within the budget (None if none was)
    trials: list[dict] = field(default_factory=list)

    @property
    def winner(self) -> str:
        return "per-layer" if self.config.ffn.layer_density else "uniform"


def _logprobs(model, windows: torch.Tensor) -> list[torch.Tensor]:
    return [F.log_softmax(model(w[None], use_cache=False).logits[0].float(), dim=-1) for w in windows]


def _ppl(logps: list[torch.Tensor], windows: torch.Tensor) -> float:
    nll = sum(float(-lp[:-1].gather(-1, w[1:, None]).sum()) for lp, w in zip(logps, windows))
    return math.exp(nll / sum(w.numel() - 1 for w in windows))


def _kl(ref: list[torch.Tensor], model, windows: torch.Tensor) -> float:
    total, count = 0.0, 0
    for lp_ref, w in zip(ref, windows):
        lp = F.log_softmax(model(w[None], use_cache=False).logits[0].float(), dim=-1)
        total += float(F.kl_div(lp, lp_ref, log_target=True, reduction="sum"))
        count += w.numel()
    return total / count


@torch.no_grad()
def sensitivity(model, windows: torch.Tensor, densities, ref, progress: bool = True):
    """(KL, bytes) tables, (layers, densities), for a model patched with HiRE FFNs."""
    _, ffns = hire_layers(model)
    set_mode(model, ffn="dense")
    kl, nbytes = [], []
    bar = tqdm(total=len(ffns) * len(densities), desc="layer sensitivity", disable=not progress, leave=False)
    for ffn in ffns:
        row_kl, row_b = [], []
        for d in densities:
            ffn.set_density(d)
            row_b.append(ffn.nbytes())
            if d < 1.0:
                ffn.mode = "always"
                row_kl.append(max(0.0, _kl(ref, model, windows)))
                ffn.mode = "dense"
            else:
                row_kl.append(0.0)
            bar.update(1)
        kl.append(row_kl)
        nbytes.append(row_b)
    bar.close()
    return kl, nbytes


def allocate(kl, nbytes, densities, price: float) -> list[float]:
    """Per layer, the density minimising bytes / dense bytes + price * KL."""
    out = []
    for row_kl, row_b in zip(kl, nbytes):
        costs = [b / max(row_b) + price * k for b, k in zip(row_b, row_kl)]
        out.append(densities[min(range(len(costs)), key=costs.__getitem__)])
    return out


def allocate_mean_density(kl, densities, mean_density: float) -> list[float]:
    """Per-layer densities averaging at most ``mean_density`` with the least summed KL (the
    Lagrangian of the knapsack, its price bisected; cost = density, every layer the same width)."""
    if not min(densities) <= mean_density <= max(densities):
        raise ValueError(f"mean density {mean_density} is outside the candidates {min(densities)}..{max(densities)}")
    cost = [list(densities)] * len(kl)
    positive = [k for row in kl for k in row if k > 0] or [1.0]
    lo, hi = math.log(1e-6 / max(positive)), math.log(1e6 / min(positive))
    best = [min(densities)] * len(kl)
    for _ in range(60):
        mid = (lo + hi) / 2
        pick = allocate(kl, cost, densities, math.exp(mid))
        if sum(pick) / len(pick) <= mean_density + 1e-9:
            best, lo = pick, mid  # affordable: try paying more for quality
        else:
            hi = mid
    return best


@torch.no_grad()
def topk_sensitivity(model, windows: torch.Tensor, densities, progress: bool = True):
    """KL table (layers, densities) of exact top-k FFNs (what a trained top-k model computes), one
    layer at a time, on the dense ``model``."""
    ref = _logprobs(model, windows)
    sparsify_(model, HiReConfig(head=HeadConfig(enabled=False), ffn=FFNConfig(proxy="exact")))
    try:
        kl, _ = sensitivity(model, windows, densities, ref, progress)
    finally:
        unsparsify_(model)
    return kl


@torch.no_grad()
def _try(model, base: HiReConfig, windows, layer_density, ppl_dense) -> dict:
    trial = replace(base, ffn=replace(base.ffn, layer_density=tuple(layer_density)))
    sparsify_(model, trial)
    try:
        _, ffns = hire_layers(model)
        set_mode(model, ffn="always")
        ppl = perplexity(model, windows)
        ffn_bytes = sum(f.nbytes() for f in ffns)
    finally:
        set_mode(model, ffn="decode")
        unsparsify_(model)
    return {"layer_density": list(layer_density), "mean_density": sum(layer_density) / len(layer_density),
            "ppl": ppl, "ppl_increase": ppl / ppl_dense - 1, "ffn_bytes": ffn_bytes}


@torch.no_grad()
def tune_ffn(
    model,
    config: HiReConfig,
    windows: torch.Tensor,
    max_ppl_increase: float,
    *,
    densities=DENSITIES,
    sensitivity_windows: int = 1,
    steps: int = 10,
    progress: bool = True,
) -> TuneResult:
    """Per-layer FFN densities for ``model`` keeping the perplexity increase on ``windows`` (use
    calibration text, not the evaluation split) within ``max_ppl_increase`` (0.03 = +3 %).
    Sensitivities are measured on the first ``sensitivity_windows`` windows."""
    if not config.ffn.enabled:
        raise ValueError("the FFN is disabled in this config: nothing to tune")
    if not max_ppl_increase > 0:
        raise ValueError(f"max_ppl_increase must be > 0 (e.g. 0.03 for +3 %), got {max_ppl_increase}")
    if not densities or any(not 0 < d <= 1 for d in densities):
        raise ValueError(f"candidate densities must be in (0, 1], got {densities}")
    if not 1 <= sensitivity_windows <= windows.shape[0]:
        raise ValueError(f"sensitivity_windows must be in [1, {windows.shape[0]}], got {sensitivity_windows}")
    densities = tuple(sorted(set(densities) | {1.0}))
    # perplexity uses the dense head anyway; each trial sets its own layer densities
    base = replace(config, head=replace(config.head, enabled=False), ffn=replace(config.ffn, layer_density=()))
    ref_all = _logprobs(model, windows)
    ppl_dense = _ppl(ref_all, windows)
    sens = windows[:sensitivity_windows]
    sparsify_(model, base)
    try:
        layers = len(hire_layers(model)[1])
        kl, nbytes = sensitivity(model, sens, densities, ref_all[:sensitivity_windows], progress)
    finally:
        unsparsify_(model)
    del ref_all
    trials = []
    bar = tqdm(total=len(densities) - 1 + steps, desc="tuning", disable=not progress, leave=False)
    uniform = None
    for d in densities[:-1]:  # the best uniform density, lowest first
        t = _try(model, base, windows, [d] * layers, ppl_dense)
        t["kind"] = "uniform"
        trials.append(t)
        bar.update(1)
        if t["ppl_increase"] <= max_ppl_increase:
            uniform = t
            bar.update(len(densities) - 2 - densities.index(d))
            break
    positive = [k for row in kl for k in row if k > 0]
    lo, hi = math.log(1e-3 / max(positive)), math.log(1e3 / min(positive))  # price range: all sparse .. all dense
    tuned = None
    for _ in range(steps):
        mid = (lo + hi) / 2
        t = _try(model, base, windows, allocate(kl, nbytes, densities, math.exp(mid)), ppl_dense)
        t.update(kind="per-layer", price=math.exp(mid))
        trials.append(t)
        bar.update(1)
        bar.set_postfix(density=f"{t['mean_density']:.3f}", ppl=f"{100 * t['ppl_increase']:+.2f}%")
        if t["ppl_increase"] <= max_ppl_increase:
            hi = mid  # cheaper prices sparsify more
            if tuned is None or t["ffn_bytes"] < tuned["ffn_bytes"]:
                tuned = t
        else:
            lo = mid
    bar.close()
    if tuned is None and uniform is None:
        best = min(trials, key=lambda t: t["ppl_increase"])
        raise ValueError(
            f"no tried setting kept the perplexity increase within {100 * max_ppl_increase:.2f} % "
            f"(best {100 * best['ppl_increase']:.2f} %); allow more or add denser candidates"
        )
    if tuned is not None and (uniform is None or tuned["ffn_bytes"] < uniform["ffn_bytes"]):
        chosen, ffn = tuned, replace(config.ffn, layer_density=tuple(tuned["layer_density"]))
    else:
        chosen, ffn = uniform, replace(config.ffn, density=uniform["layer_density"][0], layer_density=())
    out = replace(config, ffn=ffn)
    dense_ffn = sum(row[-1] for row in nbytes)
    return TuneResult(out, ppl_dense, chosen["ppl"], chosen["ffn_bytes"], dense_ffn, densities, kl, nbytes,
                      tuned, uniform, trials)


def tune_model(
    model_name: str,
    config: HiReConfig,
    out: str,
    max_ppl_increase: float,
    *,
    windows: int = 4,
    seq_len: int = 512,
    sensitivity_windows: int = 1,
    densities=DENSITIES,
    steps: int = 10,
    force: bool = False,
    progress: bool = True,
    text: str | Path | None = None,
) -> dict:
    """`hire tune`: :func:`tune_ffn` for ``model_name`` on ``windows`` calibration windows of
    ``seq_len`` tokens (of ``text``, a file, directory or JSONL, else of the packaged calibration domains) (sensitivities on the first ``sensitivity_windows`` of them, at most all),
    the chosen config written to ``out`` (atomically; an existing file only with ``force``).
    Returns the report (the JSON of ``hire tune``)."""

    if not max_ppl_increase > 0:  # before the model loads: tune_ffn checks it only after
        raise ValueError(f"--max-ppl-increase must be > 0 (e.g. 0.03 for +3 %), got {max_ppl_increase}")
    if not config.ffn.enabled:
        raise ValueError("the FFN is disabled in this config (--no-ffn): nothing to tune")
    refuse_overwrite(out, force, "--out")
    calib_text = read_text(text) if text is not None else None  # refused before the model loads
    model, tokenizer = load_model(model_name)
    if calib_text is None:
        calib = calibration_windows(tokenizer, seq_len, windows)
    else:
        calib = token_windows(tokenizer, calib_text, seq_len, windows, source=str(text), spread=True)
    r = tune_ffn(model, config, calib, max_ppl_increase, densities=tuple(densities),
                 sensitivity_windows=min(sensitivity_windows, calib.shape[0]), steps=steps, progress=progress)
    r.config.save(out)  # atomic
    return {"model": model_name, "text": str(text or "packaged calibration domains"), "config": str(out),
            "max_ppl_increase": max_ppl_increase, "winner": r.winner,
            "windows": int(calib.shape[0]), "ppl_dense": r.ppl_dense, "ppl_hire": r.ppl_hire,
            "ppl_increase": r.ppl_hire / r.ppl_dense - 1, "ffn_bytes_fraction": r.ffn_bytes / r.ffn_bytes_dense,
            "ffn_bytes_dense": r.ffn_bytes_dense, "tuned": r.tuned, "uniform": r.uniform, "densities": r.densities, "kl": r.kl, "trials": r.trials}
