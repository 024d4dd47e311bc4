"""Decode tokens/s at several context depths, dense and HiRE, in one engine on a model's GGUF codes:
after each depth's prompt (random token ids, a warm-up of 2 tokens first), ``--tokens`` decoded tokens.
Prints one JSON line, {"<depth>d": dense, "<depth>h": HiRE, "<depth>p": the dense run's prefill of that
prompt in tokens/s}; a .gguf path runs dense only (no head is fitted for it). To compare two checkouts,
run it from each in turns (A B A B):

    PYTHONPATH=<checkout>/src .venv/bin/python benchmarks/decode_depth.py --model smollm2-135m

``hire bench --context N --llama-cpp`` measures one depth against llama-bench's ``-d N``.
"""

from __future__ import annotations

import argparse
import json

import torch

from hire.calibrate.prepare import load_for_decode
from hire.config import HeadConfig, HiReConfig
from hire.engine.engine import Engine
from hire.recommended import recommended_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="a packaged model (its recommended config) or a .gguf path")
    p.add_argument("--depths", default="16,512,2048,4096", help="comma-separated context lengths")
    p.add_argument("--tokens", type=int, default=65, help="tokens decoded after each depth's prompt")
    args = p.parse_args()
    depths = [int(d) for d in args.depths.split(",")]
    path = args.model.endswith(".gguf")
    config = HiReConfig(head=HeadConfig(enabled=False)) if path else recommended_config(args.model)
    prepared = load_for_decode(args.model, config, progress=False)
    engine = Engine(prepared.model, prepared.config, head_proxy=prepared.head_proxy, dtype=torch.float16,
                    max_seq_len=max(depths) + args.tokens + 8)
    torch.manual_seed(0)
    out = {}
    for depth in depths:
        prompt = torch.randint(100, 20000, (max(depth, 2),))
        for hire in (False,) if path else (False, True):
            engine.generate(prompt, 2, hire=hire)
            stats = engine.generate(prompt, args.tokens, hire=hire)
            out[f"{depth}{'h' if hire else 'd'}"] = round(stats.tokens_per_s, 1)
            if not hire:
                out[f"{depth}p"] = round(stats.prompt_tokens / stats.prefill_s, 1)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
