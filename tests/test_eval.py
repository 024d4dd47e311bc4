import pytest
import torch

import hire
from hire.config import FFNConfig, HeadConfig, HiReConfig
from hire.eval import bytes_per_token, evaluate
from tiny_models import ARCHS, FFN, VOCAB, WIDTH, make


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_k_equal_n_eval_is_lossless(arch):
    model = make(arch)
    windows = torch.randint(0, VOCAB, (2, 24))
    cfg = HiReConfig(head=HeadConfig(k=10, candidates=VOCAB, proxy="int4"), ffn=FFNConfig(density=1.0))
    r = evaluate(model, windows, cfg, progress=False)
    assert r["ppl_hire"] == pytest.approx(r["ppl_dense"], rel=1e-5)
    assert r["greedy_agreement"] == 1.0 and r["head_greedy_agreement"] == 1.0
    assert r["head_recall_at_1"] == 1.0 and r["head_recall_at_k"] == 1.0 and r["ffn_recall"] == 1.0
    assert r["positions"] == 48
    assert not hasattr(model, "hire_config")  # evaluate restores the model


def test_eval_reports_recall_and_bytes_for_realistic_settings():
    model = make("llama")
    windows = torch.randint(0, VOCAB, (2, 32))
    cfg = HiReConfig(head=HeadConfig(k=5, candidates=32, proxy="int8"), ffn=FFNConfig(density=0.5))
    r = evaluate(model, windows, cfg, progress=False)
    for key in ("model", "ppl_dense", "ppl_hire", "greedy_agreement", "head_recall_at_1", "head_recall_at_k",
                "head_greedy_agreement", "ffn_recall", "bytes_per_token_dense", "bytes_per_token_hire",
                "head_bytes_fraction"):
        assert r[key] is not None, key
    assert 0 < r["head_recall_at_k"] <= 1 and 0 < r["head_recall_at_1"] <= 1
    assert len(r["ffn_recall_per_layer"]) == 2
    # int8 head: V rows of (64 codes + 1 scale), plus 32 exact rows in 16 bits
    assert r["bytes_hire"]["head"] == VOCAB * (WIDTH + 2) + 32 * WIDTH * 2
    assert r["head_bytes_fraction"] == pytest.approx(r["bytes_hire"]["head"] / (VOCAB * WIDTH * 2))
    assert r["bytes_per_token_hire"] < r["bytes_per_token_dense"]


@pytest.mark.parametrize("arch", ARCHS)
def test_dense_bytes_count_every_weight_once(arch):
    model = make(arch)
    b = bytes_per_token(model)["dense"]
    params = {id(p): p for p in model.parameters()}.values()
    emb = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight is emb
    expected = sum(p.numel() for p in params) * 2 - (0 if tied else emb.numel() * 2) + WIDTH * 2
    assert b["total"] == expected
    assert b["head"] >= VOCAB * WIDTH * 2
    assert b["ffn"] >= 2 * 2 * WIDTH * FFN  # patched or not, same FFN count
    hire.sparsify_(model, HiReConfig(head=HeadConfig(proxy="int8", candidates=64), ffn=FFNConfig(density=0.5)))
    assert bytes_per_token(model)["dense"] == b
