"""The LM head's parts on a packaged model's real shapes, in turns in one process (A B A B), each
after a real decode step of the rest of the model (so the caches hold what decoding leaves there):

* the dense head (every row's exact logit, ``exact_logits``);
* the first pass over the low-rank factor U: the row-major kernel (``z = V x`` in torch, then
  ``lowrank_block_topk``) and the block-major one (``lowrank_select``: z, scores and selection in one
  call, rows ascending);
* the candidates' exact rows (``exact_logits`` on the head's codes) in block order and ascending;
* ``HiReLMHead.decode`` as the engine calls it.

Medians and minimums in ms, and GB/s from each part's bytes.

    flock /tmp/hire_notes/bench.lock .venv/bin/python benchmarks/head_parts.py --model gemma3-270m
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from hire import native
from hire.calibrate.prepare import load_for_decode
from hire.config import HeadConfig, HiReConfig
from hire.engine.engine import Engine
from hire.layers.head import exact_logits
from hire.proxies.lowrank import block_select
from hire.recommended import recommended_config

PROMPT = "The king's daughter walked alone by the river, and as the evening fell she began to sing"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="a packaged model (its recommended head) or a .gguf path")
    p.add_argument("--head-rank", type=int, default=128, help="for a .gguf path: the low-rank factor's rank")
    p.add_argument("--head-candidates", type=int, default=2048, help="for a .gguf path: k'")
    p.add_argument("--head-select-blocks", type=int, default=128, help="for a .gguf path: the first pass's blocks")
    p.add_argument("--steps", type=int, default=120, help="decode steps (each times one group of parts)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.model.endswith(".gguf"):  # the figures of `hire bench --model PATH --head-proxy lowrank ...`
        config = HiReConfig(head=HeadConfig(k=50, candidates=args.head_candidates, proxy="lowrank", rank=args.head_rank,
                                            stage_candidates=args.head_candidates, select_blocks=args.head_select_blocks,
                                            train_steps=0))
        prepared = load_for_decode(args.model, config, calib_windows=4, progress=False)
    else:
        prepared = load_for_decode(args.model, recommended_config(args.model), progress=False)
    engine = Engine(prepared.model, prepared.config, head_proxy=prepared.head_proxy, dtype=torch.float16,
                    max_seq_len=args.steps + 64)
    head = engine.head
    sel = head.selector
    first = sel.proxies[0]
    pack = first.block_pack(sel.blocks)
    if pack is None:
        raise SystemExit("this head has no native first pass here")
    per = sel.keep[0] // sel.blocks
    u_bytes = pack.codes.numel() + pack.scales.numel() * 4 + (0 if pack.bias is None else pack.bias.numel() * 2)
    rows_bytes = int(sel.keep[0] * head.decode_weight.row_nbytes()) if head.native_rows else sel.keep[0] * engine.hidden * 2
    nbytes = {"dense head": head.dense_nbytes(), "first pass, row-major (z + lowrank_block_topk)": u_bytes,
              "first pass, block-major (lowrank_select)": u_bytes, "exact rows, block order": rows_bytes,
              "exact rows, ascending": rows_bytes, "HiReLMHead.decode": u_bytes + rows_bytes}
    times: dict[str, list[float]] = {name: [] for name in nbytes}

    def timed(name, fn):
        t = time.perf_counter()
        out = fn()
        times[name].append(time.perf_counter() - t)
        return out

    ids = prepared.tokenizer(PROMPT, return_tensors="pt").input_ids[0]
    with torch.inference_mode():
        engine.prefill(ids)
        token, pos = ids[-1:], ids.numel()
        for step in range(args.steps):
            hidden = engine.forward(token, pos, hire=True)  # the rest of the model, untimed
            pos += 1
            turn = step % 3
            if turn == 0:
                logits = timed("dense head", lambda: exact_logits(hidden, engine.head_weight, None, engine.head_bias,
                                                                  engine.head_native))
                token = logits.argmax(-1)
            elif turn == 1 and first.packed is not None:  # the row-major kernel reads 8-bit U only
                def row_major():
                    z = torch.nn.functional.linear(hidden.to(first.v.dtype), first.decode_v)
                    return native.lowrank_block_topk(z, first.packed, first.row_scales, sel.blocks, per, first.bias)
                rows = timed("first pass, row-major (z + lowrank_block_topk)", row_major)
                timed("exact rows, block order", lambda: exact_logits(hidden, head.decode_weight, rows, head.bias,
                                                                      head.native_rows))
            elif turn == 2:
                rows = timed("first pass, block-major (lowrank_select)",
                             lambda: block_select(hidden, first.decode_v, pack, per)[0][0])
                timed("exact rows, ascending", lambda: exact_logits(hidden, head.decode_weight, rows, head.bias,
                                                                    head.native_rows))
                logits, idx = timed("HiReLMHead.decode", lambda: head.decode(hidden))
                token = idx[0, logits[0].argmax()].view(1)
    report = {"model": args.model, "vocab": head.vocab_size, "rank": first.rank, "candidates": sel.keep[0],
              "blocks": sel.blocks, "threads": torch.get_num_threads(), "parts": {}}
    for name, values in times.items():
        values = values[2:]  # warm-up
        if not values:
            continue
        med = statistics.median(values)
        report["parts"][name] = {"ms_median": 1e3 * med, "ms_min": 1e3 * min(values), "bytes": nbytes[name],
                                 "gb_s_median": nbytes[name] / med / 1e9}
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(f"{args.model}: {head.vocab_size} rows, rank {first.rank}, k' {sel.keep[0]} in {sel.blocks} blocks, "
          f"{report['threads']} threads")
    for name, r in report["parts"].items():
        print(f"  {name:48s} {r['ms_median']:7.3f} ms (min {r['ms_min']:6.3f})  {r['bytes'] / 2**20:6.1f} MiB "
              f"{r['gb_s_median']:6.1f} GB/s")


if __name__ == "__main__":
    main()
