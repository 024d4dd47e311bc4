"""hire.calibrate.prepare.load_for_decode: the one loading preamble of bench, eval, generate and serve."""

from hire.calibrate.prepare import load_for_decode
from hire.config import FFNConfig, HeadConfig, HiReConfig
from hire.quant.tensor import QLinear
from hire.recommended import quantized_config
from test_quant import write_gguf

CONFIG = HiReConfig(head=HeadConfig(proxy="int8", k=8, candidates=64), ffn=FFNConfig(density=0.5))  # no fitting


def _quantized(model) -> bool:
    return any(isinstance(m, QLinear) for m in model.modules())


def test_a_gguf_runs_in_its_codes_with_the_config_adapted(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(path)
    codes = load_for_decode(str(path), CONFIG, progress=False)
    assert codes.quantized and _quantized(codes.model)
    assert codes.config == quantized_config(CONFIG) and not codes.config.ffn.enabled
    dense = load_for_decode(str(path), None, progress=False)
    assert dense.quantized and dense.config is None and dense.head_proxy is None


def test_a_hugging_face_directory_is_never_quantized(model_dir):
    for quantized in (True, False):  # (this tiny GGUF has no tokenizer to dequantize it with: the float path here)
        prepared = load_for_decode(model_dir, CONFIG, quantized=quantized, progress=False)
        assert not prepared.quantized and not _quantized(prepared.model) and prepared.config == CONFIG
