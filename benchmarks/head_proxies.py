"""Recall vs bytes of LM-head proxies on held-out text: plain SVD, activation-aware low rank,
int4, and cascades. Prints one line per setting (the README's proxy table).

    .venv/bin/python benchmarks/head_proxies.py --model smollm2-135m
"""

import argparse

import torch

import hire
from hire.calibrate import collect_head_states, head_weight
from hire.data import load_corpus, token_windows
from hire.proxies import Cascade, LowRankProxy, QuantizedProxy
from hire.topk import recall_at_k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calib-windows", type=int, default=16)
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--k", type=int, default=50)
    args = parser.parse_args()

    model, tokenizer = hire.load_model(args.model)
    corpus = load_corpus()
    calib = collect_head_states(model, token_windows(tokenizer, corpus.text("calibration"), args.seq_len, args.calib_windows))
    held = collect_head_states(model, token_windows(tokenizer, corpus.text("evaluation"), args.seq_len, args.eval_windows))
    weight = head_weight(model)
    vocab, width = weight.shape
    chunks = held.split(512)
    true = [torch.nn.functional.linear(h, weight).topk(args.k, dim=-1).indices for h in chunks]

    def report(label: str, selector: Cascade) -> None:
        idx = [selector.select(h) for h in chunks]
        r1 = torch.cat([recall_at_k(t[:, :1], i) for t, i in zip(true, idx)]).mean().item()
        rk = torch.cat([recall_at_k(t, i) for t, i in zip(true, idx)]).mean().item()
        frac = (selector.nbytes() + selector.keep[-1] * width * 2) / (vocab * width * 2)
        print(f"{label:48s} recall@1 {r1:.4f}  recall@{args.k} {rk:.4f}  head bytes {100 * frac:5.1f} %", flush=True)

    print(f"{args.model}: {held.shape[0]} held-out positions, {calib.shape[0]} calibration states")
    int4 = QuantizedProxy.from_weight(weight, 4, 64)
    int8_rows = QuantizedProxy.from_weight(weight, 8, width)  # one scale per row
    report("int4 copy, k'=256", Cascade([int4], [256]))
    for rank in (64, 128):
        plain = LowRankProxy.from_weight(weight, rank, u_bits=8)
        aware = LowRankProxy.from_weight(weight, rank, states=calib, u_bits=8)
        report(f"plain SVD, rank {rank}, k'=1024", Cascade([plain], [1024]))
        report(f"activation-aware, rank {rank}, k'=1024", Cascade([aware], [1024]))
        for survivors in (2048, 4096, 8192):
            if survivors < vocab:
                report(f"cascade rank {rank} -> {survivors} -> int4 -> 256", Cascade([aware, int4], [survivors, 256]))
                report(f"cascade rank {rank} -> {survivors} -> int8/row -> 256", Cascade([aware, int8_rows], [survivors, 256]))


if __name__ == "__main__":
    with torch.no_grad():
        main()
