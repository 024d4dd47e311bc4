"""HiRE: high-recall approximate top-k for faster LLM decoding."""

from hire.calibrate.prepare import prepare_model
from hire.config import FFNConfig, HeadConfig, HiReConfig
from hire.engine import Engine
from hire.models import load_model
from hire.patch import sparsify_, unsparsify_

__version__ = "0.1.0"
__all__ = ["Engine", "FFNConfig", "HeadConfig", "HiReConfig", "load_model", "prepare_model", "sparsify_", "unsparsify_", "__version__"]
