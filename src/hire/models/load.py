"""load_model: a built-in name, a local Hugging Face directory or a GGUF file -> (model, tokenizer)."""

from __future__ import annotations

from pathlib import Path

import torch

from hire.arch import apply_rope_freqs
from hire.layers.topk_ffn import apply_saved_topk_
from hire.models.builtin import BUILTIN_MODELS, DEFAULT_MODEL
from hire.models.cache import gguf_cache_dir


def load_dir(path: Path, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` from a Hugging Face model directory, offline, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
    hf_logging.disable_progress_bar()  # a cached load takes seconds; its bars are noise
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    except Exception as err:
        raise ValueError(f"could not load the model in {path} ({type(err).__name__}: {err})") from err
    if getattr(model.config, "rope_freqs", None):  # a GGUF's RoPE frequency factors (convert_gguf kept them)
        apply_rope_freqs(model, model.config.rope_freqs)
    apply_saved_topk_(model)  # a model trained with top-k FFNs runs them (config.hire_topk)
    model.eval()
    return model, tokenizer


def resolve(name_or_path: str) -> Path:
    """A loadable directory for a built-in name, a local HF directory or a .gguf file."""
    if name_or_path in BUILTIN_MODELS:
        return gguf_cache_dir(BUILTIN_MODELS[name_or_path].locate())
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        return gguf_cache_dir(path)
    if path.is_dir():
        return path
    raise ValueError(
        f"unknown model {name_or_path!r}: use a built-in name ({', '.join(BUILTIN_MODELS)}), "
        "a local Hugging Face model directory, or a .gguf file"
    )


def gguf_source(name_or_path: str) -> Path | None:
    """The GGUF file behind a built-in name or a .gguf path (None for a Hugging Face directory)."""
    if name_or_path in BUILTIN_MODELS:
        return BUILTIN_MODELS[name_or_path].locate()
    path = Path(name_or_path).expanduser()
    return path if path.suffix == ".gguf" else None


def load_model(name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, *, quantized: bool = False):
    """Load ``(model, tokenizer)`` offline, in eval mode. ``quantized``: a GGUF model keeps its
    matrices in their block codes (hire.quant.load_quantized); otherwise, and for Hugging Face
    directories, the weights are float (a GGUF is dequantized once, cached)."""
    if quantized:
        source = gguf_source(name_or_path)
        if source is not None:
            from hire.quant import load_quantized

            model, tokenizer, _ = load_quantized(source, dtype=dtype)
            return model, tokenizer
    return load_dir(resolve(name_or_path), dtype)
