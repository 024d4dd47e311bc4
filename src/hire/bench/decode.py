"""`hire bench`: dense vs HiRE decode speed in one engine, interleaved, medians.

Rounds alternate dense, HiRE, dense, HiRE... after a warm-up of each, so drift of a shared,
noisy machine hits both alike. Speed is decode tokens/s (the first token, which comes from the
prefill, is excluded). Bytes per token are the weights each decode step reads (hire.eval.bytes);
achieved bandwidth = bytes x tokens/s, the roofline number that matters for decoding. The report's
``parts`` joins, per mode and part, the breakdown's ms per token with the part's bytes and their
GB/s; for a GGUF model the file's tensor bytes stand against the bytes read per token.

With an outside anchor (llama.cpp's llama-bench, hire.bench.llama_cpp) each round is dense, HiRE,
our prefill of ``prefill_tokens``, then llama-bench's tg and pp tests, each on each llama.cpp build
(with and without AMX where the CPU has it), on the same GGUF and threads, so every ratio to
llama.cpp's best build is taken between figures of the same rounds.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from torch import nn

from hire import native
from hire.bench.llama_cpp import LlamaBenchRounds, find_variants
from hire.calibrate.prepare import load_for_decode
from hire.config import HiReConfig
from hire.data import CALIBRATION_WINDOWS
from hire.engine import Engine
from hire.eval.bytes import bytes_per_token, gguf_tensor_bytes
from hire.files import refuse_overwrite
from hire.models.load import gguf_source
from hire.quant import quantized_matrices
from hire.quant.tensor import ACT_BITS
from hire.plots import plot_bench


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def part_times(engine: Engine, prompt: torch.Tensor, tokens: int, hire: bool) -> dict[str, float]:
    """Milliseconds per decode step in the head, the FFNs, attention and the rest; the prefill's
    share is measured alone and taken out."""
    with engine.timed() as full:
        stats = engine.generate(prompt, tokens, hire=hire)
    with engine.timed() as prefill:
        engine.generate(prompt, 1, hire=hire)
    steps = max(stats.new_tokens - 1, 1)
    out = {part: 1000 * (full[part] - prefill[part]) / steps for part in ("head", "ffn", "attention")}
    out["other"] = max(0.0, 1000 * stats.decode_s / steps - sum(out.values()))
    return out


def op_overhead(engine: Engine, prompt: torch.Tensor, tokens: int, hire: bool) -> dict[str, float]:
    """Per decode step: wall time vs time inside operators (torch.profiler); the difference is
    Python and dispatch overhead. The prefill's operator time is profiled apart and taken out (a
    GGUF model's prefill is mostly dequantization outside operators)."""
    from torch.profiler import ProfilerActivity, profile

    engine.generate(prompt, 1, hire=hire)
    with profile(activities=[ProfilerActivity.CPU]) as first:  # the prefill's operators, counted apart
        engine.generate(prompt, 1, hire=hire)
    ops_prefill = sum(e.self_cpu_time_total for e in first.key_averages()) / 1e6
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        stats = engine.generate(prompt, tokens, hire=hire)
        wall = time.perf_counter() - t
    prefill = stats.prefill_s
    ops = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e6
    steps = max(stats.new_tokens - 1, 1)
    ops_decode = max(0.0, ops - ops_prefill)
    return {
        "ms_per_token_profiled": 1000 * (wall - prefill) / steps,
        "ms_in_ops_per_token": 1000 * ops_decode / steps,
        "ms_overhead_per_token": 1000 * max(0.0, (wall - prefill) - ops_decode) / steps,
    }


def machine_bandwidth(mib: int = 512, repeats: int = 5) -> float:
    """The machine's read bandwidth in GB/s: the best of ``repeats`` sums over a float32 buffer of
    ``mib`` MiB (far larger than the caches) on the current threads."""
    buffer = torch.ones(mib * 2**20 // 4)
    buffer.sum()  # touch every page first
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - t)
    return buffer.numel() * 4 / best / 1e9


