"""Training-free FFN sparsity that needs no per-token proxy bytes, measured for quality before any
kernel is written (issue 24): FFN bytes read per decoded token against the perplexity increase on
each of the six held-out domains, the worst domain deciding.

Each window of --seq-len tokens is split: its first --prompt tokens are the "prompt" (run densely,
as a prefill would be), the rest are scored teacher-forced with the FFN restricted as each method
decodes. Methods, each at several densities d (the share of the FFN's neurons kept):

* ``sequence`` (GRIFFIN-style, one set per sequence): each layer keeps the d F neurons whose
  activations act(gate) * up, each prompt token's normalised to unit length, have the largest norm
  over the prompt. Decoding reads only those neurons' gate, up and down rows: bytes d.
* ``gate`` (CATS-style, per token): the gate is read densely; a neuron runs when |act(gate)| passes
  the layer's threshold, set on the calibration side of the corpus (never an evaluation text) so
  that a share d of the neurons pass. Bytes 1/3 + 2/3 x (the share that passed).
* ``down`` (per token, no proxy): gate and up dense, the down projection for the d F largest
  |act(gate) * up| only. Bytes 2/3 + d/3.
* ``sequence-oracle``: ``sequence``'s statistic taken over the scored tokens themselves, not the
  prompt: the best set any per-sequence method could pick by it (not a method: it sees the future).

Every method at d = 1 reproduces the dense model's perplexity (checked in the run). The model is the
float32 model of the GGUF's dequantized values (the engine on the codes is within 0.03 % of it).

    .venv/bin/python benchmarks/ffn_sequence_sparsity.py --model smollm2-135m   # ~3 min
    .venv/bin/python benchmarks/ffn_sequence_sparsity.py --model gemma3-270m    # ~8 min
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from hire.data import domain_windows, load_domains
from hire.models.load import load_model

METHODS = ("sequence", "sequence-oracle", "gate", "down")
DENSITIES = (0.5, 0.7, 0.8, 0.9, 0.95)


def mlps(model) -> list:
    """The decoder layers' MLP modules (gate_proj, up_proj, down_proj, act_fn)."""
    return [layer.mlp for layer in model.model.layers]


class Restrict:
    """Replaces each MLP's forward with one that runs the method at the scored positions (>= prompt)."""

    def __init__(self, model, prompt: int):
        self.modules = mlps(model)
        self.prompt = prompt
        self.method, self.density = None, 1.0
        self.thresholds: list[dict[float, float]] | None = None  # per layer, density -> |act(gate)| threshold
        self.kept: list[float] = []  # per layer call: the share of neurons the scored positions ran
        self.capture: list[list[torch.Tensor]] | None = None
        for i, m in enumerate(self.modules):
            m.forward = self._forward(i, m)

    def _forward(self, i, m):
        def forward(x):
            g = m.act_fn(m.gate_proj(x))
            act = g * m.up_proj(x)  # (B, T, F)
            if self.capture is not None:
                self.capture[i].append(g.abs().reshape(-1, g.shape[-1]))
            if self.method is None or self.density >= 1.0:
                return m.down_proj(act)
            act = act.clone()
            scored = act[:, self.prompt:]
            F = act.shape[-1]
            if self.method in ("sequence", "sequence-oracle"):
                seen = act[:, : self.prompt] if self.method == "sequence" else scored
                z = seen / seen.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # each token's activations, unit length
                keep = z.norm(dim=1).topk(max(1, round(self.density * F)), dim=-1).indices  # (B, dF)
                mask = torch.zeros(act.shape[0], F, dtype=torch.bool)
                mask.scatter_(1, keep, True)
                scored = scored * mask[:, None, :]
                self.kept.append(self.density)
            elif self.method == "gate":
                passed = g[:, self.prompt:].abs() > self.thresholds[i][self.density]
                scored = scored * passed
                self.kept.append(1 / 3 + 2 / 3 * passed.float().mean().item())
            elif self.method == "down":
                k = max(1, round(self.density * F))
                idx = scored.abs().topk(k, dim=-1).indices
                scored = torch.zeros_like(scored).scatter_(-1, idx, scored.gather(-1, idx))
                self.kept.append(2 / 3 + self.density / 3)
            act[:, self.prompt:] = scored
            return m.down_proj(act)

        return forward


@torch.no_grad()
def scored_nll(model, window: torch.Tensor, prompt: int) -> tuple[float, int]:
    """Summed negative log-likelihood of tokens prompt..T-1 given the window before each."""
    hidden = model.model(window[None]).last_hidden_state[0]  # (T, D)
    head = model.get_output_embeddings()
    total, count = 0.0, 0
    for s in range(prompt - 1, window.numel() - 1, 64):
        e = min(window.numel() - 1, s + 64)
        logits = head(hidden[s:e]).float()
        soft_cap = getattr(model.config, "final_logit_softcapping", None)
        if soft_cap:
            logits = torch.tanh(logits / soft_cap) * soft_cap
        lp = logits.log_softmax(-1).gather(-1, window[s + 1 : e + 1, None])
        total -= lp.sum().item()
        count += e - s
    return total, count


