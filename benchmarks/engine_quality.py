"""The engine's native decode step against its eager step, on held-out text: teacher-forced
perplexity (exact log-probabilities over the whole vocabulary) and greedy agreement, dense and HiRE,
with the recommended config in float16.

The native step keeps activations in float32 and quantizes them to int8 for the 4-bit FFN proxy and
the head's first pass (hire.native.int4_estimates, lowrank_block_topk); the eager step rounds them to
float16 and runs torch's int4/int8 kernels on bfloat16 activations. This measures what that changes.

    .venv/bin/python benchmarks/engine_quality.py --model smollm2-135m   # ~1 min
    .venv/bin/python benchmarks/engine_quality.py --model gemma3-270m    # ~2 min
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from hire.calibrate.prepare import prepare_model
from hire.data import load_corpus, token_windows
from hire.engine import Engine
from hire.recommended import recommended_config


def run(engine: Engine, windows: torch.Tensor, hire: bool) -> tuple[list[int], float]:
    """Greedy predictions at every position after the first, and the perplexity of the windows."""
    preds, nll, count = [], 0.0, 0
    for window in windows:
        predicted, log_prob = engine.teacher_forced(window, hire=hire, start=1, log_probs=True)
        preds += predicted[:-1]
        nll -= log_prob
        count += window.numel() - 1
    return preds, math.exp(nll / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    config = recommended_config(args.model)
    model, tokenizer, head_proxy = prepare_model(args.model, config, seq_len=512, calib_windows=16, progress=False)[:3]
    windows = token_windows(tokenizer, load_corpus().text("evaluation"), args.seq_len, args.windows)
    engine = Engine(model, config, head_proxy=head_proxy, max_seq_len=args.seq_len + 1)
    if engine.native_steps is None:
        raise SystemExit(f"no native step here: {engine.native_reason}")
    results = {}
    steps = engine.native_steps
    for step in ("native", "eager"):
        engine.native_steps = steps if step == "native" else None
        for mode in ("dense", "hire"):
            results[f"{step}_{mode}"] = run(engine, windows, hire=mode == "hire")

    def agreement(a: str, b: str) -> float:
        pa, pb = results[a][0], results[b][0]
        return sum(x == y for x, y in zip(pa, pb)) / len(pa)

    report = {
        "model": args.model,
        "positions": len(results["native_dense"][0]),
        "perplexity": {name: ppl for name, (_, ppl) in results.items()},
        "agreement_native_vs_eager_dense": agreement("native_dense", "eager_dense"),
        "agreement_native_vs_eager_hire": agreement("native_hire", "eager_hire"),
        "agreement_hire_vs_dense_native": agreement("native_hire", "native_dense"),
        "agreement_hire_vs_dense_eager": agreement("eager_hire", "eager_dense"),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
