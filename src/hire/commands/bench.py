"""`hire bench`: decode tokens/s, dense vs HiRE, in one engine (with --tp: over P ranks)."""

from __future__ import annotations

import argparse
import json

from hire.bench.decode import bench_model
from hire.commands import _tp
from hire.commands._args import DTYPES, add_act_bits, add_force, add_json, add_model_args, build_config, integer
from hire.system import set_threads

HELP = "decode tokens/s, dense vs HiRE, in one engine"
DESCRIPTION = ("Dense vs HiRE decode speed in the same engine and run: interleaved rounds after a warm-up, medians; "
               "bytes per token, achieved bandwidth against the machine's read bandwidth (measured in the same run), "
               "the ideal speedup from bytes and the fraction reached, a per-part breakdown (ms, GB/s) and the "
               "Python/dispatch overhead; our prefill of --prefill-tokens tokens; --llama-cpp adds llama.cpp's own "
               "C++ llama-bench (decode tg and prefill pp) on the same GGUF and threads, each test on each of its builds "
               "(with and without AMX where the CPU has it) every round, the best build as the outside anchor.")
DEFAULT_PROMPT = "The king's daughter walked alone by the river, and as the evening fell she began to sing"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the prompt decoding starts from")
    p.add_argument("--tokens", type=integer(minimum=2), default=64,
                   help="new tokens per round (default 64; the first comes from the prefill, so at least 2)")
    p.add_argument("--rounds", type=integer(minimum=1), default=5, help="interleaved dense/HiRE rounds (default 5)")
    p.add_argument("--warmup", type=integer(minimum=0), default=1, help="untimed rounds before them (default 1)")
    p.add_argument("--threads", type=integer(minimum=1), default=None,
                   help="torch threads (default: all cores; with --tp, cores / TP per rank)")
    p.add_argument("--dtype", default="float16", choices=DTYPES,
                   help="weights in the engine (default float16; the residual stream stays float32)")
    p.add_argument("--dequantized", action="store_true",
                   help="run a GGUF model dequantized to --dtype (the default runs it in its GGUF block codes, "
                        "with the HiRE head only)")
    add_act_bits(p)
    p.add_argument("--no-breakdown", action="store_true", help="skip the per-part timing and the profile")
    p.add_argument("--vs-transformers", action="store_true", help="also time transformers' eager generate()")
    p.add_argument("--prefill-tokens", type=integer(minimum=0), default=512,
                   help="time our prefill of a prompt this long in every round (default 512, as llama-bench's pp512; "
                        "0: skip)")
    p.add_argument("--context", type=integer(minimum=0), default=0,
                   help="decode after this many tokens of context (the prompt repeated to that length; llama-bench's "
                        "tg runs at the same depth, -d): the speed a long chat or document sees, where attention reads "
                        "the KV cache (default 0: after the prompt alone)")
    p.add_argument("--llama-cpp", action="store_true",
                   help="also run llama.cpp's llama-bench (C++, no Python in its loop) on the same GGUF and threads in "
                        "every round: tg --tokens and pp --prefill-tokens, each on each cached build (with and without "
                        "AMX where the CPU has it; the best that runs a test is the figure); built once into the cache "
                        "if not found (see --llama-bench)")
    p.add_argument("--llama-bench", metavar="PATH", default=None,
                   help="the llama-bench binary for --llama-cpp (implies it; the only build run; default: $HIRE_LLAMA_BENCH, "
                        "else the cached builds, else build them from the llama-cpp-python sdist's llama.cpp)")
    p.add_argument("--llama-cpp-reps", type=integer(minimum=1), default=1,
                   help="llama-bench repetitions per round (-r; default 1: the rounds give the median)")
    p.add_argument("--plot", help="write a PNG of the breakdown (with --tp: tokens/s and collectives per mode)")
    add_force(p)
    add_json(p)
    _tp.add_tp_args(p)


def run(args: argparse.Namespace) -> int:
    config = build_config(args)
    args.llama_cpp = args.llama_cpp or args.llama_bench is not None  # a path is a request too (and --tp refuses it)
    if args.tp is not None:
        return _tp.run(args, config)
    set_threads(args.threads)
    result = bench_model(args.model, config, prompt=args.prompt, tokens=args.tokens, rounds=args.rounds,
                         warmup=args.warmup, dtype=args.dtype, breakdown=not args.no_breakdown,
                         vs_transformers=args.vs_transformers, llama_cpp=args.llama_cpp,
                         llama_bench=args.llama_bench, llama_cpp_repetitions=args.llama_cpp_reps,
                         prefill_tokens=args.prefill_tokens, context=args.context, seq_len=args.seq_len,
                         calib_windows=args.calib_windows, plot=args.plot, force=args.force, progress=not args.json,
                         quantized=not args.dequantized, act_bits=args.act_bits)
    print(json.dumps(result, indent=2) if args.json else format_bench(result))
    return 0


