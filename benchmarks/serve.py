"""`hire serve` under load: total tokens/s and per-request latency at 1, 2, 4 and 8 concurrent
streams, dense vs HiRE, each model's two servers up side by side and measured in turns (dense,
HiRE, dense, HiRE, ...) so that both see the same machine. Every request is a greedy streamed
completion through the official ``openai`` client; the servers' /health gives the HiRE unions (how
many head rows a step computes for its batch) and the prefill cost.

    .venv/bin/python benchmarks/serve.py                      # both packaged models, JSON beside this file
    .venv/bin/python benchmarks/serve.py --models smollm2-135m --streams 1 8 --rounds 1

Writes benchmarks/serve_<model>.json and prints a table per model.
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
    def __init__(self, model: str, dense: bool, slots: int, context: int, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [HIRE, "serve", "--model", model, "--port", str(self.port), "--slots", str(slots),
                "--context", str(context)] + (["--dense"] if dense else [])
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    p.add_argument("--streams", nargs="+", type=int, default=[1, 2, 4, 8])
    p.add_argument("--tokens", type=int, default=64, help="max_tokens per request (default 64)")
    p.add_argument("--rounds", type=int, default=2, help="measurements per mode and concurrency (default 2)")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--out", type=Path, default=Path(__file__).parent, help="directory for serve_<model>.json")
    args = p.parse_args()
    for model in args.models:
        report = run_model(model, args.streams, args.tokens, args.rounds, args.context)
        (args.out / f"serve_{model}.json").write_text(json.dumps(report, indent=1))
        show(report)


if __name__ == "__main__":
    main()
