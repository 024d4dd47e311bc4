"""The server's logprobs under HiRE against the dense head's: the error of the proxy's tail.

A HiRE step knows the exact logits of its candidates only; ``hire serve`` normalises them over the
whole vocabulary with the tail's first-pass proxy scores (hire.engine.logprobs). This teacher-forces
one window of each of the six held-out domains through the engine (the recommended HiRE head, the
model in its GGUF codes, as ``hire serve`` runs it) and, at each step, compares the next token's
logprob and the top 5 with the exact log_softmax of the same hidden state's dense logits.

    .venv/bin/python benchmarks/logprobs.py --model smollm2-135m   # ~1 min
    .venv/bin/python benchmarks/logprobs.py --model gemma3-270m    # ~2 min

Writes ``benchmarks/logprobs_<model>.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from hire.calibrate.prepare import load_for_decode
from hire.data import domain_windows, load_domains
from hire.engine import BatchDecoder, Engine
from hire.engine.logprobs import token_logprobs
from hire.recommended import recommended_config


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="prefilled before the scored steps")
    parser.add_argument("--steps", type=int, default=64, help="scored steps per domain")
    args = parser.parse_args()
    prepared = load_for_decode(args.model, recommended_config(args.model), progress=False)
    engine = Engine(prepared.model, prepared.config, head_proxy=prepared.head_proxy, dtype=torch.float16,
                    max_seq_len=args.prompt_tokens + args.steps + 1)
    decoder = BatchDecoder(engine, 1, dense_above=1.0)
    texts = load_domains(prepared.tokenizer)["held_out"]
    windows = domain_windows(prepared.tokenizer, texts, args.prompt_tokens + args.steps + 1, len(texts))
    per = {}
    for name, window in zip(texts, windows):
        slot = decoder.acquire()
        hidden = decoder.prefill(slot, window[: args.prompt_tokens])
        errors, tails, true_tails, top_errors, outside = [], [], [], [], 0
        for pos in range(args.prompt_tokens, args.prompt_tokens + args.steps):
            target = int(window[pos])
            logits, idx = decoder.logits(hidden, True)
            got = decoder.token_logprobs(hidden, logits, idx, target, 5)
            dense = decoder.dense_logits(hidden).float()
            want = token_logprobs(dense, None, target, 5)
            if idx is not None:
                inside = torch.logsumexp(dense[0, idx[0]], 0)
                true_tails.append(float(1 - torch.exp(inside - torch.logsumexp(dense[0], 0))))
            errors.append(abs(got.logprob - want.logprob))
            top_errors.append(max(abs(a[1] - b[1]) for a, b in zip(got.top, want.top)))
            tails.append(got.tail_share)
            outside += idx is not None and target not in set(idx[0].tolist())
            hidden = decoder.step(window[pos : pos + 1], [pos], [slot], True)
        decoder.release(slot)
        per[name] = {"mean_abs_error": statistics.mean(errors), "max_abs_error": max(errors),
                     "top5_max_abs_error": max(top_errors), "mean_tail_share": statistics.mean(tails),
                     "max_tail_share": max(tails), "mean_true_tail_share": statistics.mean(true_tails or [0.0]),
                     "targets_outside_candidates": outside}
        print(f"{name}: |logprob - dense| mean {per[name]['mean_abs_error']:.2e}, max {per[name]['max_abs_error']:.2e}; "
              f"top 5 max {per[name]['top5_max_abs_error']:.2e}; tail share mean {per[name]['mean_tail_share']:.2e}, "
              f"max {per[name]['max_tail_share']:.2e} (exact: mean {per[name]['mean_true_tail_share']:.2e}); targets outside the candidates {outside} of {args.steps}",
              flush=True)
    out = Path(__file__).parent / f"logprobs_{args.model}.json"
    out.write_text(json.dumps({"model": args.model, "config": prepared.config.to_dict(), "steps": args.steps,
                               "prompt_tokens": args.prompt_tokens, "domains": per}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
