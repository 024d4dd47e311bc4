"""`hire tune`: per-layer FFN densities that read the fewest bytes within a perplexity budget."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hire.commands._args import add_force, add_json, add_model_args, build_config, fractions, integer, number
from hire.tune import DENSITIES, tune_model

HELP = "per-layer FFN densities that read the fewest bytes within a perplexity budget"
DESCRIPTION = ("Measure each FFN layer's sensitivity (output KL with only that layer sparse, at each candidate "
               "density) on calibration text, allocate densities by a knapsack over bytes and KL, bisect its price "
               "on the real calibration perplexity, compare with the best uniform density, and write the cheaper as "
               "a config (per-layer densities in ffn.layer_density). The head settings are kept as given.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--max-ppl-increase", type=number(above=0), default=0.03,
                   help="allowed perplexity increase, > 0 (default 0.03 = +3 %%)")
    p.add_argument("--windows", type=integer(minimum=1), default=4, help="calibration windows of --seq-len tokens (default 4)")
    p.add_argument("--sensitivity-windows", type=integer(minimum=1), default=1,
                   help="of those, windows for the per-layer sensitivities (default 1)")
    p.add_argument("--densities", type=fractions(), default=DENSITIES,
                   help="candidate densities, comma-separated, in (0, 1] (default 0.2,0.3,...,1.0)")
    p.add_argument("--steps", type=integer(minimum=0), default=10,
                   help="bisection steps on the price, one perplexity pass each (default 10)")
    p.add_argument("--text", metavar="PATH",
                   help="calibration text: a text file, a directory of them, or JSONL with a 'text' field "
                        "(default: the packaged calibration domains, as hire calibrate)")
    p.add_argument("--out", help="config file to write (default hire-MODEL-tuned.json)")
    add_force(p)
    add_json(p)


def run(args: argparse.Namespace) -> int:
    config = build_config(args)
    out = args.out or f"hire-{Path(args.model).name}-tuned.json"
    r = tune_model(args.model, config, out, args.max_ppl_increase, windows=args.windows, seq_len=args.seq_len,
                   sensitivity_windows=args.sensitivity_windows, densities=args.densities, steps=args.steps,
                   force=args.force, progress=not args.json, text=args.text)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"{args.model}: FFN densities within +{100 * args.max_ppl_increase:.2f} % perplexity on "
          f"{r['windows']} calibration windows (dense {r['ppl_dense']:.3f})")
    dense_bytes = r["ffn_bytes_dense"]
    for name, t in (("per-layer", r["tuned"]), ("uniform", r["uniform"])):
        if t is None:
            print(f"  {name:9s}: nothing within the budget")
        else:
            print(f"  {name:9s}: mean density {t['mean_density']:.3f}, FFN bytes "
                  f"{100 * t['ffn_bytes'] / dense_bytes:.1f} % of dense, perplexity {100 * t['ppl_increase']:+.2f} %")
    if r["tuned"] is not None:
        print("  per-layer densities: " + " ".join(f"{d:g}" for d in r["tuned"]["layer_density"]))
    print(f"wrote {r['config']} ({r['winner']}: fewer bytes); check it on held-out text: "
          f"hire eval --model {args.model} --config {r['config']}")
    return 0
