"""A scaling model for tensor-parallel decoding with the three selection modes, for what one CPU
machine cannot run: P = 1..64 devices, 1B-70B models, NVLink- and ICI-class links.

Decoding one token is a sum of three costs per device:

* weights read: each device reads its 1/P of the attention, FFN and LM-head bytes (HiRE: the
  proxies, the candidates' rows and the kept rows, as ``hire.eval.bytes`` counts them) plus its
  share of the KV cache, at ``mem_gbs``;
* collectives, on the critical path: per layer an all-reduce after attention and one after the
  FFN (the hidden state, 2 bytes a value), the LM head's gather of k (value, index) pairs, and for
  the exact global top-k one gather per selection (8 bytes a pair, each rank sending its local
  top-k), modelled as ``latency * ceil(log2 P)`` per phase (two phases for an all-reduce) plus the
  ring's bytes over ``link_gbs``;
* a fixed per-layer overhead (kernel launches; 0 by default for GPU/TPU: CUDA graphs / XLA).

``fit_link`` turns timed gloo collectives (``measure_collectives``) into the same latency and
bandwidth parameters, so the model can be checked against this machine's P = 2 measurements.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import torch

from hire.distributed.comm import Comm
from hire.distributed.tp import MODES


@dataclass(frozen=True)
class ModelShape:
    name: str
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def params(self) -> float:
        attn = self.hidden * (self.heads + 2 * self.kv_heads) * self.head_dim + self.heads * self.head_dim * self.hidden
        return self.layers * (attn + 3 * self.hidden * self.intermediate) + 2 * self.vocab * self.hidden


# Llama-3-family shapes (public configs), untied head
MODELS = {
    "1B": ModelShape("1B", 16, 2048, 8192, 128256, 32, 8, 64),
    "3B": ModelShape("3B", 28, 3072, 8192, 128256, 24, 8, 128),
    "8B": ModelShape("8B", 32, 4096, 14336, 128256, 32, 8, 128),
    "70B": ModelShape("70B", 80, 8192, 28672, 128256, 64, 8, 128),
}


@dataclass(frozen=True)
class Hardware:
    name: str
    mem_gbs: float  # weight-read bandwidth per device, GB/s
    link_latency_us: float  # per collective phase (one hop of a tree / one ring start-up)
    link_gbs: float  # per-device link bandwidth for the ring's bytes, GB/s
    layer_overhead_us: float = 0.0  # fixed cost per layer per token (launches, Python)


# Inputs, not measurements: round public figures for one accelerator and its link. Change them
# with --mem-gbs / --link-latency-us / --link-gbs.
HARDWARE = {
    "nvlink": Hardware("NVLink-class (H100 SXM: HBM3 3.35 TB/s, NVLink 450 GB/s/direction, 3 us/phase)", 3350, 3.0, 450),
    "ici": Hardware("ICI-class (TPU v5e: HBM 819 GB/s, ICI 100 GB/s, 2 us/phase)", 819, 2.0, 100),
}


@dataclass(frozen=True)
class HiReShape:
    """HiRE's settings as fractions (the recommended config: FFN density 0.6 with an int4 proxy,
    cascade head: rank-64 int8 proxy, int8 rescoring of 4096, 256 exact rows, top-50)."""

    ffn_density: float = 0.6
    ffn_oversample: float = 1.0
    ffn_proxy_bits: int = 4
    head_rank: int = 64
    head_stage: int = 4096
    head_candidates: int = 256
    head_k: int = 50
    context: int = 1024  # tokens in the KV cache


def bytes_per_device(m: ModelShape, hire: HiReShape, mode: str, P: int) -> float:
    """Weights (16-bit, proxies as stored) and KV cache each device reads per token."""
    kv_per_rank = max(1.0, m.kv_heads / P)  # fewer kv heads than ranks: each rank holds (a copy of) one
    q_per_rank = m.heads / P
    attn = m.layers * m.hidden * m.head_dim * (2 * q_per_rank + 2 * kv_per_rank) * 2
    kv_cache = m.layers * 2 * kv_per_rank * m.head_dim * hire.context * 2
    inter = m.intermediate / P
    if mode == "dense":
        ffn = m.layers * 3 * m.hidden * inter * 2
        head = m.vocab / P * m.hidden * 2
    else:
        proxy = 2 * inter * m.hidden * hire.ffn_proxy_bits / 8 * (1 + 2 / 64)  # + one fp16 scale per 64
        cand = hire.ffn_density * hire.ffn_oversample * inter * 2 * m.hidden * 2
        kept = hire.ffn_density * inter * m.hidden * 2
        ffn = m.layers * (proxy + cand + kept)
        head = (m.vocab / P * hire.head_rank + hire.head_rank * m.hidden * 2  # int8 U shard, V replicated
                + hire.head_stage / P * m.hidden + hire.head_candidates / P * m.hidden * 2)
    return attn + kv_cache + ffn + head


def collectives(m: ModelShape, hire: HiReShape, mode: str, P: int) -> list[tuple[str, str, float]]:
    """(kind, op, bytes each rank sends) per token."""
    if P == 1:
        return []
    out = [("attention", "all_reduce", m.hidden * 2.0)] * m.layers + [("ffn", "all_reduce", m.hidden * 2.0)] * m.layers
    out.append(("head_topk", "all_gather", hire.head_k * 8.0))  # the final top-k (value, index) pairs
    if mode == "exact":
        inter = m.intermediate / P
        cand = math.ceil(hire.ffn_density * hire.ffn_oversample * m.intermediate)
        out += [("ffn_select", "all_gather", min(cand, inter) * 8.0)] * m.layers
        if hire.ffn_oversample > 1:
            keep = math.ceil(hire.ffn_density * m.intermediate)
            out += [("ffn_select", "all_gather", min(keep, inter) * 8.0)] * m.layers
        for count in (hire.head_stage, hire.head_candidates):  # the cascade's global selections
            out.append(("head_select", "all_gather", min(count, m.vocab / P) * 8.0))
    return out


def collective_seconds(op: str, nbytes: float, P: int, latency_s: float, link_bps: float) -> float:
    """Tree latency plus ring bandwidth: all-reduce = reduce-scatter + all-gather."""
    phases = math.ceil(math.log2(P)) if P > 1 else 0
    if op == "all_reduce":
        return 2 * phases * latency_s + 2 * (P - 1) / P * nbytes / link_bps
    return phases * latency_s + (P - 1) * nbytes / link_bps


def token_seconds(m: ModelShape, hw: Hardware, hire: HiReShape, mode: str, P: int) -> dict:
    mem = bytes_per_device(m, hire, mode, P) / (hw.mem_gbs * 1e9)
    comm = [(kind, collective_seconds(op, n, P, hw.link_latency_us * 1e-6, hw.link_gbs * 1e9))
            for kind, op, n in collectives(m, hire, mode, P)]
    comm_s = sum(t for _, t in comm)
    select_s = sum(t for kind, t in comm if kind.endswith("_select"))
    overhead = m.layers * hw.layer_overhead_us * 1e-6
    total = mem + comm_s + overhead
    return {"tokens_per_s": 1 / total, "ms_weights": 1e3 * mem, "ms_collectives": 1e3 * comm_s,
            "ms_selection_collectives": 1e3 * select_s, "collectives": len(comm), "ms_overhead": 1e3 * overhead}


def scaling_table(hardware: dict[str, Hardware], models=None, devices=(1, 2, 4, 8, 16, 32, 64),
                  hire: HiReShape = HiReShape()) -> list[dict]:
    rows = []
    for hw_key, hw in hardware.items():
        for m in models or MODELS.values():
            for P in devices:
                for mode in MODES:
                    rows.append({"hardware": hw_key, "model": m.name, "devices": P, "mode": mode,
                                 **token_seconds(m, hw, hire, mode, P)})
    return rows


# --- fitting the link on this machine ------------------------------------------------------------
def measure_collectives(comm: Comm, sizes=(8, 64, 512, 4096, 32768, 262144, 2097152), repeats: int = 30) -> dict:
    """Median seconds of an all-reduce and an all-gather of each message size (bytes, float32)."""
    out = {"all_reduce": {}, "all_gather": {}}
    for nbytes in sizes:
        t = torch.zeros(max(1, nbytes // 4))
        for op in out:
            fn = comm.all_reduce if op == "all_reduce" else comm.all_gather
            for _ in range(3):
                fn(t, "measurement")
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                fn(t, "measurement")
                times.append(time.perf_counter() - start)
            # the slowest rank sets the pace: take the max of the ranks' medians
            med = torch.tensor([statistics.median(times)], dtype=torch.float64)
            out[op][nbytes] = float(comm.all_gather(med, "measurement").max())
    return out


def fit_link(times: dict, P: int) -> dict:
    """Least-squares t = a + b * bytes for each collective, and the link parameters that the
    all-reduce fit implies under ``collective_seconds`` (latency per phase, bandwidth)."""
    fits = {}
    for op, by_size in times.items():
        x = torch.tensor([float(s) for s in by_size], dtype=torch.float64)
        y = torch.tensor(list(by_size.values()), dtype=torch.float64)
        A = torch.stack([torch.ones_like(x), x], dim=1)
        a, b = torch.linalg.lstsq(A, y.unsqueeze(1)).solution[:, 0].tolist()
        fits[op] = {"intercept_us": a * 1e6, "us_per_kib": b * 1024 * 1e6}
    phases = math.ceil(math.log2(P))
    ar = fits["all_reduce"]
    latency_us = max(ar["intercept_us"], 0.0) / (2 * phases)
    link_gbs = (2 * (P - 1) / P) / (ar["us_per_kib"] * 1e-6 / 1024) / 1e9 if ar["us_per_kib"] > 0 else float("inf")
    return {"fits": fits, "link_latency_us": latency_us, "link_gbs": link_gbs}


# --- plots ---------------------------------------------------------------------------------------
def plot_scaling(rows: list[dict], path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hws = list(dict.fromkeys(r["hardware"] for r in rows))
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(hws), figsize=(6 * len(hws), 4.6), squeeze=False)
    styles = {"dense": ":", "exact": "--", "da": "-"}
    for ax, hw in zip(axes[0], hws):
        for i, model in enumerate(models):
            for mode in MODES:
                pts = [r for r in rows if r["hardware"] == hw and r["model"] == model and r["mode"] == mode]
                ax.plot([r["devices"] for r in pts], [r["tokens_per_s"] for r in pts], styles[mode], color=f"C{i}",
                        marker="o" if mode == "da" else None, ms=3, label=f"{model} {mode}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("devices P (tensor parallel)")
        ax.set_ylabel("tokens/s (one sequence, modelled)")
        ax.set_title(hw)
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=7, ncol=len(models))
    fig.suptitle(title or "Modelled decode tokens/s: dense (dotted), exact global top-k (dashed), DA-TOP-k (solid)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_tp_bench(result: dict, path: str) -> None:
    """Measured tokens/s and collectives per token of each mode (hire bench --tp P --plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(result["modes"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    axes[0].bar(modes, [result["modes"][m]["tokens_per_s"] for m in modes], color=["C0", "C1", "C2"][: len(modes)])
    axes[0].set_ylabel("decode tokens/s (median)")
    sel = [result["modes"][m]["selection_collectives_per_token"] for m in modes]
    tot = [result["modes"][m]["collectives_per_token"] for m in modes]
    axes[1].bar(modes, [t - s for t, s in zip(tot, sel)], label="all-reduces + the head's final top-k gather")
    axes[1].bar(modes, sel, bottom=[t - s for t, s in zip(tot, sel)], label="selection gathers")
    axes[1].set_ylabel("collectives per token")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{result.get('model', '')}: tensor parallel over {result['tp']} ranks ({result.get('backend', '')})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
