"""The from-scratch table of issue 4: dense / top-k / group top-k / top-k + HiRE-LR head.

Trains what is missing (``hire train``, resumable), then for each row runs the same commands a user
would (``hire eval --json``, ``hire bench --json``) and prints a markdown table; writes
benchmarks/from_scratch.json and benchmarks/from_scratch_loss.png.

    .venv/bin/python benchmarks/from_scratch.py            # ~1 h on 2 cores with training
    .venv/bin/python benchmarks/from_scratch.py --no-train # only evaluate existing runs

The top-k run trains its head proxy jointly (the proxy's loss does not reach the model), so the
"top-k" row is that run decoded without the head proxy and the "+ HiRE-LR head (joint)" row with it;
"(joint with refits)" re-anchors the proxy on the current head every 50 steps (activation-aware fit on
the batch's head inputs) between KL steps; the "(calibrated)" row uses a proxy fitted and trained on
the finished model (``hire calibrate``).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
HIRE = [sys.executable, "-m", "hire"]
RUNS = {  # run name -> hire train flags
    "dense": ["--density", "1.0"],
    "topk": ["--density", "0.1", "--head-rank", "32", "--head-refit-every", "0"],
    "topk-refit": ["--density", "0.1", "--head-rank", "32", "--head-refit-every", "50"],
    "group16": ["--density", "0.1", "--group-size", "16"],
}
ROWS = [  # label, run, its HiRE config (relative to the run directory), extra flags for eval/bench
    ("dense", "dense", "hire_config.json", []),
    ("top-k 10%", "topk", "hire_config.json", ["--no-head"]),
    ("group top-k 10% (groups of 16)", "group16", "hire_config.json", []),
    ("top-k 10% + HiRE-LR head (joint, rank 32)", "topk", "hire_config.json", []),
    ("top-k 10% + HiRE-LR head (joint with refits, rank 32)", "topk-refit", "hire_config.json", []),
    ("top-k 10% + HiRE-LR head (calibrated, rank 32)", "topk", "../topk-cal/hire_config.json", []),
]
CALIBRATE = ["--head-proxy-file", "", "--head-select-blocks", "0", "--steps", "300", "--calib-windows", "32",
             "--seq-len", "256", "--eval-windows", "8"]


def run_json(cmd: list[str]) -> dict:
    print("$", " ".join(cmd[2:] if cmd[:2] == HIRE[:2] else cmd), file=sys.stderr, flush=True)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def plot(runs: dict[str, dict], path: Path) -> None:
    from hire.plots import save_lines

    save_lines(path, [{"x": log["log"]["val_step"], "y": log["log"]["val_loss"], "label": log["summary"]["variant"],
                       "style": {"marker": "o", "ms": 3}} for log in runs.values()],
               xlabel="step (16 x 256 tokens)", ylabel="validation loss (nats, exact top-k)", size=(6.5, 3.8),
               title="from scratch on 2 CPU cores: 4-layer, 6.3 M-parameter Llama-layout decoder")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="runs/scratch", help="where the runs live (default runs/scratch)")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--no-train", action="store_true")
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    root = Path(args.dir)
    logs = {}
    for name, flags in RUNS.items():
        out = root / name
        if not (out / "train_log.json").is_file():
            if args.no_train:
                raise SystemExit(f"{out} has no finished run; drop --no-train")
            resume = ["--resume"] if (out / "checkpoint.pt").is_file() else ["--steps", str(args.steps), *flags]
            run_json([*HIRE, "train", "--out", str(out), *resume, "--json"])
        logs[name] = json.loads((out / "train_log.json").read_text())
    cal = root / "topk-cal"
    if not (cal / "hire_config.json").is_file():  # the head proxy refitted and trained on the finished top-k model
        run_json([*HIRE, "calibrate", "--model", str(root / "topk"), "--config", str(root / "topk" / "hire_config.json"),
                  *CALIBRATE, "--out", str(cal), "--json"])
    rows = []
    for label, name, config, extra in ROWS:
        out = root / name
        common = ["--model", str(out), "--config", str(out / config), *extra]
        ev = run_json([*HIRE, "eval", *common, "--seq-len", "256", "--windows", str(args.eval_windows), "--json"])
        be = run_json([*HIRE, "bench", *common, "--rounds", str(args.rounds), "--json"])
        rows.append({
            "label": label, "run": str(out), "summary": logs[name]["summary"],
            "val_loss_exact": math.log(ev["ppl_dense"]), "val_loss_hire": math.log(ev["ppl_hire"]),
            "greedy_agreement_hire_vs_exact": ev["greedy_agreement"], "ffn_recall": ev["ffn_recall"],
            "head_recall_at_1": ev["head_recall_at_1"], "head_recall_at_k": ev["head_recall_at_k"],
            "bytes_per_token_model": ev["bytes_per_token_dense"], "bytes_per_token_hire": ev["bytes_per_token_hire"],
            "ideal_speedup": ev["ideal_speedup"], "tokens_per_s_dense": be["tokens_per_s_dense"],
            "tokens_per_s_hire": be["tokens_per_s_hire"], "speedup": be["speedup"],
            "bench_greedy_agreement": be["greedy_agreement_last_round"],
        })
    dense_loss = rows[0]["val_loss_exact"]
    lines = ["| model | density | val loss (exact) | vs dense | val loss (HiRE decode) | HiRE = exact greedy | "
             "FFN recall | head recall@1 / @50 | KiB/token model -> HiRE | ideal | bench tokens/s model -> HiRE |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["summary"]
        head = "-" if r["head_recall_at_1"] is None else f"{r['head_recall_at_1']:.4f} / {r['head_recall_at_k']:.4f}"
        lines.append(
            f"| {r['label']} | {s['density']:g} | {r['val_loss_exact']:.4f} | "
            f"{100 * (r['val_loss_exact'] / dense_loss - 1):+.2f}% loss, {100 * (math.exp(r['val_loss_exact'] - dense_loss) - 1):+.1f}% ppl | "
            f"{r['val_loss_hire']:.4f} | {r['greedy_agreement_hire_vs_exact']:.4f} | "
            f"{'-' if r['ffn_recall'] is None else format(r['ffn_recall'], '.4f')} | {head} | "
            f"{r['bytes_per_token_model'] / 1024:.0f} -> {r['bytes_per_token_hire'] / 1024:.0f} | {r['ideal_speedup']:.2f}x | "
            f"{r['tokens_per_s_dense']:.0f} -> {r['tokens_per_s_hire']:.0f} ({r['speedup']:.2f}x) |")
    table = "\n".join(lines)
    print(table)
    (HERE / "from_scratch.json").write_text(json.dumps({"rows": rows, "table": table}, indent=2) + "\n")
    plot({k: v for k, v in logs.items() if k != "topk-refit"}, HERE / "from_scratch_loss.png")  # same model as topk


if __name__ == "__main__":
    main()
