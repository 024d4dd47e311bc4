"""Recall vs bytes of LM-head proxies on held-out text: plain SVD, activation-aware low rank,
trained low rank (hire calibrate's training), int4/int8 copies, and cascades. Prints one line per
setting (the proxy table in docs/training.md); --plot draws recall@k against head bytes, sweeping k' for the
low-rank proxies.

    .venv/bin/python benchmarks/head_proxies.py --model smollm2-135m --plot benchmarks/head_proxies_smollm2-135m.png
"""

import argparse

import torch

import hire
from hire.calibrate import collect_head_states, head_recall, head_weight
from hire.calibrate.train import train_lowrank_proxy
from hire.data import load_corpus, token_windows
from hire.proxies import Cascade, LowRankProxy, QuantizedProxy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calib-windows", type=int, default=16)
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--train-steps", type=int, default=300, help="steps for the trained low-rank proxy")
    parser.add_argument("--plot", help="write recall vs bytes curves to this PNG")
    args = parser.parse_args()

    model, tokenizer = hire.load_model(args.model)
    corpus = load_corpus()
    calib = collect_head_states(model, token_windows(tokenizer, corpus.text("calibration"), args.seq_len, args.calib_windows))
    held = collect_head_states(model, token_windows(tokenizer, corpus.text("evaluation"), args.seq_len, args.eval_windows))
    weight = head_weight(model)
    vocab, width = weight.shape
    curves: dict[str, list[tuple[float, float]]] = {}

    def report(label: str, selector: Cascade, curve: str | None = None, quiet: bool = False) -> None:
        r1, rk = head_recall(weight, selector, held, args.k)
        frac = selector.head_nbytes() / (vocab * width * 2)
        curves.setdefault(curve or label, []).append((100 * frac, rk))
        if not quiet:
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
    aware = LowRankProxy.from_weight(weight, 64, states=calib, u_bits=8)
    with torch.enable_grad():
        trained, _ = train_lowrank_proxy(weight, aware, calib, args.train_steps)
    plain = LowRankProxy.from_weight(weight, 64, u_bits=8)
    for kp in (256, 512, 1024, 1536, 1792, 2048, 3072, 4096):
        report(f"trained rank 64 ({args.train_steps} steps), k'={kp}", Cascade([trained], [kp]), "trained low rank 64")
        report(f"activation-aware rank 64, k'={kp}", Cascade([aware], [kp]), "activation-aware low rank 64", quiet=kp == 1024)
        report(f"plain SVD rank 64, k'={kp}", Cascade([plain], [kp]), "plain SVD rank 64", quiet=True)
    report("int8 copy (per row), k'=256", Cascade([int8_rows], [256]), "int4 / int8 copies, k'=256")
    curves["int4 / int8 copies, k'=256"].append(curves.pop("int4 copy, k'=256")[0])
    for survivors in (2048, 4096, 8192):
        report(f"cascade trained 64 -> {survivors} -> int8/row -> 256", Cascade([trained, int8_rows], [survivors, 256]),
               "cascades (int8 second stage)")
    if args.plot:
        plot(curves, args.plot, f"{args.model}: LM-head proxies on held-out text", args.k)


def plot(curves: dict, path: str, title: str, k: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in ("plain SVD rank 64", "activation-aware low rank 64", "trained low rank 64", "int4 / int8 copies, k'=256",
                 "cascades (int8 second stage)"):
        pts = sorted(curves.get(name, []))
        if pts:
            style = "-o" if name.endswith("64") else "s"
            ax.plot([p[0] for p in pts], [max(1 - p[1], 1e-4) for p in pts], style, ms=4, label=name)
    ax.set_xlabel("bytes read per token, % of the 16-bit head")
    ax.set_ylabel(f"1 - recall@{k} (missed top-{k} rows; log scale)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    with torch.no_grad():
        main()
