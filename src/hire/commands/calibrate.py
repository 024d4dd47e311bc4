"""`hire calibrate`: fit and train the low-rank LM-head proxy; write it and its config."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hire.calibrate.pipeline import CONFIG_NAME, PROXY_NAME, calibrate_head
from hire.commands._args import add_force, add_json, add_model_args, build_config, integer

HELP = "fit and train the low-rank LM-head proxy; write it and its config"
DESCRIPTION = ("Fit the activation-aware low-rank head proxy on calibration text, train it for recall (KL to the "
               "model's next-token distribution, temperature 3), report held-out recall of the fitted and the "
               f"trained proxy under the config's selector, and write OUT/{PROXY_NAME} and OUT/{CONFIG_NAME} "
               "(use it with --config). OUT may be the model's own directory: its config.json is never touched. "
               "Existing outputs are kept unless --force.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--steps", type=integer(minimum=1), default=300, help="training steps (default 300)")
    p.add_argument("--eval-windows", type=integer(minimum=1), default=4,
                   help="held-out windows for the recall report (default 4)")
    p.add_argument("--text", metavar="PATH",
                   help="calibration text: a text file, a directory of them, or JSONL with a 'text' field (default: "
                        "the packaged calibration domains in equal shares: prose, python, code in 400+ languages "
                        "but not C, docs, chat in 25 languages)")
    p.add_argument("--eval-text", metavar="PATH",
                   help="held-out text for the recall report (same forms; default: each packaged held-out domain: "
                        "prose, python, docs, and c, english-chat, languages, which no calibration text shares)")
    p.add_argument("--out", help=f"output directory for {CONFIG_NAME} and {PROXY_NAME} (default hire-MODEL)")
    p.add_argument("--plot", help="write a PNG of the training loss")
    add_force(p)
    add_json(p)


def run(args: argparse.Namespace) -> int:
    config = build_config(args)
    out = args.out or f"hire-{Path(args.model).name}"
    r = calibrate_head(args.model, config, out, steps=args.steps, seq_len=args.seq_len,
                       calib_windows=args.calib_windows, eval_windows=args.eval_windows, plot=args.plot,
                       force=args.force, progress=not args.json, text=args.text, eval_text=args.eval_text)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"{args.model}: head proxy rank {r['rank']}, {r['steps']} steps on {r['calibration_states']} calibration "
          f"states; loss {r['loss_first']:.4f} -> {r['loss_last']:.4f}")
    if "auto" in r:
        print(f"chosen on calibration text: rank {r['rank']}, k' {r['candidates']}")
    first = r["stage_candidates"] or r["candidates"]
    print(f"held-out ({r['held_out_states']} positions), k'={first}:  recall@1 / recall@{r['k']}, fitted -> trained")
    for name, h in [*r["held_out"].items(), ("worst", r)]:
        print(f"  {name:16s} {h['fitted_recall_at_1']:.4f} / {h['fitted_recall_at_k']:.4f} -> "
              f"{h['trained_recall_at_1']:.4f} / {h['trained_recall_at_k']:.4f}")
    print(f"head bytes {100 * r['head_bytes_fraction']:.1f} % of the 16-bit head")
    print(f"wrote {r['config']} and {r['proxy_file']}; use: hire eval --model {args.model} --config {r['config']}")
    return 0
