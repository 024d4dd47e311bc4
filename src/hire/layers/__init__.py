from hire.arch import FFNWeights
from hire.layers.ffn import HiReFFN
from hire.layers.head import HiReLMHead
from hire.layers.topk_ffn import TopKMLP, apply_topk_

__all__ = ["FFNWeights", "HiReFFN", "HiReLMHead", "TopKMLP", "apply_topk_"]
