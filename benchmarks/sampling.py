"""Exact sampling with HiRE's head (hire.engine.sampling, docs/sampling.md): what it costs and how far
its law is from dense sampling.

Speed: tokens/s of ``Engine.generate`` with HiRE, greedy against temperature 1 and top-p 0.9 (with
``DensePolicy`` and probing HiRE on every step, the sampler before it; and over the candidates only, the
law before), and the dense head's, interleaved rounds, medians, and per-round ratios' medians.
Law: on held-out text (hire.data.load_domains' held-out side, teacher-forced, dense hidden states),
at every position the total variation distance between dense sampling's law and
- temperature 1: rejection sampling's law (proportional to exp(l) on the candidates, min(exp(l), exp(a))
  on the tail: computed exactly from the dense logits and the bound), the sampler's (that, or the dense
  head's where the tail's share passes TAIL_DENSE_SHARE) and the candidates-only law;
- top-p 0.9: the nucleus the sampler settles (``top_p_nucleus``; the dense head where it falls back)
  and the candidates-only nucleus;
with the tail's share of the proposal, the rows whose bound fails and their mass.

    .venv/bin/python benchmarks/sampling.py --model smollm2-135m --json benchmarks/sampling_smollm2-135m.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from hire.calibrate.prepare import prepare_model
from hire.data import domain_windows, load_domains
from hire.engine import Engine
from hire.engine import sampling
from hire.engine.sampling import SamplingStats, top_p_nucleus
from hire.models.load import gguf_source
from hire.recommended import quantized_config, recommended_config

PROMPT = "The king's daughter walked alone by the river, and as the evening fell she began to sing"


def _nucleus_law(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Dense top-p's law, as ``sample`` keeps the nucleus.  # logits: (V,) -> (V,)"""
    probs = logits.softmax(-1)
    sorted_probs, order = probs.sort(descending=True)
    keep = sorted_probs.cumsum(0) - sorted_probs <= top_p
    law = torch.zeros_like(probs).scatter(0, order, sorted_probs * keep)
    return law / law.sum()


