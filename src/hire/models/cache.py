"""GGUF files converted once into a verified cache.

A GGUF file is converted once (transformers dequantizes it to float32) and cached as a
safetensors state dict + config + tokenizer, so later loads take seconds. A cache entry is
written to a temporary folder and renamed into place only when complete (``hire.files.atomic_dir``),
with a manifest of its files' sizes and sha256; an entry that fails the check is rebuilt, never used.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from hire.arch import apply_rope_freqs
from hire.errors import OverwriteError
from hire.files import atomic_dir, source_key, verify_cache, write_manifest
from hire.paths import cache_dir

log = logging.getLogger("hire")

CACHE_FORMAT = 2  # 2: a GGUF's RoPE frequency factors (rope_freqs) kept on the config (copies made before lack them)


def check_gguf(path: Path) -> None:
    """Clear errors for a missing, truncated or non-GGUF file before transformers sees it."""
    from hire.quant.load import check_gguf_header

    check_gguf_header(path)
    try:
        from gguf import GGUFReader

        GGUFReader(str(path))
    except Exception as err:  # gguf raises assorted errors on truncated files
        raise ValueError(f"{path} is a corrupt or truncated GGUF file ({type(err).__name__}: {err}); re-download it") from err


def _rope_freqs(gguf: Path):
    """The GGUF's RoPE frequency factors (its ``rope_freqs.weight``, Llama 3.1 and later), or None."""
    import numpy as np
    from gguf import GGUFReader

    for t in GGUFReader(str(gguf)).tensors:
        if t.name == "rope_freqs.weight":
            return np.array(t.data, dtype=np.float32).reshape(-1)
    return None


def _cache_key(gguf: Path) -> str:
    return source_key(gguf, CACHE_FORMAT)


def convert_gguf(gguf: Path, out: Path) -> None:
    """Write ``gguf`` as a Hugging Face model directory (config, tokenizer, float32 safetensors) into ``out``."""
    from safetensors.torch import save_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from hire.quant.load import UnsupportedGGUF, complete_file_config, register_gguf_architectures

    check_gguf(gguf)
    register_gguf_architectures()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        file_config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        if file_config.model_type in ("gemma2", "olmo2"):  # what transformers' table leaves out
            from gguf import GGUFReader

            complete_file_config(file_config, GGUFReader(gguf), gguf)  # before the modules read it
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, config=file_config,
                                                     dtype=torch.float32)
    except UnsupportedGGUF:
        raise  # its own message (a file HiRE refuses), not transformers'
    except Exception as err:
        raise ValueError(f"transformers could not load {gguf} ({type(err).__name__}: {err})") from err
    config = model.config
    if hasattr(config, "quantization_config"):  # the weights are dequantized now
        del config.quantization_config
    factors = _rope_freqs(gguf)
    if factors is not None:  # kept on the config (config.rope_freqs); load_dir applies them again
        apply_rope_freqs(model, factors)
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    save_model(model, str(out / "model.safetensors"))  # drops the tied duplicate of the head


def _write_manifest(entry: Path, source: Path) -> None:
    write_manifest(entry, source, CACHE_FORMAT)


def gguf_cache_dir(gguf: Path) -> Path:
    """The converted copy of ``gguf``, converted (or rebuilt when corrupt) if needed."""
    gguf = Path(gguf)
    if not gguf.is_file():
        raise FileNotFoundError(f"GGUF file {gguf} does not exist")
    entry = cache_dir("models") / _cache_key(gguf)
    rebuild = entry.exists()
    if rebuild:
        problem = verify_cache(entry)
        if problem is None:
            return entry
        log.warning("cache %s is unusable (%s); rebuilding it", entry, problem)
    log.warning("converting %s (first load; cached in %s)", gguf.name, entry)
    try:
        with atomic_dir(entry, replace=rebuild) as tmp:  # the entry appears complete or not at all
            convert_gguf(gguf, tmp)
            _write_manifest(tmp, gguf)
    except OverwriteError:
        if verify_cache(entry) is not None:
            raise
        log.warning("%s was converted by another process meanwhile; using that copy", entry)
    return entry
