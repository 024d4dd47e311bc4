"""Selectors compared on real scores: exact top-k (torch.topk), Spark's statistical top-k
(threshold = mean + std * inv_Phi(1 - k/n), no sort) and local top-k (best k/B of B interleaved
blocks). For each: recall of what the selection is for, how many rows it keeps, and the time of
one decode-step selection (N = 1).

- FFN: the int4 proxy's |activation| estimates of every layer; recall of the exact top-k neurons
  by true |activation|, at densities 0.6 (training-free HiRE) and 0.1 (trained top-k models).
- LM head: the rank-64 activation-aware proxy's scores; keep 4,096 rows; recall of the exact
  top-1 and top-50 logits among them.

    .venv/bin/python benchmarks/topk_selectors.py --model smollm2-135m [--json]
"""

import argparse
import json
import time

import torch

import hire
from hire.calibrate import collect_head_states, fit_head_proxy, head_weight
from hire.config import FFNConfig, HeadConfig, HiReConfig
from hire.data import load_corpus, token_windows
from hire.patch import hire_layers, sparsify_
from hire.topk import idx_to_mask, local_topk, mask_recall, recall_at_k, statistical_topk


def timed(fn, reps: int = 200) -> float:
    """Median milliseconds of fn() over 5 batches of ``reps`` calls."""
    for _ in range(10):
        fn()
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        runs.append((time.perf_counter() - t0) / reps * 1e3)
    return sorted(runs)[2]


def ffn_rows(model, windows, densities):
    captured: dict[int, list[torch.Tensor]] = {}
    ffns = hire_layers(model)[1]
    hooks = [f.register_forward_hook(lambda m, a, o, i=i: captured.setdefault(i, []).append(a[0].reshape(-1, a[0].shape[-1])))
             for i, f in enumerate(ffns)]
    for w in windows:
        model(w.unsqueeze(0), use_cache=False)
    for h in hooks:
        h.remove()
    rows = []
    for density in densities:
        acc = {"exact top-k": [], "statistical": [], "statistical kept": []}
        for i, ffn in enumerate(ffns):
            x = torch.cat(captured[i])
            est = ffn.estimate(x)  # (N, I)
            true = ffn.weights.activations(x).abs()
            n = est.shape[-1]
            k = max(1, round(density * n))
            exact = idx_to_mask(true.topk(k, dim=-1).indices, n)
            acc["exact top-k"].append(mask_recall(exact, idx_to_mask(est.topk(k, dim=-1).indices, n)).mean().item())
            stat = statistical_topk(est, k)
            acc["statistical"].append(mask_recall(exact, stat).mean().item())
            acc["statistical kept"].append(stat.sum(-1).float().mean().item() / k)
        one = est[:1].contiguous()
        rows.append({
            "part": "ffn", "density": density, "k": k, "n": n,
            "recall_topk": sum(acc["exact top-k"]) / len(ffns),
            "recall_statistical": sum(acc["statistical"]) / len(ffns),
            "kept_statistical_over_k": sum(acc["statistical kept"]) / len(ffns),
            "ms_topk": timed(lambda: one.topk(k, dim=-1, sorted=False).indices),
            "ms_statistical": timed(lambda: statistical_topk(one, k)[0].nonzero()),
        })
    return rows


def head_rows(model, tokenizer, corpus, keep: int = 4096, blocks: int = 512):
    calib = collect_head_states(model, token_windows(tokenizer, corpus.text("calibration"), 512, 16), progress=False)
    held = collect_head_states(model, token_windows(tokenizer, corpus.text("evaluation"), 512, 2), progress=False)
    weight = head_weight(model)
    proxy = fit_head_proxy(model, HeadConfig(proxy="lowrank", rank=64, rank_bits=8), calib)
    scores = torch.cat([proxy.scores(h) for h in held.split(256)])  # (N, V)
    true = torch.cat([torch.nn.functional.linear(h, weight).topk(50, dim=-1).indices for h in held.split(256)])
    n = scores.shape[-1]
    out = {"part": "head", "k": keep, "n": n}
    sel = {"topk": scores.topk(keep, dim=-1).indices, "local": local_topk(scores, keep, blocks)}
    for name, idx in sel.items():
        out[f"recall1_{name}"] = recall_at_k(true[:, :1], idx).mean().item()
        out[f"recall50_{name}"] = recall_at_k(true, idx).mean().item()
    stat = statistical_topk(scores, keep)
    hit = stat.gather(-1, true)
    out["recall1_statistical"] = hit[:, 0].float().mean().item()
    out["recall50_statistical"] = hit.float().mean().item()
    out["kept_statistical_over_k"] = stat.sum(-1).float().mean().item() / keep
    one = scores[:1].to(torch.float16).contiguous()
    out["ms_topk"] = timed(lambda: one.topk(keep, dim=-1, sorted=False).indices, 50)
    out["ms_local"] = timed(lambda: local_topk(one, keep, blocks), 50)
    out["ms_statistical"] = timed(lambda: statistical_topk(one, keep)[0].nonzero(), 50)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", type=int, default=2, help="held-out windows of 256 tokens for the FFN rows")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = hire.load_model(args.model)
    corpus = load_corpus()
    head = head_rows(model, tokenizer, corpus)
    sparsify_(model, HiReConfig(head=HeadConfig(enabled=False), ffn=FFNConfig(density=0.6, proxy="int4")))
    ffn = ffn_rows(model, token_windows(tokenizer, corpus.text("evaluation"), 256, args.windows), (0.6, 0.1))
    if args.json:
        print(json.dumps({"model": args.model, "ffn": ffn, "head": head}, indent=2))
        return
    print(f"{args.model}")
    print("FFN (int4 proxy estimates, mean over layers): recall of the exact top-k neurons / kept / ms per decode step")
    for r in ffn:
        print(f"  density {r['density']:.1f} (k={r['k']} of {r['n']}): top-k {r['recall_topk']:.4f} / 1.00 / "
              f"{r['ms_topk']:.4f} ms   statistical {r['recall_statistical']:.4f} / {r['kept_statistical_over_k']:.2f} / "
              f"{r['ms_statistical']:.4f} ms")
    h = head
    print(f"LM head (rank-64 proxy scores, keep {h['k']} of {h['n']}): recall@1 / recall@50 / kept / ms")
    print(f"  top-k       {h['recall1_topk']:.4f} / {h['recall50_topk']:.4f} / 1.00 / {h['ms_topk']:.3f} ms")
    print(f"  local top-k {h['recall1_local']:.4f} / {h['recall50_local']:.4f} / 1.00 / {h['ms_local']:.3f} ms")
    print(f"  statistical {h['recall1_statistical']:.4f} / {h['recall50_statistical']:.4f} / "
          f"{h['kept_statistical_over_k']:.2f} / {h['ms_statistical']:.3f} ms")


if __name__ == "__main__":
    with torch.no_grad():
        main()
