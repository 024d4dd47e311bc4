"""`hire generate`: stream text from the HiRE engine."""

from __future__ import annotations

import argparse
import sys

from hire.arch import ARCHITECTURES, engine_architectures
from hire.commands._args import DTYPES, add_act_bits, add_model_args, build_config, integer, number
from hire.generate import generate_text

HELP = "stream text from the HiRE engine"
# from the one architecture table, so the help cannot fall behind what the engine runs
DESCRIPTION = (f"Generate with the HiRE decode engine (model types {', '.join(engine_architectures())}); the other "
               f"architectures HiRE knows ({', '.join(sorted(set(ARCHITECTURES) - set(engine_architectures())))}) go "
               "through the patched model's generate().")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--dense", action="store_true", help="the dense weights of the same engine, for comparison")
    p.add_argument("--calibrate", action="store_true",
                   help="fit the HiRE head first where this model's head settings or proxy are not cached yet "
                        "(minutes on a first run); without it such a run decodes with the dense head at once and "
                        "says so (hire bench or hire eval with the same flags also fit and cache the head)")
    p.add_argument("--max-new-tokens", type=integer(minimum=1), default=64, help="(default 64)")
    p.add_argument("--temperature", type=number(minimum=0), default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=integer(minimum=1), default=None, help="sample from the K most likely tokens")
    p.add_argument("--top-p", type=number(maximum=1, above=0), default=None,
                   help="sample from the smallest set of tokens whose probability reaches P, in (0, 1]")
    p.add_argument("--seed", type=integer(), default=0, help="sampling seed (default 0)")
    p.add_argument("--dtype", default="float16", choices=DTYPES,
                   help="weights in the engine (default float16; the residual stream stays float32)")
    p.add_argument("--dequantized", action="store_true",
                   help="run a GGUF model dequantized to --dtype (the default runs it in its GGUF block codes, "
                        "with the HiRE head only)")
    add_act_bits(p)


def run(args: argparse.Namespace) -> int:
    config = build_config(args)  # checked with --dense too: the flags are the same command line
    started = False

    def show(text: str) -> None:  # the prompt once the model runs, then each new piece
        nonlocal started
        if not started:
            print(args.prompt, end="", flush=True)
            started = True
        print(text, end="", flush=True)

    r = generate_text(args.model, None if args.dense else config, args.prompt, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                      dtype=args.dtype, seq_len=args.seq_len, calib_windows=args.calib_windows,
                      on_text=show, quantized=not args.dequantized, fit=args.calibrate,
                      act_bits=args.act_bits)
    show("")
    kind = "dense" if args.dense or r.get("head_pending") else "HiRE"
    if r["backend"] == "engine":
        print(f"\n[{kind} engine, {r['weights']}: {r['new_tokens']} tokens, {r['tokens_per_s']:.1f} tokens/s decode, "
              f"prefill {1000 * r['prefill_s']:.0f} ms]", file=sys.stderr)
    else:
        print(f"\n[{kind}: {r['new_tokens']} tokens in {r['seconds']:.1f} s, {r['tokens_per_s']:.1f} tokens/s through "
              "transformers generate(); the engine does not run this architecture]", file=sys.stderr)
    if r.get("head_pending"):
        print(f"[dense head: {r['head_pending']}. This command with --calibrate (or hire bench / hire eval with "
              "the same model and head flags) fits and caches it once, in minutes; later runs decode with HiRE]",
              file=sys.stderr)
    return 0
