"""`hire <verb>`: parses arguments and calls library functions."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time

from hire.config import HiReConfig
from hire.plots import save_lines

# flag -> (config part, field, type)
CONFIG_FLAGS = {
    "head_k": ("head", "k", int),
    "head_candidates": ("head", "candidates", int),
    "head_proxy": ("head", "proxy", str),
    "head_rank": ("head", "rank", int),
    "head_rank_bits": ("head", "rank_bits", int),
    "head_bits": ("head", "bits", int),
    "head_group_size": ("head", "group_size", int),
    "head_stage_candidates": ("head", "stage_candidates", int),
    "head_select_blocks": ("head", "select_blocks", int),
    "head_train_steps": ("head", "train_steps", int),
    "head_proxy_file": ("head", "proxy_file", str),
    "ffn_density": ("ffn", "density", float),
    "ffn_oversample": ("ffn", "oversample", float),
    "ffn_proxy": ("ffn", "proxy", str),
    "ffn_bits_group_size": ("ffn", "bits_group_size", int),
    "ffn_group_size": ("ffn", "group_size", int),
    "ffn_aggregate": ("ffn", "aggregate", str),
}


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="built-in name (smollm2-135m, gemma3-270m), a Hugging Face model directory, or a .gguf file "
                        "(default: smollm2-135m)")
    p.add_argument("--config", help="HiRE config JSON (default: the recommended settings for the model)")
    for flag, (part, name, typ) in CONFIG_FLAGS.items():
        p.add_argument("--" + flag.replace("_", "-"), type=typ, default=None, help=f"override {part}.{name}")
    p.add_argument("--no-head", action="store_true", help="leave the LM head dense")
    p.add_argument("--no-ffn", action="store_true", help="leave the FFNs dense")
    p.add_argument("--calib-windows", type=int, default=16,
                   help="calibration windows (of --seq-len tokens) for fitting the low-rank head proxy (default 16)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")


def _add_tp_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=int, default=None,
                   help="tensor parallel over TP processes (torch.distributed, gloo on CPU): attention heads, FFN "
                        "neurons and the LM head's vocabulary split over the ranks; compares the selection modes "
                        "dense / exact (global top-k: local top-k + one gather of (value, index) pairs) / da "
                        "(DA-TOP-k: local shares, no selection collective for the FFN). Launches torchrun itself, "
                        "or runs as one rank under `torchrun --nproc_per_node=TP -m hire ...`")
    p.add_argument("--modes", default="dense,exact,da", help="with --tp: the modes to run (default dense,exact,da)")
    p.add_argument("--timeout", type=float, default=300,
                   help="with --tp: seconds a collective may wait for the other ranks before the run fails (default 300)")


def build_config(args: argparse.Namespace) -> HiReConfig:
    from hire.recommended import recommended_config

    base = HiReConfig.load(args.config) if args.config else recommended_config(args.model)
    data = base.to_dict()
    for flag, (part, name, _) in CONFIG_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            data[part][name] = value
    if args.no_head:
        data["head"]["enabled"] = False
    if args.no_ffn:
        data["ffn"]["enabled"] = False
    return HiReConfig.from_dict(data)


def _prepare(args, config, fit: bool = True):
    """Load the model and fit (or fetch from the cache) what the config needs."""
    from hire.calibrate import cached_head_proxy, needs_states
    from hire.data import load_corpus, token_windows
    from hire.models import load_model

    model, tokenizer = load_model(args.model)
    head_proxy = None
    if fit and needs_states(config.head):
        calib = token_windows(tokenizer, load_corpus().text("calibration"), args.seq_len, args.calib_windows)
        head_proxy = cached_head_proxy(model, config.head, calib, progress=not getattr(args, "json", False))
    return model, tokenizer, head_proxy


def cmd_eval(args) -> int:
    from hire.data import load_corpus, token_windows
    from hire.eval import evaluate

    if args.tp is not None:
        return cmd_tp(args)
    args.windows = 8 if args.windows is None else args.windows
    config = build_config(args)
    model, tokenizer, head_proxy = _prepare(args, config)
    windows = token_windows(tokenizer, load_corpus().text("evaluation"), args.seq_len, args.windows)
    result = evaluate(model, windows, config, head_proxy=head_proxy, progress=True)
    result["model"] = args.model
    if args.json:
        print(json.dumps(result, indent=None if args.compact else 2))
    else:
        print(format_eval(result))
    return 0


def _fmt(v, spec=".4f"):
    return "-" if v is None else format(v, spec)


def format_eval(r: dict) -> str:
    c = r["config"]
    mb = 1 / 2**20
    lines = [
        f"model {r['model']} ({r['architecture']}), {r['positions']} positions of held-out text "
        f"({r['windows']} windows x {r['seq_len']})",
        f"head: {c['head']['proxy'] if c['head']['enabled'] else 'dense'} k={c['head']['k']} "
        f"k'={c['head']['candidates']}   ffn: {c['ffn']['proxy'] if c['ffn']['enabled'] else 'dense'} "
        f"density={c['ffn']['density']} group={c['ffn']['group_size']}",
        "",
        *([f"reference: the model's own {r['reference']} (it was trained with it); 'dense' below means that"]
          if r.get("reference", "dense") != "dense" else []),
        f"perplexity      dense {r['ppl_dense']:.3f}   HiRE FFN {r['ppl_hire']:.3f}   ({100 * r['ppl_increase']:+.2f}%)",
        f"greedy agreement, full HiRE vs dense: {_fmt(r['greedy_agreement'])}",
        f"LM head         recall@1 {_fmt(r['head_recall_at_1'])}   recall@{c['head']['k']} {_fmt(r['head_recall_at_k'])}"
        f"   greedy agreement {_fmt(r['head_greedy_agreement'])}",
        f"FFN             recall (mean over layers) {_fmt(r['ffn_recall'])}",
        "",
        f"{'bytes/token':12s} {'dense MiB':>10s} {'HiRE MiB':>10s} {'fraction':>9s}",
    ]
    for part in ("head", "ffn", "attention", "embedding", "other", "total"):
        d, h = r["bytes_dense"][part], r["bytes_hire"][part]
        lines.append(f"{part:12s} {d * mb:10.2f} {h * mb:10.2f} {(h / d if d else 1):9.3f}")
    lines.append(f"ideal decode speedup from bytes: {r['ideal_speedup']:.2f}x   ({r['seconds']:.0f} s)")
    return "\n".join(lines)


DEFAULT_PROMPT = "The king's daughter walked alone by the river, and as the evening fell she began to sing"


def _encode(tokenizer, text: str):
    return tokenizer(text, return_tensors="pt").input_ids[0]


def cmd_generate(args) -> int:
    import torch

    from hire.engine import SUPPORTED, Engine

    config = None if args.dense else build_config(args)
    model, tokenizer, head_proxy = _prepare(args, config or build_config(args), fit=not args.dense)
    prompt = _encode(tokenizer, args.prompt)
    if model.config.model_type not in SUPPORTED:
        return _generate_transformers(args, model, tokenizer, config, head_proxy, prompt)
    engine = Engine(model, config, head_proxy=head_proxy, dtype=getattr(torch, args.dtype),
                    max_seq_len=prompt.numel() + args.max_new_tokens)
    ids: list[int] = []
    shown = ""

    def stream(token: int) -> None:
        nonlocal shown
        ids.append(token)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        print(text[len(shown):], end="", flush=True)
        shown = text

    print(args.prompt, end="", flush=True)
    stop = tuple(t for t in [tokenizer.eos_token_id] if t is not None)
    stats = engine.generate(prompt, args.max_new_tokens, hire=not args.dense, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop_ids=stop, on_token=stream)
    print(f"\n[{'dense' if args.dense else 'HiRE'} engine, {args.dtype}: {stats.new_tokens} tokens, "
          f"{stats.tokens_per_s:.1f} tokens/s decode, prefill {1000 * stats.prefill_s:.0f} ms]", file=sys.stderr)
    return 0


def _generate_transformers(args, model, tokenizer, config, head_proxy, prompt) -> int:
    """Architectures the engine does not run: the patched model through transformers' generate()."""
    import torch
    from transformers import TextStreamer

    from hire.patch import sparsify_

    if config is not None:
        sparsify_(model, config, head_proxy=head_proxy)
    sampling = dict(do_sample=args.temperature > 0)
    if args.temperature > 0:
        sampling.update(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    out = model.generate(prompt[None], max_new_tokens=args.max_new_tokens,
                         streamer=TextStreamer(tokenizer, skip_special_tokens=True), **sampling)
    elapsed = time.perf_counter() - start
    new = out.shape[1] - prompt.numel()
    print(f"\n[{'dense' if config is None else 'HiRE'}: {new} tokens in {elapsed:.1f} s, {new / elapsed:.1f} tokens/s "
          "through transformers generate(); the engine does not run this architecture]", file=sys.stderr)
    return 0


def cmd_tp(args) -> int:
    """`hire bench/eval --tp P`: launch P ranks with torchrun, or be one of them."""
    import os

    import torch

    from hire.distributed import MODES, TPEngine, init_tp, launch, launched_by_torchrun, main_rank_first
    from hire.distributed.measure import tp_bench, tp_eval
    from hire.engine import Engine

    modes = tuple(m.strip() for m in args.modes.split(","))
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"--modes takes a comma-separated subset of {','.join(MODES)}, got {args.modes!r}")
    if getattr(args, "vs_transformers", False) or getattr(args, "llama_cpp", False):
        raise ValueError("--vs-transformers and --llama-cpp time one process: run them without --tp")
    if args.tp > 1 and not launched_by_torchrun():
        return launch(args.argv, args.tp, getattr(args, "threads", None))
    comm = init_tp(args.tp, args.timeout)
    try:
        threads = getattr(args, "threads", None) or os.environ.get("HIRE_TP_THREADS")
        torch.set_num_threads(int(threads) if threads else max(1, torch_threads_default() // comm.world))
        comm.check_same("command line", " ".join(args.argv))
        config = build_config(args)
        quiet = args.json or not comm.is_main
        with main_rank_first(comm, max(args.timeout, 3600)):
            model, tokenizer, head_proxy = _prepare(args, config)
        dtype = getattr(torch, args.dtype)
        if args.command == "bench":
            prompt = _encode(tokenizer, args.prompt)
            length = prompt.numel() + args.tokens + 1
        else:
            from hire.data import load_corpus, token_windows

            windows = list(token_windows(tokenizer, load_corpus().text("evaluation"), args.seq_len, args.windows or 2))
            length = args.seq_len + 1
        engine = TPEngine(model, config, comm, head_proxy=head_proxy, dtype=dtype, max_seq_len=length)
        reference = Engine(model, None, dtype=dtype, max_seq_len=length)  # the same patched model, one process
        if args.command == "bench":
            result = tp_bench(engine, reference, prompt, tokens=args.tokens, rounds=args.rounds, warmup=args.warmup,
                              modes=modes, progress=not quiet)
        else:
            result = tp_eval(engine, reference, windows, modes=modes, progress=not quiet)
        result.update(model=args.model, backend="gloo" if comm.world > 1 else "single process",
                      config=config.to_dict())
        if comm.is_main:
            print(json.dumps(result, indent=2) if args.json else format_tp(result))
            if getattr(args, "plot", None):
                from hire.distributed.scaling import plot_tp_bench

                plot_tp_bench(result, args.plot)
    finally:
        comm.close()
    return 0


def format_tp(r: dict) -> str:
    bench = "tokens_per_s" in next(iter(r["modes"].values()))
    lines = [f"model {r['model']}, tensor parallel over {r['tp']} ranks ({r['backend']})"]
    if bench:
        lines.append(f"{r['new_tokens']} new tokens, {r['rounds']} interleaved rounds (medians), "
                     f"{r['threads_per_rank']} threads per rank, query heads per rank {r['heads_per_rank'][0]}")
        lines.append(f"{'mode':6s} {'tok/s':>7s} {'coll/tok':>9s} {'select':>7s} {'KiB/tok':>8s} "
                     f"{'FFN recall':>10s} {'head rec':>9s} {'agree':>6s}  reference")
        for mode, m in r["modes"].items():
            head = "-" if m["head_recall_vs_exact"] is None else f"{m['head_recall_vs_exact']:.4f}"
            lines.append(f"{mode:6s} {m['tokens_per_s']:7.1f} {m['collectives_per_token']:9.1f} "
                         f"{m['selection_collectives_per_token']:7.1f} {m['bytes_exchanged_per_token'] / 1024:8.1f} "
                         f"{m['recall_vs_exact']:10.4f} {head:>9s} {m['greedy_agreement']:6.3f}  {m['greedy_reference']}")
        sp = r["single_process_tokens_per_s"]
        lines.append(f"one process with {r['threads_per_rank']} thread(s), same run: dense {sp['dense']:.1f} tok/s, "
                     f"HiRE {sp['hire']:.1f} tok/s")
        if "greedy_agreement_vs_exact_mode" in r["modes"].get("da", {}):
            lines.append(f"DA-TOP-k vs the exact mode, same forced tokens: greedy agreement "
                         f"{r['modes']['da']['greedy_agreement_vs_exact_mode']:.4f}")
        if "da_vs_exact_speedup" in r:
            lines.append(f"DA-TOP-k vs exact global top-k: {r['da_vs_exact_speedup']:.2f}x tokens/s")
    else:
        sp = r["single_process"]
        lines.append(f"{r['windows']} windows, {r['positions']} positions decoded one at a time; single process: "
                     f"dense {sp['dense_perplexity']:.3f}, HiRE {sp['hire_perplexity']:.3f}")
        lines.append(f"{'mode':6s} {'perplexity':>10s} {'vs dense':>9s} {'vs 1 proc':>9s} {'FFN recall':>10s} {'agree':>6s}")
        for mode, m in r["modes"].items():
            lines.append(f"{mode:6s} {m['perplexity']:10.3f} {100 * m['perplexity_change_vs_dense']:+8.2f}% "
                         f"{100 * m['perplexity_change_vs_single_process']:+8.2f}% {m['recall_vs_exact']:10.4f} "
                         f"{m['greedy_agreement']:6.3f}")
        da = r["modes"].get("da", {})
        if "greedy_agreement_vs_exact_mode" in da:
            lines.append(f"DA-TOP-k vs the exact mode, same positions: greedy agreement "
                         f"{da['greedy_agreement_vs_exact_mode']:.4f}; at the {da['stable_positions']} positions where "
                         f"the exact mode agrees with one process: {_fmt(da['greedy_agreement_vs_exact_mode_at_stable_positions'])}")
    return "\n".join(lines)


def cmd_scaling(args) -> int:
    """`hire scaling`: fit gloo's collectives here (P = --tp ranks), then model P = 1..64 devices."""
    import dataclasses as dc
    from pathlib import Path

    from hire.distributed import init_tp, launch, launched_by_torchrun
    from hire.distributed import scaling as sc

    devices = [int(p) for p in args.devices.split(",")]
    names = [n.strip() for n in args.models.split(",")]
    unknown = [n for n in names if n not in sc.MODELS]
    if unknown or any(p < 1 for p in devices):
        raise ValueError(f"--models takes a subset of {','.join(sc.MODELS)} (got {args.models!r}) and --devices "
                         f"positive integers (got {args.devices!r})")
    hardware = dict(sc.HARDWARE)
    if any(v is not None for v in (args.mem_gbs, args.link_latency_us, args.link_gbs)):
        base = sc.HARDWARE["nvlink"]
        hardware["custom"] = sc.Hardware("custom (--mem-gbs/--link-latency-us/--link-gbs)",
                                         args.mem_gbs or base.mem_gbs, args.link_latency_us or base.link_latency_us,
                                         args.link_gbs or base.link_gbs)
    result = {"assumptions": sc.__doc__.strip(), "hire": dc.asdict(sc.HiReShape()),
              "hardware": {k: dc.asdict(v) for k, v in hardware.items()},
              "models": {n: dc.asdict(sc.MODELS[n]) | {"params_b": sc.MODELS[n].params / 1e9} for n in names}}
    comm = None
    if not args.no_measure:
        if args.tp < 2:
            raise ValueError("fitting the link needs --tp >= 2 ranks (or --no-measure)")
        if not launched_by_torchrun():
            return launch(args.argv, args.tp)
        comm = init_tp(args.tp, args.timeout)
    try:
        if comm is not None:
            import torch

            torch.set_num_threads(1)
            times = sc.measure_collectives(comm, repeats=args.repeats)
            fit = sc.fit_link(times, comm.world)
            result["measured_gloo"] = {"ranks": comm.world, "seconds": {op: {str(k): v for k, v in t.items()}
                                                                        for op, t in times.items()}, **fit}
            if not comm.is_main:
                return 0
            if args.measured:
                result["check"] = _scaling_check(Path(args.measured), fit)
        rows = sc.scaling_table(hardware, [sc.MODELS[n] for n in names], devices)
        result["table"] = rows
        if args.plot:
            sc.plot_scaling(rows, args.plot)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result, indent=2) if args.json else format_scaling(result, devices))
    finally:
        if comm is not None:
            comm.close()
    return 0


