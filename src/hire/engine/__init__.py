"""A fast decode loop for HiRE: static KV cache, dense prefill, one-token decode steps.

The engine runs a model loaded by :func:`hire.load_model` (the architectures ``hire.arch`` gives
an ``EngineSpec``: Llama, Mistral, Qwen2, Qwen3, Gemma 3), cast to 16 bits where that is faster, with
the same HiReLMHead / HiReFFN layers as the patched Hugging Face model (their decode-time
layout, see ``prepare_decode``). A decode step is one native call (``plan.py`` builds it from
per-layer decode plans; the eager step is its reference). ``hire=False`` runs the dense weights
of the same engine, so dense and HiRE are compared on equal terms. ``BatchDecoder`` runs several
sequences' tokens in one step (a KV cache slot each), for serving.
"""

from hire.engine.batch import BatchDecoder, UnionStats
from hire.engine.engine import Engine
from hire.engine.sampling import sample

__all__ = ["BatchDecoder", "Engine", "UnionStats", "sample"]
