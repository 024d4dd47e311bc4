"""A server's first start on a model whose head is not fitted yet: how soon it answers (dense), how long
its background fit takes to switch it to HiRE, what answers cost before and after, and the memory of
the server and its fitting child together.

Starts `hire serve --model M` with an empty $HIRE_CACHE (the built kernels and the corpus linked in
from the real cache), asks one greedy completion as soon as /health answers, then the same every
--every seconds until /health no longer says "head_pending", then --after more times with HiRE.

    .venv/bin/python benchmarks/serve_first_start.py --model qwen-coder-0.5b.gguf   # ~4 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from hire.paths import cache_root


def resident_gb(pid: int) -> float:
    """Resident memory of ``pid`` and its children, GB."""
    out = subprocess.run(["ps", "-o", "rss=", "--ppid", str(pid), "-p", str(pid)], capture_output=True, text=True)
    return sum(int(line) for line in out.stdout.split() if line.strip()) * 1024 / 1e9


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a model without recommended settings (a .gguf path)")
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--prompt", default="def reverse_string(s):")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--every", type=float, default=5.0, help="seconds between the dense answers during the fit")
    p.add_argument("--after", type=int, default=3, help="answers with HiRE after the switch")
    p.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds")
    p.add_argument("--out", help="JSON path (default: print only)")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="hire-first-start-") as cache:
        for part in ("native", "corpus"):
            if (cache_root() / part).exists():
                Path(cache, part).symlink_to(cache_root() / part)
        log = Path(cache, "serve.log")
        start = time.monotonic()
        with open(log, "w") as sink:
            server = subprocess.Popen([sys.executable, "-m", "hire", "serve", "--model", args.model, "--port",
                                       str(args.port)], stdout=sink, stderr=sink, env={**os.environ, "HIRE_CACHE": cache})
        url = f"http://127.0.0.1:{args.port}"
        ask = {"model": args.model, "prompt": args.prompt, "max_tokens": args.max_tokens, "temperature": 0}

        def answer() -> tuple[float, str]:
            t = time.monotonic()
            r = httpx.post(url + "/v1/completions", json=ask, timeout=args.timeout).json()
            return time.monotonic() - t, r["choices"][0]["text"]

        try:
            while True:
                if server.poll() is not None:
                    raise SystemExit(f"hire serve exited ({server.returncode}):\n{log.read_text()[-2000:]}")
                try:
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            up = time.monotonic() - start
            first_s, dense_text = answer()
            first_at = time.monotonic() - start
            dense, peak = [first_s], resident_gb(server.pid)
            while True:
                health = httpx.get(url + "/health", timeout=10).json()
                peak = max(peak, resident_gb(server.pid))
                if "head_pending" not in health or time.monotonic() - start > args.timeout:
                    break
                time.sleep(args.every)
                dense.append(answer()[0])
            switched = time.monotonic() - start
            after = [answer() for _ in range(args.after)]
        finally:
            server.terminate()
            server.wait(60)
        result = {"model": args.model, "health_at_s": up, "first_answer_at_s": first_at,
                  "switched_at_s": switched if "config" in health and health["config"]["head"]["enabled"] else None,
                  "head_switched_after_s": health.get("head_switched_after_s"), "head_dense": health.get("head_dense"),
                  "head": health.get("config", {}).get("head"), "dense_answer_s": dense,
                  "dense_answer_s_median": statistics.median(dense), "hire_answer_s": [s for s, _ in after],
                  "same_text": all(text == dense_text for _, text in after), "peak_resident_gb": peak,
                  "max_tokens": args.max_tokens, "log_tail": log.read_text()[-1500:]}
    print(f"/health at {up:.1f} s; first answer (dense) at {first_at:.1f} s ({first_s:.2f} s for {args.max_tokens} "
          f"tokens); {len(dense)} dense answers, median {result['dense_answer_s_median']:.2f} s")
    if result["switched_at_s"] is not None:
        head = result["head"]
        print(f"switched to HiRE at {switched:.1f} s (rank {head['rank']}, k' {head['candidates']}); HiRE answers "
              f"{', '.join(f'{s:.2f}' for s in result['hire_answer_s'])} s, same text: {result['same_text']}")
    else:
        print(f"no switch: {result['head_dense'] or 'timed out'}")
    print(f"peak resident, server and child: {peak:.2f} GB")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