def _scaling_check(path, fit: dict) -> dict:
    """Measured vs modelled on this machine: the collectives a `hire bench --tp P --json` run counted,
    timed with the fitted link, against the time the run measured per token."""
    from hire.distributed import scaling as sc

    bench = json.loads(path.read_text())
    P = bench["tp"]
    out = {"bench": str(path), "model": bench.get("model"), "tp": P, "modes": {}}
    for mode, m in bench["modes"].items():
        modelled = 0.0
        for kind, count in m["collectives_per_token_by_kind"].items():
            per = m["bytes_exchanged_per_token_by_kind"][kind] / count
            op = "all_reduce" if kind in ("attention", "ffn") else "all_gather"
            modelled += count * sc.collective_seconds(op, per, P, fit["link_latency_us"] * 1e-6, fit["link_gbs"] * 1e9)
        out["modes"][mode] = {"measured_ms_per_token": m["ms_per_token"], "modelled_ms_collectives": 1e3 * modelled,
                              "collectives_per_token": m["collectives_per_token"]}
    single = bench.get("single_process_tokens_per_s", {}).get("dense")
    if single and "dense" in bench["modes"] and bench["modes"]["dense"]["collectives_per_token"]:
        # what a collective really costs inside the decode loop: the measured step minus this rank's share of
        # the one-process step, over the collectives (it includes waiting for the other rank)
        d = bench["modes"]["dense"]
        out["effective_ms_per_collective"] = (d["ms_per_token"] - 1000 / single / P) / d["collectives_per_token"]
    if "exact" in out["modes"] and "da" in out["modes"]:
        e, d = out["modes"]["exact"], out["modes"]["da"]
        out["measured_ms_exact_minus_da"] = e["measured_ms_per_token"] - d["measured_ms_per_token"]
        out["modelled_ms_exact_minus_da_collectives"] = e["modelled_ms_collectives"] - d["modelled_ms_collectives"]
    return out


