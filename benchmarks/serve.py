"""`hire serve` under load: total tokens/s and per-request latency at 1, 2, 4 and 8 concurrent
streams, dense vs HiRE, each model's two servers up side by side and measured in turns (dense,
HiRE, dense, HiRE, ...) so that both see the same machine. HiRE runs with ``--dense-batch 0``
(candidates at every batch size), so the table shows the unions and where HiRE stops paying. Every request is a greedy streamed
completion through the official ``openai`` client; the servers' /health gives the HiRE unions (how
many head rows a step computes for its batch) and the prefill cost.

    .venv/bin/python benchmarks/serve.py                      # both packaged models, JSON beside this file
    .venv/bin/python benchmarks/serve.py --models smollm2-135m --streams 1 8 --rounds 1

Writes benchmarks/serve_<model>.json and prints a table per model. ``--stall N`` measures instead what
a long prompt does to running streams: three greedy streams decode while a prompt of N tokens (default
2,000) arrives; the inter-token latency of the streams while it is prefilled, against theirs before it,
with the scheduler's measured chunk sizes (``--max-stall 2``, the default) and with fixed chunks of
128 tokens (``--max-stall 0``), each a HiRE server of its own, in turns (serve_stall_<model>.json). ``--unions`` measures in process,
without HTTP, how the unions of the head's candidates and of the sparse FFNs' neurons grow with the
batch on the 16-bit (``--dequantized``) path, where the FFNs are HiRE too (serve_unions_<model>.json).
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from openai import OpenAI

HIRE = str(Path(sys.executable).with_name("hire"))
PROMPTS = [  # eight kinds of text, one per stream
    "The history of the printing press begins",
    "def merge_sort(items):\n    \"\"\"Sort a list by merging sorted halves.\"\"\"\n",
    "Q: Why is the sky blue?\nA:",
    "Dear Sir or Madam,\nI am writing to",
    "#include <stdio.h>\n\nint main(void) {\n",
    "The three most important ideas in economics are",
    "Once upon a time, in a village by the sea,",
    "Instructions: mix the flour and the water, then",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: str, dense: bool, slots: int, context: int, log: Path, extra: tuple[str, ...] = ()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [HIRE, "serve", "--model", model, "--port", str(self.port), "--slots", str(slots),
                "--context", str(context)] + (["--dense"] if dense else ["--dense-batch", "0", "--calibrate"]) + list(extra)
        self.proc = subprocess.Popen(args, stdout=open(log, "w"), stderr=subprocess.STDOUT)
        self.log = log
        deadline = time.time() + 900
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server stopped:\n{log.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        self.client = OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=600)

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=30).json()

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)


def one_request(server: Server, model: str, prompt: str, tokens: int) -> dict:
    t0 = time.perf_counter()
    first, n = None, 0
    stream = server.client.completions.create(model=model, prompt=prompt, max_tokens=tokens, temperature=0,
                                              stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text and first is None:
            first = time.perf_counter() - t0
        if chunk.usage is not None:
            n = chunk.usage.completion_tokens
    total = time.perf_counter() - t0
    return {"ttft_s": first if first is not None else total, "latency_s": total, "tokens": n}


def load(server: Server, model: str, streams: int, tokens: int) -> dict:
    """``streams`` concurrent requests (each its own prompt); what the server did for them."""
    before = server.health()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        reqs = list(pool.map(lambda i: one_request(server, model, PROMPTS[i % len(PROMPTS)], tokens), range(streams)))
    wall = time.perf_counter() - t0
    after = server.health()
    steps = after["union"]["steps"] - before["union"]["steps"]
    out = {"wall_s": wall, "tokens": sum(r["tokens"] for r in reqs), "requests": reqs,
           "tokens_per_s": sum(r["tokens"] for r in reqs) / wall,
           "ttft_s_median": statistics.median(r["ttft_s"] for r in reqs),
           "latency_s_median": statistics.median(r["latency_s"] for r in reqs),
           "per_request_tokens_per_s": statistics.median(r["tokens"] / r["latency_s"] for r in reqs)}
    if steps:  # HiRE: the head rows the batch's steps computed (sums over this load only)
        b, a = before["union"], after["union"]
        union = (a.get("head_union_mean", 0) * a["steps"] - b.get("head_union_mean", 0) * b["steps"]) / steps
        out["head_union_mean"] = union
        out["head_union_share"] = union / (a["head_union_mean"] / a["head_union_share"])
        out["head_dense_steps"] = a["head_dense_steps"] - b["head_dense_steps"]
        out["mean_batch"] = (a["mean_batch"] * a["steps"] - b["mean_batch"] * b["steps"]) / steps
    prefills = after["loop"]["prefills"] - before["loop"]["prefills"]
    out["prefill_ms_mean"] = (after["loop"]["prefill_ms_mean"] * after["loop"]["prefills"]
                              - before["loop"]["prefill_ms_mean"] * before["loop"]["prefills"]) / max(prefills, 1)
    return out


def run_model(model: str, streams: list[int], tokens: int, rounds: int, context: int) -> dict:
    logs = Path(tempfile.mkdtemp(prefix="hire-serve-bench-"))
    servers = {"dense": Server(model, True, max(streams), context, logs / "dense.log"),
               "hire": Server(model, False, max(streams), context, logs / "hire.log")}
    try:
        for s in servers.values():  # warm: first requests pay for lazy set-up
            load(s, model, 2, 8)
        results = {mode: {str(n): [] for n in streams} for mode in servers}
        for n in streams:
            for _ in range(rounds):
                for mode, server in servers.items():  # A B A B on the same machine
                    results[mode][str(n)].append(load(server, model, n, tokens))
        info = {mode: s.health() for mode, s in servers.items()}
    finally:
        for s in servers.values():
            s.stop()
    table = []
    for n in streams:
        row = {"streams": n}
        for mode in servers:
            runs = results[mode][str(n)]
            row[mode] = {k: statistics.mean(r[k] for r in runs) for k in runs[0] if k != "requests"}
        row["speedup"] = row["hire"]["tokens_per_s"] / row["dense"]["tokens_per_s"]
        table.append(row)
    return {"model": model, "tokens_per_request": tokens, "rounds": rounds, "context": context,
            "machine_threads": _threads(), "hire_config": info["hire"].get("config"),
            "kernels": info["hire"].get("kernels"), "weights": info["hire"].get("weights"),
            "table": table, "runs": results}


def _timed_stream(server: Server, model: str, prompt: str, tokens: int, times: list[float]) -> None:
    """A greedy streamed completion; the arrival time of each chunk with text into ``times``."""
    for chunk in server.client.completions.create(model=model, prompt=prompt, max_tokens=tokens, temperature=0,
                                                  stream=True):
        if chunk.choices and chunk.choices[0].text:
            times.append(time.perf_counter())


def _long_prompt(model: str, n: int) -> str:
    """About ``n`` tokens of held-out prose (the corpus's evaluation split) in ``model``'s tokenizer."""
    from transformers import AutoTokenizer

    from hire.data import load_corpus
    from hire.models.load import resolve

    tok = AutoTokenizer.from_pretrained(resolve(model))
    ids = tok(load_corpus().text("evaluation"), add_special_tokens=False).input_ids[:n]
    return tok.decode(ids)


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def stall_once(server: Server, model: str, long_prompt: str, streams: int = 3, tokens: int = 200) -> dict:
    """``streams`` greedy streams; once each has 16 tokens, the long prompt arrives. Their inter-token
    intervals before it, and while it is prefilled (until its first token)."""
    times: list[list[float]] = [[] for _ in range(streams)]
    with ThreadPoolExecutor(streams + 1) as pool:
        running = [pool.submit(_timed_stream, server, model, PROMPTS[i], tokens, times[i]) for i in range(streams)]
        while min(len(t) for t in times) < 16:
            time.sleep(0.005)
        sent = time.perf_counter()
        first: list[float] = []
        pool.submit(_timed_stream, server, model, long_prompt, 4, first).result()
        for r in running:
            r.result()
    done = first[0] if first else time.perf_counter()
    before = [b - a for t in times for a, b in zip(t, t[1:]) if b < sent]
    during = [b - a for t in times for a, b in zip(t, t[1:]) if sent <= b <= done]
    unloaded = statistics.median(before)
    return {"unloaded_itl_ms": 1000 * unloaded, "unloaded_itl_p99_ms": 1000 * _percentile(before, 0.99),
            "loaded_itl_p50_ms": 1000 * statistics.median(during), "loaded_itl_p99_ms": 1000 * _percentile(during, 0.99),
            "loaded_itl_max_ms": 1000 * max(during), "p99_over_unloaded": _percentile(during, 0.99) / unloaded,
            "long_prompt_ttft_s": done - sent, "intervals_during": len(during)}


def run_stall(model: str, prompt_tokens: int, rounds: int) -> dict:
    logs = Path(tempfile.mkdtemp(prefix="hire-serve-stall-"))
    long_prompt = _long_prompt(model, prompt_tokens)
    settings = {"max_stall_1": ("--max-stall", "1"), "max_stall_2": ("--max-stall", "2"), "chunk_128": ("--max-stall", "0")}
    servers = {name: Server(model, False, 4, prompt_tokens + 300, logs / f"{name}.log", extra) for name, extra
               in settings.items()}
    try:
        for s in servers.values():
            load(s, model, 2, 8)
        runs = {name: [] for name in servers}
        for _ in range(rounds):
            for name, server in servers.items():  # in turns on the same machine
                runs[name].append(stall_once(server, model, long_prompt))
    finally:
        for s in servers.values():
            s.stop()
    summary = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    return {"model": model, "prompt_tokens": prompt_tokens, "streams": 3, "rounds": rounds,
            "machine_threads": _threads(), "settings": {k: list(v) for k, v in settings.items()},
            "summary": summary, "runs": runs}


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def show(report: dict) -> None:
    print(f"\n{report['model']} ({report['weights']}), {report['tokens_per_request']} tokens per request, "
          f"{report['rounds']} rounds, mean")
    print(f"{'streams':>7} | {'dense tok/s':>11} {'HiRE tok/s':>10} {'HiRE/dense':>10} | {'TTFT ms d/H':>13} "
          f"{'latency s d/H':>14} | {'head union':>10} {'share':>6} {'prefill ms':>10}")
    for row in report["table"]:
        d, h = row["dense"], row["hire"]
        print(f"{row['streams']:>7} | {d['tokens_per_s']:>11.1f} {h['tokens_per_s']:>10.1f} {row['speedup']:>9.2f}x | "
              f"{1000 * d['ttft_s_median']:>6.0f}/{1000 * h['ttft_s_median']:<6.0f} "
              f"{d['latency_s_median']:>6.2f}/{h['latency_s_median']:<6.2f} | "
              f"{h.get('head_union_mean', 0):>10.0f} {h.get('head_union_share', 0):>6.3f} "
              f"{h['prefill_ms_mean']:>10.0f}")


def unions(model: str, steps: int = 16) -> dict:
    """Head and FFN unions per batch size, 16-bit weights with the recommended HiRE config (greedy)."""
    import torch

    from hire.engine import UnionStats
    from hire.recommended import recommended_config
    from hire.serve import load_service

    service = load_service(model, recommended_config(model), slots=8, context=256, quantized=False,
                           dense_batch=None, dense_above=1.0, progress=False)
    decoder = service.scheduler.decoder
    tok = service.tokenizer
    out = {"model": model, "weights": service.info["weights"], "config": service.info["config"], "batches": {}}
    ffn = decoder.engine.ffns[0]
    for batch in (1, 2, 4, 8):
        slots = [decoder.acquire() for _ in range(batch)]
        tokens, positions = [], []
        for slot, prompt in zip(slots, PROMPTS):
            ids = torch.tensor(tok(prompt).input_ids)
            logits, idx = decoder.logits(decoder.prefill(slot, ids), True)
            tokens.append(int(idx[0, logits.argmax(-1)]) if idx is not None else int(logits.argmax(-1)))
            positions.append(ids.numel())
        seconds = {True: 0.0, False: 0.0}
        decoder.stats = UnionStats()
        for i in range(2 * steps):  # HiRE and dense steps in turns (A B A B), the HiRE ones decoding
            hire = i % 2 == 0
            t0 = time.perf_counter()
            hidden = decoder.step(torch.tensor(tokens), positions, slots, hire)
            logits, idx = decoder.logits(hidden, hire)
            seconds[hire] += time.perf_counter() - t0
            if hire:
                best = logits.argmax(-1)
                tokens = (idx.gather(-1, best[:, None])[:, 0] if idx is not None else best).tolist()
                positions = [p + 1 for p in positions]
        st = decoder.stats.summary(decoder.vocab_size)
        out["batches"][str(batch)] = {
            **st, "ffn_neurons": ffn.weights.neurons, "ffn_kept_per_row": ffn.keep_groups * ffn.config.group_size,
            "ffn_union_share": st.get("ffn_union_mean", 0) / ffn.weights.neurons,
            "tokens_per_s": batch * steps / seconds[True], "dense_tokens_per_s": batch * steps / seconds[False]}
        for slot in slots:
            decoder.release(slot)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    p.add_argument("--streams", nargs="+", type=int, default=[1, 2, 4, 8])
    p.add_argument("--tokens", type=int, default=64, help="max_tokens per request (default 64)")
    p.add_argument("--rounds", type=int, default=2, help="measurements per mode and concurrency (default 2)")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--unions", action="store_true", help="measure the head and FFN unions in process (16-bit path)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent, help="directory for serve_<model>.json")
    p.add_argument("--stall", type=int, nargs="?", const=2000, default=None, metavar="TOKENS",
                   help="measure running streams' inter-token latency while a prompt of TOKENS (2000) is prefilled")
    args = p.parse_args()
    if args.stall:
        for model in args.models:
            report = run_stall(model, args.stall, args.rounds)
            (args.out / f"serve_stall_{model}.json").write_text(json.dumps(report, indent=1))
            print(f"\n{model}: 3 streams while a {args.stall}-token prompt is prefilled (medians of {args.rounds} rounds)")
            for name, r in report["summary"].items():
                print(f"  {name}: unloaded ITL {r['unloaded_itl_ms']:.1f} ms; during the prefill p50 "
                      f"{r['loaded_itl_p50_ms']:.1f}, p99 {r['loaded_itl_p99_ms']:.1f} ms ({r['p99_over_unloaded']:.1f}x), "
                      f"max {r['loaded_itl_max_ms']:.0f} ms; the long prompt's first token after {r['long_prompt_ttft_s']:.2f} s")
        return
    if args.unions:
        for model in args.models:
            report = unions(model)
            (args.out / f"serve_unions_{model}.json").write_text(json.dumps(report, indent=1))
            print(f"\n{model} (16-bit, recommended HiRE config): unions per batch size")
            for b, r in report["batches"].items():
                print(f"  batch {b}: head union {r['head_union_mean']:.0f} ({r['head_union_share']:.3f} of the rows), "
                      f"FFN union {r['ffn_union_mean']:.0f} of {r['ffn_neurons']} neurons ({r['ffn_union_share']:.3f}; "
                      f"{r['ffn_kept_per_row']} per row); in process {r['tokens_per_s']:.0f} tok/s, dense "
                      f"{r['dense_tokens_per_s']:.0f} ({r['tokens_per_s'] / r['dense_tokens_per_s']:.2f}x)")
        return
    for model in args.models:
        report = run_model(model, args.streams, args.tokens, args.rounds, args.context)
        (args.out / f"serve_{model}.json").write_text(json.dumps(report, indent=1))
        show(report)


if __name__ == "__main__":
    main()
