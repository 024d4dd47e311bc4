from hire.layers.ffn import FFNWeights, HiReFFN
from hire.layers.head import HiReLMHead

__all__ = ["FFNWeights", "HiReFFN", "HiReLMHead"]
