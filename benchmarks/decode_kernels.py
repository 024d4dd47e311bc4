"""Microbenchmarks behind docs/speed.md's notes, each an A B A B comparison in one process
(medians of --repeats): where the HiRE FFN's time goes, and what the head's fused first pass and the
float32 dense head save.

* FFN rows (SmolLM2's shapes, 30 layers of 1,536 neurons x 576, float16, cold from DRAM):
  every neuron; the first 60 % (contiguous); a random 60 %; every other neuron; random pairs.
* The fused 4-bit proxy (``int4_estimates``) per layer, and the selection's share of a HiRE FFN step.
* The head's first pass on Gemma's shape (262,144 x rank 64, int8): ``lowrank_block_topk`` against
  torch's int8 GEMV followed by ``hire.topk.local_topk``.
* argmax over 262,144 logits in float16 and in float32.

    .venv/bin/python benchmarks/decode_kernels.py          # ~1 min
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from hire import native
from hire.proxies.quantized_matrix import QuantizedMatrix
from hire.topk import local_topk

NEURONS, WIDTH, LAYERS = 1536, 576, 30  # SmolLM2-135M
VOCAB, RANK = 262_144, 64  # Gemma-3-270M's head, rank-64 proxy


def per_call(fn, calls: int) -> float:
    """Seconds per call of fn (after two warm-up calls)."""
    fn(), fn()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if not native.available():
        raise SystemExit(f"native kernels unavailable: {native.unavailable_reason()}")
    g = torch.Generator().manual_seed(0)
    layers = [torch.randn(NEURONS, 3 * WIDTH, generator=g).half() for _ in range(LAYERS)]  # 159 MB: beyond L3
    proxies = [QuantizedMatrix.from_weight(torch.randn(2 * NEURONS, WIDTH, generator=g), 4, 64) for _ in range(LAYERS)]
    x = torch.randn(1, WIDTH, generator=g)
    keep = round(0.6 * NEURONS)
    pairs = torch.randperm(NEURONS // 2, generator=g)[: keep // 2].sort().values
    patterns = {
        "every neuron": None,
        "first 60 % (contiguous)": torch.arange(keep),
        "random 60 %": torch.randperm(NEURONS, generator=g)[:keep].sort().values,
        "every other neuron (50 %)": torch.arange(0, NEURONS, 2),
        "random pairs (60 %)": torch.stack([2 * pairs, 2 * pairs + 1], 1).flatten(),
    }
    block = 3 * WIDTH * 2
    codes = torch.randint(-127, 128, (VOCAB, RANK), generator=g, dtype=torch.int8)
    scales = torch.rand(VOCAB, generator=g) / 100
    packed, bf16_scales, z = native.pack_lowrank(codes), scales.to(torch.bfloat16), torch.randn(1, RANK, generator=g)
    logits = torch.randn(1, VOCAB, generator=g)
    half_logits = logits.half()
    runs: dict[str, list[float]] = {}
    for _ in range(args.repeats):  # A B A B: every measurement once per round
        for name, idx in patterns.items():
            seconds = per_call(lambda: [native.ffn_rows(x, rows, idx, "silu", 2) for rows in layers], 10) / LAYERS
            count = NEURONS if idx is None else idx.numel()
            runs.setdefault(f"ffn rows GB/s: {name}", []).append(count * block / seconds / 1e9)
        runs.setdefault("int4 proxy estimates, us per layer", []).append(1e6 * per_call(
            lambda: [native.int4_estimates(x, m.packed, m.scales, 64, 2, "silu") for m in proxies], 10) / LAYERS)
        scores = torch.randn(1, 2 * NEURONS, generator=g)
        tiny = torch.randn(NEURONS, 3)  # rows of width 1: the call is the estimates and the selection
        runs.setdefault("estimates + selection of 60 % (ffn_decode on 1-wide rows), us", []).append(1e6 * per_call(
            lambda: native.ffn_decode(scores, torch.randn(1, 1), tiny, keep, "silu", True), 200))
        runs.setdefault("head first pass, lowrank_block_topk, ms", []).append(1e3 * per_call(
            lambda: native.lowrank_block_topk(z, packed, scales, 512, 8), 20))
        runs.setdefault("head first pass, int8 GEMV + local_topk, ms", []).append(1e3 * per_call(
            lambda: local_topk(torch._weight_int8pack_mm(z.to(torch.bfloat16), codes, bf16_scales).half(), 4096, 512), 20))
        runs.setdefault("argmax of 262,144 float16 logits, ms", []).append(1e3 * per_call(
            lambda: half_logits.argmax(-1), 50))
        runs.setdefault("argmax of 262,144 float32 logits, ms", []).append(1e3 * per_call(lambda: logits.argmax(-1), 50))
    report = {name: {"median": statistics.median(v), "runs": v} for name, v in runs.items()}
    for name, r in report.items():
        print(f"{name:70s} {r['median']:8.2f}")
    print(json.dumps({"threads": torch.get_num_threads(), "simd": native.simd_path(), **report}))


if __name__ == "__main__":
    main()
