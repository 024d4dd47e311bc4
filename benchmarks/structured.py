"""What structured output costs: decode tokens/s with and without a JSON schema, dense and HiRE.

``hire serve`` (the recommended HiRE head, or ``--dense``; started as benchmarks/serve.py starts it), one
request at a time: the same
prompts asked for plain text and for a JSON schema (``response_format`` json_schema, llguidance's
mask on every step), greedy. Tokens/s is completion tokens (``usage``) over the wall time from the
first piece of text to the last (prefill excluded), medians over the prompts; the schema's outputs are checked to parse
and validate.

    .venv/bin/python benchmarks/structured.py --model smollm2-135m   # ~2 min
    .venv/bin/python benchmarks/structured.py --model gemma3-270m    # ~3 min

Writes ``benchmarks/structured_<model>.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import tempfile
from pathlib import Path

import httpx
import jsonschema
from serve import Server  # benchmarks/serve.py: a `hire serve` process up and its /health answering

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 60},
    "born": {"type": "integer", "minimum": 0, "maximum": 2100},
    "fields": {"type": "array", "items": {"type": "string", "maxLength": 40}, "maxItems": 4},
    "summary": {"type": "string", "maxLength": 120}},
    "required": ["name", "born", "fields", "summary"], "additionalProperties": False}
PROMPTS = ["Describe Marie Curie.", "Describe Alan Turing.", "Describe Ada Lovelace.", "Describe Isaac Newton.",
           "Describe Rosalind Franklin.", "Describe Charles Darwin."]


def run(client: httpx.Client, model: str, prompt: str, structured: bool, max_tokens: int) -> tuple[float, int, str]:
    body = {"model": model, "messages": [{"role": "user", "content": prompt + " Answer in JSON."}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    if structured:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    first = reason = None
    parts, tokens = [], 0
    with client.stream("POST", "/v1/chat/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            piece = chunk["choices"][0]["delta"].get("content") if chunk["choices"] else None
            if chunk["choices"] and chunk["choices"][0]["finish_reason"]:
                reason = chunk["choices"][0]["finish_reason"]
            if piece:
                first = first or time.perf_counter()
                parts.append(piece)
    end = time.perf_counter()
    return (tokens - 1) / (end - first) if first and tokens > 1 else 0.0, reason, "".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-tokens", type=int, default=200)
    args = parser.parse_args()
    result = {"model": args.model, "schema": SCHEMA, "max_tokens": args.max_tokens, "modes": {}}
    logs = Path(tempfile.mkdtemp(prefix="hire-structured-"))
    for mode in ("dense", "hire"):
        server = Server(args.model, mode == "dense", 1, 512, logs / f"{mode}.log")
        with httpx.Client(base_url=server.url) as client:
            run(client, args.model, PROMPTS[0], True, 8)  # warm-up: the grammar engine's tokenizer
            rates = {"text": [], "schema": []}
            valid, reasons = 0, []
            for prompt in PROMPTS:
                for kind in ("text", "schema"):
                    rate, reason, text = run(client, args.model, prompt, kind == "schema", args.max_tokens)
                    rates[kind].append(rate)
                    if kind == "schema":
                        reasons.append(reason)
                        try:
                            jsonschema.validate(json.loads(text), SCHEMA)
                            valid += 1
                        except (json.JSONDecodeError, jsonschema.ValidationError):
                            pass
            med = {k: statistics.median(v) for k, v in rates.items()}
            result["modes"][mode] = {"tokens_per_s": rates, "median": med, "schema_over_text": med["schema"] / med["text"],
                                     "valid": valid, "finish_reasons": reasons, "requests": len(PROMPTS)}
        server.stop()
        print(f"{mode}: text {med['text']:.1f}, schema {med['schema']:.1f} tokens/s "
              f"({med['schema'] / med['text']:.2f}x); {valid} of {len(PROMPTS)} outputs valid (finish reasons {reasons})", flush=True)
    out = Path(__file__).parent / f"structured_{args.model}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