def roofline(result: dict) -> dict:
    """What the bench's parts reach: the FFN's achieved GB/s dense and HiRE (and their ratio),
    attention's ms against its bytes at the dense FFN's bandwidth, and the dense engine's share
    of the machine's bandwidth."""
    mode_bytes = {"dense": result["bytes_dense"], "hire": result["bytes_hire"]}
    out = {}
    for mode in ("dense", "hire"):
        ms = result[f"ms_per_part_{mode}"]
        out[f"ffn_gb_s_{mode}"] = mode_bytes[mode]["ffn"] / max(ms["ffn"], 1e-9) / 1e6
    out["ffn_hire_vs_dense_gb_s"] = out["ffn_gb_s_hire"] / out["ffn_gb_s_dense"]
    attention_ideal_ms = mode_bytes["dense"]["attention"] / (out["ffn_gb_s_dense"] * 1e6)
    out["attention_ms_vs_bytes"] = result["ms_per_part_dense"]["attention"] / attention_ideal_ms
    if "machine_gb_s" in result:
        out["dense_vs_machine_gb_s"] = result["bandwidth_gb_s_dense"] / result["machine_gb_s"]
    return out


TABLE_PARTS = ("head", "ffn", "attention", "other")  # "other": the embedding's row, norms and the rest of a step


def part_table(nbytes: dict, ms: dict | None) -> dict:
    """One mode's per-part figures, ``{part: {"ms", "bytes", "gb_s"}}`` over TABLE_PARTS and
    "total": ``nbytes`` is the mode's :func:`bytes_per_token`, ``ms`` its :func:`part_times` (None:
    no breakdown, so ms and gb_s are None). The step's clock cannot tell the embedding from the rest,
    so "other" has the embedding's bytes with its own; "total" is the parts' sums (its ms: the
    breakdown run's step, not the rounds' median). gb_s = bytes / ms / 1e6, None where ms is 0 (the
    clock found no time: "other" is the step less the timed parts, floored at 0)."""
    out = {}
    for part in TABLE_PARTS:
        b = nbytes[part] + (nbytes["embedding"] if part == "other" else 0)
        out[part] = {"ms": None if ms is None else ms[part], "bytes": int(b)}
    out["total"] = {"ms": None if ms is None else sum(ms[p] for p in TABLE_PARTS),
                    "bytes": int(sum(out[p]["bytes"] for p in TABLE_PARTS))}
    for row in out.values():
        row["gb_s"] = row["bytes"] / row["ms"] / 1e6 if row["ms"] else None  # None: no time measured
    return out


def file_report(gguf: Path | None, result: dict) -> dict:
    """The model file's tensor bytes against the bytes read per token: ``file_tensor_bytes`` (a
    GGUF's header, :func:`gguf_tensor_bytes`) and ``bytes_read_over_file`` per mode, the dense one
    ~1 when a step reads each weight once (target <= 1.05). None where it does not apply, with
    ``file_note``: a Hugging Face directory (no GGUF), or a GGUF run dequantized (the engine reads
    16-bit copies, not the file's codes: its tensor bytes are given, no ratio)."""
    if gguf is None:
        return {"file_tensor_bytes": None, "bytes_read_over_file": None,
                "file_note": "not a GGUF model: no file of the weights as read"}
    n = gguf_tensor_bytes(gguf)
    if result.get("weights") != "gguf":
        return {"file_tensor_bytes": n, "bytes_read_over_file": None,
                "file_note": "run dequantized: the engine reads 16-bit copies, not the file's codes"}
    return {"file_tensor_bytes": n, "bytes_read_over_file": {
        mode: result[f"bytes_per_token_{mode}"] / n for mode in ("dense", "hire")}}


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


def check_bench_counts(tokens: int, rounds: int, warmup: int) -> None:
    """A decode rate needs two tokens (the first comes from the prefill) and a median one round."""
    if tokens < 2:
        raise ValueError(f"--tokens must be >= 2 (the first token comes from the prefill), got {tokens}")
    if rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {rounds}")
    if warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {warmup}")


