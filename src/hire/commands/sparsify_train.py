"""`hire sparsify-train`: fine-tune a pretrained model's FFNs to top-k, layer by layer."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hire.commands._args import add_config_flags, add_force, add_json, fractions, given, integer, number
from hire.system import set_threads
from hire.train.sparse_ft import SparseFTConfig, sparsify_train

HELP = "fine-tune a pretrained model's FFNs to top-k, layer by layer"
DESCRIPTION = ("Make every FFN of a pretrained gated model (Llama, Gemma, Qwen layouts) a top-k FFN and train it, one "
               "layer at a time in order, to reproduce the dense FFN's output on calibration text (inputs from the "
               "already sparse layers before it). Reports held-out perplexity dense / top-k training-free / top-k "
               "fine-tuned and writes a Hugging Face directory (config.hire_topk; hire.load_model re-applies it) "
               "with hire_config.json for HiRE decoding and this report as sparse_ft.json. An existing --out is "
               "replaced only with --force, and only when sparsify-train wrote it.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="built-in name, Hugging Face directory or .gguf file")
    add_config_flags(p.add_argument_group("fine-tuning (SparseFTConfig)"), SparseFTConfig, dest_prefix="ft_")
    p.add_argument("--windows", type=integer(minimum=1), default=64, help="calibration windows (default 64)")
    p.add_argument("--seq-len", type=integer(minimum=2), default=256, help="tokens per calibration window (default 256)")
    p.add_argument("--eval-windows", type=integer(minimum=1), default=8, help="held-out windows for perplexity (default 8)")
    p.add_argument("--eval-seq-len", type=integer(minimum=2), default=512,
                   help="tokens per held-out window (default 512, as hire eval)")
    p.add_argument("--oversample", type=number(minimum=1), default=2.0,
                   help="FFN candidates / kept neurons in the written HiRE config (default 2)")
    p.add_argument("--allocate", action="store_true",
                   help="per-layer densities averaging --density, allocated by each layer's output-KL sensitivity "
                        "to exact top-k (a knapsack, as hire tune), instead of one density everywhere")
    p.add_argument("--allocate-densities", type=fractions(), default=(0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6),
                   help="candidate densities for --allocate (default 0.05,0.1,0.15,0.2,0.3,0.4,0.5,0.6)")
    p.add_argument("--sensitivity-windows", type=integer(minimum=1), default=2,
                   help="calibration windows for the --allocate sensitivities, at most --windows (default 2)")
    p.add_argument("--threads", type=integer(minimum=1), default=None, help="torch threads (default: all cores)")
    p.add_argument("--out", help="output directory (default hire-MODEL-topkDENSITY)")
    p.add_argument("--plot", help="write a PNG of the per-layer errors")
    add_force(p)
    add_json(p)


def run(args: argparse.Namespace) -> int:
    cfg = SparseFTConfig(**given(args, SparseFTConfig, "ft_"))
    if args.allocate and args.sensitivity_windows > args.windows:
        raise ValueError(f"--sensitivity-windows ({args.sensitivity_windows}) must be <= --windows ({args.windows})")
    out = args.out or f"hire-{Path(args.model).name}-topk{cfg.density:g}"
    set_threads(args.threads)
    r = sparsify_train(args.model, cfg, out, windows=args.windows, seq_len=args.seq_len, eval_windows=args.eval_windows,
                       eval_seq_len=args.eval_seq_len, oversample=args.oversample,
                       allocate_densities=args.allocate_densities if args.allocate else None,
                       sensitivity_windows=args.sensitivity_windows, plot=args.plot, force=args.force,
                       progress=not args.json)
    if args.json:
        print(json.dumps({k: v for k, v in r.items() if k != "layers"}, indent=2))
        return 0
    c = r["config"]
    if c["layer_density"]:
        print("per-layer densities (allocated by output-KL sensitivity): " + " ".join(f"{d:g}" for d in c["layer_density"]))
    print(f"{args.model}: FFN density {r['mean_density']:.3g} (groups of {c['group_size']}), {c['steps']} steps per "
          f"layer on {r['calibration_tokens']} calibration tokens, {r['seconds'] / 60:.1f} min")
    print(f"held-out perplexity ({r['held_out_tokens']} tokens): dense {r['ppl_dense']:.3f}   top-k training-free "
          f"{r['ppl_topk_training_free']:.3f} ({100 * r['ppl_increase_training_free']:+.1f}%)   "
          f"top-k fine-tuned {r['ppl_topk_finetuned']:.3f} ({100 * r['ppl_increase']:+.1f}%)")
    print(f"wrote {r['out']}; try:\n  hire eval --model {r['out']} --config {r['hire_config']}\n"
          f"  hire bench --model {r['out']} --config {r['hire_config']}")
    return 0