def weights_label(r: dict) -> str:
    if r.get("weights") != "gguf":
        return r["dtype"]
    return "gguf" if r.get("act_bits", 16) == 16 else f"gguf, int{r['act_bits']} activations"


def format_bench(r: dict) -> str:
    mb = 1 / 2**20
    lines = [
        f"model {r['model']}, {weights_label(r)}, {r['threads']} threads: {r['new_tokens']} new tokens after "
        + (f"{r['context_tokens']} tokens of context (the prompt repeated)" if r.get("context_tokens")
           else f"a {r['prompt_tokens']}-token prompt")
        + f", {r['rounds']} interleaved rounds (medians)",
        "",
        f"{'':22s} {'dense':>10s} {'HiRE':>10s}",
        f"{'decode tokens/s':22s} {r['tokens_per_s_dense']:10.1f} {r['tokens_per_s_hire']:10.1f}   speedup {r['speedup']:.2f}x",
        f"{'ms per token':22s} {r['ms_per_token_dense']:10.2f} {r['ms_per_token_hire']:10.2f}",
        f"{'MiB read per token':22s} {r['bytes_per_token_dense'] * mb:10.1f} {r['bytes_per_token_hire'] * mb:10.1f}"
        f"   ideal speedup {r['ideal_speedup']:.2f}x, reached {100 * r['fraction_of_ideal']:.0f} %",
        f"{'achieved GB/s':22s} {r['bandwidth_gb_s_dense']:10.2f} {r['bandwidth_gb_s_hire']:10.2f}"
        f"   machine {r['machine_gb_s']:.1f} GB/s (dense reaches {100 * r['dense_vs_machine_gb_s']:.0f} %)",
    ]
    if r.get("context_tokens"):
        lines.append(f"{'KV cache MiB per token':22s} {r['kv_cache_bytes_per_token'] * mb:10.1f} "
                     f"{r['kv_cache_bytes_per_token'] * mb:10.1f}   read by attention at this depth, besides the "
                     "weights (not in the bytes or GB/s above)")
    if "parts" in r:
        lines += format_parts(r)
    if "ms_per_part_dense" in r:
        od, oh = r["overhead_dense"], r["overhead_hire"]
        lines.append(f"{'Python/dispatch ms':22s} {od['ms_overhead_per_token']:10.2f} {oh['ms_overhead_per_token']:10.2f}"
                     "   (wall time outside operators, torch.profiler)")
        lines.append(f"{'FFN GB/s':22s} {r['ffn_gb_s_dense']:10.2f} {r['ffn_gb_s_hire']:10.2f}   HiRE at "
                     f"{100 * r['ffn_hire_vs_dense_gb_s']:.0f} % of dense; attention takes "
                     f"{r['attention_ms_vs_bytes']:.2f}x its bytes' time at the dense FFN's GB/s")
    if "tokens_per_s_transformers" in r:
        lines.append(f"transformers generate(): {r['tokens_per_s_transformers']:.1f} tokens/s (float32, eager); "
                     f"dense engine is {r['engine_dense_vs_transformers']:.2f}x that")
    if "prefill_tokens_per_s" in r:
        lines.append(f"prefill of {r['prefill_tokens']} tokens: {r['prefill_tokens_per_s']:.1f} tokens/s (dense, "
                     f"to the first logits)")
    if "llama_cpp" in r:
        lines += format_llama_cpp(r)
    lines.append(f"greedy tokens identical, dense vs HiRE: {100 * r['greedy_agreement_last_round']:.0f} % "
                 f"(kernels {r['hire_kernels']})")
    return "\n".join(lines)


def _cell(value, spec: str, width: int) -> str:
    return f"{'-':>{width}s}" if value is None else f"{value:{width}{spec}}"