def format_scaling(r: dict, devices: list[int]) -> str:
    lines = []
    if "measured_gloo" in r:
        g = r["measured_gloo"]
        lines.append(f"measured here (gloo, {g['ranks']} ranks): all-reduce {g['fits']['all_reduce']['intercept_us']:.0f} us "
                     f"+ {g['fits']['all_reduce']['us_per_kib']:.2f} us/KiB, all-gather "
                     f"{g['fits']['all_gather']['intercept_us']:.0f} us + {g['fits']['all_gather']['us_per_kib']:.2f} us/KiB "
                     f"-> latency {g['link_latency_us']:.1f} us/phase, {g['link_gbs']:.2f} GB/s")
    if "check" in r:
        c = r["check"]
        lines.append(f"check on {c['model']} at P={c['tp']}: " + ", ".join(
            f"{mode} {m['measured_ms_per_token']:.1f} ms/token measured, {m['modelled_ms_collectives']:.1f} ms of it "
            f"collectives (modelled)" for mode, m in c["modes"].items()))
        if "effective_ms_per_collective" in c:
            lines.append(f"  in the decode loop a collective costs {c['effective_ms_per_collective']:.2f} ms (dense step minus "
                         f"1/{c['tp']} of the one-process step, over its collectives), waiting for the other rank included")
        if "measured_ms_exact_minus_da" in c:
            lines.append(f"  exact - DA: {c['measured_ms_exact_minus_da']:.1f} ms/token measured, "
                         f"{c['modelled_ms_exact_minus_da_collectives']:.1f} ms modelled for the selection collectives")
    lines.append("modelled tokens/s (dense / exact / DA-TOP-k):")
    shown = [p for p in devices if p in (1, 8, 64)] or devices
    header = f"{'hardware':8s} {'model':5s} " + " ".join(f"{'P=' + str(p):>22s}" for p in shown)
    lines.append(header)
    for hw in r["hardware"]:
        for model in r["models"]:
            cells = []
            for p in shown:
                t = {row["mode"]: row["tokens_per_s"] for row in r["table"]
                     if row["hardware"] == hw and row["model"] == model and row["devices"] == p}
                cells.append(f"{t['dense']:6.0f} /{t['exact']:6.0f} /{t['da']:6.0f}")
            lines.append(f"{hw:8s} {model:5s} " + " ".join(f"{c:>22s}" for c in cells))
    return "\n".join(lines)


