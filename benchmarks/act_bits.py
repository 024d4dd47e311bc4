"""int16 against int8 activations in the engine's products on GGUF codes: quality and decode speed.

Every one-token product quantizes its activation per 32 columns, to int16 (the default: the float32
model's logits to ~1e-5) or int8 (llama.cpp's choice: one VNNI product per code byte where int16
takes two). This measures what int8 costs and what it buys, on one model:

- quality: one window of each of the six held-out domains (``hire.data.load_domains``), teacher-forced
  through the dense engine's native decode step, against the float32 model on the same dequantized
  weights (the multi-token path): perplexity per domain, mean KL(float32 || engine) per token, and
  the share of positions whose argmax matches;
- speed: dense decode of ``--tokens`` tokens after a short prompt, int16 and int8 in turn
  (A B A B, ``--rounds`` each), in one process; medians and the ratio of medians.

    .venv/bin/python benchmarks/act_bits.py --model smollm2-135m    # ~2 min
    .venv/bin/python benchmarks/act_bits.py --model path/to/model.gguf --seq-len 256

Writes ``benchmarks/act_bits_<model>.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from hire.data import domain_windows, load_domains
from hire.engine import Engine
from hire.models.load import gguf_source
from hire.quant import load_quantized, quantized_matrices
from hire.calibrate.auto import cpu_name
from hire.system import cpu_flags

WIDTHS = (16, 8)


def set_width(model, bits: int) -> None:
    for q in quantized_matrices(model).values():
        q.act_bits = bits


@torch.inference_mode()
def reference(model, windows: torch.Tensor) -> list[torch.Tensor]:
    """The float32 model's log-probabilities at every position of each window (dequantized rows)."""
    return [torch.log_softmax(model(w[None]).logits[0, :-1].float(), -1) for w in windows]


@torch.inference_mode()
def engine_log_probs(engine: Engine, window: torch.Tensor) -> torch.Tensor:
    """The dense engine's log-probabilities after each of the window's tokens but the last, one
    decode step per token (the native step).  # (T,) -> (T - 1, V)"""
    out = []
    for pos in range(window.numel() - 1):
        hidden = engine.forward(window[pos : pos + 1], pos, hire=False)
        out.append(torch.log_softmax(engine.logits(hidden, hire=False)[0][0].float(), -1))
    return torch.stack(out)


def quality(model, engine: Engine, windows: torch.Tensor, ref: list[torch.Tensor], names: list[str]) -> dict:
    per = {}
    for name, window, r in zip(names, windows, ref):
        e = engine_log_probs(engine, window)
        target = window[1:, None]
        ppl_ref = math.exp(-float(r.gather(1, target).mean()))
        ppl = math.exp(-float(e.gather(1, target).mean()))
        kl = float((r.exp() * (r - e)).sum(-1).mean())
        agree = float((r.argmax(-1) == e.argmax(-1)).float().mean())
        per[name] = {"ppl_float32": ppl_ref, "ppl": ppl, "ppl_change_pct": 100 * (ppl / ppl_ref - 1),
                     "kl": kl, "argmax_agreement": agree}
    return per


def decode_rate(engine: Engine, prompt: torch.Tensor, tokens: int) -> float:
    return engine.generate(prompt, tokens, hire=False).tokens_per_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="a built-in name or a .gguf file")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per quality window (one per domain)")
    parser.add_argument("--tokens", type=int, default=64, help="decoded tokens per speed round")
    parser.add_argument("--rounds", type=int, default=4, help="speed rounds per width (A B A B)")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    source = gguf_source(args.model)
    if source is None:
        raise SystemExit(f"{args.model}: a built-in name or a .gguf file is needed (the codes are a GGUF's)")
    model, tokenizer, _ = load_quantized(source)
    result: dict = {"model": args.model, "cpu": cpu_name(), "vnni": "avx512_vnni" in cpu_flags(), "threads": torch.get_num_threads(),
                    "command": "benchmarks/act_bits.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in
                                                                     vars(args).items() if v not in (None, False))}
    engines = {}
    for bits in WIDTHS:  # the native step takes each matrix's width when it is built
        set_width(model, bits)
        engines[bits] = Engine(model, None, dtype=torch.float32, max_seq_len=max(args.seq_len, args.tokens + 16) + 1)
        if engines[bits].native_steps is None:
            raise SystemExit(f"no native step here: {engines[bits].native_reason}")
    if not args.skip_quality:
        texts = load_domains(tokenizer)["held_out"]
        windows = domain_windows(tokenizer, texts, args.seq_len, len(texts))
        ref = reference(model, windows)
        result["quality"] = {}
        for bits in WIDTHS:
            set_width(model, bits)  # the dense head reads the width at each call
            t = time.perf_counter()
            result["quality"][f"int{bits}"] = per = quality(model, engines[bits], windows, ref, list(texts))
            worst = max(per.values(), key=lambda d: abs(d["ppl_change_pct"]))
            print(f"int{bits}: perplexity change " + ", ".join(f"{n} {d['ppl_change_pct']:+.3f} %" for n, d in per.items())
                  + f"; mean KL {statistics.mean(d['kl'] for d in per.values()):.2e}; argmax agreement "
                  + f"{statistics.mean(d['argmax_agreement'] for d in per.values()):.4f}; worst "
                  + f"{abs(worst['ppl_change_pct']):.3f} % ({time.perf_counter() - t:.0f} s)", flush=True)
    prompt = torch.tensor(tokenizer("The history of the printing press")["input_ids"])
    rates: dict[int, list[float]] = {bits: [] for bits in WIDTHS}
    for bits in WIDTHS:  # warm-up
        set_width(model, bits)
        decode_rate(engines[bits], prompt, 8)
    for _ in range(args.rounds):
        for bits in WIDTHS:
            set_width(model, bits)
            rates[bits].append(decode_rate(engines[bits], prompt, args.tokens))
    med = {bits: statistics.median(r) for bits, r in rates.items()}
    result["speed"] = {"tokens": args.tokens, "rounds": {f"int{b}": r for b, r in rates.items()},
                       "median_tokens_per_s": {f"int{b}": m for b, m in med.items()}, "int8_over_int16": med[8] / med[16]}
    print(f"dense decode, tokens/s (median of {args.rounds}): int16 {med[16]:.1f}, int8 {med[8]:.1f} "
          f"({med[8] / med[16]:.2f}x)")
    stem = Path(source).stem if args.model.endswith(".gguf") else args.model
    out = Path(args.out or Path(__file__).parent / f"act_bits_{stem}.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
