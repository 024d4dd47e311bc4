"""The native decode step against torch.compile of the engine's eager step (dense SmolLM2, float16).

The issue asked to compare a native step with torch.compile / AOTInductor of the decode step and
keep the faster. This compiles ``Engine.eager_forward`` for one token (dynamic positions, so that
one graph serves every step) and times greedy decoding with each step, in alternating rounds.

    .venv/bin/python benchmarks/compile_decode.py      # compiling takes minutes on 2 cores
"""

from __future__ import annotations

import json
import statistics
import time

import torch

from hire.engine import Engine
from hire.models import load_model

PROMPT = "The king's daughter walked alone by the river, and as the evening fell she began to sing"


def decode_rate(engine: Engine, step, ids: torch.Tensor, tokens: int) -> float:
    """Greedy dense decode tokens/s with ``step(h, pos)`` for every token after the prefill."""
    with torch.inference_mode():
        hidden = engine.forward(ids, 0, hire=False)
        token = engine.logits(hidden, False)[0].argmax(-1)
        t = time.perf_counter()
        for pos in range(ids.numel(), ids.numel() + tokens):
            hidden = step(engine.embed(token.view(1)).float(), pos)
            token = engine.logits(hidden, False)[0].argmax(-1)
        return tokens / (time.perf_counter() - t)


def main() -> None:
    model, tokenizer = load_model("smollm2-135m")
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids[0]
    engine = Engine(model, None, max_seq_len=ids.numel() + 80)
    native = engine.native_steps[False]
    compiled = torch.compile(lambda h, pos: engine.eager_forward(h, pos, hire=False), dynamic=True)
    t = time.perf_counter()
    decode_rate(engine, compiled, ids, 4)  # compiles
    compile_s = time.perf_counter() - t
    rates: dict[str, list[float]] = {"native": [], "torch.compile": [], "eager": []}
    steps = {"native": lambda h, pos: native.step(h, pos).to(engine.dtype), "torch.compile": compiled,
             "eager": lambda h, pos: engine.eager_forward(h, pos, hire=False)}
    for _ in range(3):
        for name, step in steps.items():
            rates[name].append(decode_rate(engine, step, ids, 48))
    report = {"compile_s": compile_s, **{f"tokens_per_s_{k}": statistics.median(v) for k, v in rates.items()},
              "rounds": rates}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
