"""`hire generate`: stream text from a model with HiRE (or dense, for comparison).

Architectures the engine runs decode in the engine (static KV cache, HiRE's decode path); others
go through the patched Hugging Face model's ``generate()``, which takes the same HiRE layers.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from hire.arch import engine_supported
from hire.calibrate.prepare import load_for_decode
from hire.config import HiReConfig
from hire.data import CALIBRATION_WINDOWS
from hire.engine import Engine
from hire.models.detok import Detokenizer
from hire.patch import sparsify_
from hire.quant.tensor import ACT_BITS


def stop_token_ids(tokenizer, model) -> list[int]:
    """The tokens that end a generation: the tokenizer's EOS and the model's generation config's
    (an instruct model's end of turn)."""
    ids = [tokenizer.eos_token_id]
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += extra if isinstance(extra, (list, tuple)) else [extra]
    return sorted({int(t) for t in ids if t is not None})


def codes_label(act_bits: int) -> str:
    """What a run on a GGUF's codes reports as its weights."""
    return "GGUF codes" if act_bits == ACT_BITS else f"GGUF codes, int{act_bits} activations"


def generate_text(
    model_name: str,
    config: HiReConfig | None,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    dtype: str = "float16",
    seq_len: int = 512,
    calib_windows: int = CALIBRATION_WINDOWS,
    on_text: Callable[[str], None] = lambda text: None,
    progress: bool = True,
    quantized: bool = True,
    fit: bool = True,
    act_bits: int = ACT_BITS,
) -> dict:
    """Continue ``prompt`` by up to ``max_new_tokens`` tokens with ``model_name`` under ``config``
    (``None``: dense), calling ``on_text`` with each new piece of text as it is decoded (the prompt
    itself is not repeated). Greedy at ``temperature`` 0, else sampled (``top_k``, ``top_p``, ``seed``).
    Returns what was generated and how fast: ``text``, ``new_tokens``, ``tokens_per_s``, ``seconds``,
    ``prefill_s`` (engine only) and ``backend`` ("engine" or "transformers"). ``quantized``: a GGUF
    model runs in its block codes (``quantized_config`` adapts ``config``), else dequantized; ``act_bits``:
    the width of its products' activations (``hire.quant.set_act_bits``).
    ``fit=False``: a head whose settings or proxy are not cached yet is not fitted first (minutes on a
    first run): the text comes from the dense head at once, and ``head_pending`` says why."""
    prepared = load_for_decode(model_name, config, quantized=quantized, seq_len=seq_len, calib_windows=calib_windows,
                               progress=progress, fit=fit, act_bits=act_bits)
    model, tokenizer, head_proxy, config = prepared.model, prepared.tokenizer, prepared.head_proxy, prepared.config
    pending = {"head_pending": prepared.pending} if prepared.pending else {}
    quantized = prepared.quantized
    ids = tokenizer(prompt, return_tensors="pt").input_ids[0]
    if not engine_supported(model.config.model_type):
        return {**_generate_transformers(model, tokenizer, config, head_proxy, ids, max_new_tokens=max_new_tokens,
                                         temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                         on_text=on_text), **pending}
    engine = Engine(model, config, head_proxy=head_proxy, dtype=getattr(torch, dtype),
                    max_seq_len=ids.numel() + max_new_tokens)
    detok = Detokenizer(tokenizer)  # whole characters only: a token may carry part of one

    def stream(token: int) -> None:
        piece = detok.add(token)
        if piece:
            on_text(piece)

    stop = tuple(stop_token_ids(tokenizer, model))
    stats = engine.generate(ids, max_new_tokens, hire=config is not None, temperature=temperature, top_k=top_k,
                            top_p=top_p, seed=seed, stop_ids=stop, on_token=stream)
    rest = detok.flush()
    if rest:
        on_text(rest)
    return {"backend": "engine", "weights": codes_label(act_bits) if quantized else dtype, "text": detok.text,
            "new_tokens": stats.new_tokens, "tokens_per_s": stats.tokens_per_s, "prefill_s": stats.prefill_s,
            "seconds": stats.prefill_s + stats.decode_s, **pending}


def _generate_transformers(model, tokenizer, config, head_proxy, ids: torch.Tensor, *, max_new_tokens: int,
                           temperature: float, top_k, top_p, seed: int, on_text) -> dict:
    """The patched model through transformers' generate(), streamed through ``on_text``."""
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            on_text(text)

    if config is not None:
        sparsify_(model, config, head_proxy=head_proxy)
    sampling = dict(do_sample=temperature > 0)
    if temperature > 0:
        sampling.update(temperature=temperature, top_k=top_k, top_p=top_p)
    torch.manual_seed(seed)
    start = time.perf_counter()
    out = model.generate(ids[None], max_new_tokens=max_new_tokens,
                         streamer=Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True), **sampling)
    elapsed = time.perf_counter() - start
    new = out.shape[1] - ids.numel()
    return {"backend": "transformers", "text": tokenizer.decode(out[0, ids.numel():], skip_special_tokens=True),
            "new_tokens": new, "tokens_per_s": new / elapsed, "seconds": elapsed}
