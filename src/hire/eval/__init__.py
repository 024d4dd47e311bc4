from hire.eval.bytes import bytes_per_token
from hire.eval.quality import evaluate, perplexity

__all__ = ["bytes_per_token", "evaluate", "perplexity"]
