"""Which proxy could select FFN neurons when the FFN is already 4-5 bits (GGUF codes)? For each
candidate, the FFN output's relative error at a density (the selected neurons computed exactly from
the codes) and the bytes a token would read, as a fraction of the dense FFN's codes:

* ``plane2`` / ``plane1``: the top 2 (1) bits of each code with the format's own scales (a bit-plane
  layout would make this proxy free of extra memory; the exact pass adds the low planes of the
  selected rows);
* ``int4_copy``: a separate 4-bit copy of gate and up (group 64, float16 scales: hire's int4 proxy);
* ``lowrank64`` / ``lowrank128``: an activation-aware rank-r factor of gate and up (int8);
* ``exact_gate``: the gate read densely, |act(gate)| as the score, then the selected up/down rows;
* ``oracle``: the exact |act(gate) * up| (no proxy bytes counted: the floor of the error).

Inputs are the FFN inputs of held-out text (2 windows of 256 tokens, 128 positions sampled per
layer, every third layer), through the model run in its codes. Bytes assume the selected rows read
as fast as dense ones (they read ~25 % slower on this machine, benchmarks/decode_kernels.py).

    .venv/bin/python benchmarks/quant_ffn_proxies.py --model smollm2-135m   # ~1 min
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from hire.data import load_corpus, token_windows
from hire.models.load import gguf_source
from hire.quant import load_quantized

DENSITIES = (0.6, 0.5, 0.4)


def plane(q, keep_bits: int) -> torch.Tensor:
    """The matrix from the top ``keep_bits`` of each code (the dropped bits at their midpoint)."""
    codes, scales, mins = q.unpacked()
    drop = q.bits - keep_bits
    top = (codes.astype(np.float32) // 2**drop) * 2**drop + (2**drop - 1) / 2
    w = (top - q.zero).reshape(codes.shape[0], -1, q.group) * scales[:, :, None]
    if mins is not None:
        w = w + mins[:, :, None]
    return torch.from_numpy(w.reshape(codes.shape))


def int4_copy(w: torch.Tensor, group: int = 64) -> torch.Tensor:
    g = w.reshape(w.shape[0], -1, group)
    scale = g.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 7
    return (torch.round(g / scale).clamp(-8, 7) * scale).reshape(w.shape)


def lowrank(w: torch.Tensor, x: torch.Tensor, rank: int) -> torch.Tensor:
    """Activation-aware rank-r approximation (SVD of W diag(rms x)), its factors rounded to int8 per row."""
    d = x.pow(2).mean(0).sqrt().clamp_min(1e-6)
    u, s, vt = torch.linalg.svd(w * d, full_matrices=False)
    a, b = u[:, :rank] * s[:rank], vt[:rank] / d

    def q8(m):
        scale = m.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127
        return torch.round(m / scale) * scale

    return q8(a) @ q8(b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()
    model, tokenizer, _ = load_quantized(gguf_source(args.model))
    layers = model.model.layers
    picked = list(range(0, len(layers), 3))
    inputs = {i: [] for i in picked}
    hooks = [layers[i].mlp.register_forward_pre_hook(lambda m, a, i=i: inputs[i].append(a[0][0].detach()))
             for i in picked]
    windows = token_windows(tokenizer, load_corpus().text("evaluation"), 256, 2)
    with torch.no_grad():
        for w in windows:
            model(w[None])
    for h in hooks:
        h.remove()
    gen = torch.Generator().manual_seed(0)
    errors = {d: {} for d in DENSITIES}
    fractions = {}
    for i in picked:
        mlp = layers[i].mlp
        x = torch.cat(inputs[i])
        x = x[torch.randperm(x.shape[0], generator=gen)[:128]].float()
        gq, uq, dq = mlp.gate_proj.q, mlp.up_proj.q, mlp.down_proj.q
        gate, up, down = gq.dequantize(), uq.dequantize(), dq.dequantize()
        act = mlp.act_fn
        g, u = x @ gate.T, x @ up.T
        h = act(g) * u
        y = h @ down.T
        neurons, width = gate.shape
        dense_bytes = gq.nbytes + uq.nbytes + dq.nbytes
        scale_bits = 8 * (gq.scales.numel() * gq.scales.element_size() + gq.mins.numel() * gq.mins.element_size()) / gate.numel()
        row_bits = gq.bits + scale_bits
        io = (gq.nbytes + uq.nbytes) / dense_bytes  # gate and up's share of the FFN's bytes
        scores = {"oracle": h.abs(), "exact_gate": act(g).abs()}
        proxy_bytes = {"oracle": 0.0, "exact_gate": gq.nbytes / dense_bytes}
        exact_share = {"oracle": 1.0, "exact_gate": 1 - gq.nbytes / dense_bytes}  # per selected neuron, of all rows
        for bits in (2, 1):
            if bits < gq.bits:
                gp, upl = plane(gq, bits), plane(uq, bits)
                scores[f"plane{bits}"] = (act(x @ gp.T) * (x @ upl.T)).abs()
                proxy_bytes[f"plane{bits}"] = io * (bits + scale_bits) / row_bits
                exact_share[f"plane{bits}"] = io * (gq.bits - bits) / row_bits + (1 - io)
        scores["int4_copy"] = (act(x @ int4_copy(gate).T) * (x @ int4_copy(up).T)).abs()
        proxy_bytes["int4_copy"] = 2 * neurons * width * (4 + 16 / 64) / 8 / dense_bytes
        exact_share["int4_copy"] = 1.0
        for rank in (64, 128):
            scores[f"lowrank{rank}"] = (act(x @ lowrank(gate, x, rank).T) * (x @ lowrank(up, x, rank).T)).abs()
            proxy_bytes[f"lowrank{rank}"] = 2 * rank * (neurons + width) / dense_bytes
            exact_share[f"lowrank{rank}"] = 1.0
        for density in DENSITIES:
            keep = round(density * neurons)
            for name, s in scores.items():
                idx = s.topk(keep, dim=-1).indices
                mask = torch.zeros_like(h).scatter_(-1, idx, 1.0)
                err = ((h * mask) @ down.T - y).norm(dim=-1) / y.norm(dim=-1)
                errors[density].setdefault(name, []).append(float(err.mean()))
                fractions.setdefault(density, {}).setdefault(name, []).append(proxy_bytes[name] + density * exact_share[name])
    report = {"model": args.model, "layers": picked, "positions_per_layer": 128, "densities": {}}
    for density in DENSITIES:
        report["densities"][str(density)] = {
            name: {"relative_error": float(np.mean(errors[density][name])),
                   "bytes_vs_dense_ffn": float(np.mean(fractions[density][name]))}
            for name in errors[density]
        }
        print(f"density {density}")
        for name, r in report["densities"][str(density)].items():
            print(f"  {name:12s} error {r['relative_error']:.3f}  bytes {r['bytes_vs_dense_ffn']:.2f} of the dense FFN")
    out = Path(__file__).with_name(f"quant_ffn_proxies_{args.model}.json")
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
