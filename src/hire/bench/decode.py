"""`hire bench`: dense vs HiRE decode speed in one engine, interleaved, medians.

Rounds alternate dense, HiRE, dense, HiRE... after a warm-up of each, so drift of a shared,
noisy machine hits both alike. Speed is decode tokens/s (the first token, which comes from the
prefill, is excluded). Bytes per token are the weights each decode step reads (hire.eval.bytes);
achieved bandwidth = bytes x tokens/s, the roofline number that matters for decoding.
"""

from __future__ import annotations

import statistics
from contextlib import contextmanager
import time
from collections import defaultdict

import torch
from torch import nn

from hire.engine import Engine
from hire.eval.bytes import bytes_per_token


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


@contextmanager
def _timed_parts(engine: Engine):
    """Seconds spent in the engine's attention, FFN and head calls while the block runs (the CPU
    runs operators synchronously, so perf_counter around a call is its cost)."""
    spent: dict[str, float] = defaultdict(float)
    for method, part in (("_attention", "attention"), ("_ffn", "ffn"), ("logits", "head")):
        fn = getattr(engine, method)

        def wrapper(*args, _fn=fn, _part=part, **kwargs):
            t = time.perf_counter()
            out = _fn(*args, **kwargs)
            spent[_part] += time.perf_counter() - t
            return out

        setattr(engine, method, wrapper)
    try:
        yield spent
    finally:
        for method in ("_attention", "_ffn", "logits"):
            delattr(engine, method)  # back to the class's methods


def part_times(engine: Engine, prompt: torch.Tensor, tokens: int, hire: bool) -> dict[str, float]:
    """Milliseconds per decode step in the head, the FFNs, attention and the rest; the prefill's
    share is measured alone and taken out."""
    with _timed_parts(engine) as full:
        stats = engine.generate(prompt, tokens, hire=hire)
    with _timed_parts(engine) as prefill:
        engine.generate(prompt, 1, hire=hire)
    steps = max(stats.new_tokens - 1, 1)
    out = {part: 1000 * (full[part] - prefill[part]) / steps for part in ("head", "ffn", "attention")}
    out["other"] = max(0.0, 1000 * stats.decode_s / steps - sum(out.values()))
    return out


def op_overhead(engine: Engine, prompt: torch.Tensor, tokens: int, hire: bool) -> dict[str, float]:
    """Per decode step: wall time vs time inside aten operators (torch.profiler); the difference
    is Python and dispatch overhead."""
    from torch.profiler import ProfilerActivity, profile

    engine.generate(prompt, 1, hire=hire)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        stats = engine.generate(prompt, tokens, hire=hire)
        wall = time.perf_counter() - t
    prefill = stats.prefill_s
    ops = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e6
    steps = max(stats.new_tokens - 1, 1)
    ops_decode = max(0.0, ops - prefill)  # approximate: the prefill is almost all operator time
    return {
        "ms_per_token_profiled": 1000 * (wall - prefill) / steps,
        "ms_in_ops_per_token": 1000 * ops_decode / steps,
        "ms_overhead_per_token": 1000 * max(0.0, (wall - prefill) - ops_decode) / steps,
    }


def _decode_rate(run, tokens: int) -> float:
    """Decode tokens/s of ``run(n) -> tokens generated``: a warm-up, then the time of a one-token run
    (prompt + first token) is taken off an n-token run."""
    run(4)
    t = time.perf_counter()
    run(1)
    first = time.perf_counter() - t
    t = time.perf_counter()
    produced = run(tokens)
    return (produced - 1) / max(time.perf_counter() - t - first, 1e-9)


def transformers_tokens_per_s(model: nn.Module, prompt: torch.Tensor, tokens: int) -> float:
    """The same model through transformers' eager generate() (greedy), decode tokens/s."""
    ids = prompt.reshape(1, -1)

    def run(n: int) -> int:
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return out.shape[1] - ids.shape[1]

    return _decode_rate(run, tokens)