def cmd_bench(args) -> int:
    import torch

    if args.tp is not None:
        return cmd_tp(args)
    from hire.bench import run_bench
    from hire.bench.decode import llama_cpp_tokens_per_s, plot_bench, transformers_tokens_per_s
    from hire.engine import Engine
    from hire.models import BUILTIN_MODELS

    torch.set_num_threads(args.threads or torch_threads_default())
    config = build_config(args)
    model, tokenizer, head_proxy = _prepare(args, config)
    prompt = _encode(tokenizer, args.prompt)
    extra = {}
    if args.vs_transformers:  # before the engine casts and patches the model
        extra["tokens_per_s_transformers"] = transformers_tokens_per_s(model, prompt, args.tokens)
    if args.llama_cpp:
        gguf = BUILTIN_MODELS[args.model].locate() if args.model in BUILTIN_MODELS else (
            args.model if args.model.endswith(".gguf") else None)
        extra["llama_cpp"] = (llama_cpp_tokens_per_s(gguf, args.prompt, args.tokens) if gguf else
                              {"available": False, "reason": "no GGUF file for this model"})
    engine = Engine(model, config, head_proxy=head_proxy, dtype=getattr(torch, args.dtype),
                    max_seq_len=prompt.numel() + args.tokens + 1)
    result = {"model": args.model, "config": config.to_dict()}
    result.update(run_bench(engine, prompt, tokens=args.tokens, rounds=args.rounds, warmup=args.warmup,
                            breakdown=not args.no_breakdown, progress=not args.json))
    result.update(extra)
    if "tokens_per_s_transformers" in result:
        result["engine_dense_vs_transformers"] = result["tokens_per_s_dense"] / result["tokens_per_s_transformers"]
    if args.plot:
        plot_bench(result, args.plot)
    print(json.dumps(result, indent=2) if args.json else format_bench(result))
    return 0


