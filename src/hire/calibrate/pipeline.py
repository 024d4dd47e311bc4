"""`hire calibrate`: fit the low-rank LM-head proxy on calibration text, train it for recall, report
held-out recall of both under the config's selector, and write the trained proxy with a config
that points at it.

The outputs are ``OUT/hire_config.json`` and ``OUT/head_proxy.safetensors``: names no Hugging Face
model directory uses, so OUT may be the model's own directory (its ``config.json`` is never
touched). An existing output is replaced only with ``force``; each file is written atomically.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from hire.calibrate import collect_head_states, fit_head_proxy, head_recall, head_weight, proxy_meta, save_head_proxy
from hire.calibrate.train import train_lowrank_proxy
from hire.config import HiReConfig
from hire.calibrate.prepare import resolve_auto_head
from hire.data import CALIBRATION_WINDOWS, calibration_windows, load_domains, read_text, token_windows
from hire.files import refuse_overwrite
from hire.models import load_model
from hire.patch import build_head_selector
from hire.plots import save_lines

CONFIG_NAME = "hire_config.json"
PROXY_NAME = "head_proxy.safetensors"


def calibrate_head(
    model_name: str,
    config: HiReConfig,
    out: str | Path,
    *,
    steps: int = 300,
    seq_len: int = 512,
    calib_windows: int = CALIBRATION_WINDOWS,
    eval_windows: int = 4,
    plot: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
    text: str | Path | None = None,
    eval_text: str | Path | None = None,
) -> dict:
    """Fit and train ``config.head``'s low-rank proxy for ``model_name`` (``steps`` Adam steps on the
    head inputs of ``calib_windows`` calibration windows of ``seq_len`` tokens), measure recall on
    ``eval_windows`` held-out windows of each held-out text, write ``out/hire_config.json`` +
    ``out/head_proxy.safetensors`` (and a loss curve at ``plot``). Returns the report (the JSON of
    ``hire calibrate``; the top-level recall figures are the worst held-out text's).

    Calibration text: ``text`` (a file, directory or JSONL: ``hire.data.read_text``), else the
    packaged calibration domains (``hire.data.calibration_windows``). Held-out text: ``eval_text``,
    else each held-out domain of ``hire.data.load_domains``. An ``auto`` head has its rank and k'
    chosen first (``hire.calibrate.auto``) and the choice is written into the config."""
    if config.head.proxy not in ("lowrank", "cascade") and not config.head.auto:
        raise ValueError(f"hire calibrate trains the low-rank head proxy: use --head-proxy lowrank or cascade, "
                         f"not {config.head.proxy!r}")
    out = Path(out)
    config_path, proxy_path = out / CONFIG_NAME, out / PROXY_NAME
    for path in (config_path, proxy_path):  # before anything loads: a refusal costs nothing
        refuse_overwrite(path, force, "--out")
    if plot:
        refuse_overwrite(plot, force, "--plot")
    calib_text = read_text(text) if text is not None else None  # refused before the model loads
    held_text = read_text(eval_text) if eval_text is not None else None

    model, tokenizer = load_model(model_name)
    calib_domains = None
    if calib_text is None:
        calib, calib_domains = calibration_windows(tokenizer, seq_len, calib_windows, with_domains=True)
    else:
        calib = token_windows(tokenizer, calib_text, seq_len, calib_windows, source=str(text), spread=True)
    held_texts = {str(eval_text): held_text} if held_text is not None else load_domains(tokenizer)["held_out"]
    auto = None
    if config.head.auto:
        config, auto = resolve_auto_head(model, config, calib, progress=progress, domains=calib_domains)
        if not config.head.enabled:
            raise ValueError(f"{model_name}: {auto['reason']}")
    head = dataclasses.replace(config.head, train_steps=steps, proxy_file="")
    states = collect_head_states(model, calib, progress=progress)
    held = {name: collect_head_states(model, token_windows(tokenizer, t, seq_len, eval_windows, source=name, spread=True),
                                      progress=progress) for name, t in held_texts.items()}
    weight = head_weight(model)
    fitted = fit_head_proxy(model, head, states)
    trained, log = train_lowrank_proxy(weight, fitted, states, steps, progress=progress)
    if head.optimism:  # each proxy with its own rows' error spread
        fitted, trained = (p.with_optimism(weight, states, head.optimism) for p in (fitted, trained))
    result = {"model": model_name, "calibration_text": str(text or "packaged calibration domains"),
              "held_out_text": str(eval_text or "packaged held-out domains"),
              "calibration_states": states.shape[0], "held_out_states": sum(h.shape[0] for h in held.values()),
              "steps": steps, "loss_first": log.loss[0], "loss_last": log.loss[-1],
              "proxy": head.proxy, "rank": head.rank, "k": head.k, "candidates": head.candidates,
              "stage_candidates": head.stage_candidates if head.proxy == "cascade" else None, "held_out": {}}
    if auto is not None:
        result["auto"] = auto
    for name, proxy in (("fitted", fitted), ("trained", trained)):
        selector = build_head_selector(weight, head, lowrank=proxy)
        for text_name, h in held.items():
            r1, rk = head_recall(weight, selector, h, head.k)
            result["held_out"].setdefault(text_name, {}).update({f"{name}_recall_at_1": r1, f"{name}_recall_at_k": rk})
        for key in (f"{name}_recall_at_1", f"{name}_recall_at_k"):
            result[key] = min(r[key] for r in result["held_out"].values())
        result["head_bytes_fraction"] = selector.head_nbytes() / (weight.numel() * 2)  # the same for both

    # the proxy first: the config that names it must never exist without it
    save_head_proxy(proxy_path, trained, {**proxy_meta(model, head), "train_steps": steps})
    saved = dataclasses.replace(config, head=dataclasses.replace(head, proxy_file=PROXY_NAME))  # relative to the config
    saved.save(config_path)  # atomic
    result["config"] = str(config_path)
    result["proxy_file"] = str(proxy_path)
    if plot:
        save_lines(plot, [{"x": log.steps, "y": log.loss, "style": {"lw": 0.8}}], xlabel="step",
                   ylabel="KL(model || proxy)", title=f"{model_name}: head proxy training (KL, T=3)")
        result["plot"] = str(plot)
    return result