def llama_cpp_tokens_per_s(gguf_path, prompt_text: str, tokens: int) -> dict:
    """llama.cpp on the same GGUF (only when llama-cpp-python is installed)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return {"available": False, "reason": "llama-cpp-python is not installed (pip install llama-cpp-python)"}
    llm = Llama(model_path=str(gguf_path), n_ctx=1024, n_threads=torch.get_num_threads(), verbose=False)

    def run(n: int) -> int:
        return llm(prompt_text, max_tokens=n, temperature=0.0)["usage"]["completion_tokens"]

    return {"available": True, "tokens_per_s": _decode_rate(run, tokens)}


def run_bench(
    engine: Engine,
    prompt: torch.Tensor,
    *,
    tokens: int = 64,
    rounds: int = 5,
    warmup: int = 1,
    breakdown: bool = True,
    progress: bool = True,
) -> dict:
    """Dense vs HiRE in ``engine``: interleaved rounds, median decode tokens/s and the rest."""
    from tqdm.auto import tqdm

    for _ in range(warmup):
        engine.generate(prompt, tokens, hire=False)
        engine.generate(prompt, tokens, hire=True)
    speeds: dict[str, list[float]] = {"dense": [], "hire": []}
    for _ in tqdm(range(rounds), desc="bench rounds (dense, HiRE)", disable=not progress):
        d = engine.generate(prompt, tokens, hire=False)
        h = engine.generate(prompt, tokens, hire=True)
        speeds["dense"].append(d.tokens_per_s)
        speeds["hire"].append(h.tokens_per_s)
    agreement = sum(a == b for a, b in zip(d.token_ids, h.token_ids)) / len(d.token_ids)
    first_diff = next((i for i, (a, b) in enumerate(zip(d.token_ids, h.token_ids)) if a != b), None)
    nbytes = bytes_per_token(engine.model)  # 16-bit weights, proxies as stored
    dense_b, hire_b = nbytes["dense"], nbytes["hire"]
    tps_d, tps_h = _median(speeds["dense"]), _median(speeds["hire"])
    ideal = dense_b["total"] / hire_b["total"]
    result = {
        "prompt_tokens": int(prompt.numel()),
        "new_tokens": tokens,
        "rounds": rounds,
        "dtype": str(engine.dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "tokens_per_s_dense": tps_d,
        "tokens_per_s_hire": tps_h,
        "tokens_per_s_dense_rounds": speeds["dense"],
        "tokens_per_s_hire_rounds": speeds["hire"],
        "ms_per_token_dense": 1000 / tps_d,
        "ms_per_token_hire": 1000 / tps_h,
        "speedup": tps_h / tps_d,
        "bytes_per_token_dense": dense_b["total"],
        "bytes_per_token_hire": hire_b["total"],
        "bandwidth_gb_s_dense": dense_b["total"] * tps_d / 1e9,
        "bandwidth_gb_s_hire": hire_b["total"] * tps_h / 1e9,
        "ideal_speedup": ideal,
        "fraction_of_ideal": (tps_h / tps_d) / ideal,
        "bytes_dense": dense_b,
        "bytes_hire": hire_b,
        "greedy_agreement_last_round": agreement,
        "first_divergence": first_diff,
        "hire_kernels": engine.kernel_report(),
    }
    if breakdown:
        result["ms_per_part_dense"] = part_times(engine, prompt, tokens, hire=False)
        result["ms_per_part_hire"] = part_times(engine, prompt, tokens, hire=True)
        result["overhead_dense"] = op_overhead(engine, prompt, tokens, hire=False)
        result["overhead_hire"] = op_overhead(engine, prompt, tokens, hire=True)
    return result


def plot_bench(result: dict, path: str) -> None:
    """Bar chart: ms per decoded token by part, and bytes per token by part, dense vs HiRE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    parts = ["head", "ffn", "attention", "other"]
    for ax, key_d, key_h, unit, title in (
        (axes[0], "ms_per_part_dense", "ms_per_part_hire", "ms / token", "decode time per token"),
        (axes[1], "bytes_dense", "bytes_hire", "MiB / token", "weights read per token"),
    ):
        if key_d not in result:
            ax.set_visible(False)
            continue
        div = 2**20 if unit.startswith("MiB") else 1
        bottom_d = bottom_h = 0.0
        for i, part in enumerate(parts):
            dv = result[key_d].get(part, 0) / div + (result[key_d].get("embedding", 0) / div if part == "other" and div > 1 else 0)
            hv = result[key_h].get(part, 0) / div + (result[key_h].get("embedding", 0) / div if part == "other" and div > 1 else 0)
            color = f"C{i}"
            ax.bar(0, dv, bottom=bottom_d, color=color, label=part)
            ax.bar(1, hv, bottom=bottom_h, color=color)
            bottom_d += dv
            bottom_h += hv
        ax.set_xticks([0, 1], ["dense", "HiRE"])
        ax.set_ylabel(unit)
        ax.set_title(title)
    visible = [ax for ax in axes if ax.get_visible()]
    visible[0].legend(loc="upper right")
    fig.suptitle(
        f"{result.get('model', '')}: {result['tokens_per_s_dense']:.1f} -> {result['tokens_per_s_hire']:.1f} tokens/s "
        f"({result['speedup']:.2f}x; ideal from bytes {result['ideal_speedup']:.2f}x)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