def format_bench(r: dict) -> str:
    mb = 1 / 2**20
    lines = [
        f"model {r['model']}, {r['dtype']}, {r['threads']} threads: {r['new_tokens']} new tokens after a "
        f"{r['prompt_tokens']}-token prompt, {r['rounds']} interleaved rounds (medians)",
        "",
        f"{'':22s} {'dense':>10s} {'HiRE':>10s}",
        f"{'decode tokens/s':22s} {r['tokens_per_s_dense']:10.1f} {r['tokens_per_s_hire']:10.1f}   speedup {r['speedup']:.2f}x",
        f"{'ms per token':22s} {r['ms_per_token_dense']:10.2f} {r['ms_per_token_hire']:10.2f}",
        f"{'MiB read per token':22s} {r['bytes_per_token_dense'] * mb:10.1f} {r['bytes_per_token_hire'] * mb:10.1f}"
        f"   ideal speedup {r['ideal_speedup']:.2f}x, reached {100 * r['fraction_of_ideal']:.0f} %",
        f"{'achieved GB/s':22s} {r['bandwidth_gb_s_dense']:10.2f} {r['bandwidth_gb_s_hire']:10.2f}",
    ]
    if "ms_per_part_dense" in r:
        lines.append("")
        lines.append(f"{'per part':22s} {'ms dense':>10s} {'ms HiRE':>10s} {'MiB dense':>10s} {'MiB HiRE':>10s}")
        for part in ("head", "ffn", "attention", "other"):
            bd = r["bytes_dense"][part] + (r["bytes_dense"]["embedding"] if part == "other" else 0)
            bh = r["bytes_hire"][part] + (r["bytes_hire"]["embedding"] if part == "other" else 0)
            lines.append(f"{part:22s} {r['ms_per_part_dense'][part]:10.2f} {r['ms_per_part_hire'][part]:10.2f} "
                         f"{bd * mb:10.1f} {bh * mb:10.1f}")
        od, oh = r["overhead_dense"], r["overhead_hire"]
        lines.append(f"{'Python/dispatch ms':22s} {od['ms_overhead_per_token']:10.2f} {oh['ms_overhead_per_token']:10.2f}"
                     "   (wall time outside aten operators, torch.profiler)")
    if "tokens_per_s_transformers" in r:
        lines.append(f"transformers generate(): {r['tokens_per_s_transformers']:.1f} tokens/s (float32, eager); "
                     f"dense engine is {r['engine_dense_vs_transformers']:.2f}x that")
    if "llama_cpp" in r:
        lc = r["llama_cpp"]
        lines.append(f"llama.cpp: {lc['tokens_per_s']:.1f} tokens/s" if lc.get("available") else f"llama.cpp: {lc['reason']}")
    lines.append(f"greedy tokens identical, dense vs HiRE: {100 * r['greedy_agreement_last_round']:.0f} % "
                 f"(kernels {r['hire_kernels']})")
    return "\n".join(lines)


def torch_threads_default() -> int:
    import os

    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def cmd_calibrate(args) -> int:
    from pathlib import Path

    from hire.calibrate import collect_head_states, fit_head_proxy, head_recall, head_weight, proxy_meta, save_head_proxy
    from hire.calibrate.train import train_lowrank_proxy
    from hire.data import load_corpus, token_windows
    from hire.models import load_model
    from hire.patch import build_head_selector

    config = build_config(args)
    head = config.head
    if head.proxy not in ("lowrank", "cascade"):
        raise ValueError(f"hire calibrate trains the low-rank head proxy: use --head-proxy lowrank or cascade, not {head.proxy!r}")
    head.train_steps = args.steps
    head.proxy_file = ""
    out = Path(args.out or f"hire-{Path(args.model).name}")
    model, tokenizer = load_model(args.model)
    corpus = load_corpus()
    quiet = args.json
    calib = token_windows(tokenizer, corpus.text("calibration"), args.seq_len, args.calib_windows)
    held_windows = token_windows(tokenizer, corpus.text("evaluation"), args.seq_len, args.eval_windows)
    states = collect_head_states(model, calib, progress=not quiet)
    held = collect_head_states(model, held_windows, progress=not quiet)
    weight = head_weight(model)
    fitted = fit_head_proxy(model, head, states)
    trained, log = train_lowrank_proxy(weight, fitted, states, args.steps, progress=not quiet)
    result = {"model": args.model, "calibration_states": states.shape[0], "held_out_states": held.shape[0],
              "steps": args.steps, "loss_first": log.loss[0], "loss_last": log.loss[-1]}
    for name, proxy in (("fitted", fitted), ("trained", trained)):
        selector = build_head_selector(weight, head, lowrank=proxy)
        r1, rk = head_recall(weight, selector, held, head.k)
        result[f"{name}_recall_at_1"], result[f"{name}_recall_at_k"] = r1, rk
        result["head_bytes_fraction"] = selector.head_nbytes() / (weight.numel() * 2)  # the same for both
    out.mkdir(parents=True, exist_ok=True)
    meta = {**proxy_meta(model, head), "train_steps": args.steps}
    save_head_proxy(out / "head_proxy.safetensors", trained, meta)
    head.proxy_file = "head_proxy.safetensors"  # relative to the config file
    config.save(out / "config.json")
    result["config"] = str(out / "config.json")
    result["proxy_file"] = str(out / "head_proxy.safetensors")
    if args.plot:
        save_lines(args.plot, [{"x": log.steps, "y": log.loss, "style": {"lw": 0.8}}], xlabel="step",
                   ylabel="KL(model || proxy)", title=f"{args.model}: head proxy training (KL, T=3)")
        result["plot"] = args.plot
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.model}: head proxy rank {head.rank}, {args.steps} steps on {states.shape[0]} calibration states; "
              f"loss {log.loss[0]:.4f} -> {log.loss[-1]:.4f}")
        print(f"held-out ({held.shape[0]} positions), k'={head.candidates}:  recall@1 / recall@{head.k}")
        for name in ("fitted", "trained"):
            print(f"  {name:8s} {result[f'{name}_recall_at_1']:.4f} / {result[f'{name}_recall_at_k']:.4f}")
        print(f"head bytes {100 * result['head_bytes_fraction']:.1f} % of the 16-bit head")
        print(f"wrote {result['config']} and {result['proxy_file']}; use: hire eval --model {args.model} --config {result['config']}")
    return 0


def _train_config(args):
    """The TrainConfig from the flags (over the defaults, or over the saved run with --resume)."""
    from pathlib import Path

    from hire.train import TrainConfig

    data = TrainConfig().to_dict()
    if args.resume:
        saved = Path(args.out) / "train_config.json"
        if not saved.is_file():
            raise FileNotFoundError(f"cannot resume: {saved} does not exist; start a new run without --resume")
        data = json.loads(saved.read_text())
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, "t_" + f.name)
        if value is not None:
            data[f.name] = value
    return TrainConfig.from_dict(data)


