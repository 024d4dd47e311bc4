"""GGUF models run in their own block formats: ``load_quantized`` (a Hugging Face model whose
matrices are ``QLinear``/``QEmbedding`` over ``QTensor`` codes) and the formats' layout."""

from hire.quant.formats import FORMATS, SUPPORTED
from hire.quant.load import LoadReport, UnsupportedGGUF, load_quantized, quantized_matrices, set_act_bits
from hire.quant.tensor import QEmbedding, QLinear, QTensor, reference_qaxpy, reference_qgemv, reference_quantize_x

__all__ = ["FORMATS", "SUPPORTED", "LoadReport", "QEmbedding", "QLinear", "QTensor", "UnsupportedGGUF",
           "load_quantized", "quantized_matrices", "reference_qaxpy", "reference_qgemv", "reference_quantize_x",
           "set_act_bits"]