@torch.no_grad()
def calibrate(model, restrict: Restrict, windows: torch.Tensor, densities) -> None:
    """Per layer and density: the |act(gate)| threshold that a share d of the calibration tokens'
    neurons pass (never an evaluation text)."""
    restrict.capture = [[] for _ in restrict.modules]
    restrict.method = None
    for w in windows:
        model.model(w[None])
    gates = [torch.cat(c) for c in restrict.capture]
    restrict.capture = None
    gen = torch.Generator().manual_seed(0)
    restrict.thresholds = []
    for g in gates:
        sample = g.reshape(-1)
        if sample.numel() > 4_000_000:  # torch.quantile's limit is 16M; 4M samples fix a quantile to ~1e-3
            sample = sample[torch.randint(sample.numel(), (4_000_000,), generator=gen)]
        restrict.thresholds.append({d: sample.quantile(1 - d).item() for d in densities})


def draw(result: dict, path: Path) -> None:
    """Each method's FFN bytes against the worst held-out domain's perplexity increase, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method in METHODS:
        pts = sorted((r["ffn_bytes_fraction"], 100 * r["worst_increase"]) for r in rows if r["method"] == method)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=method)
    ax.axvline(0.5, color="grey", lw=0.8, ls="--")
    ax.axhline(3.0, color="grey", lw=0.8, ls="--")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_ylim(bottom=min(0.0, min(100 * r["worst_increase"] for r in rows)) - 0.2)
    ax.set_xlabel("FFN bytes read per token / dense FFN")
    ax.set_ylabel("perplexity increase, worst of 6 domains (%)")
    ax.set_title(f"{result['model']}: FFN sparsity without training\n(bar: <= 0.5 of the bytes at <= +3 %)",
                 fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--prompt", type=int, default=256, help="tokens of each window run densely (the set's prompt)")
    parser.add_argument("--windows", type=int, default=2, help="windows per held-out domain")
    parser.add_argument("--calib-windows", type=int, default=10)
    parser.add_argument("--densities", default=",".join(map(str, DENSITIES)))
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/ffn_sequence_sparsity_<model>.json)")
    parser.add_argument("--plot", default=None, help="PNG path (default next to the JSON)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--replot", metavar="JSON", help="only draw the PNG of a JSON this script wrote")
    args = parser.parse_args()
    if args.replot:
        path = Path(args.replot)
        draw(json.loads(path.read_text()), Path(args.plot or path.with_suffix(".png")))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    densities = [float(d) for d in args.densities.split(",")]
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, torch.float32)
    domains = load_domains(tokenizer)
    held = {name: domain_windows(tokenizer, {name: text}, args.seq_len, args.windows)
            for name, text in domains["held_out"].items()}
    calib = domain_windows(tokenizer, domains["calibration"], args.seq_len, args.calib_windows)
    restrict = Restrict(model, args.prompt)
    calibrate(model, restrict, calib, densities)  # (at d = 1 every method runs the dense FFN)

    def ppl(name: str) -> float:
        nll = count = 0
        for w in held[name]:
            a, b = scored_nll(model, w, args.prompt)
            nll, count = nll + a, count + b
        return math.exp(nll / count)

    restrict.method = None
    dense = {name: ppl(name) for name in held}
    print(f"{args.model}: dense perplexity on the scored tokens " + ", ".join(f"{k} {v:.3f}" for k, v in dense.items()),
          flush=True)
    rows = []
    for method in METHODS:
        for d in densities + [1.0]:
            restrict.method, restrict.density, restrict.kept = method, d, []
            got = {name: ppl(name) for name in held}
            increase = {name: got[name] / dense[name] - 1 for name in held}
            if d >= 1.0:  # every method at d = 1 is the dense model
                assert max(abs(v) for v in increase.values()) < 1e-5, (method, increase)
                continue
            bytes_fraction = sum(restrict.kept) / len(restrict.kept)
            worst = max(increase, key=increase.get)
            rows.append({"method": method, "density": d, "ffn_bytes_fraction": bytes_fraction,
                         "ppl_increase": increase, "worst_domain": worst, "worst_increase": increase[worst]})
            print(f"  {method:14s} d {d:.2f}: FFN bytes {bytes_fraction:.3f}, worst {worst} "
                  f"{100 * increase[worst]:+.2f} %, mean {100 * sum(increase.values()) / len(increase):+.2f} %", flush=True)
    restrict.method = None
    meeting = [r for r in rows if r["ffn_bytes_fraction"] <= 0.5 and r["worst_increase"] <= 0.03]
    result = {"model": args.model, "seq_len": args.seq_len, "prompt": args.prompt, "windows_per_domain": args.windows,
              "calib_windows": args.calib_windows, "dense_ppl": dense, "rows": rows,
              "meets_bar": meeting, "seconds": time.perf_counter() - t0}
    out = Path(args.out or Path(__file__).parent / f"ffn_sequence_sparsity_{args.model}.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot = Path(args.plot or out.with_suffix(".png"))
    draw(result, plot)
    print(f"wrote {out} and {plot} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