def cmd_train(args) -> int:
    import torch

    from hire.train import train

    torch.set_num_threads(args.threads)
    cfg = _train_config(args)
    summary = train(cfg, args.out, resume=args.resume, stop_after=args.stop_after, progress=not args.json)
    if args.json:
        print(json.dumps(summary, indent=2))
    elif "stopped_at" in summary:
        print(f"stopped after step {summary['stopped_at']} of {summary['steps']}; continue with: "
              f"hire train --out {args.out} --resume")
    else:
        print(f"{summary['variant']}: {summary['parameters'] / 1e6:.2f} M parameters, {summary['steps']} steps, "
              f"{summary['tokens_seen'] / 1e6:.2f} M tokens in {summary['train_seconds'] / 60:.1f} min")
        print(f"validation loss {summary['val_loss']:.4f} (perplexity {summary['val_ppl']:.2f}) with exact "
              f"{'top-k' if summary['density'] < 1 else 'dense'} FFNs")
        if summary["val_head_recall_at_1"] is not None:
            print(f"jointly trained head proxy: validation recall@1 {summary['val_head_recall_at_1']:.4f}, "
                  f"recall@{cfg.head_k} {summary['val_head_recall_at_k']:.4f} at k'={cfg.head_candidates} (float factors)")
        print(f"wrote {args.out} (a Hugging Face model directory + hire_config.json, loss.png); try:\n"
              f"  hire eval --model {args.out} --config {summary['hire_config']} --seq-len {cfg.seq_len}\n"
              f"  hire bench --model {args.out} --config {summary['hire_config']}")
    return 0


def cmd_sparsify_train(args) -> int:
    import copy
    from pathlib import Path

    import torch

    from hire.data import load_corpus, token_windows
    from hire.layers.topk_ffn import apply_topk_
    from hire.models import load_model
    from hire.recommended import recommended_config
    from hire.eval import perplexity
    from hire.train.sparse_ft import SparseFTConfig, sparse_finetune

    torch.set_num_threads(args.threads)
    cfg = SparseFTConfig(density=args.density, group_size=args.group_size, steps=args.steps, batch=args.batch,
                         lr=args.lr, seed=args.seed)
    out = Path(args.out or f"hire-{Path(args.model).name}-topk{args.density:g}")
    if (out / "sparse_ft.json").exists():
        raise ValueError(f"{out} already holds a fine-tuned model; choose another --out")
    model, tokenizer = load_model(args.model)
    corpus = load_corpus()
    calib = token_windows(tokenizer, corpus.text("calibration"), args.seq_len, args.windows)
    held = token_windows(tokenizer, corpus.text("evaluation"), args.eval_seq_len, args.eval_windows)
    quiet = args.json
    result = {"model": args.model, "calibration_tokens": calib.numel(), "held_out_tokens": held.numel()}
    if args.allocate:
        from hire.tune import allocate_mean_density, topk_sensitivity

        grid = tuple(sorted({float(d) for d in args.allocate_densities.split(",")} | {cfg.density}))
        kl = topk_sensitivity(model, calib[: args.sensitivity_windows], grid, progress=not quiet)
        cfg.layer_density = allocate_mean_density(kl, grid, cfg.density)
        result["allocation"] = {"densities": grid, "kl": kl, "layer_density": cfg.layer_density}
    result["config"] = dataclasses.asdict(cfg)
    result["ppl_dense"] = perplexity(model, held, progress=not quiet)
    free = apply_topk_(copy.deepcopy(model), cfg.layer_density or cfg.density, cfg.group_size)
    result["mean_density"] = free.config.hire_topk["density"]
    result["ppl_topk_training_free"] = perplexity(free, held, progress=not quiet)
    del free
    start = time.time()
    log = sparse_finetune(model, calib, cfg, progress=not quiet)
    result["seconds"] = time.time() - start
    result["ppl_topk_finetuned"] = perplexity(model, held, progress=not quiet)
    result["ppl_increase"] = result["ppl_topk_finetuned"] / result["ppl_dense"] - 1
    result["ppl_increase_training_free"] = result["ppl_topk_training_free"] / result["ppl_dense"] - 1
    result["layers"] = log
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    base = recommended_config(args.model).to_dict()
    base["ffn"].update(enabled=True, density=result["mean_density"], layer_density=list(cfg.layer_density),
                       group_size=cfg.group_size, oversample=args.oversample)
    HiReConfig.from_dict(base).save(out / "hire_config.json")
    result["out"] = str(out)
    result["hire_config"] = str(out / "hire_config.json")
    (out / "sparse_ft.json").write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        save_lines(args.plot, [
            {"x": log["layer"], "y": log["rel_error_before"], "label": "top-k, training-free", "style": {"marker": "o", "ms": 3}},
            {"x": log["layer"], "y": log["rel_error_after"], "label": "top-k, fine-tuned", "style": {"marker": "o", "ms": 3}},
        ], xlabel="decoder layer", ylabel="held-out ||y - y_dense||^2 / ||y_dense||^2", logy=True, size=(6.5, 3.5),
            title=f"{args.model}: top-{100 * result['mean_density']:.3g}% FFNs, layer-wise fine-tuning")
        result["plot"] = args.plot
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "layers"}, indent=2))
    else:
        if cfg.layer_density:
            print("per-layer densities (allocated by output-KL sensitivity): "
                  + " ".join(f"{d:g}" for d in cfg.layer_density))
        print(f"{args.model}: FFN density {result['mean_density']:.3g} (groups of {cfg.group_size}), {cfg.steps} steps per layer on "
              f"{calib.numel()} calibration tokens, {result['seconds'] / 60:.1f} min")
        print(f"held-out perplexity ({held.numel()} tokens): dense {result['ppl_dense']:.3f}   top-k training-free "
              f"{result['ppl_topk_training_free']:.3f} ({100 * result['ppl_increase_training_free']:+.1f}%)   "
              f"top-k fine-tuned {result['ppl_topk_finetuned']:.3f} ({100 * result['ppl_increase']:+.1f}%)")
        print(f"wrote {out}; try:\n  hire eval --model {out} --config {out / 'hire_config.json'}\n"
              f"  hire bench --model {out} --config {out / 'hire_config.json'}")
    return 0