def format_parts(r: dict) -> list[str]:
    """The per-part table (``r["parts"]``): per token, ms, MiB read and GB/s, dense and HiRE, then the
    machine's read bandwidth and, for a GGUF, the file's tensor bytes against the bytes read."""
    mb = 1 / 2**20
    d, h = r["parts"]["dense"], r["parts"]["hire"]
    lines = ["", f"{'per part, per token':22s} {'ms dense':>9s} {'ms HiRE':>9s} {'MiB dense':>10s} {'MiB HiRE':>10s} "
                 f"{'GB/s dense':>10s} {'GB/s HiRE':>10s}"]
    names = {"other": "embedding row+other", "total": "total (breakdown run)"}
    for part in d:
        lines.append(f"{names.get(part, part):22s} {_cell(d[part]['ms'], '.2f', 9)} {_cell(h[part]['ms'], '.2f', 9)} "
                     f"{d[part]['bytes'] * mb:10.2f} {h[part]['bytes'] * mb:10.2f} "
                     f"{_cell(d[part]['gb_s'], '.2f', 10)} {_cell(h[part]['gb_s'], '.2f', 10)}")
    line = f"machine read bandwidth {r['machine_gb_s']:.1f} GB/s (a 512 MiB read, same run)"
    if r.get("file_tensor_bytes") is not None:
        line += f"; file tensors {r['file_tensor_bytes'] * mb:.2f} MiB"
        ratio = r.get("bytes_read_over_file")
        if ratio:
            line += f", read per token / file: dense {ratio['dense']:.3f}x, HiRE {ratio['hire']:.3f}x (dense target <= 1.05x)"
    if r.get("file_note"):
        line += f" ({r['file_note']})"
    lines.append(line)
    return lines


def _rounds(values: list[float]) -> str:
    return ", ".join(f"{v:.1f}" for v in values)


def _variants(test: dict) -> str:
    """Every build's median on one test, or how it failed: 'amx 201.0, noamx: crashed (SIGSEGV)'."""
    parts = []
    for name, v in test["variants"].items():
        if "failed" in v:
            f = v["failed"]
            parts.append(f"{name}: cannot run it here ({f.get('signal', 'exit ' + str(f['exit']))})")
        else:
            parts.append(f"{name} {v['tokens_per_s']:.1f}")
    return ", ".join(parts)


def format_llama_cpp(r: dict) -> list[str]:
    """The llama.cpp lines of the report: per test the best build's median and rounds (and every build's
    median), our ratios to the best, the builds and the best builds' commands."""
    lc = r["llama_cpp"]
    if not lc.get("available"):
        return [f"llama.cpp: {lc['reason']}"]
    depth = f" @ d{r['context_tokens']}" if r.get("context_tokens") else ""
    tg_label = f"tg{lc['tg_tokens']}{depth} tokens/s"
    tests = lc["tests"]
    lines = [
        "",
        f"llama.cpp llama-bench, {lc['threads']} threads, each test on each build every round (the best build's "
        "median; per round in brackets):",
        f"{tg_label:22s} {lc['tg_tokens_per_s']:10.1f}   "
        f"[{_rounds(lc['tg_tokens_per_s_rounds'])}]  best: {lc['tg_variant']} of {_variants(tests['tg'])}",
        f"{'dense / llama.cpp':22s} {lc['dense_vs_llama_cpp']:10.2f}x  [{_rounds(r['tokens_per_s_dense_rounds'])} tokens/s dense]",
        f"{'HiRE / llama.cpp':22s} {lc['hire_vs_llama_cpp']:10.2f}x  [{_rounds(r['tokens_per_s_hire_rounds'])} tokens/s HiRE]",
    ]
    if "pp_tokens_per_s" in lc:
        lines.append(f"{'pp' + str(lc['pp_tokens']) + ' tokens/s':22s} {lc['pp_tokens_per_s']:10.1f}   "
                     f"[{_rounds(lc['pp_tokens_per_s_rounds'])}]  best: {lc['pp_variant']} of {_variants(tests['pp'])}")
    if "prefill_vs_llama_cpp" in lc:
        lines.append(f"{'our prefill / pp':22s} {lc['prefill_vs_llama_cpp']:10.2f}x  "
                     f"[{_rounds(r['prefill_tokens_per_s_rounds'])} tokens/s ours]")
    for name, b in lc["builds"].items():
        lines.append(f"build {name}: {b.get('source', '?')}, commit {b.get('build_commit', b.get('commit', '?'))}, "
                     f"SIMD {'+'.join(b['simd']) if b.get('simd') else 'unknown'}")
    for test, t in tests.items():
        lines.append(f"command ({test}, best): {' '.join(t['command'])}")
    return lines
