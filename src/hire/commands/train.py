"""`hire train`: train a small decoder from scratch (dense, top-k FFN, group top-k, + HiRE-LR head)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hire.commands._args import add_config_flags, add_json, given, integer
from hire.system import set_threads
from hire.train import TrainConfig, train

HELP = "train a small decoder from scratch: dense, top-k FFN, group top-k, + HiRE-LR head"
DESCRIPTION = ("Train a Llama-layout decoder from scratch on the corpus (a byte-level BPE tokenizer is trained "
               "first) with dense FFNs (--density 1), top-k FFNs (--density 0.1), group top-k (--group-size 16) "
               "and/or a jointly trained low-rank LM-head proxy (--head-rank 32). Checkpoints every --save-every "
               "steps; --resume continues an interrupted run exactly. Writes a Hugging Face model directory with "
               "hire_config.json (how HiRE decodes it), head_proxy.safetensors, train_log.json and loss.png.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--stop-after", type=integer(minimum=1), default=None,
                   help="stop (with a checkpoint) after this many steps")
    p.add_argument("--threads", type=integer(minimum=1), default=None, help="torch threads (default: all cores)")
    add_json(p, "print the summary as JSON")
    add_config_flags(p.add_argument_group("the run (TrainConfig; with --resume, over the saved run's)"),
                     TrainConfig, dest_prefix="t_")


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig from the flags, over the defaults (or over the saved run with --resume);
    validated as it is built."""
    data = TrainConfig().to_dict()
    if args.resume:
        saved = Path(args.out) / "train_config.json"
        if not saved.is_file():
            raise FileNotFoundError(f"cannot resume: {saved} does not exist; start a new run without --resume")
        data = json.loads(saved.read_text())
    return TrainConfig.from_dict({**data, **given(args, TrainConfig, "t_")})


def run(args: argparse.Namespace) -> int:
    cfg = train_config(args)
    set_threads(args.threads)
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