def cmd_tune(args) -> int:
    from pathlib import Path

    from hire.data import load_corpus, token_windows
    from hire.models import load_model
    from hire.tune import DENSITIES, tune_ffn

    config = build_config(args)
    model, tokenizer = load_model(args.model)
    windows = token_windows(tokenizer, load_corpus().text("calibration"), args.seq_len, args.windows)
    densities = tuple(float(d) for d in args.densities.split(",")) if args.densities else DENSITIES
    r = tune_ffn(model, config, windows, args.max_ppl_increase, densities=densities,
                 sensitivity_windows=min(args.sensitivity_windows, windows.shape[0]), steps=args.steps,
                 progress=not args.json)
    out = args.out or f"hire-{Path(args.model).name}-tuned.json"
    r.config.save(out)
    result = {"model": args.model, "config": out, "max_ppl_increase": args.max_ppl_increase, "winner": r.winner,
              "ppl_dense": r.ppl_dense, "ppl_hire": r.ppl_hire, "ppl_increase": r.ppl_hire / r.ppl_dense - 1,
              "ffn_bytes_fraction": r.ffn_bytes / r.ffn_bytes_dense, "tuned": r.tuned, "uniform": r.uniform,
              "densities": r.densities, "kl": r.kl, "trials": r.trials}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.model}: FFN densities within +{100 * args.max_ppl_increase:.2f} % perplexity on "
              f"{windows.shape[0]} calibration windows (dense {r.ppl_dense:.3f})")
        for name, t in (("per-layer", r.tuned), ("uniform", r.uniform)):
            if t is None:
                print(f"  {name:9s}: nothing within the budget")
            else:
                print(f"  {name:9s}: mean density {t['mean_density']:.3f}, FFN bytes "
                      f"{100 * t['ffn_bytes'] / r.ffn_bytes_dense:.1f} % of dense, perplexity {100 * t['ppl_increase']:+.2f} %")
        if r.tuned is not None:
            print("  per-layer densities: " + " ".join(f"{d:g}" for d in r.tuned["layer_density"]))
        print(f"wrote {out} ({r.winner}: fewer bytes); check it on held-out text: "
              f"hire eval --model {args.model} --config {out}")
    return 0


