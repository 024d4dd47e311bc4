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

import dataclasses
import json
import math
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from hire.distributed.comm import Comm, launch, launched_by_torchrun, tp_group
from hire.distributed.tp import MODES
from hire.files import atomic_write_json, refuse_overwrite
from hire.plots import plot_scaling


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


# --- checking the fit against a measured run -----------------------------------------------------
def check_against_bench(path: str | Path, fit: dict) -> dict:
    """Measured vs modelled on this machine: the collectives a `hire bench --tp P --json` run (the
    file at ``path``) counted, timed with the fitted link (``fit_link``'s result), against the time
    the run measured per token."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--measured {path} does not exist: pass a `hire bench --tp P --json` result")
    try:
        bench = json.loads(path.read_text())
        P = bench["tp"]
        modes = bench["modes"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"--measured {path} is not a `hire bench --tp P --json` result ({type(err).__name__}: {err})") from err
    out = {"bench": str(path), "model": bench.get("model"), "tp": P, "modes": {}}
    for mode, m in modes.items():
        modelled = 0.0
        for kind, count in m["collectives_per_token_by_kind"].items():
            per = m["bytes_exchanged_per_token_by_kind"][kind] / count
            op = "all_reduce" if kind in ("attention", "ffn") else "all_gather"
            modelled += count * collective_seconds(op, per, P, fit["link_latency_us"] * 1e-6, fit["link_gbs"] * 1e9)
        out["modes"][mode] = {"measured_ms_per_token": m["ms_per_token"], "modelled_ms_collectives": 1e3 * modelled,
                              "collectives_per_token": m["collectives_per_token"]}
    single = bench.get("single_process_tokens_per_s", {}).get("dense")
    if single and "dense" in modes and modes["dense"]["collectives_per_token"]:
        # what a collective really costs inside the decode loop: the measured step minus this rank's share of
        # the one-process step, over the collectives (it includes waiting for the other rank)
        d = modes["dense"]
        out["effective_ms_per_collective"] = (d["ms_per_token"] - 1000 / single / P) / d["collectives_per_token"]
    if "exact" in out["modes"] and "da" in out["modes"]:
        e, d = out["modes"]["exact"], out["modes"]["da"]
        out["measured_ms_exact_minus_da"] = e["measured_ms_per_token"] - d["measured_ms_per_token"]
        out["modelled_ms_exact_minus_da_collectives"] = e["modelled_ms_collectives"] - d["modelled_ms_collectives"]
    return out


# --- `hire scaling` ------------------------------------------------------------------------------
def scaling_report(
    argv: list[str],
    *,
    models=tuple(MODELS),
    devices=(1, 2, 4, 8, 16, 32, 64),
    custom: dict | None = None,
    measure: bool = True,
    tp: int = 2,
    repeats: int = 30,
    timeout: float = 300.0,
    measured: str | Path | None = None,
    out: str | Path | None = None,
    plot: str | Path | None = None,
    force: bool = False,
) -> dict | int:
    """`hire scaling`: fit gloo's collectives here on ``tp`` ranks (unless ``measure`` is False), then
    model tokens/s of every mode for ``models`` (keys of MODELS) on ``devices`` and every HARDWARE,
    plus a "custom" device built from ``custom`` (``mem_gbs``, ``link_latency_us``, ``link_gbs``; the
    ones given override NVLink's). ``measured``: a bench result to check the fit against. Writes the
    whole report to ``out`` (JSON) and a plot to ``plot``.

    Outside torchrun, measuring launches ``hire argv`` on ``tp`` ranks and returns their exit status
    (an int); as a rank it returns the report on rank 0 and 0 on the others.
    """
    unknown = [n for n in models if n not in MODELS]
    if unknown or not models:
        raise ValueError(f"--models takes a comma-separated subset of {','.join(MODELS)}, got {','.join(models)!r}")
    if not devices or any(p < 1 for p in devices):
        raise ValueError(f"--devices takes positive integers, got {','.join(map(str, devices))!r}")
    if measure and tp < 2:
        raise ValueError(f"fitting the link needs --tp >= 2 ranks (or --no-measure), got --tp {tp}")
    if measured and not measure:
        raise ValueError("--measured checks the fitted link: it needs the fit (drop --no-measure)")
    for path, flag in ((out, "--out"), (plot, "--plot")):
        if path:
            refuse_overwrite(path, force, flag)
    hardware = dict(HARDWARE)
    custom = {k: v for k, v in (custom or {}).items() if v is not None}
    if custom:
        hardware["custom"] = dataclasses.replace(HARDWARE["nvlink"], name="custom (--mem-gbs/--link-latency-us/--link-gbs)",
                                                 **custom)
    result = {"assumptions": __doc__.strip(), "hire": dataclasses.asdict(HiReShape()),
              "hardware": {k: dataclasses.asdict(v) for k, v in hardware.items()},
              "models": {n: dataclasses.asdict(MODELS[n]) | {"params_b": MODELS[n].params / 1e9} for n in models}}
    if measure and not launched_by_torchrun():
        return launch(argv, tp)
    with tp_group(tp, timeout) if measure else nullcontext() as comm:  # left in a safe order on every way out
        if comm is not None:
            torch.set_num_threads(1)
            times = measure_collectives(comm, repeats=repeats)
            fit = fit_link(times, comm.world)
            result["measured_gloo"] = {"ranks": comm.world, "seconds": {op: {str(k): v for k, v in t.items()}
                                                                        for op, t in times.items()}, **fit}
            if not comm.is_main:
                return 0
            if measured:
                result["check"] = check_against_bench(measured, fit)
        rows = scaling_table(hardware, [MODELS[n] for n in models], devices)
        result["table"] = rows
        if plot:
            plot_scaling(rows, plot)
        if out:
            atomic_write_json(out, result, indent=1)
    return result