def _restricted(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """softmax over ``ids`` only.  # logits: (V,) -> (V,)"""
    law = torch.zeros_like(logits)
    law[ids] = logits[ids].softmax(0)
    return law


def _tv(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * float((p.double() - q.double()).abs().sum())


def law_report(engine: Engine, windows: torch.Tensor, top_p: float, seed: int = 0) -> dict:
    """The laws at every position of ``windows`` (dense hidden states: the head's and sampler's effect alone)."""
    gen = torch.Generator().manual_seed(seed)
    stats = SamplingStats()
    rows = {k: [] for k in ("tv_t1", "tv_t1_sampler", "tv_t1_candidates", "tv_top_p", "tv_top_p_candidates", "tail_share",
                            "true_tail_mass", "violating_rows", "violating_mass")}
    for window in windows:
        hidden = engine.forward(window[:1], 0, hire=False)
        for pos in range(1, window.numel()):
            dense = engine.logits(hidden, hire=False)[0][0]  # (V,) float32
            logits, idx = engine.logits(hidden, hire=True)
            tail = engine.tail(hidden, logits, idx)
            is_tail = torch.ones_like(dense, dtype=torch.bool)
            is_tail[idx[0]] = False
            bound = tail.bound[0]
            p = dense.softmax(-1)
            # temperature 1: the sampler's law from the exact logits and the bound
            law = torch.where(is_tail, torch.minimum(dense, bound), dense).softmax(-1)
            rows["tv_t1"].append(_tv(law, p))  # rejection sampling's law
            share = float(torch.stack([dense[~is_tail].logsumexp(0), bound[is_tail].logsumexp(0)]).softmax(0)[1])
            rows["tv_t1_sampler"].append(0.0 if share > sampling.TAIL_DENSE_SHARE else rows["tv_t1"][-1])
            rows["tv_t1_candidates"].append(_tv(_restricted(dense, idx[0]), p))
            rows["true_tail_mass"].append(float(p[is_tail].sum()))
            masses = torch.stack([dense[~is_tail].logsumexp(0), bound[is_tail].logsumexp(0)])
            rows["tail_share"].append(float(masses.softmax(0)[1]))
            over = is_tail & (dense > bound)
            rows["violating_rows"].append(int(over.sum()))
            rows["violating_mass"].append(float(p[over].sum()))
            # top-p
            truth = _nucleus_law(dense, top_p)
            kept = top_p_nucleus(logits, idx, 1.0, top_p, gen, tail, stats)
            mine = truth if kept is None else _restricted(dense, kept[0])
            rows["tv_top_p"].append(_tv(mine, truth))
            before = torch.zeros_like(dense)
            before[idx[0]] = _nucleus_law(logits[0], top_p)  # the nucleus over the candidates only
            rows["tv_top_p_candidates"].append(_tv(before, truth))
            hidden = engine.forward(window[pos : pos + 1], pos, hire=False)
    n = len(rows["tv_t1"])
    out = {"positions": n}
    for k, v in rows.items():
        out[k + "_mean"] = sum(v) / n
        if k.startswith("tv"):
            out[k + "_max"] = max(v)
    s = stats.summary()
    out["top_p_paths"] = {k: s[k] for k in ("nucleus_exact", "nucleus_grown", "nucleus_estimated", "nucleus_dense")}
    out["top_p_rows_per_position"] = stats.rows / n if n else 0.0
    out["top_p_violations_seen"] = s["violations"]
    return out


def speed_report(engine: Engine, ids: torch.Tensor, tokens: int, rounds: int) -> dict:
    """decode tokens/s, HiRE: greedy, temperature 1, top-p 0.9 (with DensePolicy, and probing HiRE on every
    step: the sampler before it), top-p 0.9 candidates only; dense greedy, dense temperature 1 and top-p 0.9."""
    modes = {"dense_greedy": dict(hire=False), "dense_t1": dict(hire=False, temperature=1.0),
             "dense_top_p_0.9": dict(hire=False, temperature=1.0, top_p=0.9),
             "greedy": dict(hire=True), "t1": dict(hire=True, temperature=1.0),
             "top_p_0.9": dict(hire=True, temperature=1.0, top_p=0.9),
             "t1_probe_every_step": dict(hire=True, temperature=1.0, probe_every=1),
             "top_p_0.9_probe_every_step": dict(hire=True, temperature=1.0, top_p=0.9, probe_every=1),
             "t1_candidates_only": dict(hire=True, temperature=1.0, tail=False),
             "top_p_0.9_candidates_only": dict(hire=True, temperature=1.0, top_p=0.9, tail=False)}
    speeds = {m: [] for m in modes}
    stats = {}
    for r in range(rounds + 1):  # round 0 warms up
        for name, kw in modes.items():
            kw = dict(kw)
            engine.sample_tail = kw.pop("tail", True)
            engine.probe_every = kw.pop("probe_every", sampling.PROBE_EVERY)
            engine.sampling_stats = SamplingStats()
            out = engine.generate(ids, tokens, seed=r, **kw)
            if r:
                speeds[name].append(out.tokens_per_s)
                if engine.sampling_stats.steps:
                    stats.setdefault(name, []).append(engine.sampling_stats.summary())
    engine.sample_tail, engine.probe_every = True, sampling.PROBE_EVERY
    report = {f"tokens_per_s_{m}": statistics.median(v) for m, v in speeds.items()}
    # the same round's modes side by side (the machine may be shared: ratios of one round's runs hold better)
    for a, b in (("t1", "t1_probe_every_step"), ("top_p_0.9", "top_p_0.9_probe_every_step"),
                 ("t1", "dense_t1"), ("top_p_0.9", "dense_top_p_0.9"), ("t1", "dense_greedy")):
        report[f"ratio_{a}_over_{b}"] = statistics.median(x / y for x, y in zip(speeds[a], speeds[b]))
    for name, runs in stats.items():
        report[f"stats_{name}"] = {k: statistics.mean(r[k] for r in runs) for k in runs[0]}
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per generate (speed)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved speed rounds (after one warm-up)")
    p.add_argument("--windows", type=int, default=12, help="held-out windows for the law (2 per domain)")
    p.add_argument("--window-len", type=int, default=48, help="tokens per held-out window")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--margin", type=float, default=None, help="the tail bound's margin in spreads (default: the head's)")
    p.add_argument("--dequantized", action="store_true", help="a GGUF model dequantized to float16 (default: its codes)")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-law", action="store_true")
    p.add_argument("--json", help="write the report here")
    args = p.parse_args()
    torch.manual_seed(0)
    config = recommended_config(args.model)
    quantized = not args.dequantized and gguf_source(args.model) is not None
    if quantized:
        config = quantized_config(config)
    prepared = prepare_model(args.model, config, quantized=quantized)
    ids = prepared.tokenizer(PROMPT, return_tensors="pt").input_ids[0]
    engine = Engine(prepared.model, prepared.config, head_proxy=prepared.head_proxy, dtype=torch.float16,
                    max_seq_len=max(ids.numel() + args.tokens, args.window_len) + 1)
    if args.margin is not None:
        engine.head.tail_margin = args.margin
    report = {"model": args.model, "weights": "gguf" if quantized else "float16", "threads": torch.get_num_threads(),
              "candidates": int(engine.head.selector.keep[-1]), "vocab": engine.head.vocab_size,
              "margin": engine.head.tail_margin, "top_p": args.top_p}
    if not args.skip_speed:
        t = time.perf_counter()
        report["speed"] = speed_report(engine, ids, args.tokens, args.rounds)
        report["speed_s"] = time.perf_counter() - t
    if not args.skip_law:
        held_out = load_domains(prepared.tokenizer)["held_out"]
        windows = domain_windows(prepared.tokenizer, held_out, args.window_len, args.windows)
        t = time.perf_counter()
        report["law"] = law_report(engine, windows, args.top_p)
        report["law_s"] = time.perf_counter() - t
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
