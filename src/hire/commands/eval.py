"""`hire eval`: quality and bytes of HiRE vs dense on held-out text."""

from __future__ import annotations

import argparse
import json

from hire.commands import _tp
from hire.commands._args import DTYPES, add_json, add_model_args, build_config, fmt, integer
from hire.eval.quality import evaluate_model

HELP = "quality and bytes of HiRE vs dense on held-out text"
DESCRIPTION = ("Perplexity dense vs HiRE-FFN, greedy agreement, LM-head and FFN recall, and bytes read per decoded "
               "token, on the evaluation split of the packaged corpus.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--windows", type=integer(minimum=1), default=None,
                   help="evaluation windows of --seq-len tokens (default 8; with --tp, 2: they are decoded token by token)")
    add_json(p)
    p.add_argument("--compact", action="store_true", help="with --json: on one line")
    _tp.add_tp_args(p)
    p.add_argument("--dtype", default="float16", choices=DTYPES, help="with --tp: weights in the engine (default float16)")
    p.add_argument("--text", action="append", metavar="PATH",
                   help="held-out text instead of the corpus's evaluation split: a text file, a directory of them, or "
                        "JSONL with a 'text' field; give it several times for per-domain results and the worst of each")
    p.add_argument("--domains", action="store_true",
                   help="evaluate on the packaged held-out domains, per domain and the worst: prose (Shakespeare "
                        "plays), python and docs (click's source and documentation), and three no calibration text is "
                        "of: c (lz4's C source), english-chat, languages (Russian and Swedish dialogue)")
    p.add_argument("--dequantized", action="store_true",
                   help="evaluate a GGUF model dequantized to float32 with the config as given (the default runs it "
                        "in its GGUF block codes with the HiRE head only, as hire bench and hire generate do)")


def run(args: argparse.Namespace) -> int:
    config = build_config(args)
    if args.tp is not None:
        if args.text or args.domains:
            raise ValueError("--text and --domains are not available with --tp (it evaluates the corpus's evaluation split)")
        return _tp.run(args, config, windows=args.windows or 2)
    result = evaluate_model(args.model, config, windows=args.windows or 8, seq_len=args.seq_len,
                            calib_windows=args.calib_windows, progress=not args.json, quantized=not args.dequantized,
                            texts=args.text, domains=args.domains)
    if args.json:
        print(json.dumps(result, indent=None if args.compact else 2))
    elif "domains" in result:
        unseen = set(result.get("unseen", ()))
        blocks = [f"--- {name}{' (no calibration text is of this domain)' if name in unseen else ''}\n{format_eval(r)}"
                  for name, r in result["domains"].items()]
        worst = "   ".join(f"{key} {fmt(value)}" for key, value in result["worst"].items())
        print("\n\n".join(blocks) + f"\n\nworst over {len(blocks)} domains: {worst}")
    else:
        print(format_eval(result))
    if result.get("auto") and not args.json:
        print(format_auto(result["auto"]))
    return 0


def format_auto(auto: dict) -> str:
    """What hire.calibrate.auto chose for a model without recommended settings."""
    t = auto["targets"]
    def setting(e: dict) -> str:
        blocks = e.get("select_blocks") or 0
        count = e["candidates"] or ("(skipped)" if e.get("skipped") else "-")
        return f"rank {e['rank']}{f' in {blocks} blocks' if blocks else ''}: k' {count}"

    tried = ", ".join(setting(e) for e in auto["tried"])
    if auto["chosen"] is None:
        return f"head chosen on calibration text: none ({auto['reason']}); tried {tried}"
    c = auto["chosen"]
    return (f"head chosen on calibration text for recall@1 >= {t['recall_at_1']} and recall@k >= {t['recall_at_k']}: "
            f"{setting(c)} ({100 * c['bytes_fraction']:.1f} % of the head's bytes; check "
            f"recall {c['recall_at_1']:.4f} / {c['recall_at_k']:.4f}); tried {tried}")


def ffn_description(r: dict) -> str:
    """What the FFNs ran in a ``hire eval`` result: the HiRE settings, or why they ran dense (the
    density in the config is not shown then: it was not used)."""
    ffn = r["config"]["ffn"]
    if ffn["enabled"]:
        return f"HiRE, {ffn['proxy']} proxy, density={ffn['density']} group={ffn['group_size']}"
    if r.get("weights") == "gguf":
        return "dense (GGUF codes; the FFN density setting is not used on codes)"
    return "dense (HiRE FFN off)"


def format_eval(r: dict) -> str:
    c = r["config"]
    mb = 1 / 2**20
    hire_ffn = c["ffn"]["enabled"]
    lines = [
        f"model {r['model']} ({r['architecture']}, {'GGUF codes' if r.get('weights') == 'gguf' else 'float32'}), "
        f"{r['positions']} positions of {r.get('text', 'held-out text')} "
        f"({r['windows']} windows x {r['seq_len']})",
        f"head: {c['head']['proxy'] if c['head']['enabled'] else 'dense'} k={c['head']['k']} "
        f"k'={c['head']['candidates']}   FFN: {ffn_description(r)}",
        "",
        *([f"reference: the model's own {r['reference']} (it was trained with it); 'dense' below means that"]
          if r.get("reference", "dense") != "dense" else []),
        (f"perplexity      dense {r['ppl_dense']:.3f}   HiRE FFN {r['ppl_hire']:.3f}   ({100 * r['ppl_increase']:+.2f}%)"
         if hire_ffn else f"perplexity      {r['ppl_dense']:.3f} (FFNs dense: only the head below differs from dense)"),
        f"greedy agreement, full HiRE vs dense: {fmt(r['greedy_agreement'])}",
        f"LM head         recall@1 {fmt(r['head_recall_at_1'])}   recall@{c['head']['k']} {fmt(r['head_recall_at_k'])}"
        f"   greedy agreement {fmt(r['head_greedy_agreement'])}"
        f"   bytes {fmt(r.get('head_bytes_fraction_16bit'), '.3f')} of the 16-bit head",
        f"FFN             recall (mean over layers) {fmt(r['ffn_recall'])}" if hire_ffn
        else "FFN             dense: every neuron, no selection to measure",
        "",
        f"{'bytes/token':12s} {'dense MiB':>10s} {'HiRE MiB':>10s} {'fraction':>9s}",
    ]
    for part in ("head", "ffn", "attention", "embedding", "other", "total"):
        d, h = r["bytes_dense"][part], r["bytes_hire"][part]
        lines.append(f"{part:12s} {d * mb:10.2f} {h * mb:10.2f} {(h / d if d else 1):9.3f}")
    lines.append(f"ideal decode speedup from bytes: {r['ideal_speedup']:.2f}x   ({r['seconds']:.0f} s)")
    return "\n".join(lines)
