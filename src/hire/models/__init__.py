"""Loading models: the packaged defaults (``builtin``), a GGUF file converted once into a verified
cache (``cache``), or a local Hugging Face directory (``load``)."""

from hire.models.builtin import BUILTIN_MODELS, DEFAULT_MODEL, GEMMA_PARTS, BuiltinModel, ModelPackageMissing
from hire.files import MANIFEST, verify_cache
from hire.models.cache import CACHE_FORMAT, check_gguf, convert_gguf, gguf_cache_dir
from hire.models.load import load_dir, load_model, resolve

__all__ = [
    "BUILTIN_MODELS", "CACHE_FORMAT", "DEFAULT_MODEL", "GEMMA_PARTS", "MANIFEST", "BuiltinModel", "ModelPackageMissing",
    "check_gguf", "convert_gguf", "gguf_cache_dir", "load_dir", "load_model", "resolve", "verify_cache",
]
