"""`hire bench --tp P` and `hire eval --tp P`: the tensor-parallel flags, the run, its report."""

from __future__ import annotations

import argparse
import json

from hire.commands._args import fmt, integer, names, number
from hire.distributed.measure import run_tp
from hire.distributed.tp import MODES


def add_tp_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("tensor parallel")
    g.add_argument("--tp", type=integer(minimum=1), default=None, metavar="TP",
                   help="tensor parallel over TP processes (torch.distributed, gloo on CPU): attention heads, FFN "
                        "neurons and the LM head's vocabulary split over the ranks; compares the selection modes "
                        "dense / exact (global top-k: local top-k + one gather of (value, index) pairs) / da "
                        "(DA-TOP-k: local shares, no selection collective for the FFN). Launches torchrun itself, "
                        "or runs as one rank under `torchrun --nproc_per_node=TP -m hire ...`")
    g.add_argument("--modes", type=names(MODES), default=MODES,
                   help=f"with --tp: the modes to run (default {','.join(MODES)})")
    g.add_argument("--timeout", type=number(above=0), default=300.0,
                   help="with --tp: seconds a collective may wait for the other ranks before the run fails (default 300)")


def run(args: argparse.Namespace, config, *, windows: int = 2) -> int:
    """The --tp branch of bench and eval (``args.command``)."""
    if getattr(args, "vs_transformers", False) or getattr(args, "llama_cpp", False):
        raise ValueError("--vs-transformers and --llama-cpp time one process: run them without --tp")
    if getattr(args, "context", 0):
        raise ValueError("--context is not measured with --tp (its ranks decode after the prompt alone): "
                         "run it without --tp")
    bench = args.command == "bench"
    result = run_tp(args.command, args.argv, args.model, config, tp=args.tp, modes=args.modes, timeout=args.timeout,
                    threads=getattr(args, "threads", None), dtype=args.dtype, seq_len=args.seq_len,
                    calib_windows=args.calib_windows, prompt=getattr(args, "prompt", ""),
                    tokens=getattr(args, "tokens", 0), rounds=getattr(args, "rounds", 0),
                    warmup=getattr(args, "warmup", 0), windows=windows, plot=getattr(args, "plot", None) if bench else None,
                    force=getattr(args, "force", False), progress=not args.json)
    if isinstance(result, int):  # the launcher (the ranks printed) or a rank other than 0
        return result
    print(json.dumps(result, indent=2) if args.json else format_tp(result))
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
                         f"the exact mode agrees with one process: "
                         f"{fmt(da['greedy_agreement_vs_exact_mode_at_stable_positions'])}")
    return "\n".join(lines)
