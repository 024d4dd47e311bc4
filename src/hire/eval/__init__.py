from hire.eval.bytes import bytes_per_token
from hire.eval.quality import evaluate

__all__ = ["bytes_per_token", "evaluate"]
