"""How much optimism (hire.proxies.LowRankProxy.with_optimism) the low-rank head proxy should get,
chosen on calibration text only, and what it does on the held-out domains.

The recommended head's proxy (rank, training steps) is fitted on three in four of the packaged
calibration windows (hire.data.calibration_windows); each c of a ladder adds c times every row's
error spread to its score, and recall@1 / recall@50 at the recommended k' (one exact top-k) is
measured on the fourth calibration window of each four: the c with the best recall@50 there is the
choice. The same proxies are then measured on every held-out domain (hire.data.load_domains, 2,048
positions each), which played no part in the choice.

    .venv/bin/python benchmarks/head_optimism.py --model smollm2-135m   # ~4 min
    .venv/bin/python benchmarks/head_optimism.py --model gemma3-270m    # ~8 min
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from hire.calibrate import collect_head_states, fit_and_train, head_weight
from hire.data import calibration_windows, load_domains, token_windows
from hire.models import load_model
from hire.recommended import quantized_config, recommended_config
from hire.topk import recall_at_k

LADDER = (0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0)


@torch.no_grad()
def recalls(proxy, weight, states, candidates, k=50):
    r1 = rk = 0.0
    for h in states.split(512):
        true = (h @ weight.t()).topk(k, dim=-1).indices
        idx = proxy.scores(h).topk(candidates, dim=-1).indices
        r1 += recall_at_k(true[:, :1], idx).sum().item()
        rk += recall_at_k(true, idx).sum().item()
    return r1 / states.shape[0], rk / states.shape[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", help="JSON report (default benchmarks/head_optimism_MODEL.json)")
    args = p.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_model(args.model)
    head = quantized_config(recommended_config(args.model)).head  # k' as the GGUF codes run it
    weight = head_weight(model).float()
    windows = calibration_windows(tokenizer, 512)
    check = torch.arange(windows.shape[0]) % 4 == 3
    fit_states = collect_head_states(model, windows[~check])
    check_states = collect_head_states(model, windows[check])
    held = {name: collect_head_states(model, token_windows(tokenizer, text, 512, 4, spread=True))
            for name, text in load_domains(tokenizer)["held_out"].items()}
    base, _ = fit_and_train(model, dataclasses.replace(head, optimism=0.0), fit_states)
    rows = []
    for c in LADDER:
        proxy = base.with_optimism(weight, fit_states, c)
        row = {"optimism": c, "calibration_check": recalls(proxy, weight, check_states, head.candidates),
               "held_out": {name: recalls(proxy, weight, h, head.candidates) for name, h in held.items()}}
        row["worst_held_out"] = [min(r[i] for r in row["held_out"].values()) for i in (0, 1)]
        rows.append(row)
        print(f"c={c}: calibration check {row['calibration_check'][0]:.4f} / {row['calibration_check'][1]:.4f}; "
              f"held-out worst {row['worst_held_out'][0]:.4f} / {row['worst_held_out'][1]:.4f}", flush=True)
    chosen = max(rows, key=lambda r: (r["calibration_check"][1], -r["optimism"]))
    report = {"model": args.model, "rank": head.rank, "train_steps": head.train_steps, "candidates": head.candidates,
              "fit_states": fit_states.shape[0], "check_states": check_states.shape[0], "ladder": rows,
              "chosen_on_calibration": chosen["optimism"]}
    out = Path(args.out or Path(__file__).parent / f"head_optimism_{args.model}.json")
    out.write_text(json.dumps(report, indent=1))
    print(f"chosen on calibration: optimism {chosen['optimism']}; wrote {out}")


if __name__ == "__main__":
    main()
