"""The pieces of a batched decode step, in process, on a packaged model's GGUF codes (the serving
path; ``--dequantized``: 16-bit weights): what `hire serve`'s figures are made of.

* ``step``: ``BatchDecoder.step`` (the whole model but the head) and the head (``logits``) at
  batch 1, 2, 4, 8, dense and HiRE in turns;
* ``select``: the head's first pass (``lowrank_block_topk``) at several blocks x rows per block;
* ``prefill``: ``Engine.prefill`` (batched native steps) against the eager prefill, per prompt length;
* ``thread``: one decode step run from the main thread and from a second thread (OpenMP).

    .venv/bin/python benchmarks/batch_step.py --model smollm2-135m
    .venv/bin/python benchmarks/batch_step.py --model gemma3-270m --parts select prefill

Writes benchmarks/batch_step_<model>.json. Times are medians of ``--repeats`` runs, the compared
variants taken in turns (A B A B) within one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import torch

from hire import native
from hire.calibrate.prepare import prepare_model
from hire.engine import BatchDecoder, Engine, UnionStats
from hire.recommended import quantized_config, recommended_config

PROMPTS = ["The history of the printing press begins", "def merge_sort(items):", "Q: Why is the sky blue?\nA:",
           "Dear Sir or Madam,\nI am writing to", "#include <stdio.h>\n\nint main(void) {",
           "The three most important ideas in economics are", "Once upon a time, in a village by the sea,",
           "Instructions: mix the flour and the water, then"]


def turns(fns: dict, repeats: int) -> dict[str, float]:
    """Median ms of each callable, called in turns after one warm-up call each."""
    for f in fns.values():
        f()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, f in fns.items():
            t = time.perf_counter()
            f()
            times[name].append(1000 * (time.perf_counter() - t))
    return {name: statistics.median(v) for name, v in times.items()}


def step_part(engine: Engine, tokenizer, repeats: int) -> dict:
    decoder = BatchDecoder(engine, 8, dense_above=1.0)
    slots = [decoder.acquire() for _ in PROMPTS]
    positions = []
    for slot, prompt in zip(slots, PROMPTS):
        ids = torch.tensor(tokenizer(prompt).input_ids)
        decoder.prefill(slot, ids)
        positions.append(ids.numel())
    out = {}
    for batch in (1, 2, 4, 8):
        tokens = torch.arange(5, 5 + batch)
        hidden = {h: decoder.step(tokens, positions[:batch], slots[:batch], h) for h in (False, True)}
        decoder.stats = UnionStats()
        ms = turns({"dense_step": lambda: decoder.step(tokens, positions[:batch], slots[:batch], False),
                    "hire_step": lambda: decoder.step(tokens, positions[:batch], slots[:batch], True),
                    "dense_head": lambda: decoder.logits(hidden[False], False),
                    "hire_head": lambda: decoder.logits(hidden[True], True)}, repeats)
        ms["tokens_per_s_dense"] = 1000 * batch / (ms["dense_step"] + ms["dense_head"])
        ms["tokens_per_s_hire"] = 1000 * batch / (ms["hire_step"] + ms["hire_head"])
        ms["head_union"] = decoder.stats.head_union / max(decoder.stats.steps, 1)
        out[str(batch)] = ms
        print(f"batch {batch}: step dense {ms['dense_step']:.2f} / HiRE {ms['hire_step']:.2f} ms, head dense "
              f"{ms['dense_head']:.2f} / HiRE {ms['hire_head']:.2f} ms (union {ms['head_union']:.0f} rows); "
              f"{ms['tokens_per_s_dense']:.0f} / {ms['tokens_per_s_hire']:.0f} tok/s")
    return out


def select_part(engine: Engine, repeats: int) -> dict:
    first = engine.head.selector.proxies[0]
    if getattr(first, "packed", None) is None:
        print("the head's first pass has no fused kernel here")
        return {}
    z = torch.nn.functional.linear(torch.randn(1, engine.hidden).to(first._v.dtype), first._v)
    vocab = first.packed.shape[0] * 16
    out = {}
    for blocks, per in ((512, 32), (512, 8), (128, 32), (512, 1)):
        if vocab % blocks or per > vocab // blocks:
            continue
        ms = turns({"ms": lambda: native.lowrank_block_topk(z, first.packed, first._u.row_scales, blocks, per,
                                                             first.bias)}, repeats)["ms"]
        out[f"{blocks}x{per}"] = ms
        print(f"lowrank_block_topk, {blocks} blocks x {per} rows (k' {blocks * per}): {ms:.3f} ms")
    return out


def prefill_part(engine: Engine, repeats: int) -> dict:
    out = {}
    g = torch.Generator().manual_seed(0)
    for length in (8, 32, 128, 512):
        if length >= engine.max_seq_len:
            continue
        ids = torch.randint(0, 1000, (length,), generator=g)
        ms = turns({"stepped": lambda: engine.prefill(ids),
                    "eager": lambda: engine.eager_forward(engine.embed(ids).float(), 0, hire=False)}, repeats)
        out[str(length)] = ms
        print(f"prefill {length} tokens: batched steps {ms['stepped']:.1f} ms, eager {ms['eager']:.1f} ms "
              f"({ms['eager'] / ms['stepped']:.1f}x)")
    return out


def thread_part(engine: Engine, tokenizer, repeats: int) -> dict:
    decoder = BatchDecoder(engine, 1)
    slot = decoder.acquire()
    ids = torch.tensor(tokenizer(PROMPTS[0]).input_ids)
    decoder.prefill(slot, ids)

    def steps():
        for _ in range(20):
            decoder.step(torch.tensor([5]), [ids.numel()], [slot], True)

    def on_thread():
        t = threading.Thread(target=steps)
        t.start()
        t.join()

    ms = turns({"main": steps, "thread": on_thread}, repeats)
    out = {"main_ms_per_step": ms["main"] / 20, "thread_ms_per_step": ms["thread"] / 20}
    print(f"decode step from the main thread {out['main_ms_per_step']:.2f} ms, from a second thread "
          f"{out['thread_ms_per_step']:.2f} ms ({out['thread_ms_per_step'] / out['main_ms_per_step']:.1f}x)")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--parts", nargs="+", default=["step", "select", "prefill", "thread"],
                   choices=["step", "select", "prefill", "thread"])
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--dequantized", action="store_true", help="16-bit weights and the full HiRE config (FFNs too)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = p.parse_args()
    config = recommended_config(args.model)
    prepared = prepare_model(args.model, config if args.dequantized else quantized_config(config),
                             quantized=not args.dequantized, progress=False)
    engine = Engine(prepared.model, prepared.config, head_proxy=prepared.head_proxy, max_seq_len=1024)
    report = {"model": args.model, "weights": "16-bit" if args.dequantized else "GGUF codes", "threads": torch.get_num_threads(), "simd": native.simd_path()}
    for part in args.parts:
        print(f"--- {part}")
        if part == "step":
            report[part] = step_part(engine, prepared.tokenizer, args.repeats)
        elif part == "select":
            report[part] = select_part(engine, args.repeats)
        elif part == "prefill":
            report[part] = prefill_part(engine, args.repeats)
        else:
            report[part] = thread_part(engine, prepared.tokenizer, args.repeats)
    (args.out / f"batch_step_{args.model}{'_16bit' if args.dequantized else ''}.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
