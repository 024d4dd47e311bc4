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


def test_act_bits_sets_every_matrix_and_the_engine_steps_with_it(tmp_path):
    import pytest
    import torch

    from hire import native
    from hire.engine import Engine
    from hire.quant import quantized_matrices, set_act_bits

    path = tmp_path / "tiny.gguf"
    write_gguf(path)
    with pytest.raises(ValueError, match="act_bits must be 8 or 16, got 12"):
        load_for_decode(str(path), None, progress=False, act_bits=12)
    prepared = load_for_decode(str(path), None, progress=False, act_bits=8)
    widths = {q.act_bits for q in quantized_matrices(prepared.model).values()}
    assert widths == {8}
    if not native.available():
        pytest.skip(f"native kernels: {native.unavailable_reason()}")
    tokens = torch.tensor([3, 17, 5, 9, 30, 2])

    def log_probs(engine: Engine) -> torch.Tensor:
        return torch.tensor([engine.teacher_forced(tokens, hire=False, start=t, log_probs=True)[1]
                             for t in range(1, tokens.numel())])

    # the native step (widths taken when the engine is built) against the eager one (each product's
    # width read at the call, hire.quant.reference_qgemv): equal to float32 rounding for each width
    engines = {}
    for bits in (8, 16):
        set_act_bits(prepared.model, bits)
        engine = Engine(prepared.model, None, dtype=torch.float32, max_seq_len=16)
        assert engine.native_steps is not None
        fast = log_probs(engine)
        engine.native_steps = None
        torch.testing.assert_close(fast, log_probs(engine), rtol=1e-4, atol=1e-4)
        engines[bits] = fast
    assert not torch.allclose(engines[8], engines[16], rtol=1e-4, atol=1e-4)  # the width took effect