def prefill_rate(engine: Engine, prompt: torch.Tensor) -> float:
    """Prompt tokens/s of the engine's prefill of ``prompt`` up to the first token's logits (dense),
    what llama-bench's pp test times. # prompt: (T,) -> tokens/s"""
    with torch.inference_mode():
        t = time.perf_counter()
        hidden = engine.prefill(prompt)
        engine.logits(hidden, hire=False)[0].float().sum()  # the logits are made, not just scheduled
        return prompt.numel() / (time.perf_counter() - t)


def kv_cache_bytes_per_token(engine: Engine, start: int, tokens: int) -> float:
    """Bytes of K and V cache the attention reads per decoded token, averaged over the ``tokens`` tokens
    decoded after ``start`` tokens of context (a sliding-window layer reads its window at most): what a
    long context adds to the weights' bytes."""
    per_position = 2 * engine.k_cache.shape[1] * engine.k_cache.shape[3] * engine.k_cache.element_size()
    positions = torch.arange(start, start + tokens, dtype=torch.float64) + 1  # the keys each step attends to
    read = sum(positions.clamp(max=layer.sliding) if layer.sliding else positions for layer in engine.layers)
    return float(read.mean()) * per_position


def prefill_prompt(prompt: torch.Tensor, length: int) -> torch.Tensor:
    """``prompt`` repeated to ``length`` tokens: a prefill prompt of real tokens (speed does not depend
    on which). # prompt: (T,) -> (length,)"""
    return prompt.reshape(-1).repeat(-(-length // prompt.numel()))[:length].clone()


def anchor_report(anchor_rounds: list[dict], speeds: dict[str, list[float]], anchor) -> dict:
    """The llama.cpp part of the report from ``anchor_rounds`` (:meth:`LlamaBenchRounds.run` per
    round): per test (tg, pp) every build's figures and the best build's median and per-round
    tokens/s, and our medians over the best build's (ratios of the medians, as ``speedup``), with
    the per-round ratios beside them."""
    tests = anchor.summary(anchor_rounds)
    builds = anchor.builds(anchor_rounds)
    tg = tests["tg"]
    out = {
        "available": True,
        "threads": anchor.threads,
        "tests": tests,
        "builds": builds,
        "command": tg["command"],
        "build": builds[tg["best"]],
        "tg_tokens": tg["tokens"],
        "tg_variant": tg["best"],
        "tg_tokens_per_s": tg["tokens_per_s"],
        "tg_tokens_per_s_rounds": tg["tokens_per_s_rounds"],
        "hire_vs_llama_cpp": _median(speeds["hire"]) / tg["tokens_per_s"],
        "dense_vs_llama_cpp": _median(speeds["dense"]) / tg["tokens_per_s"],
        "hire_vs_llama_cpp_rounds": [h / t for h, t in zip(speeds["hire"], tg["tokens_per_s_rounds"])],
        "dense_vs_llama_cpp_rounds": [d / t for d, t in zip(speeds["dense"], tg["tokens_per_s_rounds"])],
    }
    if "pp" in tests:
        pp = tests["pp"]
        out.update({"pp_tokens": pp["tokens"], "pp_variant": pp["best"], "pp_tokens_per_s": pp["tokens_per_s"],
                    "pp_tokens_per_s_rounds": pp["tokens_per_s_rounds"]})
        if speeds.get("prefill"):
            out["prefill_vs_llama_cpp"] = _median(speeds["prefill"]) / pp["tokens_per_s"]
    parsed = [run for r in anchor_rounds for per in r.values() for run in per.values()]
    for key in ("model_type", "model_size", "model_n_params"):
        if parsed and key in parsed[-1]:
            out[key] = parsed[-1][key]
    return out


def run_bench(
    engine: Engine,
    prompt: torch.Tensor,
    *,
    tokens: int = 64,
    rounds: int = 5,
    warmup: int = 1,
    breakdown: bool = True,
    progress: bool = True,
    prefill_tokens: int | None = None,
    anchor=None,
) -> dict:
    """Dense vs HiRE in ``engine``: interleaved rounds, median decode tokens/s and the rest.
    ``prefill_tokens``: also time the prefill of a prompt that long in every round. ``anchor``
    (a :class:`hire.bench.llama_cpp.LlamaBenchRounds`): its tests on its builds every round after ours."""
    from tqdm.auto import tqdm

    check_bench_counts(tokens, rounds, warmup)
    long_prompt = None
    if prefill_tokens is not None:
        if prefill_tokens < 1 or prefill_tokens + 1 > engine.max_seq_len:
            raise ValueError(f"prefill_tokens must be in 1..{engine.max_seq_len - 1} (the engine's max_seq_len - 1), "
                             f"got {prefill_tokens}")
        long_prompt = prefill_prompt(prompt, prefill_tokens)

    for _ in range(warmup):
        engine.generate(prompt, tokens, hire=False)
        engine.generate(prompt, tokens, hire=True)
        if long_prompt is not None:
            prefill_rate(engine, long_prompt)
    speeds: dict[str, list[float]] = {"dense": [], "hire": [], "prefill": []}
    anchor_rounds: list[dict] = []
    parts = "dense, HiRE" + (", prefill" if long_prompt is not None else "") + (", llama.cpp" if anchor else "")
    for i in tqdm(range(rounds), desc=f"bench rounds ({parts})", disable=not progress):
        d = engine.generate(prompt, tokens, hire=False)
        h = engine.generate(prompt, tokens, hire=True)
        speeds["dense"].append(d.tokens_per_s)
        speeds["hire"].append(h.tokens_per_s)
        if long_prompt is not None:
            speeds["prefill"].append(prefill_rate(engine, long_prompt))
        if anchor is not None:
            anchor_rounds.append(anchor.run(i))
    agreement = sum(a == b for a, b in zip(d.token_ids, h.token_ids)) / len(d.token_ids)
    first_diff = next((i for i, (a, b) in enumerate(zip(d.token_ids, h.token_ids)) if a != b), None)
    nbytes = bytes_per_token(engine.model)  # 16-bit weights, proxies as stored
    dense_b, hire_b = nbytes["dense"], nbytes["hire"]
    tps_d, tps_h = _median(speeds["dense"]), _median(speeds["hire"])
    ideal = dense_b["total"] / hire_b["total"]
    result = {
        "prompt_tokens": int(prompt.numel()),
        "new_tokens": tokens,
        "kv_cache_bytes_per_token": kv_cache_bytes_per_token(engine, int(prompt.numel()), tokens),
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
        "hire_kernels": {**engine.kernel_report(), "simd": native.simd_path()},
    }
    if long_prompt is not None:
        result["prefill_tokens"] = prefill_tokens
        result["prefill_tokens_per_s"] = _median(speeds["prefill"])
        result["prefill_tokens_per_s_rounds"] = speeds["prefill"]
    if anchor is not None:
        result["llama_cpp"] = anchor_report(anchor_rounds, speeds, anchor)
    result["machine_gb_s"] = machine_bandwidth()
    result["dense_vs_machine_gb_s"] = result["bandwidth_gb_s_dense"] / result["machine_gb_s"]
    if breakdown:
        result["ms_per_part_dense"] = part_times(engine, prompt, tokens, hire=False)
        result["ms_per_part_hire"] = part_times(engine, prompt, tokens, hire=True)
        result["overhead_dense"] = op_overhead(engine, prompt, tokens, hire=False)
        result["overhead_hire"] = op_overhead(engine, prompt, tokens, hire=True)
        result.update(roofline(result))
    result["parts"] = {mode: part_table(nbytes[mode], result.get(f"ms_per_part_{mode}")) for mode in ("dense", "hire")}
    return result


def bench_model(
    model_name: str,
    config: HiReConfig,
    *,
    prompt: str,
    tokens: int = 64,
    rounds: int = 5,
    warmup: int = 1,
    dtype: str = "float16",
    breakdown: bool = True,
    vs_transformers: bool = False,
    llama_cpp: bool = False,
    llama_bench: str | Path | None = None,
    llama_cpp_repetitions: int = 1,
    prefill_tokens: int = 512,
    context: int = 0,
    seq_len: int = 512,
    calib_windows: int = CALIBRATION_WINDOWS,
    plot: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
    quantized: bool = True,
    act_bits: int = ACT_BITS,
) -> dict:
    """`hire bench`: load ``model_name`` (with the head proxy ``config`` needs, fitted on
    ``calib_windows`` windows of ``seq_len`` tokens), optionally time transformers' generate() on it,
    then :func:`run_bench` in an engine of ``dtype`` weights (with the prefill of ``prefill_tokens``
    tokens, 0: none); ``context`` > 0: decoding starts after that many tokens (the prompt repeated to that
    length; llama-bench's tg at that depth); ``llama_cpp``: llama.cpp's llama-bench (``llama_bench``: its path, else the
    builds found or built by hire.bench.llama_cpp, the best of them per test) on the same GGUF, in the
    same rounds; a breakdown PNG at ``plot``.
    Returns the report (the JSON of ``hire bench``). ``quantized``: a GGUF model runs in its block
    codes (``quantized_config`` adapts ``config``), else dequantized to ``dtype``; ``act_bits``: the
    width of its products' activations (``hire.quant.set_act_bits``)."""
    check_bench_counts(tokens, rounds, warmup)
    if prefill_tokens < 0:
        raise ValueError(f"--prefill-tokens must be >= 0 (0: no prefill timing), got {prefill_tokens}")
    if context < 0:
        raise ValueError(f"--context must be >= 0 (0: decode after the prompt alone), got {context}")
    if plot:
        refuse_overwrite(plot, force, "--plot")
    gguf = gguf_source(model_name)
    anchor, extra = None, {}
    if llama_cpp and gguf is None:
        extra["llama_cpp"] = {"available": False, "reason": "no GGUF file for this model (llama.cpp reads GGUF only)"}
    elif llama_cpp:  # found (or built) before the model loads, so a missing llama.cpp fails fast
        if llama_cpp_repetitions < 1:
            raise ValueError(f"--llama-cpp-reps must be >= 1, got {llama_cpp_repetitions}")
        anchor = LlamaBenchRounds(find_variants(llama_bench), gguf, threads=torch.get_num_threads(),
                                  n_prompt=prefill_tokens, n_gen=tokens, repetitions=llama_cpp_repetitions,
                                  depth=context)
    prepared = load_for_decode(model_name, config, quantized=quantized, seq_len=seq_len, calib_windows=calib_windows,
                               progress=progress, act_bits=act_bits)
    model, tokenizer, head_proxy, config = prepared.model, prepared.tokenizer, prepared.head_proxy, prepared.config
    quantized = prepared.quantized
    ids = tokenizer(prompt, return_tensors="pt").input_ids[0]
    if context:
        ids = prefill_prompt(ids, context)
    if vs_transformers:  # before the engine casts and patches the model
        extra["tokens_per_s_transformers"] = transformers_tokens_per_s(model, ids, tokens)
    max_seq_len = max(ids.numel() + tokens, prefill_tokens) + 1
    engine = Engine(model, config, head_proxy=head_proxy, dtype=getattr(torch, dtype), max_seq_len=max_seq_len)
    result = {"model": model_name, "config": config.to_dict(), "weights": "gguf" if quantized else dtype,
              "context_tokens": context}
    if quantized:
        result["weight_formats"] = sorted({q.format for q in quantized_matrices(model).values()})
        result["act_bits"] = act_bits
    result.update(run_bench(engine, ids, tokens=tokens, rounds=rounds, warmup=warmup, breakdown=breakdown,
                            progress=progress, prefill_tokens=prefill_tokens or None, anchor=anchor))
    result.update(file_report(gguf, result))
    result.update(extra)
    if "tokens_per_s_transformers" in result:
        result["engine_dense_vs_transformers"] = result["tokens_per_s_dense"] / result["tokens_per_s_transformers"]
    if plot:
        plot_bench(result, plot)
        result["plot"] = str(plot)
    return result
