"""Loading a packaged GGUF in its block codes: warm load time and resident memory, each model in a
fresh process. After the imports, the tokenizer is loaded first (``tokenizer_rss``), then
``hire.quant.load_quantized`` runs with that tokenizer handed back to it (``model_rss``: the
model's weights and modules, against the GGUF file's size); ``seconds`` is a whole warm load.

    .venv/bin/python benchmarks/quant_load.py        # ~1 min warm; writes benchmarks/quant_load.json
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, time
import torch, transformers, accelerate, gguf, numpy  # noqa: F401  (imports before the first reading)
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401
from hire.models.builtin import BUILTIN_MODELS
from hire.quant import load_quantized
from hire.quant.load import _meta_dir

def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))

path = BUILTIN_MODELS[sys.argv[1]].locate()
meta = _meta_dir(path)  # written by a first load
before = rss()
tokenizer = AutoTokenizer.from_pretrained(meta, local_files_only=True)
tokenizer_rss = rss() - before
original = AutoTokenizer.from_pretrained
AutoTokenizer.from_pretrained = lambda *args, **kwargs: tokenizer  # load_quantized reuses it
before = rss()
model, _, report = load_quantized(path)
model_rss = rss() - before
del model
AutoTokenizer.from_pretrained = original
t = time.perf_counter()
load_quantized(path)
print(json.dumps({"model_rss": model_rss, "tokenizer_rss": tokenizer_rss, "seconds": time.perf_counter() - t,
                  "weight_bytes": report.weight_bytes, "file_bytes": report.file_bytes, "formats": report.formats}))
"""


def child(model: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, model], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    results = {}
    for model in ("smollm2-135m", "gemma3-270m"):
        r = min((child(model) for _ in range(2)), key=lambda r: r["seconds"])
        r["model_rss_vs_file"] = r["model_rss"] / r["file_bytes"]
        r["weight_bytes_vs_file"] = r["weight_bytes"] / r["file_bytes"]
        results[model] = r
        print(model, {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}, flush=True)
    out = Path(__file__).with_suffix(".json")
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