def make_parser() -> argparse.ArgumentParser:
    from hire.train import TrainConfig

    parser = argparse.ArgumentParser(prog="hire", description="HiRE: high-recall approximate top-k for faster LLM decoding")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("eval", help="quality and bytes of HiRE vs dense on held-out text",
                       description="Perplexity dense vs HiRE-FFN, greedy agreement, LM-head and FFN recall, and "
                                   "bytes read per decoded token, on the evaluation split of the packaged corpus.")
    _add_model_args(p)
    p.add_argument("--windows", type=int, default=None,
                   help="evaluation windows of --seq-len tokens (default 8; with --tp, 2: they are decoded token by token)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--compact", action="store_true", help="with --json: on one line")
    _add_tp_args(p)
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="with --tp: weights in the engine (default float16)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("calibrate", help="fit and train the low-rank LM-head proxy; write it and its config",
                       description="Fit the activation-aware low-rank head proxy on calibration text, train it for "
                                   "recall (KL to the model's next-token distribution, temperature 3), report "
                                   "held-out recall of the fitted and the trained proxy under the config's "
                                   "selector, and write OUT/head_proxy.safetensors and OUT/config.json "
                                   "(use it with --config).")
    _add_model_args(p)
    p.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    p.add_argument("--eval-windows", type=int, default=4, help="held-out windows for the recall report (default 4)")
    p.add_argument("--out", help="output directory (default hire-MODEL)")
    p.add_argument("--plot", help="write a PNG of the training loss")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("train", help="train a small decoder from scratch: dense, top-k FFN, group top-k, + HiRE-LR head",
                       description="Train a Llama-layout decoder from scratch on the corpus (a byte-level BPE "
                                   "tokenizer is trained first) with dense FFNs (--density 1), top-k FFNs "
                                   "(--density 0.1), group top-k (--group-size 16) and/or a jointly trained low-rank "
                                   "LM-head proxy (--head-rank 32). Checkpoints every --save-every steps; --resume "
                                   "continues an interrupted run exactly. Writes a Hugging Face model directory with "
                                   "hire_config.json (how HiRE decodes it), head_proxy.safetensors, train_log.json "
                                   "and loss.png.")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--stop-after", type=int, default=None, help="stop (with a checkpoint) after this many steps")
    p.add_argument("--threads", type=int, default=torch_threads_default(), help="torch threads (default: all cores)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    for f in dataclasses.fields(TrainConfig):  # the flags mirror the config's fields
        p.add_argument("--" + f.name.replace("_", "-"), dest="t_" + f.name, type=type(f.default), default=None,
                       metavar=f.name.upper(),
                       help=f"default {f.default}")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sparsify-train", help="fine-tune a pretrained model's FFNs to top-k, layer by layer",
                       description="Make every FFN of a pretrained gated model (Llama, Gemma, Qwen layouts) a top-k "
                                   "FFN and train it, one layer at a time in order, to reproduce the dense FFN's "
                                   "output on calibration text (inputs from the already sparse layers before it). "
                                   "Reports held-out perplexity dense / top-k training-free / top-k fine-tuned and "
                                   "writes a Hugging Face directory (config.hire_topk; hire.load_model re-applies it) "
                                   "with hire_config.json for HiRE decoding.")
    p.add_argument("--model", default="smollm2-135m", help="built-in name, Hugging Face directory or .gguf file")
    p.add_argument("--density", type=float, default=0.2, help="FFN neurons kept per token (default 0.2)")
    p.add_argument("--group-size", type=int, default=1, help="contiguous neurons selected together (default 1)")
    p.add_argument("--steps", type=int, default=200, help="Adam steps per layer (default 200)")
    p.add_argument("--batch", type=int, default=512, help="tokens per step (default 512)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate, cosine-decayed to 10%% (default 1e-3)")
    p.add_argument("--windows", type=int, default=64, help="calibration windows (default 64)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window (default 256)")
    p.add_argument("--eval-windows", type=int, default=8, help="held-out windows for perplexity (default 8)")
    p.add_argument("--eval-seq-len", type=int, default=512, help="tokens per held-out window (default 512, as hire eval)")
    p.add_argument("--oversample", type=float, default=2.0,
                   help="FFN candidates / kept neurons in the written HiRE config (default 2)")
    p.add_argument("--allocate", action="store_true",
                   help="per-layer densities averaging --density, allocated by each layer's output-KL sensitivity "
                        "to exact top-k (a knapsack, as hire tune), instead of one density everywhere")
    p.add_argument("--allocate-densities", default="0.05,0.1,0.15,0.2,0.3,0.4,0.5,0.6",
                   help="candidate densities for --allocate (default 0.05,0.1,0.15,0.2,0.3,0.4,0.5,0.6)")
    p.add_argument("--sensitivity-windows", type=int, default=2,
                   help="calibration windows for the --allocate sensitivities (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=torch_threads_default(), help="torch threads (default: all cores)")
    p.add_argument("--out", help="output directory (default hire-MODEL-topkDENSITY)")
    p.add_argument("--plot", help="write a PNG of the per-layer errors")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_sparsify_train)

    p = sub.add_parser("tune", help="per-layer FFN densities that read the fewest bytes within a perplexity budget",
                       description="Measure each FFN layer's sensitivity (output KL with only that layer sparse, at "
                                   "each candidate density) on calibration text, allocate densities by a knapsack "
                                   "over bytes and KL, bisect its price on the real calibration perplexity, compare "
                                   "with the best uniform density, and write the cheaper as a config (per-layer "
                                   "densities in ffn.layer_density). The head settings are kept as given.")
    _add_model_args(p)
    p.add_argument("--max-ppl-increase", type=float, default=0.03, help="allowed perplexity increase (default 0.03 = +3 %%)")
    p.add_argument("--windows", type=int, default=4, help="calibration windows of --seq-len tokens (default 4)")
    p.add_argument("--sensitivity-windows", type=int, default=1,
                   help="of those, windows for the per-layer sensitivities (default 1)")
    p.add_argument("--densities", help="candidate densities, comma-separated (default 0.2,0.3,...,1.0)")
    p.add_argument("--steps", type=int, default=10, help="bisection steps on the price, one perplexity pass each (default 10)")
    p.add_argument("--out", help="config file to write (default hire-MODEL-tuned.json)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("generate", help="stream text from the HiRE engine",
                       description="Generate with the HiRE decode engine (Llama, Mistral, Qwen2 and Gemma-3 "
                                   "layouts; other architectures go through the patched model's generate()).")
    _add_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--dense", action="store_true", help="the dense weights of the same engine, for comparison")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="weights in the engine (default float16; the residual stream stays float32)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench", help="decode tokens/s, dense vs HiRE, in one engine",
                       description="Dense vs HiRE decode speed in the same engine and run: interleaved rounds after "
                                   "a warm-up, medians; bytes per token, achieved bandwidth, the ideal speedup from "
                                   "bytes and the fraction reached, a per-part breakdown.")
    _add_model_args(p)
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--tokens", type=int, default=64, help="new tokens per round (default 64)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved dense/HiRE rounds (default 5)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: all cores; with --tp, cores / TP per rank)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="weights in the engine (default float16; the residual stream stays float32)")
    p.add_argument("--no-breakdown", action="store_true", help="skip the per-part timing and the profile")
    p.add_argument("--vs-transformers", action="store_true", help="also time transformers' eager generate()")
    p.add_argument("--llama-cpp", action="store_true", help="also time llama.cpp (needs llama-cpp-python)")
    p.add_argument("--plot", help="write a PNG of the breakdown (with --tp: tokens/s and collectives per mode)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_tp_args(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("scaling", help="model tensor-parallel tokens/s for P = 1..64 devices, 1B-70B models",
                       description="Fit gloo's all-reduce / all-gather latency and bandwidth on this machine (--tp "
                                   "ranks, launched with torchrun), then model decode tokens/s of dense, exact global "
                                   "top-k and DA-TOP-k for P devices and Llama-shaped 1B-70B models on NVLink- and "
                                   "ICI-class hardware (their bandwidths and latencies are inputs, see --help of the "
                                   "flags). --measured BENCH.json compares the fitted collective costs with a "
                                   "`hire bench --tp P --json` run.")
    p.add_argument("--tp", type=int, default=2, help="ranks for fitting gloo here (default 2)")
    p.add_argument("--no-measure", action="store_true", help="skip fitting gloo; model only")
    p.add_argument("--repeats", type=int, default=30, help="timed repeats per message size (default 30)")
    p.add_argument("--timeout", type=float, default=300, help="seconds a collective may wait (default 300)")
    p.add_argument("--measured", help="a `hire bench --tp P --json` result to check the fitted model against")
    p.add_argument("--devices", default="1,2,4,8,16,32,64", help="device counts to model (default 1,2,4,...,64)")
    p.add_argument("--models", default="1B,3B,8B,70B", help="model sizes to model (default 1B,3B,8B,70B)")
    p.add_argument("--mem-gbs", type=float, default=None, help="add a 'custom' device: weight-read GB/s per device")
    p.add_argument("--link-latency-us", type=float, default=None, help="custom device: latency per collective phase, us")
    p.add_argument("--link-gbs", type=float, default=None, help="custom device: link GB/s per device")
    p.add_argument("--out", help="write the whole result (table, fit, assumptions) as JSON")
    p.add_argument("--plot", help="write a PNG of tokens/s vs P")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_scaling)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = make_parser().parse_args(argv)
    args.argv = argv  # --tp relaunches the same command under torchrun
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="hire: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"hire: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
