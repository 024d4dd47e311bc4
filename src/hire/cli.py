"""`hire <verb>`: parses arguments and calls library functions."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from hire.config import HiReConfig

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


def _prepare(args, config):
    """Load the model and fit (or fetch from the cache) what the config needs."""
    from hire.calibrate import cached_head_proxy, needs_states
    from hire.data import load_corpus, token_windows
    from hire.models import load_model

    model, tokenizer = load_model(args.model)
    head_proxy = None
    if needs_states(config.head):
        calib = token_windows(tokenizer, load_corpus().text("calibration"), args.seq_len, args.calib_windows)
        head_proxy = cached_head_proxy(model, config.head, calib, progress=not getattr(args, "json", False))
    return model, tokenizer, head_proxy


def cmd_eval(args) -> int:
    from hire.data import load_corpus, token_windows
    from hire.eval import evaluate

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


def cmd_generate(args) -> int:
    import torch
    from transformers import TextStreamer

    from hire.patch import sparsify_

    config = build_config(args)
    if args.dense:
        from hire.models import load_model

        model, tokenizer = load_model(args.model)
    else:
        model, tokenizer, head_proxy = _prepare(args, config)
        sparsify_(model, config, head_proxy=head_proxy)
    inputs = tokenizer(args.prompt, return_tensors="pt")
    streamer = TextStreamer(tokenizer, skip_special_tokens=True)
    sampling = dict(do_sample=args.temperature > 0)
    if args.temperature > 0:
        sampling.update(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, streamer=streamer, **sampling)
    elapsed = time.perf_counter() - start
    new = out.shape[1] - inputs["input_ids"].shape[1]
    print(f"\n[{'dense' if args.dense else 'HiRE'}: {new} tokens in {elapsed:.1f} s, {new / elapsed:.1f} tokens/s "
          "through transformers generate()]", file=sys.stderr)
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hire", description="HiRE: high-recall approximate top-k for faster LLM decoding")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("eval", help="quality and bytes of HiRE vs dense on held-out text",
                       description="Perplexity dense vs HiRE-FFN, greedy agreement, LM-head and FFN recall, and "
                                   "bytes read per decoded token, on the evaluation split of the packaged corpus.")
    _add_model_args(p)
    p.add_argument("--windows", type=int, default=8, help="evaluation windows of --seq-len tokens (default 8)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--compact", action="store_true", help="with --json: on one line")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="stream text from the HiRE-patched model",
                       description="Generate with transformers' generate() from the patched model (or --dense).")
    _add_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--dense", action="store_true", help="the unpatched model, for comparison")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="hire: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"hire: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
