"""A >= 1B GGUF to measure decode speed on: random weights in a real Qwen2.5-1.5B's shapes, Q4_K_M
(or another llama.cpp file type: ``--type Q3_K_M``, ``IQ4_XS``, ...).

Speed needs no trained weights: a decode step reads every matrix whatever its values (dense), and
HiRE's head and selection cost the same on random rows; only HiRE's *quality* (recall, agreement)
needs a trained model, and those figures are not measured on this file. The file is:

- arch qwen2 with Qwen2.5-1.5B's shapes: hidden 1536, FFN 8960, 28 layers, vocabulary 151,936,
  12 query / 2 KV heads of dim 128, rope theta 1e6, RMSNorm eps 1e-6, q/k/v biases, a head tied to
  the embedding (as Qwen2.5-1.5B has: no output.weight);
- weights normal with std 0.02 (a trained model's scale: nothing overflows in float16), norms 1;
- a real byte-level BPE tokenizer (SmolLM2's 49,152 tokens and merges, from the packaged
  smollm2-135m GGUF) padded with unused tokens to 151,936, which llama.cpp and transformers both read;
- written as F16 with the ``gguf`` package, then quantized to Q4_K_M (``--type``) by llama.cpp's
  llama-quantize (hire.bench.llama_cpp finds or builds it), into the hire cache (not git).

    .venv/bin/python benchmarks/synthetic_gguf.py            # -> <hire cache>/gguf/synthetic-qwen2.5-1.5b-Q4_K_M.gguf
    .venv/bin/python benchmarks/synthetic_gguf.py --type IQ4_XS   # -> ...-IQ4_XS.gguf
    .venv/bin/hire bench --model <that path> --llama-cpp --head-proxy lowrank --head-rank 128 --head-candidates 2048 \
        --head-train-steps 0 --calib-windows 4      # docs/llama-cpp.md
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, LlamaFileType, TokenType

from hire.bench.llama_cpp import find_tools
from hire.files import atomic_path
from hire.models import BUILTIN_MODELS
from hire.paths import cache_dir

# Qwen2.5-1.5B's config.json (hidden_size, intermediate_size, num_hidden_layers, vocab_size,
# num_attention_heads, num_key_value_heads, rope_theta, rms_norm_eps, max_position_embeddings)
SHAPES = dict(hidden=1536, ffn=8960, layers=28, vocab=151936, heads=12, kv_heads=2, rope_theta=1e6, eps=1e-6,
              context=32768)
STD = 0.02
NAME = "synthetic-qwen2.5-1.5b"


def default_path(ftype: str = "Q4_K_M") -> Path:
    return cache_dir("gguf") / f"{NAME}-{ftype}.gguf"


def tokenizer_fields(vocab: int) -> dict:
    """A real byte-level BPE vocabulary (the packaged SmolLM2's) padded to ``vocab`` with unused tokens."""
    reader = GGUFReader(str(BUILTIN_MODELS["smollm2-135m"].locate()))

    def strings(key: str) -> list[str]:
        field = reader.fields[key]
        return [bytes(field.parts[i]).decode("utf-8") for i in field.data]

    def scalar(key: str) -> int:
        field = reader.fields[key]
        return int(field.parts[field.data[0]][0])

    tokens, merges = strings("tokenizer.ggml.tokens"), strings("tokenizer.ggml.merges")
    types = [int(reader.fields["tokenizer.ggml.token_type"].parts[i][0]) for i in reader.fields["tokenizer.ggml.token_type"].data]
    if len(tokens) > vocab:
        raise ValueError(f"the source vocabulary has {len(tokens)} tokens, more than {vocab}")
    pad = vocab - len(tokens)
    return {
        "tokens": tokens + [f"<|unused_{i}|>" for i in range(pad)],
        "types": types + [int(TokenType.UNUSED)] * pad,
        "merges": merges,
        "bos": scalar("tokenizer.ggml.bos_token_id"),
        "eos": scalar("tokenizer.ggml.eos_token_id"),
        "unk": scalar("tokenizer.ggml.unknown_token_id"),
    }


def tensor_shapes(s: dict) -> list[tuple[str, tuple[int, ...], bool]]:
    """(GGUF name, numpy shape (rows, cols), is a matrix) in llama.cpp's qwen2 naming."""
    d, f, hd = s["hidden"], s["ffn"], s["hidden"] // s["heads"]
    kv = s["kv_heads"] * hd
    out = [("token_embd.weight", (s["vocab"], d), True), ("output_norm.weight", (d,), False)]
    for i in range(s["layers"]):
        b = f"blk.{i}."
        out += [
            (b + "attn_norm.weight", (d,), False),
            (b + "attn_q.weight", (d, d), True), (b + "attn_q.bias", (d,), False),
            (b + "attn_k.weight", (kv, d), True), (b + "attn_k.bias", (kv,), False),
            (b + "attn_v.weight", (kv, d), True), (b + "attn_v.bias", (kv,), False),
            (b + "attn_output.weight", (d, d), True),
            (b + "ffn_norm.weight", (d,), False),
            (b + "ffn_gate.weight", (f, d), True), (b + "ffn_up.weight", (f, d), True),
            (b + "ffn_down.weight", (d, f), True),
        ]
    return out


def random_tensor(rng: np.random.Generator, name: str, shape: tuple[int, ...], matrix: bool) -> np.ndarray:
    """Matrices normal(0, STD) in float16 (generated in row blocks to bound the float32 scratch);
    norm weights 1 and biases normal(0, STD) in float32, as llama.cpp keeps 1-D tensors."""
    if not matrix:
        return np.ones(shape, np.float32) if name.endswith("norm.weight") else (rng.standard_normal(shape, np.float32) * STD)
    out = np.empty(shape, np.float16)
    step = max(1, (1 << 24) // shape[1])
    for r in range(0, shape[0], step):
        out[r : r + step] = rng.standard_normal((min(step, shape[0] - r), shape[1]), np.float32) * STD
    return out


def write_f16(path: Path, shapes: dict, seed: int) -> None:
    """The F16 GGUF, streamed tensor by tensor (the whole model is never in memory)."""
    hd = shapes["hidden"] // shapes["heads"]
    tok = tokenizer_fields(shapes["vocab"])
    w = GGUFWriter(str(path), "qwen2")
    w.add_name(NAME)
    w.add_context_length(shapes["context"])
    w.add_embedding_length(shapes["hidden"])
    w.add_block_count(shapes["layers"])
    w.add_feed_forward_length(shapes["ffn"])
    w.add_head_count(shapes["heads"])
    w.add_head_count_kv(shapes["kv_heads"])
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(shapes["rope_theta"])
    w.add_layer_norm_rms_eps(shapes["eps"])
    w.add_file_type(LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    w.add_bos_token_id(tok["bos"])
    w.add_eos_token_id(tok["eos"])
    w.add_unk_token_id(tok["unk"])
    w.add_pad_token_id(tok["eos"])
    w.add_add_bos_token(False)
    table = tensor_shapes(shapes)
    for name, shape, matrix in table:
        dtype = np.float16 if matrix else np.float32
        w.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for n, (name, shape, matrix) in enumerate(table):
        w.write_tensor_data(random_tensor(rng, name, shape, matrix))
        if matrix and name.endswith("ffn_down.weight"):
            print(f"  layer {name.split('.')[1]} written", file=sys.stderr, flush=True)
    w.close()


def make(out: Path, *, layers: int, seed: int, llama_quantize: str | None, threads: int, ftype: str = "Q4_K_M") -> Path:
    """Write the F16 model beside ``out``, quantize it to ``ftype`` into ``out`` (atomically), drop the F16."""
    tools = find_tools(llama_quantize)
    if tools.quantize is None:
        raise SystemExit(f"no llama-quantize beside {tools.bench}: build llama.cpp with python -m hire.bench.llama_cpp")
    shapes = {**SHAPES, "layers": layers}
    t0 = time.perf_counter()
    f16 = out.with_name(f".{out.stem}.f16.gguf")  # a step, not a product (~3 GB): removed whatever happens
    try:
        with atomic_path(out) as q:
            print(f"writing {NAME} (F16, {layers} layers, seed {seed}) ...", file=sys.stderr, flush=True)
            write_f16(f16, shapes, seed)
            t1 = time.perf_counter()
            print(f"quantizing to {ftype} with {tools.quantize} ...", file=sys.stderr, flush=True)
            done = subprocess.run([str(tools.quantize), str(f16), str(q), ftype, str(threads)],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"llama-quantize failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
            q.chmod(0o644)  # a model file others may read, not mkstemp's 0600
    finally:
        f16.unlink(missing_ok=True)
    print(f"{out}: {out.stat().st_size / 2**30:.2f} GiB, F16 written in {t1 - t0:.0f} s, quantized in "
          f"{time.perf_counter() - t1:.0f} s", file=sys.stderr)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="the GGUF (default: <hire cache>/gguf/...-<type>.gguf)")
    p.add_argument("--type", default="Q4_K_M", help="llama-quantize's file type (Q4_K_M, Q3_K_M, IQ4_XS, IQ4_NL, ...)")
    p.add_argument("--layers", type=int, default=SHAPES["layers"], help="decoder layers (default 28, Qwen2.5-1.5B's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--llama-quantize", default=None,
                   help="a llama-bench path whose folder holds llama-quantize (default: as hire bench --llama-cpp)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--force", action="store_true", help="replace an existing file")
    args = p.parse_args()
    out = args.out or default_path(args.type)
    if out.exists() and not args.force:
        print(f"{out} exists (--force to make it again)")
        return
    print(make(out, layers=args.layers, seed=args.seed, llama_quantize=args.llama_quantize, threads=args.threads,
               ftype=args.type))


if __name__ == "__main__":
    main()
