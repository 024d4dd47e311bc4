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
from hire.data import domain_windows, load_corpus, load_domains, read_text, token_windows
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
    calib_windows: int = 16,
    eval_windows: int = 4,
    plot: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
    text: str | Path | None = None,
    eval_text: str | Path | None = None,
    domains: bool = False,
) -> dict:
    """Fit and train ``config.head``'s low-rank proxy for ``model_name`` (``steps`` Adam steps on the
    head inputs of ``calib_windows`` calibration windows of ``seq_len`` tokens), measure recall on
    ``eval_windows`` held-out windows, write ``out/hire_config.json`` + ``out/head_proxy.safetensors``
    (and a loss curve at ``plot``). ``text`` / ``eval_text``: the calibration / held-out text instead
    of the corpus's splits (files, directories or JSONL: ``hire.data.read_text``). Returns the report
    (the JSON of ``hire calibrate``). ``domains``: calibrate on the calibration side of
    ``hire.data.load_domains`` (prose, code, docs in equal shares) and measure on its held-out side."""
    if domains and (text is not None or eval_text is not None):
        raise ValueError("--domains chooses both texts: leave out --text and --eval-text")
    if config.head.proxy not in ("lowrank", "cascade"):
        raise ValueError(f"hire calibrate trains the low-rank head proxy: use --head-proxy lowrank or cascade, "
                         f"not {config.head.proxy!r}")
    out = Path(out)
    config_path, proxy_path = out / CONFIG_NAME, out / PROXY_NAME
    for path in (config_path, proxy_path):  # before anything loads: a refusal costs nothing
        refuse_overwrite(path, force, "--out")
    if plot:
        refuse_overwrite(plot, force, "--plot")
    head = dataclasses.replace(config.head, train_steps=steps, proxy_file="")
    calib_text = read_text(text) if text is not None else None  # refused before the model loads
    held_text = read_text(eval_text) if eval_text is not None else None

    model, tokenizer = load_model(model_name)
    if not domains and (calib_text is None or held_text is None):
        corpus = load_corpus()
        calib_text = corpus.text("calibration") if calib_text is None else calib_text
        held_text = corpus.text("evaluation") if held_text is None else held_text
    if domains:
        split = load_domains()
        calib = domain_windows(tokenizer, split["calibration"], seq_len, calib_windows)
        held_windows = domain_windows(tokenizer, split["held_out"], seq_len, eval_windows)
    else:
        calib = token_windows(tokenizer, calib_text, seq_len, calib_windows,
                              source=str(text or "the calibration split"), spread=text is not None)
        held_windows = token_windows(tokenizer, held_text, seq_len, eval_windows,
                                     source=str(eval_text or "the evaluation split"), spread=eval_text is not None)
    states = collect_head_states(model, calib, progress=progress)
    held = collect_head_states(model, held_windows, progress=progress)
    weight = head_weight(model)
    fitted = fit_head_proxy(model, head, states)
    trained, log = train_lowrank_proxy(weight, fitted, states, steps, progress=progress)
    result = {"model": model_name,
              "calibration_text": "domains: prose, code, docs" if domains else str(text or "corpus calibration split"),
              "held_out_text": "held-out domains" if domains else str(eval_text or "corpus evaluation split"),
              "calibration_states": states.shape[0], "held_out_states": held.shape[0],
              "steps": steps, "loss_first": log.loss[0], "loss_last": log.loss[-1],
              "rank": head.rank, "k": head.k, "candidates": head.candidates}
    for name, proxy in (("fitted", fitted), ("trained", trained)):
        selector = build_head_selector(weight, head, lowrank=proxy)
        r1, rk = head_recall(weight, selector, held, head.k)
        result[f"{name}_recall_at_1"], result[f"{name}_recall_at_k"] = r1, rk
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
